"""FP8 base weights: how a float8 tensor and its scales make a float32 weight, and back (FORMATS.md, "FP8 bases").

Two storage schemes are in use, both W = w · s with w float8_e4m3fn (max 448):

  block     DeepSeek-V3/R1, Qwen3 FP8 and transformers' "fp8" quantization: `<name>.weight_scale_inv`, float32,
            one scale per (bh, bw) block of the weight (`quantization_config.weight_block_size`, [128, 128]),
            shape (ceil(out / bh), ceil(in / bw)); edge blocks are partial. transformers' FP8Linear dequantizes
            as `weight * weight_scale_inv` expanded over the blocks.
  tensor    compressed-tensors (llm-compressor) float8: `<name>.weight_scale`, one value (shape (), (1,)) or
  channel   one per output row (out, 1); `input_scale` (activations) is left as it is.

Requantizing (`quantize`) follows the producers, per group (block, tensor or row) and rounding to nearest
even through ml_dtypes, clipped to ±448: for "block" transformers' Fp8Quantize (w = W · (448 / amax), stored
scale 1 / (448 / amax)); for "tensor" and "channel" compressed-tensors (s = amax / 448, w = W / s). A group
whose values are all zero keeps scale 1. Dequantizing a requantized W gives W within half an e4m3 ulp
of each value's group scale: one FP8 rounding.

`Fp8Target` merges adapter terms into one float8 weight as the model streamer (io/stream.py) writes it: the
weight's rows are dequantized, merged in float32 by ops.merge's Merger (the one merge arithmetic), and
requantized with recomputed scales; the scale tensor is written by a second transform of the same target.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass

import ml_dtypes
import numpy as np

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


def _decode(w: np.ndarray) -> np.ndarray:
    """float8_e4m3fn values as a new float32 array."""
    return _E4M3_TO_F32[np.asarray(w).view(np.uint8)]


def dequantize(w: np.ndarray, s: np.ndarray, scheme: Scheme) -> np.ndarray:
    """W = w · s in float32 for weight rows `w` (h, cols) and the scale rows that cover them (block: the
    ceil(h / bh) scale rows; tensor: the one value; channel: h values)."""
    W = _decode(w)
    s = np.asarray(s, dtype=np.float32)
    if scheme.kind == "block":
        _blockwise(W, s.reshape(-1, s.shape[-1]), scheme.block, np.multiply)
    elif scheme.kind == "tensor":
        W *= s.reshape(())
    else:
        W *= s.reshape(-1, 1)
    return W


def quantize(W: np.ndarray, scheme: Scheme) -> tuple[np.ndarray, np.ndarray]:
    """(w float8_e4m3fn, s float32) with W ≈ w · s: s = amax / 448 per group, w rounded to nearest even.

    W is float32 rows (h, cols): for "block" whole blocks of rows (h a multiple of bh, but the last rows of a
    tensor); for "tensor" the whole tensor; for "channel" any rows. Returns s shaped as the scheme stores it
    for those rows: (ceil(h / bh), ceil(cols / bw)), (1,) or (h, 1).
    """
    W = np.asarray(W, dtype=np.float32)
    h, cols = W.shape
    if scheme.kind == "block":
        bh, bw = scheme.block
        nr, nc = -(-h // bh), -(-cols // bw)
        P = np.zeros((nr * bh, nc * bw), np.float32)  # padded with zeros: they do not change an amax
        np.abs(W, out=P[:h, :cols])
        amax = P.reshape(nr, bh, nc, bw).max(axis=(1, 3))
    elif scheme.kind == "tensor":
        amax = np.array([np.abs(W).max() if W.size else 0.0], np.float32)
    else:
        amax = np.abs(W).max(axis=1, keepdims=True) if cols else np.zeros((h, 1), np.float32)
    if scheme.kind == "block":
        # transformers' Fp8Quantize: multiplier 448 / amax, stored scale its float32 reciprocal (a power of two,
        # rounded up, for scale_fmt "ue8m0"), W times the multiplier.
        mult = np.where(amax > 0, np.float32(E4M3_MAX) / np.where(amax > 0, amax, 1), 1).astype(np.float32)
        s = (np.float32(1) / mult).astype(np.float32)
        if scheme.pow2:
            s = np.exp2(np.ceil(np.log2(np.maximum(s, np.finfo(np.float32).tiny)))).astype(np.float32)
            mult = (np.float32(1) / s).astype(np.float32)
        Q = np.array(W, copy=True)
        _blockwise(Q, mult, scheme.block, np.multiply)
    else:  # compressed-tensors: scale amax / 448, W divided by it
        s = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1.0)).astype(np.float32)
        Q = W / s
    np.clip(Q, -E4M3_MAX, E4M3_MAX, out=Q)
    return Q.astype(E4M3), s


def _blockwise(X: np.ndarray, s: np.ndarray, block: tuple[int, int], op) -> None:
    """X[i*bh:(i+1)*bh, j*bw:(j+1)*bw] = op(that block, s[i, j]) in place, for X (h, cols) and s covering it,
    through broadcast views (no weight-sized array of scales)."""
    bh, bw = block
    h, cols = X.shape
    full_r, full_c = h // bh, cols // bw
    if full_r and full_c:  # whole blocks: (full_r, bh, full_c, bw) against s (full_r, 1, full_c, 1)
        V = X[:full_r * bh, :full_c * bw].reshape(full_r, bh, full_c, bw)
        op(V, s[:full_r, None, :full_c, None], out=V)
    if full_c * bw < cols:  # the last, partial column block of every row
        for i in range(-(-h // bh)):
            R = X[i * bh:(i + 1) * bh, full_c * bw:]
            op(R, s[i, full_c], out=R)
    if full_r * bh < h:  # the last, partial row block's whole column blocks
        for j in range(full_c):
            R = X[full_r * bh:, j * bw:(j + 1) * bw]
            op(R, s[full_r, j], out=R)


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
        self.device, self.probe = device, probe
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

        return Merger(self.key, self.shape, "F32", self.terms, "F32", device=self.device, probe=probe)

    def _merged_rows(self, merger, V, r0: int) -> tuple[np.ndarray, np.ndarray, slice]:
        """(X, M, sl): the rows dequantized with the original scales, merged, and the scale rows they use."""
        sl = self._scale_slice(r0, r0 + V.shape[0])
        X = dequantize(V, self.old_scales[sl], self.scheme)
        M = np.array(merger.block(X, r0), copy=True)  # the merger returns its scratch
        return X, M, sl

    def _quantize(self, M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.scheme.kind != "tensor":
            return quantize(M, self.scheme)
        s = self._tensor_scale
        Q = np.clip(M / s.reshape(()), -E4M3_MAX, E4M3_MAX)
        return Q.astype(E4M3), s

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
            amax = max(amax, float(np.abs(M).max()) if M.size else 0.0)
        self._tensor_scale = np.array([amax / E4M3_MAX if amax > 0 else 1.0], np.float32)

    def _requantize(self, V, X, M, r0: int) -> np.ndarray:
        """The float8 rows of merged rows M (X: the rows as they were, V: their stored bytes), their new scales
        recorded in `new_scales`; untouched blocks keep their bytes and scales."""
        sl = self._scale_slice(r0, r0 + V.shape[0])
        q, s = self._quantize(M)
        if self.scheme.kind == "block":
            q, s = _keep_untouched(V, X, M, q, s, self.old_scales[sl], self.scheme)
        self.new_scales[sl] = s.reshape(self.new_scales[sl].shape)
        return q

    def _weight_block(self, V, r0: int) -> np.ndarray:
        if r0 == 0:
            with self._cv:
                self._state = "writing"
            self._first_pass()
            self._merger = self._new_merger(self.probe)
            self.probe_merger = self._merger
        X, M, sl = self._merged_rows(self._merger, V, r0)
        q = self._requantize(V, X, M, r0)
        D = dequantize(q, self.new_scales[sl], self.scheme) - X
        self._moved += float(np.dot(D.reshape(-1), D.reshape(-1)))
        M -= X
        self._delta += float(np.dot(M.reshape(-1), M.reshape(-1)))
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


def _keep_untouched(V, X, M, q, s, s_old, scheme: Scheme):
    """Blocks whose merged values equal the dequantized original keep the original float8 bytes and scale."""
    bh, bw = scheme.block
    h, cols = X.shape
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rs, cs = slice(i * bh, min(h, (i + 1) * bh)), slice(j * bw, min(cols, (j + 1) * bw))
            if np.array_equal(M[rs, cs], X[rs, cs]):
                q[rs, cs] = V[rs, cs]
                s[i, j] = s_old.reshape(s.shape)[i, j]
    return q, s


__all__ = ["Fp8Target", "Scheme", "schemes", "block_size", "dequantize", "quantize", "E4M3", "E4M3_MAX", "DEFAULT_BLOCK"]
