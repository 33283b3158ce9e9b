"""Tensors held by numpy: the torch-free route of a CPU merge.

`import torch` costs seconds, about as long as copying a 2 GB model, and a merge whose inputs are all
safetensors files needs none of it. A `HostTensor` is a numpy array that remembers the safetensors dtype it
was read as, and answers the few questions the adapter readers ask a torch tensor (`shape`, `ndim`,
`reshape`, `numel()`, `is_floating_point()`), so one reader serves both routes.

numpy has no bfloat16: BF16 is held as its uint16 bit patterns. The conversions here are exact widenings
and IEEE round-to-nearest-even narrowings, bit for bit the ones torch's `.to(dtype)` makes (tests compare
them), so a merge computed here equals the torch route's.
"""

from __future__ import annotations

import numpy as np

from . import spec

NP_DTYPES = {
    "F16": np.float16, "BF16": np.uint16, "F32": np.float32, "F64": np.float64,
    "I8": np.int8, "U8": np.uint8, "I16": np.int16, "U16": np.uint16, "I32": np.int32, "U32": np.uint32,
    "I64": np.int64, "U64": np.uint64, "BOOL": np.bool_, "F8_E4M3": np.uint8, "F8_E5M2": np.uint8,
}
# Signed and unsigned integer views of each float dtype's bits, and the pattern of +Inf: a value is Inf or
# NaN when its bits, read as a signed integer, are >= +Inf's (positive) or, read unsigned, >= -Inf's.
_BITS = {"F16": (np.int16, np.uint16, 0x7C00, 0xFC00), "BF16": (np.int16, np.uint16, 0x7F80, 0xFF80),
         "F32": (np.int32, np.uint32, 0x7F800000, 0xFF800000)}
HOST_DTYPES = ("F16", "BF16", "F32")  # the dtypes the numpy route reads and writes (float64 goes through torch)


class HostTensor(np.ndarray):
    """A numpy array read from a safetensors file, tagged with its safetensors dtype name (`st_dtype`)."""

    st_dtype: str | None

    def __new__(cls, array, st_dtype: str):
        obj = np.asarray(array).view(cls)
        obj.st_dtype = st_dtype
        return obj

    def __array_finalize__(self, obj):
        self.st_dtype = getattr(obj, "st_dtype", None)

    def is_floating_point(self) -> bool:
        return self.st_dtype in spec.FLOAT_DTYPES

    def numel(self) -> int:
        return int(self.size)

    def float32(self) -> np.ndarray:
        """A new float32 array (exact from F16 and BF16, rounded to nearest from F64)."""
        out = np.empty(self.shape, np.float32)
        to_f32(np.asarray(self), self.st_dtype, out)
        return out

    def item_float(self) -> float:
        """The value of a one-element tensor as a Python float (exact for every dtype but 64-bit integers)."""
        a = self.float32() if self.st_dtype == "BF16" else np.asarray(self)
        return float(a.reshape(-1)[0])

    def torch(self):
        """The same values as a torch tensor of the same dtype (imports torch)."""
        import torch

        from .container import torch_dtype

        a = np.ascontiguousarray(np.asarray(self))
        if self.st_dtype in ("BF16", "F8_E4M3", "F8_E5M2"):
            return torch.from_numpy(a.copy()).view(torch_dtype(self.st_dtype))
        return torch.from_numpy(a.copy())


def from_buffer(buf, st_dtype: str, shape) -> HostTensor:
    """A HostTensor over `buf` (bytes-like, little-endian), without a copy."""
    a = np.frombuffer(buf, dtype=NP_DTYPES[st_dtype]) if len(buf) else np.empty(0, NP_DTYPES[st_dtype])
    return HostTensor(a.reshape(shape), st_dtype)


def as_torch(x):
    """x as a torch tensor: HostTensors are converted, anything else is returned as it is."""
    return x.torch() if isinstance(x, HostTensor) else x


def as_f32(x) -> np.ndarray:
    """A contiguous float32 numpy copy of a HostTensor, a torch tensor or a numpy array."""
    if isinstance(x, HostTensor):
        return x.float32()
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x, dtype=np.float32)
    import torch

    return x.detach().to("cpu", torch.float32).contiguous().numpy().copy()


def to_f32(a: np.ndarray, st_dtype: str, out: np.ndarray) -> None:
    """Widen the raw values `a` (numpy dtype NP_DTYPES[st_dtype]) into the float32 array `out`, same shape."""
    if st_dtype == "BF16":
        np.left_shift(a, 16, out=out.view(np.uint32), dtype=np.uint32)  # bf16 is the top half of a float32
    else:
        np.copyto(out, a, casting="unsafe")  # F16, F32 exact; F64 rounded to nearest even, as torch


def from_f32(x: np.ndarray, st_dtype: str, out: np.ndarray, scratch: np.ndarray | None = None) -> None:
    """Round the float32 array `x` once into `out` (raw values of `st_dtype`, same shape), as torch does.

    BF16 rounds to nearest, ties to even, on the bit pattern: (u + 0x7FFF + (u >> 16 & 1)) >> 16; an overflow
    becomes Inf, as in torch. `scratch` is a uint32 array of x's shape (allocated when None).
    """
    if st_dtype != "BF16":
        np.copyto(out, x, casting="unsafe")
        return
    u = x.view(np.uint32)
    t = np.empty(x.shape, np.uint32) if scratch is None else scratch
    np.right_shift(u, 16, out=t)
    np.bitwise_and(t, 1, out=t)
    np.add(t, 0x7FFF, out=t)
    np.add(t, u, out=t)
    np.right_shift(t, 16, out=out, casting="unsafe")


def first_nonfinite(raw: np.ndarray, st_dtype: str) -> int | None:
    """Flat index of the first Inf or NaN in the raw values of a float dtype, or None when all are finite.

    Two integer max reductions over the bit patterns (fast SIMD, no temporary); only a block that fails is
    searched element by element.
    """
    if st_dtype == "F64":
        ok = np.isfinite(raw)
        return None if bool(ok.all()) else int(np.argmin(ok.reshape(-1)))
    stype, utype, pos_inf, neg_inf = _BITS[st_dtype]
    if raw.size == 0 or (int(raw.view(stype).max()) < pos_inf and int(raw.view(utype).max()) < neg_inf):
        return None
    bits = raw.view(utype).reshape(-1)
    return int(np.argmax((bits & utype(pos_inf)) == pos_inf))


__all__ = ["HostTensor", "NP_DTYPES", "HOST_DTYPES", "from_buffer", "as_torch", "as_f32", "to_f32", "from_f32",
           "first_nonfinite"]
