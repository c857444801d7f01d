"""Time and peak memory of the 1000 x 1000 empirical NTK of ResNet-20
(100 noise inputs x 10 outputs): ``ntksap.ntk.empirical_ntk`` against an
independent per-output-unit backward loop (and, unless ``--no-jacrev``, a
straightforward ``torch.func.vmap(jacrev)`` + ``J @ J.T``), side by side.

Each timed call runs in a fresh child process, so its peak memory is its own:
on the CPU the process's peak resident set size minus its size just before the
call; on CUDA ``torch.cuda.max_memory_allocated`` minus the memory held
before. The implementations' runs are interleaved over ``--repeat`` rounds and
the best time is reported (the machine may be shared; with several threads a
busy CPU slows every parallel region, so ``--threads 1`` gives steadier
numbers). Every implementation is warmed up on 2 inputs first.

All three use the same BatchNorm semantics (batch statistics of the inputs,
unbiased variance, then eval mode), so their matrices must agree. The float32
ResNet-20 at initialisation amplifies rounding (its float32 NTK differs from
the float64 one by ~1e-3 relative, for every implementation), so agreement is
also checked in float64 on a few inputs, where it is exact to rounding.

    python benchmarks/ntk_speed.py                 # CPU (or CUDA when available)
    python benchmarks/ntk_speed.py --device cpu --repeat 3 --threads 1 --sparsity 0.738

The last line is ``speed-up: <loop time / ours time>x``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMPLS = ("ours", "loop", "jacrev")


# -- the two references (written independently of ntksap.ntk) --------------------------------
def _with_batch_stats(model: torch.nn.Module, x: torch.Tensor, masks=None) -> torch.nn.Module:
    """A copy of ``model`` with the masked weights zeroed, in eval mode, whose
    BatchNorm running statistics are the batch statistics of ``x`` (reset,
    momentum 1, one no-grad train-mode pass)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if masks and n in masks:
                p.mul_(masks[n].to(p.device))
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = 1.0
    m.train()
    with torch.no_grad():
        m(x)
    return m.eval()


def _column_mask(m: torch.nn.Module, masks) -> torch.Tensor | None:
    if not masks:
        return None
    p0 = next(m.parameters())
    return torch.cat([(masks[n].to(p0.device) if n in masks else torch.ones_like(p)).reshape(-1)
                      for n, p in m.named_parameters() if p.requires_grad])


def loop_ntk(model: torch.nn.Module, x: torch.Tensor, masks=None) -> torch.Tensor:
    """One autograd backward pass per output unit of each input, rows stacked
    into J (masked weights' columns zeroed), then J J^T."""
    m = _with_batch_stats(model, x, masks)
    params = [p for p in m.parameters() if p.requires_grad]
    keep = _column_mask(m, masks)
    rows = []
    for i in range(x.shape[0]):
        out = m(x[i:i + 1]).reshape(-1)
        for c in range(out.numel()):
            grads = torch.autograd.grad(out[c], params, retain_graph=c < out.numel() - 1)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    J = torch.stack(rows)
    if keep is not None:
        J *= keep
    return (J @ J.T).double()


def jacrev_ntk(model: torch.nn.Module, x: torch.Tensor, masks=None) -> torch.Tensor:
    """``vmap`` over inputs of ``jacrev`` of the per-sample network, then J J^T."""
    from torch.func import functional_call, jacrev, vmap

    m = _with_batch_stats(model, x, masks)
    params = {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}
    buffers = dict(m.named_buffers())
    keep = _column_mask(m, masks)

    def f(p, xi):
        return functional_call(m, (p, buffers), (xi.unsqueeze(0),)).reshape(-1)

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    J = torch.cat([j.reshape(j.shape[0] * j.shape[1], -1) for j in jac.values()], 1)
    if keep is not None:
        J *= keep
    return (J @ J.T).double()


# -- memory ---------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# -- one implementation in this process ---------------------------------------------------------
def run_child(impl: str, args) -> None:
    import ntksap
    from ntksap import ntk

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = ntksap.build_model(args.model, num_classes=10).to(device)
    x = torch.randn(args.n, *ntksap.default_input_shape(args.model), generator=torch.Generator().manual_seed(1))
    x = x.to(device)
    masks = random_masks(model, args.sparsity)
    fn = {"ours": lambda xs: ntk.empirical_ntk(model, xs, masks),
          "loop": lambda xs: loop_ntk(model, xs, masks),
          "jacrev": lambda xs: jacrev_ntk(model, xs, masks)}[impl]
    fn(x[:2])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        theta = fn(x)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - base
    else:  # this process's lifetime peak is the call's peak (import and warm-up are smaller)
        base = _rss_bytes()
        t0 = time.perf_counter()
        theta = fn(x)
        seconds = time.perf_counter() - t0
        peak = _peak_rss_bytes() - base
    if args.out:
        torch.save(theta.cpu(), args.out)
    print(json.dumps({"impl": impl, "seconds": seconds, "peak": peak, "device": str(device),
                      "threads": torch.get_num_threads()}))


def float64_check(args) -> float:
    """Relative Frobenius difference of ours and the loop in float64 on a few inputs."""
    import ntksap
    from ntksap import ntk

    torch.manual_seed(0)
    model = ntksap.build_model(args.model, num_classes=10).double()
    x = torch.randn(args.check64, *ntksap.default_input_shape(args.model), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    masks = random_masks(model, args.sparsity)
    ref = loop_ntk(model, x, masks)
    return float((ntk.empirical_ntk(model, x, masks) - ref).norm() / ref.norm())


def random_masks(model: torch.nn.Module, sparsity: float):
    """Random masks of the given sparsity over the prunable weights (None when 0)."""
    import ntksap

    if sparsity <= 0:
        return None
    g = torch.Generator().manual_seed(2)
    return ntksap.Masks({n: (torch.rand(p.shape, generator=g) >= sparsity).float()
                         for n, p in ntksap.prunable_parameters(model).items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--n", type=int, default=100, help="number of noise inputs (default 100)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=3,
                    help="timed runs per implementation, interleaved, each in a fresh process (best is reported)")
    ap.add_argument("--no-jacrev", action="store_true", help="skip the vmap(jacrev) baseline")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (default 0: torch's default)")
    ap.add_argument("--sparsity", type=float, default=0.0, help="random masks of this sparsity (default 0: dense)")
    ap.add_argument("--check64", type=int, default=4, help="inputs for the float64 agreement check (default 4)")
    ap.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.n < 1:
        ap.error(f"--n={args.n} must be >= 1")
    if args.repeat < 1:
        ap.error(f"--repeat={args.repeat} must be >= 1")
    if args.check64 < 1:
        ap.error(f"--check64={args.check64} must be >= 1")
    if args.threads < 0:
        ap.error(f"--threads={args.threads} must be >= 0")
    if not 0 <= args.sparsity < 1:
        ap.error(f"--sparsity={args.sparsity} must be in [0, 1)")
    if args.child:
        run_child(args.child, args)
        return
    impls = [i for i in IMPLS if not (i == "jacrev" and args.no_jacrev)]
    runs = {impl: [] for impl in impls}
    thetas = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):  # interleaved, in a rotating order, so a busy machine slows all alike
            for impl in impls[r % len(impls):] + impls[:r % len(impls)]:
                out = os.path.join(tmp, f"{impl}.pt") if r == 0 else ""
                cmd = [sys.executable, __file__, "--child", impl, "--out", out, "--model", args.model,
                       "--n", str(args.n), "--device", args.device, "--sparsity", str(args.sparsity),
                       "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if proc.returncode != 0:
                    sys.exit(f"{impl} failed:\n{proc.stderr[-4000:]}")
                runs[impl].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                if r == 0:
                    thetas[impl] = torch.load(out)
    ref = thetas["loop"]
    nk = ref.shape[0]
    first = runs[impls[0]][0]
    print(f"{args.model}: {nk} x {nk} NTK ({args.n} inputs x {nk // args.n} outputs), device {first['device']}, "
          f"{first['threads']} threads, sparsity {args.sparsity}, {args.repeat} interleaved run(s) each")
    print(f"{'implementation':<16}{'best (s)':>10}{'all runs (s)':>24}{'peak mem (MiB)':>16}{'rel. diff to loop':>20}")
    names = {"ours": "ntksap.ntk", "loop": "backward loop", "jacrev": "vmap(jacrev)"}
    best = {impl: min(r["seconds"] for r in runs[impl]) for impl in impls}
    for impl in impls:
        diff = float((thetas[impl] - ref).norm() / ref.norm())
        all_runs = ", ".join(f"{r['seconds']:.2f}" for r in runs[impl])
        peak = max(r["peak"] for r in runs[impl]) / 2**20
        print(f"{names[impl]:<16}{best[impl]:>10.2f}{all_runs:>24}{peak:>16.0f}{diff:>20.2e}")
    if "jacrev" in thetas:
        print(f"rel. diff ntksap.ntk to vmap(jacrev) (float32): "
              f"{float((thetas['ours'] - thetas['jacrev']).norm() / thetas['jacrev'].norm()):.2e}")
    print(f"rel. diff ntksap.ntk to loop in float64 ({args.check64} inputs): {float64_check(args):.2e}")
    if "jacrev" in best:
        print(f"vs vmap(jacrev): {best['jacrev'] / best['ours']:.2f}x")
    print(f"speed-up: {best['loop'] / best['ours']:.2f}x")


if __name__ == "__main__":
    main()
