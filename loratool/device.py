"""The one device layer: where arithmetic runs, and the dozen array functions the algorithms use there.

An algorithm is written once against a `Device`: on the CPU its arrays are numpy arrays (no torch import);
with `--device cuda` they are torch tensors on the GPU, through array-api-compat's torch namespace, so the
same lines run on both. Inputs and outputs cross the boundary as numpy arrays (`asarray`, `to_numpy`).

`session(name)` is the one place a device is chosen and prepared: it resolves the name once, and on CUDA
turns TF32 off for the call (TF32 rounds float32 products to 10 mantissa bits, so GPU results would differ
from the CPU's) and restores the previous setting afterwards. `blas_threads(n)` limits the CPU BLAS with
threadpoolctl for a block of code.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import dtypes
from .errors import UnsupportedError

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Device:
    """Where arrays live and arithmetic runs. `xp` is the array namespace (array-api-compat) of that place."""

    name: str  # "cpu" or "cuda" / "cuda:N"
    xp: Any

    @property
    def is_cpu(self) -> bool:
        return self.name == "cpu"

    def asarray(self, x, dtype: str | None = "F32"):
        """x (numpy or torch) as an array of this device, in `dtype` (a safetensors name; None keeps x's)."""
        if self.is_cpu:
            a = dtypes.as_numpy(x)
            return a if dtype is None or a.dtype == dtypes.np_dtype(dtype) else a.astype(dtypes.np_dtype(dtype))
        if not dtypes.is_torch(x):
            x = np.ascontiguousarray(dtypes.as_numpy(x))
            # A read-only array (a mapped file) is copied on the host first: torch warns on stderr when it wraps
            # one, and the tensor goes to the device as a copy anyway.
            x = x if x.flags.writeable else x.copy()
        t = dtypes.to_torch(x)
        t = t.to(self.name, non_blocking=False)
        return t if dtype is None else t.to(dtypes.torch_dtype(dtype))

    def to_numpy(self, x) -> np.ndarray:
        """A numpy array (on the host) of x."""
        return dtypes.as_numpy(x)

    @property
    def where(self) -> str:
        """The `device=` argument of this device's array creation functions."""
        return "cpu" if self.is_cpu else self.name

    def widen(self, V, dtype: str = "F32", out=None):
        """Rows V (numpy, any float dtype, or an array of this device) as a new `dtype` array of this device; on
        the CPU, copied into `out` (a preallocated array of V's shape) when given, so a hot loop allocates
        nothing."""
        if self.is_cpu and out is not None:
            np.copyto(out, V, casting="unsafe")  # exact from F16/BF16; F64 -> F32 rounds to nearest even
            return out
        X = self.asarray(V, dtype)
        return X.clone() if X is V else X  # a tensor already there, in that dtype: still a copy

    def lookup(self, table, codes):
        """table[codes] for a 1-D table of this device and integer codes (uint8) of any shape."""
        if self.is_cpu:
            # uint8 codes cannot be out of range: mode "clip" skips the bounds checks (1.0 ns per element against
            # 2.2 for fancy indexing)
            return np.take(table, codes, mode="clip")
        return table[codes.long()]

    def synchronize(self) -> None:
        """Wait for the device's queued work (a timer's edge); nothing to wait for on the CPU."""
        if not self.is_cpu:
            import torch

            torch.cuda.synchronize(self.name)

    def into(self, fn: str, *args, out):
        """The element-wise function `fn` (a name numpy and torch share: "maximum", "copysign", "multiply") of
        args, written into `out`: no allocation in a hot loop."""
        if self.is_cpu:
            return getattr(np, fn)(*args, out=out)
        import torch

        return getattr(torch, fn)(*args, out=out)

    def bitcast(self, x, name: str):
        """The bits of x seen as dtype `name` (a safetensors name) of the same size: a view, no copy."""
        return x.view(dtypes.np_dtype(name) if self.is_cpu else dtypes.torch_dtype(name))

    def narrow(self, X, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """X rounded once to dtype `name` (nearest even, NaN and Inf kept), on the host: into `out` when given."""
        if self.is_cpu:
            return X if X.dtype == dtypes.np_dtype(name) else dtypes.cast(X, name, out)
        y = dtypes.from_torch(X.to(dtypes.torch_dtype(name)))
        if out is None:
            return y
        np.copyto(out, y)
        return out

    def empty(self, shape, dtype: str = "F32"):
        if self.is_cpu:
            return np.empty(shape, dtypes.np_dtype(dtype))
        import torch

        return torch.empty(shape, dtype=dtypes.torch_dtype(dtype), device=self.name)

    def matmul(self, a, b, out=None):
        """a @ b, written into `out` when given (no allocation in a hot loop)."""
        if self.is_cpu:
            return np.matmul(a, b, out=out)
        import torch

        return torch.mm(a, b, out=out) if out is not None else a @ b


def _numpy_namespace():
    import array_api_compat.numpy as xp

    return xp


CPU = None  # set on first use: the CPU Device


def cpu() -> Device:
    """The CPU device (numpy)."""
    global CPU
    if CPU is None:
        CPU = Device("cpu", _numpy_namespace())
    return CPU


def resolve(name: str | None) -> Device:
    """The Device for a user's `--device` value ("cpu", "cuda", "cuda:N"; None means cpu).

    Raises:
        UnsupportedError: CUDA was asked for and is not available (or the name is not a device).
    """
    if name in (None, "cpu"):
        return cpu()
    if not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise UnsupportedError(f"--device {name}: use cpu or cuda")
    import torch

    if not torch.cuda.is_available():
        raise UnsupportedError(f"--device {name}: no CUDA device is available here; use --device cpu")
    import array_api_compat.torch as xp

    return Device(name, xp)


def of(x) -> Device:
    """The Device an array lives on: the CPU for numpy, its own device for a torch tensor."""
    if not dtypes.is_torch(x):
        return cpu()
    import array_api_compat.torch as xp

    return Device("cpu" if x.device.type == "cpu" else str(x.device), xp)


@contextlib.contextmanager
def session(name: str | None):
    """Resolve `name` once and yield its Device; on CUDA, TF32 is off inside and restored on the way out."""
    dev = resolve(name)
    if dev.is_cpu:
        yield dev
        return
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield dev
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def blas_threads(n: int | None):
    """Limit numpy's BLAS to `n` threads inside the block (threadpoolctl); None leaves it alone."""
    if n is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n, user_api="blas"):
        yield


__all__ = ["Device", "DEVICES", "cpu", "of", "resolve", "session", "blas_threads"]
