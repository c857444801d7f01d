"""The CPU memory allocator of a computing process: freed tensor memory kept for reuse (glibc).

PyTorch takes a CPU tensor's memory from the C library's ``malloc`` and gives it back on free.
glibc serves large blocks with fresh ``mmap`` pages and hands freed memory at the top of its heap
back to the system, so a ResNet-20 step's activations (megabytes each, allocated and freed on
every step) arrive as new pages and each page costs a fault on first touch: about 90 000 faults
a second of ResNet-20 training on the 2-core development CPU. :func:`keep_freed_memory` sets
two glibc parameters (``mallopt``) so that blocks up to 32 MiB come from the heap and freed
memory stays there for the next step. Only the speed changes (there, ``python
benchmarks/allocator_speed.py``: bare training steps 1.15-1.21x, the trainer 1.08x, NTK-SAP scoring
1.05x), never a result: the arithmetic is the same. The price is that the process keeps its peak heap until it exits,
which is why the library leaves the choice to the process: the pipeline's notebooks
(:func:`ntksap.notebook.setup`), their worker processes and ``ntksap.distributed`` call it;
a script of your own may call it first thing.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1
"""``mallopt`` parameter: free heap memory above this many bytes is returned to the system."""
M_MMAP_THRESHOLD = -3
"""``mallopt`` parameter: blocks from this many bytes up get their own ``mmap`` pages."""

MMAP_THRESHOLD = 32 * 1024 * 1024
"""Blocks below 32 MiB come from the heap (glibc's largest allowed value on 64-bit systems)."""
TRIM_THRESHOLD = 2**31 - 1
"""Freed heap memory is not returned to the system (the largest ``int``)."""

_applied: bool | None = None


def _glibc():
    """This process's C library when it is glibc (``mallopt`` and ``gnu_get_libc_version`` are
    among its symbols), else None."""
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it: musl, macOS and Windows do not)
        libc.mallopt  # noqa: B018
        return libc
    except (OSError, AttributeError, TypeError):
        return None


def keep_freed_memory() -> bool:
    """Let glibc's ``malloc`` in this process serve blocks below :data:`MMAP_THRESHOLD` from its
    heap and keep freed memory there (:data:`TRIM_THRESHOLD`), for every allocation from now
    on. Returns whether both settings took (False where the C library is not glibc: nothing
    changes there). Idempotent; results are unchanged, only page faults go."""
    global _applied
    if _applied is None:
        libc = _glibc()
        _applied = bool(libc is not None
                        and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                        and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    return _applied


def applied() -> bool:
    """Whether :func:`keep_freed_memory` has taken in this process."""
    return bool(_applied)
