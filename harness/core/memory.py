"""Keep freed memory in the process: large CPU tensors then reuse pages instead of faulting in fresh ones.

glibc's malloc serves a large request (over its mmap threshold, at most 32 MiB) with a fresh mmap and gives the
pages back to the kernel with munmap when it is freed; it also trims the top of the heap once more than its trim
threshold is free there. A training step allocates and frees the same large tensors (activations, gradients, the
im2col buffers of CPU convolutions) every time, so every step touches thousands of brand-new pages, and each first
touch is a page fault the kernel must serve and zero. Measured on this project's 2-core VM with
`python benchmarks/memory.py` (docs/cpu_speed.md): an fp64 WRN-10-1 run as the tests train it (B = 128, 6 steps)
8.23 s with freed memory kept against 11.0 s with glibc's defaults; nn.BatchNorm2d forward + backward on a
(512, 64, 16, 16) fp32 input 37.7 against 76.1 ms.

So every harness process that trains (`harness train`, each sweep worker, each torchrun or DeepSpeed rank) tells
glibc, before it allocates its tensors, to serve every request from its heaps (M_MMAP_MAX = 0) and to give memory
back only when more than 2 GiB lie free at the top of a heap (M_TRIM_THRESHOLD). This is what PyTorch's CPU
performance guide gets by preloading jemalloc or tcmalloc, without a dependency. The cost: the process keeps its
peak of freed memory instead of returning it (what a training loop at its steady state holds anyway).

It changes where tensors live, never what is computed: PyTorch aligns every CPU tensor to 64 bytes itself, so the
kernels, their vector widths and reduction orders, and every result are the same bit for bit (the layout and
resume tests compare runs bitwise and to 1e-10).

Not applied: off glibc (macOS, musl), when the user chose malloc settings (any MALLOC_* variable or a
glibc.malloc tunable in GLIBC_TUNABLES), or with HARNESS_KEEP_FREED_MEMORY=0.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: about 2 GiB
_applied: Optional[str] = None


def user_chose_malloc() -> bool:
    """Whether the environment already sets glibc's malloc (a MALLOC_* variable or a glibc.malloc tunable)."""
    env = os.environ
    return any(k.startswith("MALLOC_") for k in env) or "glibc.malloc" in env.get("GLIBC_TUNABLES", "")


def keep_freed_memory() -> str:
    """Apply the setting once per process (before large allocations); returns what was done, for env.json."""
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get("HARNESS_KEEP_FREED_MEMORY", "1") == "0":
        _applied = "glibc defaults (HARNESS_KEEP_FREED_MEMORY=0)"
    elif user_chose_malloc():
        _applied = "the environment's malloc settings (MALLOC_* or GLIBC_TUNABLES)"
    elif not sys.platform.startswith("linux"):
        _applied = "the platform's malloc"
    else:
        _applied = _mallopt()
    return _applied


def _mallopt() -> str:
    try:  # the process's own symbols: no library search (ctypes.util.find_library runs `ldconfig -p` in a subprocess)
        libc = ctypes.CDLL(None)
        mallopt, gnu = libc.mallopt, libc.gnu_get_libc_version
    except (OSError, AttributeError):  # musl and others: no mallopt, or not glibc's
        return "the platform's malloc"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    gnu.restype = ctypes.c_char_p
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return "glibc defaults (mallopt refused)"
    return f"glibc {gnu().decode()}: freed memory kept (M_MMAP_MAX=0, M_TRIM_THRESHOLD={TRIM_THRESHOLD})"

