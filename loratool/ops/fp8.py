"""FP8 base weights: how a float8 tensor and its scales make a float32 weight, and back (FORMATS.md, "FP8 bases").

Two storage schemes are in use, both W = w · s with w float8_e4m3fn (max 448):

  block     DeepSeek-V3/R1, Qwen3 FP8 and transformers' "fp8" quantization: `<name>.weight_scale_inv`, float32,
            one scale per (bh, bw) block of the weight (`quantization_config.weight_block_size`, [128, 128]),
            shape (ceil(out / bh), ceil(in / bw)); edge blocks are partial. transformers' FP8Linear dequantizes
            as `weight * weight_scale_inv` expanded over the blocks.
  tensor    compressed-tensors (llm-compressor) float8: `<name>.weight_scale`, one value (shape (), (1,)) or
  channel   one per output row (out, 1); `input_scale` (activations) is left as it is.

Requantizing (`quantize`) follows the producers, per group (block, tensor or row), rounding to nearest even
as ml_dtypes does (`encode`: the same codes, faster): for "block" transformers' Fp8Quantize (w = W · (448 /
amax), stored scale 1 / (448 / amax)); for "tensor" and "channel" compressed-tensors (s = amax / 448,
w = W / s). A group whose values are all zero keeps scale 1. Dequantizing a requantized W gives W within half
an e4m3 ulp of each value's group scale: one FP8 rounding.

`Fp8Target` merges adapter terms into one float8 weight as the model streamer (io/stream.py) writes it: the
weight's rows are dequantized, merged in float32 by ops.merge's Merger (the one merge arithmetic), and
requantized with recomputed scales; the scale tensor is written by a second transform of the same target. All
of it is written once against the device layer: numpy on the CPU, torch tensors with `--device cuda`.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ..device import Device, cpu
from .svd import sum_squares

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E4M3_MAX = 448.0
DEFAULT_BLOCK = (128, 128)


@dataclass(frozen=True)
class Scheme:
    """How one float8 weight is stored: `kind` "block", "tensor" or "channel", the key of its scales, and
    for "block" the block shape (rows, cols)."""

    kind: str
    scale_key: str
    scale_dtype: str
    block: tuple[int, int] | None = None
    pow2: bool = False  # scales rounded up to powers of two (quantization_config.scale_fmt "ue8m0")


def block_size(config: dict | None) -> tuple[int, int]:
    """`quantization_config.weight_block_size` of a model's config.json, or the common [128, 128]."""
    q = (config or {}).get("quantization_config") or {}
    size = q.get("weight_block_size") if isinstance(q, dict) else None
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(x, int) and x > 0 for x in size):
        return int(size[0]), int(size[1])
    return DEFAULT_BLOCK


def schemes(info, keys, config: dict | None = None) -> dict[str, Scheme]:
    """The float8 weights of a base and how each is stored, from tensor names, shapes and dtypes alone.

    Args:
        info: key -> (shape, safetensors dtype) or None.
        keys: every key of the base.
        config: the base's config.json, for the block size (else it is inferred from the scale's shape).
    Returns:
        weight key -> Scheme, for every F8_E4M3 tensor that has a scale tensor loratool understands; a float8
        tensor without one is left out (and refused by the merge as an unscaled quantized tensor).
    """
    keyset = set(keys)
    out = {}
    for key in keys:
        i = info(key)
        if i is None or i[1] != "F8_E4M3" or len(i[0]) != 2:
            continue
        rows, cols = i[0]
        inv, plain = key + "_scale_inv", re.sub(r"weight$", "weight_scale", key)
        if inv in keyset:
            sshape, sdt = info(inv)
            if len(sshape) != 2:
                continue
            srows, scols = sshape
            bh, bw = block_size(config)
            if (srows, scols) != (-(-rows // bh), -(-cols // bw)):
                bh, bw = -(-rows // max(srows, 1)), -(-cols // max(scols, 1))  # inferred from the scale's shape
                if (srows, scols) != (-(-rows // bh), -(-cols // bw)):
                    continue
            q = (config or {}).get("quantization_config")
            out[key] = Scheme("block", inv, sdt, (bh, bw), isinstance(q, dict) and q.get("scale_fmt") == "ue8m0")
        elif plain != key and plain in keyset:
            sshape, sdt = info(plain)
            n = math.prod(sshape)
            if n == 1:
                out[key] = Scheme("tensor", plain, sdt)
            elif n == rows and tuple(sshape) in ((rows,), (rows, 1)):
                out[key] = Scheme("channel", plain, sdt)
    return out


# Every float8_e4m3fn code as float32, from ml_dtypes itself. Decoding by table lookup gives ml_dtypes' values
# (tests/test_fp8.py compares all 256) about 2.5x faster than `astype` (2.0 against 5.2 ns per element on the
# benchmark machine; a float32 multiply is 0.36): ml_dtypes converts float8 element by element.
_E4M3_TO_F32 = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)


def dequantize(w, s, scheme: Scheme, dev: Device | None = None):
    """W = w · s in float32 for weight rows `w` (h, cols) and the scale rows that cover them (block: the
    ceil(h / bh) scale rows; tensor: the one value; channel: h values): numpy arrays in, a new float32 array of
    `dev` (default the CPU) out."""
    dev = dev or cpu()
    w = dev.asarray(w.view(np.uint8) if isinstance(w, np.ndarray) else w, None)
    W = dev.lookup(dev.asarray(_E4M3_TO_F32), w)  # ml_dtypes' value of every code
    s = dev.asarray(s)
    if scheme.kind == "block":
        _blockwise(W, dev.xp.reshape(s, (-1, s.shape[-1])), scheme.block)
    else:
        W *= dev.xp.reshape(s, ()) if scheme.kind == "tensor" else dev.xp.reshape(s, (-1, 1))
    return W


def quantize(W: np.ndarray, scheme: Scheme) -> tuple[np.ndarray, np.ndarray]:
    """(w float8_e4m3fn, s float32) with W ≈ w · s: s = amax / 448 per group, w rounded to nearest even.

    W is finite float32 rows (h, cols): for "block" whole blocks of rows (h a multiple of bh, but the last rows of a
    tensor); for "tensor" the whole tensor; for "channel" any rows. Returns s shaped as the scheme stores it
    for those rows: (ceil(h / bh), ceil(cols / bw)), (1,) or (h, 1).
    """
    W = np.ascontiguousarray(W, dtype=np.float32)
    dev = cpu()
    q, s, _ = _quantize(W, scheme, _scales(W, scheme, dev), dev)
    return q.view(E4M3), s


def _scales(W, scheme: Scheme, dev: Device) -> tuple[np.ndarray, np.ndarray]:
    """(multiplier, stored scale) per group of W (an array of `dev`), from the groups' amax: small numpy
    arrays."""
    xp = dev.xp
    h, cols = W.shape
    if W.shape[0] * W.shape[1] == 0:
        amax = np.zeros((-(-h // scheme.block[0]), -(-cols // scheme.block[1])) if scheme.kind == "block" else
                        (1,) if scheme.kind == "tensor" else (h, 1), np.float32)
    elif scheme.kind == "block":
        amax = dev.to_numpy(xp.maximum(_block_reduce(W, scheme.block, xp.max, xp),
                                       -_block_reduce(W, scheme.block, xp.min, xp)))
    elif scheme.kind == "tensor":
        amax = np.array([max(float(xp.max(W)), -float(xp.min(W)))], np.float32)
    else:
        amax = dev.to_numpy(xp.maximum(xp.max(W, axis=1, keepdims=True), -xp.min(W, axis=1, keepdims=True)))
    if scheme.kind == "block":
        # transformers' Fp8Quantize: multiplier 448 / amax, stored scale its float32 reciprocal (a power of two,
        # rounded up, for scale_fmt "ue8m0"), W times the multiplier.
        mult = np.where(amax > 0, np.float32(E4M3_MAX) / np.where(amax > 0, amax, 1), 1).astype(np.float32)
        s = (np.float32(1) / mult).astype(np.float32)
        if scheme.pow2:
            s = np.exp2(np.ceil(np.log2(np.maximum(s, np.finfo(np.float32).tiny)))).astype(np.float32)
            mult = (np.float32(1) / s).astype(np.float32)
        return mult, s
    # compressed-tensors: scale amax / 448, W divided by it
    s = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1.0)).astype(np.float32)
    return s, s


# Columns per pass of `_quantize`: a 128-row chunk's float32 temporaries (about six) stay in a 2 MiB L2 cache.
_CHUNK_COLS = 512


def _quantize(W, scheme: Scheme, scales, dev: Device, X=None, keep: np.ndarray | None = None):
    """(codes, s, moved) for float32 rows W (an array of `dev`) and the groups' (multiplier, scale) from
    `_scales`, a few hundred columns at a time (the temporaries stay in cache): the float8_e4m3fn codes as a
    uint8 numpy array, s as given.

    moved is ||w · s − X||² for the rows X as they were (0.0 without X), over the blocks `keep` does not mark
    (a "block" scheme's blocks that keep their stored bytes).
    """
    xp = dev.xp
    mult, s = scales
    mult_d, s_d = dev.asarray(mult), dev.asarray(s)
    h, cols = W.shape
    block = scheme.kind == "block"
    q = xp.empty((h, cols), dtype=xp.uint8, device=dev.where)
    unkept = dev.asarray((~keep).astype(np.float32)) if keep is not None else None
    moved = 0.0
    step = scheme.block[1] * max(1, _CHUNK_COLS // scheme.block[1]) if block else _CHUNK_COLS
    for c0 in range(0, cols, step):
        c1 = min(cols, c0 + step)
        Y = xp.asarray(W[:, c0:c1], copy=True)
        if block:  # the chunk's whole column blocks: c0 is a multiple of bw
            j0, j1 = c0 // scheme.block[1], -(-c1 // scheme.block[1])
            _blockwise(Y, mult_d[:, j0:j1], scheme.block)
        else:
            Y /= xp.reshape(mult_d, ()) if scheme.kind == "tensor" else xp.reshape(mult_d, (-1, 1))
        # |Y| <= 448 (1 + 2^-22) < 464, the midpoint above 448, for finite W: Y needs no clipping.
        codes, R = encode(Y, dev)
        q[:, c0:c1] = codes
        if X is None:
            continue
        if block:
            _blockwise(R, s_d[:, j0:j1], scheme.block)
        else:
            R *= xp.reshape(s_d, ()) if scheme.kind == "tensor" else xp.reshape(s_d, (-1, 1))
        R -= X[:, c0:c1]
        if unkept is not None:
            _blockwise(R, unkept[:, j0:j1], scheme.block)
        moved += sum_squares(dev, R)
    return dev.to_numpy(q), s, moved


# float8_e4m3fn codes by arithmetic instead of ml_dtypes' cast (the measured reason STYLE §8 asks for):
# ml_dtypes converts float32 to float8 element by element, 6.5 ns per element on a merge's 128 x 512 chunks,
# more than the rest of the float8 path's per-element work; `encode` is thirteen vectorised passes, 2.4 ns, and
# returns the rounded values, so the survival report does not decode the new codes. Its codes are ml_dtypes'
# on every float32 below 464, both signs (`benchmarks/fp8.py --check-encoder`: both figures, 0 mismatches in
# 2.28 G values); tests/test_fp8.py compares a strided sweep, every e4m3 value and every midpoint.
_EXPONENT = 0x7F800000
_SMALLEST_NORMAL = 0x3C800000  # 2^-6: below it float8_e4m3fn steps by 2^-9
_REBIAS = 2.0 ** -120  # e4m3's exponent bias is 7, float32's 127


def encode(Y, dev: Device | None = None):
    """Float32 Y (finite, |Y| < 464; an array of `dev`, default the CPU) rounded to float8_e4m3fn, nearest even,
    as ml_dtypes rounds it.

    Returns (the codes as uint8, the rounded values as float32), arrays of `dev`. Y is overwritten.
    """
    dev = dev or cpu()
    xp = dev.xp
    A = xp.abs(Y)
    # |Y| + C - C with C = 2^(e + 20) (e the exponent of |Y|, at least -6) rounds |Y| once, to nearest even, to
    # a multiple of 2^(e - 3): three bits of mantissa, or e4m3's subnormal step 2^-9. In int32: |Y| < 2^9, so
    # C's bits stay below 2^31.
    C = dev.bitcast(A, "I32") & _EXPONENT
    dev.into("maximum", C, xp.asarray(_SMALLEST_NORMAL, dtype=xp.int32, device=dev.where), out=C)
    C += 20 << 23
    Cf = dev.bitcast(C, "F32")
    A += Cf
    A -= Cf
    R = dev.into("copysign", A, Y, out=A)
    # R · 2^-120 is exact (float32 subnormals below 2^-126 have e4m3's subnormal spacing) and holds the code in
    # bits 20..26 (exponent and mantissa; bit 27 is 0) and 31 (sign). The cast to uint8 keeps the low 8 bits
    # (modular, in numpy and torch alike), so the copies of the sign that int32 shifts bring in drop out.
    bits = dev.bitcast(dev.into("multiply", R, _REBIAS, out=Y), "I32")
    code = bits >> 20
    bits >>= 24
    bits &= 0x80
    code |= bits
    return xp.astype(code, xp.uint8), R


def _block_reduce(W, block: tuple[int, int], fn, xp):
    """fn (xp.max or xp.min) over each (bh, bw) block of W (h, cols), edge blocks partial: (ceil(h / bh),
    ceil(cols / bw)). Rows first: an element-wise reduction of whole rows (0.3 ns per element, against 0.9
    for runs of bw values first), then the small (row blocks, cols) array by columns."""
    bh, bw = block
    h, cols = W.shape
    fr, fc = h // bh, cols // bw
    parts = [fn(xp.reshape(W[:fr * bh], (fr, bh, cols)), axis=1)] if fr else []
    if fr * bh < h:
        parts.append(fn(W[fr * bh:], axis=0, keepdims=True))
    R = xp.concat(parts, axis=0) if len(parts) > 1 else parts[0]
    parts = [fn(xp.reshape(R[:, :fc * bw], (R.shape[0], fc, bw)), axis=2)] if fc else []
    if fc * bw < cols:
        parts.append(fn(R[:, fc * bw:], axis=1, keepdims=True))
    return xp.concat(parts, axis=1) if len(parts) > 1 else parts[0]


def _blockwise(X, s, block: tuple[int, int]) -> None:
    """X[i*bh:(i+1)*bh, j*bw:(j+1)*bw] *= s[i, j] in place, for X (h, cols) and s covering it (numpy arrays or
    torch tensors), through broadcast views (no weight-sized array of scales)."""
    bh, bw = block
    h, cols = X.shape
    full_r, full_c = h // bh, cols // bw
    if full_r and full_c:  # whole blocks: (full_r, bh, full_c, bw) against s (full_r, 1, full_c, 1)
        V = X[:full_r * bh, :full_c * bw].reshape(full_r, bh, full_c, bw)  # a view in numpy and torch alike
        V *= s[:full_r, None, :full_c, None]
    if full_c * bw < cols:  # the last, partial column block of every row
        for i in range(-(-h // bh)):
            X[i * bh:(i + 1) * bh, full_c * bw:] *= s[i, full_c]
    if full_r * bh < h:  # the last, partial row block's whole column blocks
        for j in range(full_c):
            X[full_r * bh:, j * bw:(j + 1) * bw] *= s[full_r, j]


class Fp8Target:
    """One float8 weight that adapters change, written with the same scheme: `weight` and `scales` are the two
    transforms (duck-typed as ops.merge.Merger: `block_rows`, `block(V, r0)`) of its two tensors.

    The weight's row blocks are whole scale blocks; each is dequantized with the original scales, merged in
    float32 (ops.merge.Merger, out dtype F32) and requantized (`quantize`). A scale block whose merged values
    equal the dequantized original (no term reaches it) keeps its original bytes and scale. For the "tensor"
    scheme the one scale needs the whole merged tensor's amax: a first pass computes it.

    The new scales are recorded as the weight is written; the scale tensor's transform waits for them when the
    weight is being written by another worker, and computes them itself (the same pass, the same numbers) when
    the weight has not started (a writer that takes tensors in another order).

    `survival()` is ||Q(W + ΔW) − Q(W)||_F / ||ΔW||_F over the tensor: the share of the adapter's change that
    the requantized weight keeps (1 when the grid is fine enough, near 0 when rounding swallows it).
    """

    def __init__(self, key: str, shape, scheme: Scheme, terms, reader, *, device=None, probe: bool = False):
        from ..adapter import block_rows_for
        from .merge import BLOCK_BYTES

        self.key, self.shape, self.scheme, self.terms, self.reader = key, tuple(shape), scheme, list(terms), reader
        self.dev, self.probe = device or cpu(), probe
        self.rows, self.cols = self.shape
        step = scheme.block[0] if scheme.kind == "block" else 1
        rows = block_rows_for(self.rows, self.cols, BLOCK_BYTES, 4)
        self.block_rows = max(step, rows // step * step)  # whole scale blocks
        old = np.asarray(reader.read(scheme.scale_key), dtype=np.float32)
        # Scales as a 2-D row view, as the streamer hands the scale tensor over: (rows of it, the rest).
        self.old_scales = old.reshape(old.shape[0] if old.ndim else 1, -1)
        self.new_scales = np.array(self.old_scales, copy=True)
        self._merger = None
        self._tensor_scale = None  # the "tensor" scheme's one scale (first pass)
        self._state = "waiting"  # -> "writing" -> "done"
        self._cv = threading.Condition()
        self._moved = 0.0  # ||Q(W + ΔW) − Q(W)||^2
        self._delta = 0.0  # ||ΔW||^2
        self.weight = _Transform(self.block_rows, self._weight_block)
        self.scales = _Transform(self.old_scales.shape[0], self._scale_block)

    def _scale_slice(self, r0: int, r1: int):
        if self.scheme.kind == "block":
            bh = self.scheme.block[0]
            return slice(r0 // bh, -(-r1 // bh))
        return slice(r0, r1) if self.scheme.kind == "channel" else slice(0, 1)

    def _new_merger(self, probe: bool):
        from .merge import Merger

        return Merger(self.key, self.shape, "F32", self.terms, "F32", device=self.dev, probe=probe)

    def _merged_rows(self, merger, V, r0: int):
        """(X, M, sl): the rows dequantized with the original scales and merged, arrays of the merge's device (M
        the merger's scratch, valid until its next block in this thread), and the scale rows they use."""
        sl = self._scale_slice(r0, r0 + V.shape[0])
        X = dequantize(V, self.old_scales[sl], self.scheme, self.dev)
        return X, merger.block(X, r0, host=False), sl

    def _whole_pass(self):
        """(V, X, M, r0) for every row block of the tensor, read from the file and merged by a merger of its own
        (the passes that need the whole merged tensor before or apart from writing it)."""
        from ..adapter import row_spans

        merger = self._new_merger(False)
        with self.reader.mapped(self.key) as flat:
            W = flat.reshape(self.rows, self.cols)
            for r0, r1 in row_spans(self.rows, self.block_rows):
                X, M, _ = self._merged_rows(merger, W[r0:r1], r0)
                yield W[r0:r1], X, M, r0
            del W, flat

    def _first_pass(self) -> None:
        """The "tensor" scheme's scale: amax of the whole merged tensor / 448."""
        if self.scheme.kind != "tensor" or self._tensor_scale is not None:
            return
        amax = 0.0
        for _, _, M, _ in self._whole_pass():
            amax = max(amax, float(self.dev.xp.max(M)), -float(self.dev.xp.min(M))) if M.shape[0] else amax
        self._tensor_scale = np.array([amax / E4M3_MAX if amax > 0 else 1.0], np.float32)

    def _requantize(self, V, X, M, r0: int) -> tuple[np.ndarray, float, float]:
        """(float8 rows, ||Q(M) − X||², ||M − X||²) for merged rows M (X: the rows as they were, V: their stored
        bytes), their new scales recorded in `new_scales`; untouched blocks keep their bytes and scales."""
        scheme, dev, xp = self.scheme, self.dev, self.dev.xp
        sl = self._scale_slice(r0, r0 + V.shape[0])
        D = M - X
        delta = sum_squares(dev, D)
        keep = None
        if scheme.kind == "block":  # a block with M == X everywhere keeps its bytes and scale
            keep = dev.to_numpy((_block_reduce(D, scheme.block, xp.max, xp) == 0)
                                & (_block_reduce(D, scheme.block, xp.min, xp) == 0))
            keep = keep if keep.any() else None
        del D
        scales = (self._tensor_scale, self._tensor_scale) if scheme.kind == "tensor" else \
            _scales(M, scheme, dev)
        q, s, moved = _quantize(M, scheme, scales, dev, X, keep)
        q = q.view(E4M3)
        if keep is not None:
            bh, bw = scheme.block
            old = self.old_scales[sl].reshape(s.shape)
            for i, j in zip(*np.nonzero(keep)):
                rs, cs = slice(i * bh, (i + 1) * bh), slice(j * bw, (j + 1) * bw)
                q[rs, cs] = V[rs, cs]
                s[i, j] = old[i, j]
        self.new_scales[sl] = s.reshape(self.new_scales[sl].shape)
        return q, moved, delta

    def _weight_block(self, V, r0: int) -> np.ndarray:
        if r0 == 0:
            with self._cv:
                self._state = "writing"
            self._first_pass()
            self._merger = self._new_merger(self.probe)
            self.probe_merger = self._merger
        X, M, _ = self._merged_rows(self._merger, V, r0)
        q, moved, delta = self._requantize(V, X, M, r0)
        self._moved += moved
        self._delta += delta
        if r0 + V.shape[0] == self.rows:
            with self._cv:
                self._state = "done"
                self._cv.notify_all()
        return q

    def _scale_block(self, S, r0: int) -> np.ndarray:
        with self._cv:
            if self._state == "writing":
                self._cv.wait_for(lambda: self._state == "done")
            fresh = self._state == "waiting"
        if fresh:  # the weight has not started: the same pass, its numbers
            self._first_pass()
            for V, X, M, a in self._whole_pass():
                self._requantize(V, X, M, a)
            with self._cv:
                self._state = "done"
        from .. import dtypes

        rows = self.new_scales[r0:r0 + S.shape[0]].reshape(S.shape)
        return dtypes.cast(np.ascontiguousarray(rows), self.scheme.scale_dtype)

    def survival(self) -> float:
        """||Q(W + ΔW) − Q(W)||_F / ||ΔW||_F (1.0 for a zero delta)."""
        return math.sqrt(self._moved / self._delta) if self._delta > 0 else 1.0


class _Transform:
    def __init__(self, block_rows: int, fn):
        self.block_rows, self._fn = block_rows, fn

    def block(self, V, r0: int):
        return self._fn(V, r0)


__all__ = ["Fp8Target", "Scheme", "schemes", "block_size", "dequantize", "quantize", "encode", "E4M3", "E4M3_MAX",
           "DEFAULT_BLOCK"]
