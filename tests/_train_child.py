"""A training run in its own process, for the SIGKILL resume test.

    python tests/_train_child.py OUT_DIR DATA_ROOT EPOCHS [SLEEP_PER_BATCH_S [STACK]]

Trains the digits net with seeded random masks (50 % density) under the digits
protocol with EPOCHS epochs, and prints one JSON line with the epoch it
resumed from and the final test accuracy. SLEEP_PER_BATCH_S slows training
down so that the parent can kill it mid-run. STACK (lockstep or grouped)
trains three such nets (densities 50, 30 and 10 %) at once with
``train.train_stacked`` into OUT_DIR/<0, 1, 2>.
"""

import json
import sys

import torch

from ntksap import Masks, build_model, data, params, train

from _slow_loader import slow_down_loader

out_dir, data_root, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
sleep = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
stack = sys.argv[5] if len(sys.argv) > 5 else None
torch.set_num_threads(1)

slow_down_loader(sleep)

bundle = data.get_dataset("digits", root=data_root)
config = params.protocol("digits", epochs=epochs)


def net_and_masks(density):
    torch.manual_seed(0)
    model = build_model("digits_cnn", bundle.num_classes)
    g = torch.Generator().manual_seed(1)
    return model, Masks({n: (torch.rand(m.shape, generator=g) < density).float()
                         for n, m in Masks.ones_like(model).items()})


if stack is None:
    df = train.train(*net_and_masks(0.5), bundle, config, out_dir, seed=7, progress=False)
else:
    nets = [net_and_masks(d) for d in (0.5, 0.3, 0.1)]
    df = train.train_stacked([n for n, _ in nets], [m for _, m in nets], bundle, config, out_dir, seed=7,
                             kind=stack, progress=False)[0]
print(json.dumps({"resumed_from": df.attrs["resumed_from_epoch"], "test_top1": float(df["test_top1"].iloc[-1])}))
