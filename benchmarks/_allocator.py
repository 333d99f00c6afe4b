"""XLA:CPU scratch memory and glibc's allocator: timings with and without caching.

XLA:CPU allocates an executable's scratch buffer ("preallocated temp" in its
buffer assignment) with ``malloc`` on every execution. glibc serves blocks
above its mmap threshold (adaptive, at most 32 MiB by default) with a fresh
anonymous mapping, so every scratch page a step touches is a minor page fault
(the kernel zeroes the page) on every step. GPU runtimes keep a caching
allocator (XLA's BFC allocator) and pay nothing of the kind. A method whose
step needs more scratch than the plain optimizer's can thus look several times
slower on CPU for a reason that is not its arithmetic.

`cache_large_blocks` raises glibc's mmap and trim thresholds (``mallopt``) so
that such blocks are reused from the heap: the CPU analogue of a caching
allocator. Users can do the same without code:
``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 python train.py``.
The benchmarks print their ratios under both settings.

It does not reach every block: scratch of several hundred MiB (a
`curvax.diagnostics.monitor` step's, sized for its tracked branch's per-example
gradients: 255-756 MB on 3c3d, 788 MB on a raw mnist_mlp-shaped MLP) was still
mapped afresh on every execution with either setting (glibc 2.36: thousands of
page faults per step, presumably because a thread arena's heap holds at most
64 MiB and larger blocks are always mapped). An allocator that caches large
blocks does reach them: with ``LD_PRELOAD=libtcmalloc_minimal.so.4`` (Debian
package libtcmalloc-minimal4) the MLP's untracked monitor steps had ~300 page
faults instead of ~3500 (measured with ``minor_page_faults``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def cache_large_blocks(nbytes: int = 1 << 30) -> bool:
  """Makes glibc keep freed blocks up to ``nbytes`` for reuse; False if not glibc."""
  name = ctypes.util.find_library("c")
  if name is None:
    return False
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return bool(mallopt(_M_MMAP_THRESHOLD, nbytes)) and bool(mallopt(_M_TRIM_THRESHOLD, nbytes))


def minor_page_faults() -> int:
  """Minor page faults of this process so far (``getrusage``)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
