"""Work to be killed with SIGKILL, for tests/test_faults.py.

    python tests/_fault_child.py train OUT_DIR DATA_ROOT
    python tests/_fault_child.py prune OUT_DIR

``train``: the digits net with seeded random masks (50 %), 4 epochs of the
digits protocol on a 600/200 subset, slowed by 30 ms a batch (about 1.2 s of training).
``prune``: SynFlow, 90 % sparsity, 60 iterations on the digits net; after every
iteration the masks so far go to ``OUT_DIR/mask.pt`` (``Masks.save``), the
final ones to ``OUT_DIR/final.pt``. Both print ``ready`` once imports are done
and ``done`` at the end.
"""

import sys
from pathlib import Path

import torch

import ntksap
from ntksap import Masks, build_model, data, params, train

from _slow_loader import slow_down_loader

SPARSITY, ITERATIONS = 0.9, 60


def masked_model():
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10)
    g = torch.Generator().manual_seed(1)
    masks = Masks({n: (torch.rand(m.shape, generator=g) < 0.5).float() for n, m in Masks.ones_like(model).items()})
    return model, masks


def small_digits(root):
    return data.subset(data.get_dataset("digits", root=root), train=600, test=200, seed=0)


CONFIG = dict(epochs=4, milestones=(2,))


def run_train(out, root, sleep=0.0):
    slow_down_loader(sleep)
    model, masks = masked_model()
    return train.train(model, masks, small_digits(root), params.protocol("digits", **CONFIG), out, seed=7,
                       device="cpu", progress=False)


def run_prune(callback=None):
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10)
    return ntksap.prune(model, "synflow", SPARSITY, input_shape=(1, 8, 8), iterations=ITERATIONS,
                        callback=callback, progress=False)


def prune_and_save(out):
    out.mkdir(parents=True, exist_ok=True)
    masks = run_prune(lambda it, m, s: m.save(out / "mask.pt"))
    masks.save(out / "final.pt")
    return masks


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, out = sys.argv[1], Path(sys.argv[2])
    print("ready", flush=True)
    if mode == "train":
        run_train(out, sys.argv[3], sleep=0.03)
    else:
        prune_and_save(out)
    print("done", flush=True)
