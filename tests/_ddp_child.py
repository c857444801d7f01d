"""One rank of a DDP training run on CPU (gloo), for tests/test_ddp.py.

    torchrun --nproc_per_node 2 tests/_ddp_child.py OUT_DIR DATA_ROOT MASK_FILE

Trains a BatchNorm-free digits net (``digits_cnn`` with its BatchNorm layers
replaced by identities, so that a DDP run and a one-process run with the same
global batch compute the same thing) for 2 epochs on a 512/200 digits subset,
global batch 64; rank 0 reads the masks and broadcasts them. Every rank writes
``OUT_DIR/rank<r>.json`` (its masks digest, whether its pruned weights are
zero) and ``OUT_DIR/rank<r>.pt`` (its final state_dict).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ntksap import Masks, build_model, data, params, train
from ntksap.distributed import DDPHook, broadcast_masks
from ntksap.files import atomic_torch_save, atomic_write_text
from ntksap.hashing import tensor_digest


def no_bn_model():
    """digits_cnn without BatchNorm (seeded), shared with the one-process reference."""
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10)
    for i, m in enumerate(model.features):
        if isinstance(m, nn.BatchNorm2d):
            model.features[i] = nn.Identity()
    return model


def small_digits(root):
    return data.subset(data.get_dataset("digits", root=root), train=512, test=200, seed=0)


CONFIG = dict(epochs=2, milestones=(1,), batch_size=64)

if __name__ == "__main__":
    out, root, mask_file = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    bundle = small_digits(root)
    model = no_bn_model()
    masks = broadcast_masks(Masks.load(mask_file) if rank == 0 else None)
    cpu = torch.device("cpu")
    train.train(model, masks, bundle, params.protocol("digits", **CONFIG), out / "run", seed=3, device=cpu,
                progress=False, distributed=DDPHook(cpu))
    zero = all(bool((p.detach()[masks[n] == 0] == 0).all()) for n, p in model.named_parameters() if n in masks)
    atomic_torch_save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / f"rank{rank}.pt")
    atomic_write_text(json.dumps({"digest": tensor_digest(masks), "pruned_zero": zero}), out / f"rank{rank}.json")
    dist.barrier()
    dist.destroy_process_group()
