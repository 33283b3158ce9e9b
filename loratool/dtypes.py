"""Tensor dtypes: safetensors names, numpy dtypes (ml_dtypes for bfloat16 and float8), and the one cast.

Every tensor loratool holds on the CPU is a numpy array. numpy has no bfloat16 or float8 of its own;
ml_dtypes gives it real ones (round to nearest even, NaN and Inf kept), so a BF16 tensor is an ordinary
array of dtype `ml_dtypes.bfloat16`, read from a file without a copy and cast with `astype`.

torch is imported only by `to_torch` / `from_torch`, for torch files and `--device cuda`.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from . import spec

# safetensors dtype name -> numpy dtype (spec section 2, rule C006).
NP_DTYPES = {
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "I16": np.dtype(np.int16), "U16": np.dtype(np.uint16),
    "I32": np.dtype(np.int32), "U32": np.dtype(np.uint32), "I64": np.dtype(np.int64), "U64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dt: name for name, dt in NP_DTYPES.items()}

# The largest finite value of each float dtype a merge writes: a float32 value beyond it rounds to Inf.
# (bfloat16 rounds to nearest even, so values up to half an ulp past its max still round down to it.)
# The values are the first that round to Inf: the largest finite value plus half its ulp (a tie rounds to
# even, away from the largest value, whose mantissa is odd).
FINITE_MAX = {
    "F16": 65504.0 + 2.0 ** 4,
    "BF16": float(ml_dtypes.finfo(ml_dtypes.bfloat16).max) + 2.0 ** 119,
    "F32": float(np.finfo(np.float32).max) + 2.0 ** 103,
    "F64": math.inf,
}
EPS = {"F16": 2.0 ** -10, "BF16": 2.0 ** -7, "F32": 2.0 ** -23, "F64": 2.0 ** -52}


def np_dtype(name: str) -> np.dtype:
    """The numpy dtype of a safetensors dtype name."""
    return NP_DTYPES[name]


def st_name(dtype) -> str:
    """The safetensors dtype name of a numpy dtype or a torch dtype.

    Raises:
        KeyError: the dtype has no safetensors name.
    """
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        return _NAMES[np.dtype(dtype)]
    name = str(dtype)
    if name.startswith("torch."):
        return _TORCH_NAMES[name[len("torch."):]]
    return _NAMES[np.dtype(dtype)]


def dtype_of(x) -> str:
    """The safetensors dtype name of an array (numpy or torch)."""
    return st_name(x.dtype)


def is_float(name: str) -> bool:
    """Whether a safetensors dtype can take a delta (rule B003)."""
    return name in spec.FLOAT_DTYPES


def from_buffer(buf, name: str, shape) -> np.ndarray:
    """An array over `buf` (bytes-like, little-endian) of dtype `name` and `shape`, without a copy."""
    dt = NP_DTYPES[name]
    if len(buf) == 0:
        return np.empty(tuple(shape), dt)
    return np.frombuffer(buf, dtype=dt).reshape(tuple(shape))


# ---- torch at the edges -----------------------------------------------------------------------------------

_TORCH_NAMES = {
    "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2", "int8": "I8", "uint8": "U8", "int16": "I16", "uint16": "U16", "int32": "I32",
    "uint32": "U32", "int64": "I64", "uint64": "U64", "bool": "BOOL",
}
# dtypes numpy and torch cannot hand each other directly: moved as integers of the same width.
_BITS_OF = {"BF16": "I16", "F8_E4M3": "U8", "F8_E5M2": "U8"}


def torch_dtype(name: str):
    """The torch dtype of a safetensors dtype name (imports torch)."""
    import torch

    return getattr(torch, {v: k for k, v in _TORCH_NAMES.items()}[name])


def is_torch(x) -> bool:
    """Whether x is a torch tensor (without importing torch)."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def from_torch(t) -> np.ndarray:
    """A numpy array with the values and dtype of the torch tensor `t` (copied to the CPU when needed)."""
    name = st_name(t.dtype)
    t = t.detach().to("cpu").contiguous()
    bits = _BITS_OF.get(name)
    if bits is None:
        return t.numpy()
    return t.view(torch_dtype(bits)).numpy().view(NP_DTYPES[name])


def to_torch(a, device=None):
    """A torch tensor with the values and dtype of the array `a` (a torch tensor is returned as it is)."""
    import torch

    if is_torch(a):
        return a if device is None else a.to(device)
    a = np.ascontiguousarray(a)
    name = st_name(a.dtype)
    bits = _BITS_OF.get(name)
    t = torch.from_numpy(a.view(NP_DTYPES[bits]) if bits else a)
    if bits:
        t = t.view(torch_dtype(name))
    return t if device is None else t.to(device)


def as_numpy(x) -> np.ndarray:
    """x as a numpy array (torch tensors are converted; numpy arrays are returned as they are)."""
    return from_torch(x) if is_torch(x) else np.asarray(x)


def as_f32(x) -> np.ndarray:
    """A contiguous float32 copy of x (numpy or torch): exact from F16 and BF16, rounded from F64."""
    return np.array(as_numpy(x), dtype=np.float32, copy=True, order="C")


# ---- the cast ---------------------------------------------------------------------------------------------

def cast(x: np.ndarray, name: str, out: np.ndarray | None = None) -> np.ndarray:
    """Round x once to dtype `name` (round to nearest even; NaN and Inf kept), into `out` when given."""
    dt = NP_DTYPES[name]
    if out is None:
        return x.astype(dt)
    np.copyto(out, x, casting="unsafe")
    return out


def out_of_range(x: np.ndarray, name: str) -> float | None:
    """None when every value of the float array x (numpy or torch) is finite and rounds to a finite value of
    dtype `name`; else the largest magnitude (NaN when x holds a NaN or Inf). Two reductions, no temporary."""
    if math.prod(x.shape) == 0:
        return None
    lo, hi = float(x.min()), float(x.max())  # NaN propagates through both
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return math.nan
    big = max(-lo, hi)
    limit = FINITE_MAX.get(name)
    return big if limit is not None and big >= limit else None


__all__ = ["NP_DTYPES", "FINITE_MAX", "EPS", "np_dtype", "st_name", "dtype_of", "is_float", "from_buffer",
           "torch_dtype", "is_torch", "from_torch", "to_torch", "as_numpy", "as_f32", "cast", "out_of_range"]
