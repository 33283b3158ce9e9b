"""How many threads numpy's BLAS runs one product on, set for the length of a block.

extract's CPU route factorises several matrices at once, one per thread ("lanes", ops/extract_host.py). Each
lane then wants its products on one core: a BLAS that also spreads every product over all cores runs
lanes x cores threads on the cores. And two thin products side by side, one per core, run at least as fast
as one on all cores (benchmarks/README.md, `extract.py --lanes`: a 2048 x 2048 by 32 product runs at 36-48
GFLOP/s on one core and 58-70 on two; two of them side by side at 59-83 together).

numpy does not say which BLAS it links, so the library is found among those the process has loaded
(/proc/self/maps on Linux, numpy's own wheel folder elsewhere) and asked by its own names: OpenBLAS
(numpy's wheels: `scipy_openblas_*64_`, or a system `openblas_*`) or MKL (conda's numpy). Anything else (Apple's
Accelerate, BLIS) makes `controllable()` False, and the caller runs one lane.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import threading

# (getter, setter) pairs by library; the first that resolves wins. OpenBLAS's setter is process-wide.
_NAMES = (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
          ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
          ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
          ("openblas_get_num_threads", "openblas_set_num_threads"),
          ("MKL_Get_Max_Threads", "MKL_Set_Num_Threads"))
_MARKERS = ("openblas", "mkl_rt", "libmkl")
_state: dict = {}
_lock = threading.Lock()


def _candidates() -> list[str]:
    """Paths of loaded shared libraries that may be numpy's BLAS."""
    paths: list[str] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(None, 5)  # address, perms, offset, device, inode[, path]
                path = parts[5].strip() if len(parts) == 6 else ""
                if path.startswith("/") and any(m in os.path.basename(path).lower() for m in _MARKERS):
                    if path not in paths:
                        paths.append(path)
    except OSError:  # not Linux: numpy's wheels keep their BLAS next to the package
        import numpy

        root = os.path.dirname(os.path.dirname(numpy.__file__))
        for folder in ("numpy.libs", os.path.join("numpy", ".dylibs"), os.path.join("numpy", "DLLs")):
            paths += sorted(p for p in glob.glob(os.path.join(root, folder, "*"))
                            if any(m in os.path.basename(p).lower() for m in _MARKERS))
    return paths


def _resolve():
    __import__("numpy")  # loads numpy's BLAS before looking for it

    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _NAMES:
            try:
                get, set_ = getattr(lib, get_name), getattr(lib, set_name)
            except AttributeError:
                continue
            get.argtypes, get.restype = [], ctypes.c_int
            set_.argtypes, set_.restype = [ctypes.c_int], None
            return get, set_
    return None


def _fns():
    with _lock:
        if "fns" not in _state:
            _state["fns"] = _resolve()
        return _state["fns"]


def controllable() -> bool:
    """True when numpy's BLAS thread count can be read and set here."""
    return _fns() is not None


def threads() -> int | None:
    """numpy's BLAS thread count now, or None when it cannot be read."""
    fns = _fns()
    return None if fns is None else int(fns[0]())


@contextlib.contextmanager
def limit(n: int):
    """Run numpy's BLAS on at most `n` threads inside the block (process-wide), then restore the count.
    Yields True when the limit is in force, False when this BLAS cannot be controlled (nothing changed)."""
    fns = _fns()
    if fns is None:
        yield False
        return
    before = int(fns[0]())
    fns[1](max(1, int(n)))
    try:
        yield True
    finally:
        fns[1](before)


__all__ = ["controllable", "threads", "limit"]
