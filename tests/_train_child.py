"""A training run in its own process, for the SIGKILL resume test.

    python tests/_train_child.py OUT_DIR DATA_ROOT EPOCHS [SLEEP_PER_BATCH_S]

Trains the digits net with seeded random masks (50 % density) under the digits
protocol with EPOCHS epochs, and prints one JSON line with the epoch it
resumed from and the final test accuracy. SLEEP_PER_BATCH_S slows training
down so that the parent can kill it mid-run.
"""

import json
import sys

import torch

from ntksap import Masks, build_model, data, params, train

from _slow_loader import slow_down_loader

out_dir, data_root, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
sleep = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
torch.set_num_threads(1)

slow_down_loader(sleep)

bundle = data.get_dataset("digits", root=data_root)
torch.manual_seed(0)
model = build_model("digits_cnn", bundle.num_classes)
g = torch.Generator().manual_seed(1)
masks = Masks({n: (torch.rand(m.shape, generator=g) < 0.5).float() for n, m in Masks.ones_like(model).items()})
df = train.train(model, masks, bundle, params.protocol("digits", epochs=epochs), out_dir, seed=7, progress=False)
print(json.dumps({"resumed_from": df.attrs["resumed_from_epoch"], "test_top1": float(df["test_top1"].iloc[-1])}))
