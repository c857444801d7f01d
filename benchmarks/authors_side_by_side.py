"""Our masks beside the authors' code, on the same ResNet-20 init and prune set.

Needs a checkout of their repository (GitHub YiteWang/NTK-SAP; not part of this
project), passed with ``--authors``. Builds our ResNet-20, copies its init into
their ``lottery_resnet.resnet20``, draws the prune set of
``../shared/reference/authors_layer_density.json`` (100 N(0, 1) inputs, labels
uniform in 0..9), then runs their ``prune_loop`` with their pruner and
``ntksap.prune`` with ``count_rule="authors"``, ``channels_last=False`` (and
float32 SynFlow; NTK-SAP with ``bn_mode="unperturbed_two_pass"``, their BatchNorm
passes), and prints, per iteration, the largest relative difference of
the (sum-normalised) scores and, at the end, how many mask entries differ::

    python benchmarks/authors_side_by_side.py --authors /path/to/NTK-SAP --method synflow --k 18
"""

from __future__ import annotations

import argparse
import sys

import torch

import ntksap

THEIRS = {"snip": "SNIP", "iterative_snip": "IterSNIP", "grasp": "GraSP", "synflow": "SynFlow",
          "magnitude": "Mag", "ntksap": "NTKSAP"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--authors", required=True, help="a checkout of the authors' repository")
    ap.add_argument("--method", choices=sorted(THEIRS), default="synflow")
    ap.add_argument("--k", type=int, default=4, help="density 0.8^k (default 4: 59.04 %% sparsity)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=None, help="T (default: the paper's)")
    args = ap.parse_args(argv)
    sys.path.insert(0, args.authors)
    from Models import lottery_resnet  # noqa: E402  (their code, from --authors)
    from Pruners import pruners
    from Utils import generator
    from prune import prune_loop

    T = args.iterations or ntksap.METHODS[args.method].iterations
    torch.manual_seed(args.seed)  # the reference file's order: seed, prune set, model
    x, y = torch.randn(100, 3, 32, 32), torch.randint(0, 10, (100,))
    ours = ntksap.build_model("resnet20")
    theirs = lottery_resnet.resnet20((3, 32, 32), 10)
    src = list(ours.state_dict().values())
    dst = [v for n, v in theirs.state_dict().items()  # theirs also has masks and identity-shortcut weights
           if "mask" not in n and not (n.endswith(".shortcut.weight"))]
    if len(src) != len(dst):
        raise SystemExit(f"their ResNet-20 has {len(dst)} tensors to copy, ours {len(src)}")
    with torch.no_grad():
        for d, s in zip(dst, src):
            d.copy_(s)
    pruner = getattr(pruners, THEIRS[args.method])(generator.masked_parameters(theirs, False, False, False),
                                                   ntksap_epsilon=0.01, ntksap_R=5)
    their_scores = []
    step = pruner.mask

    def record_then_mask(sparse, scope):
        their_scores.append([pruner.scores[id(p)].clone() for _, p in pruner.masked_parameters])
        step(sparse, scope)

    pruner.mask = record_then_mask
    torch.manual_seed(args.seed)
    prune_loop(theirs, torch.nn.CrossEntropyLoss(), pruner, [(x, y)], "cpu", 0.8 ** args.k, "exponential",
               "global", T, train_mode=args.method != "synflow")
    their_masks = [m.clone() for m, _ in pruner.masked_parameters]

    our_scores = []
    # NTK-SAP: their two BatchNorm passes (a statistics pass, then the scoring passes), not our one-pass default
    extra = dict(rounds=5, num_samples=100, bn_mode="unperturbed_two_pass") if args.method == "ntksap" else {}
    masks = ntksap.prune(ours, args.method, 1 - 0.8 ** args.k, data=[(x, y)], input_shape=(3, 32, 32),
                         iterations=T, seed=args.seed, count_rule="authors", channels_last=False,
                         synflow_dtype="float32", apply=False, progress=False,
                         callback=lambda t, m, s: our_scores.append(s), **extra)
    names = list(masks)
    for t, (a, b) in enumerate(zip(our_scores, their_scores), 1):
        a = torch.cat([a[n].reshape(-1).double() for n in names])
        b = torch.cat([v.reshape(-1).double() for v in b])
        a, b = a / a.sum(), b / b.sum()
        print(f"iteration {t:3d}: largest relative score difference {((a - b).abs().max() / b.abs().max()):.2e}")
    differ = int(sum((masks[n] != m).sum() for n, m in zip(names, their_masks)))
    print(f"kept: ours {masks.kept}, theirs {int(sum(m.sum() for m in their_masks))}; "
          f"mask entries that differ: {differ} of {masks.numel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
