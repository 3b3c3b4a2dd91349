"""Host memory for XLA:CPU: freed buffers stay in the process for the next step.

glibc's malloc gives each thread its own arena, and an arena's heap is unmapped as soon
as everything in it is free. XLA:CPU frees a step's buffers when the step ends, so the
next step gets fresh pages, which the kernel faults in and zeroes one 4 KiB page at a
time, every step. `reuse_freed_memory()` keeps every thread on glibc's main arena, with no
trimming and no mmap'd chunks, so after the first steps the buffers are reused, for some
resident memory; `python -m benchmarks.step` reports the page faults per step with and
without it.

It must run before the first thread allocates, i.e. before JAX starts its backend; the
command-line entry points (`qhnet.main`, `python -m qhnet.symmetry`) call it first.
Outside glibc (macOS, musl) it does nothing.
"""

import ctypes
import ctypes.util

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def reuse_freed_memory() -> bool:
    """One malloc arena, never trimmed, no mmap'd chunks. True if glibc took all three."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)
