"""Freed memory kept for reuse (ntksap.allocator): it takes on glibc, it stops the page faults of a
repeated allocation, it reaches the worker processes of a stage, and no result depends on it.

The setting is process-wide and cannot be undone, so each check runs in a fresh Python process."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ntksap import allocator

ROOT = Path(__file__).resolve().parents[1]

glibc_only = pytest.mark.skipif(allocator._glibc() is None, reason="the C library is not glibc")
has_mallinfo2 = pytest.mark.skipif(allocator._glibc() is None or not hasattr(allocator._glibc(), "mallinfo2"),
                                   reason="needs glibc >= 2.33 (mallinfo2)")


def _child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter at the repository root; it prints one JSON line last."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_keep_freed_memory_takes_once_and_says_so():
    got = _child("""
        import json
        from ntksap import allocator
        before = allocator.applied()
        first, second = allocator.keep_freed_memory(), allocator.keep_freed_memory()
        print(json.dumps([before, first, second, allocator.applied()]))
    """)
    assert got == [False, True, True, True]


def test_without_glibc_nothing_changes_and_it_says_so(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    monkeypatch.setattr(allocator, "_applied", None)
    assert allocator.keep_freed_memory() is False
    assert allocator.applied() is False


@has_mallinfo2
@pytest.mark.parametrize("kept", [False, True])
def test_a_large_tensor_comes_from_the_heap_and_stays_there_only_with_it(kept):
    """A 30 MiB tensor (glibc's ``mallinfo2``): with the defaults it gets its own mapping
    (``hblkhd``), unmapped when freed, so the next one faults in fresh pages; kept it comes from
    the heap (``arena``) and, freed, stays there as free heap (``fordblks``) for the next one."""
    got = _child(f"""
        import ctypes, json
        import torch
        from ntksap import allocator
        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                       "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = Info
        if {kept}:
            allocator.keep_freed_memory()
        before = libc.mallinfo2()
        t = torch.ones(30 * 2**18)  # 30 MiB of float32
        held = libc.mallinfo2()
        del t
        after = libc.mallinfo2()
        print(json.dumps([(held.hblkhd - before.hblkhd) / 2**20, after.fordblks / 2**20]))
    """)
    mapped, free_heap = got
    if kept:
        assert mapped < 1 and free_heap >= 30
    else:
        assert mapped >= 30 and free_heap < 30


@glibc_only
@pytest.mark.parametrize("kept", [False, True])
def test_the_workers_of_a_stage_take_the_callers_setting(kept):
    got = _child(f"""
        import json
        from ntksap import allocator, parallel
        if __name__ == "__main__":
            if {kept}:
                allocator.keep_freed_memory()
            print(json.dumps(parallel.run_all(allocator.applied, [((), {{}})] * 3, workers=2)))
    """)
    assert got == [kept] * 3


def test_results_do_not_depend_on_it(tmp_path):
    """A few training steps of a masked ResNet-20 and its SNIP masks, in a process with and one
    without the setting: the same bits."""
    code = """
        import hashlib, json, sys
        import torch
        from ntksap import allocator, build_model, prune
        if sys.argv[1:] == ["kept"]:
            allocator.keep_freed_memory()
        torch.manual_seed(0)
        model = build_model("resnet20", 10)
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
        masks = prune(model, "snip", 0.9, data=[(x, y)], progress=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        h = hashlib.sha256()
        for t in [*masks.values(), *model.state_dict().values()]:
            h.update(t.detach().contiguous().numpy().tobytes())
        print(json.dumps([allocator.applied(), h.hexdigest()]))
    """
    runs = {}
    for setting in ("default", "kept"):
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), setting], cwd=ROOT, check=True,
                             capture_output=True, text=True, timeout=300)
        runs[setting] = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs["default"][0] is False
    assert runs["kept"][0] is (allocator._glibc() is not None)
    assert runs["default"][1] == runs["kept"][1]
