"""torch's own float32 GEMM, called on numpy arrays without `import torch`.

A merge must reproduce PEFT's `B @ A` bit for bit, and the order in which a BLAS sums the r products of
each element decides the last bit: numpy's OpenBLAS and torch's MKL disagree on about 2 % of the elements
of a rank-16 product. torch's CPU wheels link MKL into `libtorch_cpu`, and `torch.mm` on float32 calls its
`sgemm_` (`at::native::cpublas::gemm`). Loading that library with ctypes costs about 0.4 s where
`import torch` costs 2-4 s, and calling the same routine with the same arguments gives the same bits
(`tests/test_hostmerge.py` compares them with `torch.mm`).

`available()` is False when the library or its MKL symbols are missing (torch built without MKL, other
platforms); callers then take the torch route, which gives the same result more slowly.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading

_LIB_NAMES = ("libtorch_cpu.so", "libtorch_cpu.dylib")
_state: dict = {}
_lock = threading.Lock()


def _dlopen(path: str):
    """Load a shared library through the C library's dlopen, called without the GIL (ctypes.CDLL holds it
    for the whole load), lazily bound; falls back to ctypes.CDLL."""
    try:
        fn = ctypes.CDLL(None).dlopen
        flags = os.RTLD_LAZY | os.RTLD_LOCAL
    except (OSError, AttributeError, TypeError):  # no C-library dlopen here (not a POSIX system)
        return ctypes.CDLL(path)
    fn.restype, fn.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
    handle = fn(os.fsencode(path), flags)
    if not handle:
        raise OSError(f"cannot load {path}")
    return ctypes.CDLL(path, handle=handle)


def _load():
    spec = importlib.util.find_spec("torch")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    libdir = os.path.join(list(spec.submodule_search_locations)[0], "lib")
    for name in _LIB_NAMES:
        path = os.path.join(libdir, name)
        if not os.path.exists(path):
            continue
        try:
            lib = _dlopen(path)  # the same object torch._C links against: one copy per process
            # MKL's own thread control next to sgemm_ says the BLAS is MKL (torch's BLAS_INFO=mkl builds).
            gemm, set_local = lib.sgemm_, lib.MKL_Set_Num_Threads_Local
        except (OSError, AttributeError):
            return None
        set_local.argtypes, set_local.restype = [ctypes.c_int], ctypes.c_int
        return gemm, set_local
    return None


def preload() -> None:
    """Start loading the library in a background thread, so that it overlaps other start-up work that holds
    no loader lock (reading headers and adapters; import extension modules first); `available()` waits."""
    with _lock:
        if "thread" in _state or "fns" in _state:
            return
        # Not a daemon: the interpreter waits for it before exiting. Exiting while the library's static
        # initializers run in this thread would run its destructors against a half-built library (abort).
        t = threading.Thread(target=_resolve, name="loratool-blas", daemon=False)
        _state["thread"] = t
        t.start()


def _resolve() -> None:
    fns = _load()
    with _lock:
        _state.setdefault("fns", fns)


def available() -> bool:
    """True when torch's MKL sgemm can be called without importing torch (loads it on first call)."""
    t = _state.get("thread")
    if t is not None:
        t.join()
    if "fns" not in _state:
        _resolve()
    return _state["fns"] is not None


def loaded() -> bool:
    """True when this process has loaded the library (after waiting for a load in progress)."""
    t = _state.get("thread")
    if t is not None:
        t.join()
    return _state.get("fns") is not None


def single_threaded() -> None:
    """Make MKL calls from the current thread run on this thread only (callers run one tensor per core)."""
    _state["fns"][1](1)


def gemm_f32(X, Y, out) -> None:
    """out = X @ Y for float32 numpy matrices: X (m, k), Y (k, n), out (m, n), each with unit column stride.

    The call torch.mm makes for row-major operands: column-major sgemm("N", "N", n, m, k, 1, Y, ldY, X, ldX,
    0, out, ldOut), i.e. out^T = Y^T X^T. (Never beta = 1 to add into out: MKL's small-matrix path then
    rounds differently from a product followed by an add.)
    """
    m, k = X.shape
    n = Y.shape[1]
    if m == 0 or n == 0:
        return
    if k == 0:
        out[...] = 0.0
        return
    for a in (X, Y, out):
        if a.dtype.itemsize != 4 or a.dtype.kind != "f" or (a.shape[1] > 1 and a.strides[1] != 4):
            raise ValueError("gemm_f32 takes float32 matrices with unit column stride")
    c_int, c_float, ref = ctypes.c_int, ctypes.c_float, ctypes.byref
    no = ctypes.c_char(b"N")
    lda, ldb, ldc = (max(1, a.strides[0] // 4, a.shape[1]) for a in (Y, X, out))
    _state["fns"][0](ref(no), ref(no), ref(c_int(n)), ref(c_int(m)), ref(c_int(k)), ref(c_float(1.0)),
                     ctypes.c_void_p(Y.ctypes.data), ref(c_int(lda)), ctypes.c_void_p(X.ctypes.data),
                     ref(c_int(ldb)), ref(c_float(0.0)), ctypes.c_void_p(out.ctypes.data), ref(c_int(ldc)))


__all__ = ["available", "loaded", "preload", "single_threaded", "gemm_f32"]
