"""train.release_freed_memory: after it, freed blocks of >= 1 MiB leave the process at once.

Checked in a child process with bare malloc/free (ctypes): glibc's setting cannot be undone and would stay
with the test process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.train.host_memory import release_freed_memory

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import ctypes, json, sys
from tunelab.train.host_memory import release_freed_memory

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
MB = 1 << 20

def anon_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024

def resident_after_freeing_half():
    # 64 blocks of 2 MiB, touched; free every other one while the rest stays in use (as a step's activations)
    blocks = [libc.malloc(2 * MB) for _ in range(64)]
    for b in blocks:
        ctypes.memset(b, 1, 2 * MB)
    before = anon_mb()
    for b in blocks[::2]:
        libc.free(b)
    released = before - anon_mb()
    for b in blocks[1::2]:
        libc.free(b)
    return released

big = libc.malloc(16 * MB)  # freeing a big mapped block raises glibc's threshold: 2 MiB blocks now use the heap
ctypes.memset(big, 1, 16 * MB)
libc.free(big)
kept = resident_after_freeing_half()
changed = release_freed_memory()
print(json.dumps({"default": kept, "changed": changed, "released": resident_after_freeing_half()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not Path("/proc/self/status").exists(),
                    reason="reads /proc; glibc only")
def test_freed_blocks_leave_the_process_only_with_the_setting():
    import json

    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=REPO,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    if not got["changed"]:
        pytest.skip("the C library is not glibc")
    assert got["default"] < 16, got  # glibc keeps the 64 MiB freed between live blocks in its heap
    assert got["released"] > 56, got  # with the setting, each freed 2 MiB block is unmapped at once


def test_nothing_changes_where_the_c_library_has_no_mallopt(monkeypatch):
    import tunelab.train.host_memory as host_memory

    class NotGlibc:
        def __init__(self, name):
            pass

        def __getattr__(self, name):
            raise AttributeError(name)

    monkeypatch.setattr(host_memory.ctypes, "CDLL", NotGlibc)
    assert release_freed_memory() is False
