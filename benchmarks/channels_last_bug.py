"""Whether this torch still corrupts the heap in a channels-last strided 1x1 conv's weight gradient.

`ntksap.devices.channels_last_is_safe` keeps models with a 1x1 stride-2
convolution (ResNet shortcuts) in NCHW on CPUs without AVX-512, because torch
2.14.1's channels-last ``aten.convolution_backward`` weight gradient of such a
convolution aborts there on one thread (glibc: "corrupted double-linked list";
two threads, NCHW, or the input gradient alone are fine). This script runs the
smallest reproducer found, in a child process so that the abort cannot take this
one down, both layouts, and says whether the workaround is still needed with the
installed torch on this CPU. Run it after a torch upgrade; the reproducer doubles
as the upstream bug report's.

    python benchmarks/channels_last_bug.py [--threads 1] [--repeats 50]
"""

import argparse
import subprocess
import sys

import torch

REPRODUCER = """
import torch
torch.set_num_threads({threads})
torch.manual_seed(0)
fmt = torch.{layout}
x = torch.randn(8, 2, 6, 6).to(memory_format=fmt)        # input, N C H W
w = torch.randn(4, 2, 1, 1).to(memory_format=fmt)        # 1x1 kernel
go = torch.randn(8, 4, 3, 3).to(memory_format=fmt)       # grad of the stride-2 output
for _ in range({repeats}):
    torch.ops.aten.convolution_backward(go, x, w, None, (2, 2), (0, 0), (1, 1), False, (0, 0), 1,
                                        (False, True, False))   # the weight gradient only
"""


def run(layout: str, threads: int, repeats: int) -> subprocess.CompletedProcess:
    code = REPRODUCER.format(threads=threads, layout=layout, repeats=repeats)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the child (default 1, where it aborts)")
    parser.add_argument("--repeats", type=int, default=50, help="convolution_backward calls (default 50)")
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1:
        parser.error(f"--threads and --repeats must be >= 1, got {args.threads} and {args.repeats}")

    from ntksap.devices import channels_last_is_safe
    from ntksap.models import build_model

    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, CPU capability {capability}, {args.threads} thread(s), {args.repeats} calls")
    broken = False
    for layout in ("contiguous_format", "channels_last"):
        result = run(layout, args.threads, args.repeats)
        ok = result.returncode == 0
        broken |= not ok and layout == "channels_last"
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        detail = "" if ok else f" (exit {result.returncode}: {last})"
        print(f"  {layout:18s} {'ok' if ok else 'ABORTS'}{detail}")
    rule = channels_last_is_safe(build_model("resnet20"), torch.device("cpu"))
    print(f"ntksap keeps ResNet-20 in {'channels-last' if rule else 'NCHW'} on this CPU "
          f"(devices.channels_last_is_safe = {rule})")
    if broken and rule:
        print("the bug is here, but the rule allows channels-last: widen channels_last_is_safe")
    elif not broken and not rule and args.threads > 1:
        print(f"not reproduced at {args.threads} threads, as expected: the abort needs one thread (run with --threads 1)")
    elif not broken and not rule:
        print("the bug is gone with this torch on this CPU: the workaround may be dropped or narrowed")
    else:
        print("the rule matches what this torch does on this CPU")


if __name__ == "__main__":
    main()
