"""Quantized base weights: the registry of storage schemes loratool reads (FORMATS.md, "Quantized bases").

A scheme is one unit (`QuantScheme`): how its weights are found from tensor names, dtypes and shapes (and
config.json's `quantization_config` where the tensors cannot tell), which companion tensors each weight owns,
how rows of the weight's row view are dequantized to float32, and whether the merge can write the weight back
in its own scheme (FP8 only: ops/fp8.py; requantizing to 4 or 8 bits is out of scope). A found weight is a
`QuantWeight`: the key it is written under dequantized (GPTQ's `qweight` becomes `weight`, gpt-oss'
`gate_up_proj_blocks` becomes `gate_up_proj`), its dequantized shape, and the base keys it replaces.

`DequantizedView` presents a base reader as the float model the quantized one stands for: adapter readers
resolve their targets against it, `extract` pairs its tensors, `validate --base` fits against it.

Formulas (each checked against its library in tests/test_quant.py):
  bnb-nf4/fp4  bitsandbytes 4-bit (`Params4bit`): `weight` packs two 4-bit codes per byte (high nibble first)
               of the flattened weight; W = quant_map[code] · absmax[i // blocksize]; with double quantization
               (`nested_absmax`) absmax = nested_quant_map[absmax_u8] · nested_absmax[j // nested_blocksize]
               + nested_offset. The shape, block sizes and offset are JSON in `weight.quant_state.bitsandbytes__*`
               (bitsandbytes.functional.QuantState.as_dict(packed=True); dequantize_4bit).
  bnb-int8     LLM.int8 (`Int8Params`): W = weight_i8 · SCB[row] · (1 / 127) (bitsandbytes' int8_vectorwise_dequant).
  gptq         AutoGPTQ/GPTQModel: `qweight` (in·bits/32, out) int32 packs `bits`-bit codes along the input
               dimension, low bits first; `qzeros` (groups, out·bits/32) packs zeros along the output dimension;
               W^T[i, j] = scales[g_idx[i], j] · (q[i, j] − (z[g_idx[i], j] + 1)) (AutoGPTQ qlinear_cuda_old.py
               forward; the +1 is the "gptq" checkpoint_format's, "gptq_v2" stores z itself).
  awq          AutoAWQ GEMM: `qweight` (in, out·bits/32) and `qzeros` (groups, out·bits/32) pack along the output
               dimension in the order [0, 2, 4, 6, 1, 3, 5, 7]; W^T[i, j] = (q[i, j] − z[i // group, j]) ·
               scales[i // group, j] (AutoAWQ awq/utils/packing_utils.py dequantize_gemm).
  mxfp4        OCP MX FP4 (gpt-oss): `<name>_blocks` (E, R, G, 16) uint8, two e2m1 codes per byte (low nibble
               first), `<name>_scales` (E, R, G) uint8 exponents biased by 127; the weight `<name>` is
               (E, G·32, R) (transformers' integrations/mxfp4.py convert_moe_packed_tensors, transposed as it does).
  fp8-*        ops/fp8.py (block-scaled e4m3 and compressed-tensors per-tensor / per-channel).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import fp8


@dataclass(frozen=True)
class QuantWeight:
    """One quantized weight of a base: `key` is the float weight it stands for (the key it is written under,
    dequantized, and the key adapters target), `shape` its dequantized shape, `stored` the tensor holding its
    codes (the output places `key` in that tensor's shard), `owned` every base key it replaces."""

    key: str
    scheme: str
    shape: tuple[int, ...]
    stored: str
    owned: tuple[str, ...]
    params: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def rows_cols(self) -> tuple[int, int]:
        return (1, 1) if not self.shape else (self.shape[0], math.prod(self.shape[1:]))


@dataclass(frozen=True)
class QuantScheme:
    """A registered storage scheme: `find(info, keys, config, read)` -> {key: QuantWeight};
    `rows(reader, weight, r0, r1)` -> float32 rows [r0, r1) of the weight's row view (r1 - r0, cols);
    `requantize`: the merge can write the weight back in this scheme (else it is written dequantized);
    `library`: whose formula `rows` follows."""

    name: str
    summary: str
    library: str
    find: Callable[..., dict]
    rows: Callable[..., np.ndarray]
    requantize: bool = False


SCHEMES: dict[str, QuantScheme] = {}


def register(scheme: QuantScheme) -> QuantScheme:
    SCHEMES[scheme.name] = scheme
    return scheme


def quant_config(config: dict | None) -> dict:
    q = (config or {}).get("quantization_config") if isinstance(config, dict) else None
    return q if isinstance(q, dict) else {}


def find_weights(info, keys, config: dict | None = None, read=None) -> dict[str, QuantWeight]:
    """Every quantized weight of a base that some registered scheme reads.

    Args:
        info: key -> (shape, safetensors dtype) or None. keys: every key of the base.
        config: the base's config.json (its quantization_config), or None.
        read: key -> numpy array, for the small tensors a scheme parses (bitsandbytes' quant_state).
    Returns:
        dequantized key -> QuantWeight; a key is owned by one weight at most (the first scheme wins).
    """
    keys = list(keys)
    out: dict[str, QuantWeight] = {}
    owned: set[str] = set()
    for scheme in SCHEMES.values():
        for key, qw in scheme.find(info, keys, config, read).items():
            if key in out or owned.intersection(qw.owned):
                continue
            out[key] = qw
            owned.update(qw.owned)
    return out


def dequantize_rows(reader, qw: QuantWeight, r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) of the weight's row view, float32 (r1 - r0, cols), read from `reader` (keys(), mapped())."""
    return SCHEMES[qw.scheme].rows(reader, qw, r0, r1)


def dequantize(reader, qw: QuantWeight) -> np.ndarray:
    """The whole dequantized weight, float32 of shape `qw.shape`."""
    return dequantize_rows(reader, qw, 0, qw.rows_cols[0]).reshape(qw.shape)


# ---- reading helpers --------------------------------------------------------------------------------------

def _span(reader, key: str, a: int, b: int) -> np.ndarray:
    """Elements [a, b) of a tensor, copied out of the mapping."""
    with reader.mapped(key, a, b) as flat:
        return np.array(flat)


def _cols(reader, key: str, shape, c0: int, c1: int) -> np.ndarray:
    """Columns [c0, c1) of a 2-D tensor (pages of the other columns are not copied)."""
    with reader.mapped(key) as flat:
        return np.array(flat.reshape(shape)[:, c0:c1])


def _whole(reader, key: str) -> np.ndarray:
    with reader.mapped(key) as flat:
        return np.array(flat)


def _dt(info, key):
    i = info(key)
    return None if i is None else (tuple(int(x) for x in i[0]), i[1])


# ---- FP8 (ops/fp8.py) -----------------------------------------------------------------------------------

def _fp8_find(info, keys, config, read, kind: str):
    found = {}
    keyset = set(keys)
    for key, s in fp8.schemes(info, keys, config).items():
        if s.kind != kind:
            continue
        shape = tuple(int(x) for x in info(key)[0])
        extra = re.sub(r"weight$", "input_scale", key)
        owned = (key, s.scale_key) + ((extra,) if extra != key and extra in keyset else ())
        found[key] = QuantWeight(key, f"fp8-{s.kind}", shape, key, owned, {"fp8": s})
    return found


def _fp8_rows(reader, qw, r0, r1):
    s: fp8.Scheme = qw.params["fp8"]
    rows, cols = qw.rows_cols
    scales = _whole(reader, s.scale_key)
    if s.kind == "block":  # fp8.dequantize starts at a scale block's first row
        bh = s.block[0]
        a = r0 // bh * bh
        w = _span(reader, qw.key, a * cols, r1 * cols).reshape(r1 - a, cols)
        return fp8.dequantize(w, scales.reshape(-(-rows // bh), -1)[a // bh:-(-r1 // bh)], s)[r0 - a:]
    w = _span(reader, qw.key, r0 * cols, r1 * cols).reshape(r1 - r0, cols)
    if s.kind == "channel":
        return fp8.dequantize(w, scales.reshape(-1)[r0:r1], s)
    return fp8.dequantize(w, scales, s)


for _kind, _text in (("block", "float8 e4m3 with float32 scales per weight block (DeepSeek-V3, Qwen3 FP8)"),
                     ("tensor", "float8 e4m3 with one scale (compressed-tensors)"),
                     ("channel", "float8 e4m3 with one scale per output row (compressed-tensors)")):
    register(QuantScheme(f"fp8-{_kind}", _text, "transformers FP8 / compressed-tensors",
                         (lambda k: lambda info, keys, config, read: _fp8_find(info, keys, config, read, k))(_kind),
                         _fp8_rows, requantize=True))


# ---- bitsandbytes 4-bit -----------------------------------------------------------------------------------

_BNB4 = re.compile(r"^(.*)\.quant_state\.bitsandbytes__(nf4|fp4)$")
_BNB_MAX_STATE = 1 << 16  # bytes of quant_state JSON read at most


def _bnb4_find(info, keys, config, read, want: str):
    found = {}
    keyset = set(keys)
    for qs in keys:
        m = _BNB4.match(qs)
        if m is None or m.group(2) != want or read is None:
            continue
        w, kind = m.group(1), m.group(2)
        need = [w, w + ".absmax", w + ".quant_map"]
        qi = _dt(info, qs)
        if not all(k in keyset for k in need) or qi is None or qi[1] != "U8" or math.prod(qi[0]) > _BNB_MAX_STATE:
            continue
        try:
            state = json.loads(bytes(np.asarray(read(qs)).reshape(-1).astype(np.uint8)).decode("utf-8"))
            shape = tuple(int(x) for x in state["shape"])
            bs = int(state["blocksize"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            continue  # not a state bitsandbytes wrote: left to the quantized-tensor refusal
        n = math.prod(shape)
        wi, ai = _dt(info, w), _dt(info, w + ".absmax")
        nested = w + ".nested_absmax" in keyset
        if (not shape or bs <= 0 or state.get("quant_type", kind) != kind or wi is None
                or math.prod(wi[0]) * _size(wi[1]) != -(-n // 2) or math.prod(ai[0]) != -(-n // bs)
                or ai[1] != ("U8" if nested else "F32")):
            continue
        owned = [w, w + ".absmax", w + ".quant_map", qs]
        params = {"kind": kind, "blocksize": bs, "n": n}
        if nested:
            if w + ".nested_quant_map" not in keyset:
                continue
            try:
                params.update(nested_blocksize=int(state["nested_blocksize"]),
                              nested_offset=float(state["nested_offset"]))
            except (KeyError, TypeError, ValueError):
                continue
            owned += [w + ".nested_absmax", w + ".nested_quant_map"]
        found[w] = QuantWeight(w, f"bnb-{kind}", shape, w, tuple(owned), params)
    return found


def _size(dtype: str) -> int:
    from ..spec import DTYPE_SIZES

    return DTYPE_SIZES.get(dtype, 0)


def _bnb4_rows(reader, qw, r0, r1):
    rows, cols = qw.rows_cols
    p, w = qw.params, qw.key
    bs = p["blocksize"]
    e0, e1 = r0 * cols, r1 * cols
    b0, b1 = e0 // 2, -(-e1 // 2)
    with reader.mapped(w) as flat:  # the packed bytes, whatever dtype they are stored as (quant_storage)
        packed = np.array(flat.view(np.uint8)[b0:b1])
    codes = np.empty(2 * packed.size, np.uint8)
    codes[0::2], codes[1::2] = packed >> 4, packed & 0x0F  # high nibble is the first element
    qmap = _whole(reader, w + ".quant_map").astype(np.float32)
    vals = qmap[codes[e0 - 2 * b0:e0 - 2 * b0 + (e1 - e0)]]
    a0, a1 = e0 // bs, -(-e1 // bs)
    absmax = _span(reader, w + ".absmax", a0, a1)
    if "nested_blocksize" in p:  # double quantization: absmax are 8-bit codes of a second blockwise scale
        nbs = p["nested_blocksize"]
        code2 = _whole(reader, w + ".nested_quant_map").astype(np.float32)
        nabs = _whole(reader, w + ".nested_absmax").astype(np.float32)
        idx = np.arange(a0, a1) // nbs
        absmax = code2[absmax] * nabs[idx] + np.float32(p["nested_offset"])
    per = absmax.astype(np.float32)[(np.arange(e0, e1) // bs) - a0]
    return (vals * per).reshape(r1 - r0, cols)


for _kind in ("nf4", "fp4"):
    register(QuantScheme(f"bnb-{_kind}", f"bitsandbytes 4-bit {_kind} (QLoRA), blockwise absmax, optional double "
                         "quantization", "bitsandbytes.functional.dequantize_4bit",
                         (lambda k: lambda info, keys, config, read: _bnb4_find(info, keys, config, read, k))(_kind),
                         _bnb4_rows))


# ---- bitsandbytes LLM.int8 ------------------------------------------------------------------------------

def _int8_find(info, keys, config, read):
    found = {}
    keyset = set(keys)
    for scb in keys:
        if not scb.endswith("SCB") or not (scb == "SCB" or scb.endswith(".SCB")):
            continue
        prefix = scb[:-3]
        w = prefix + "weight"
        wi, si = _dt(info, w), _dt(info, scb)
        if wi is None or wi[1] != "I8" or len(wi[0]) != 2 or si is None or math.prod(si[0]) != wi[0][0]:
            continue
        fmt = prefix + "weight_format"
        owned = (w, scb) + ((fmt,) if fmt in keyset else ())
        found[w] = QuantWeight(w, "bnb-int8", wi[0], w, owned)
    return found


def _int8_rows(reader, qw, r0, r1):
    rows, cols = qw.rows_cols
    w = _span(reader, qw.key, r0 * cols, r1 * cols).reshape(r1 - r0, cols)
    scb = _span(reader, qw.owned[1], r0, r1).astype(np.float32).reshape(-1, 1)
    # bitsandbytes' int8_vectorwise_dequant: A * stats * (1/127) as float32, in that order
    return (w.astype(np.float32) * scb) * np.float32(7.874015718698502e-3)


register(QuantScheme("bnb-int8", "bitsandbytes LLM.int8: int8 weight with one absmax per row (SCB)",
                     "bitsandbytes.functional.int8_vectorwise_dequant", _int8_find, _int8_rows))


# ---- GPTQ and AWQ ---------------------------------------------------------------------------------------

AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # logical column t of a packed word is at nibble AWQ_ORDER[t] (reverse order)


def _packed_find(info, keys, config, read, want: str):
    q = quant_config(config)
    method = str(q.get("quant_method", "")).lower()
    found = {}
    keyset = set(keys)
    for qk in keys:
        if not (qk == "qweight" or qk.endswith(".qweight")):
            continue
        p = qk[:-len("qweight")]
        qi, zi, si = _dt(info, qk), _dt(info, p + "qzeros"), _dt(info, p + "scales")
        if qi is None or zi is None or si is None or any(len(x[0]) != 2 for x in (qi, zi, si)):
            continue
        if qi[1] not in ("I32", "U32") or zi[1] not in ("I32", "U32"):
            continue
        (a, b), (groups, out) = qi[0], si[0]
        if zi[0][0] != groups or out == 0 or (zi[0][1] * 32) % out:
            continue
        bits = zi[0][1] * 32 // out
        if bits not in (2, 4, 8):  # 3-bit words straddle: not read
            continue
        layout = method if method in ("gptq", "awq") else "gptq" if b == out else "awq"
        if layout != want or (q.get("bits") is not None and q.get("bits") != bits):
            continue
        pf = 32 // bits
        if layout == "gptq":
            if b != out:
                continue
            n_in = a * pf
        else:
            if b * pf != out:
                continue
            n_in = a
        g = p + "g_idx"
        gi = _dt(info, g)
        params = {"bits": bits, "in": n_in, "out": out, "groups": groups}
        owned = [qk, p + "qzeros", p + "scales"]
        if gi is not None:
            if math.prod(gi[0]) != n_in:
                continue
            owned.append(g)
            params["g_idx"] = g
        gs = q.get("group_size")
        params["group_size"] = gs if isinstance(gs, int) and gs > 0 else -(-n_in // groups)
        params["zero_offset"] = 0 if (layout == "awq" or q.get("checkpoint_format") == "gptq_v2") else 1
        key = p + "weight"
        if key in keyset:
            continue
        found[key] = QuantWeight(key, layout, (out, n_in), qk, tuple(owned), params)
    return found


def _unpack(words: np.ndarray, bits: int, axis: int, order=None) -> np.ndarray:
    """Codes of int32 words packed `32 // bits` per word along `axis` (0 or 1), low bits first, or in `order`."""
    pf = 32 // bits
    u = words.astype(np.uint32)
    shifts = np.array([bits * (order[t] if order else t) for t in range(pf)], np.uint32)
    mask = np.uint32((1 << bits) - 1)
    if axis == 0:  # (n / pf, m) -> (n, m)
        return ((u[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, u.shape[1]).astype(np.int32)
    return ((u[:, :, None] >> shifts[None, None, :]) & mask).reshape(u.shape[0], -1).astype(np.int32)


def _gptq_rows(reader, qw, r0, r1):
    p, (qk, zk, sk) = qw.params, qw.owned[:3]
    bits, n_in, out, groups = p["bits"], p["in"], p["out"], p["groups"]
    pf = 32 // bits
    q = _unpack(_cols(reader, qk, (n_in // pf, out), r0, r1), bits, 0)  # (in, r1 - r0)
    c0, c1 = r0 // pf, -(-r1 // pf)
    z = _unpack(_cols(reader, zk, (groups, out // pf), c0, c1), bits, 1)[:, r0 - c0 * pf:r1 - c0 * pf]
    s = _cols(reader, sk, (groups, out), r0, r1).astype(np.float32)
    g = (_whole(reader, p["g_idx"]).astype(np.int64) if "g_idx" in p
         else np.arange(n_in) // p["group_size"])
    WT = s[g] * (q - (z[g] + p["zero_offset"])).astype(np.float32)  # (in, r1 - r0)
    return np.ascontiguousarray(WT.T)


def _awq_rows(reader, qw, r0, r1):
    p, (qk, zk, sk) = qw.params, qw.owned[:3]
    bits, n_in, out, groups = p["bits"], p["in"], p["out"], p["groups"]
    pf = 32 // bits
    c0, c1 = r0 // pf, -(-r1 // pf)
    cut = slice(r0 - c0 * pf, r1 - c0 * pf)
    q = _unpack(_cols(reader, qk, (n_in, out // pf), c0, c1), bits, 1, AWQ_ORDER)[:, cut]
    z = _unpack(_cols(reader, zk, (groups, out // pf), c0, c1), bits, 1, AWQ_ORDER)[:, cut]
    s = _cols(reader, sk, (groups, out), r0, r1).astype(np.float32)
    g = np.arange(n_in) // p["group_size"]
    WT = (q - z[g]).astype(np.float32) * s[g]  # (in, r1 - r0)
    return np.ascontiguousarray(WT.T)


register(QuantScheme("gptq", "GPTQ (AutoGPTQ, GPTQModel, optimum): int32-packed 2/4/8-bit codes, per-group scales "
                     "and zeros, g_idx", "AutoGPTQ qlinear forward (published formula)",
                     lambda info, keys, config, read: _packed_find(info, keys, config, read, "gptq"), _gptq_rows))
register(QuantScheme("awq", "AWQ GEMM (AutoAWQ): int32-packed 4-bit codes in AWQ order, per-group scales and zeros",
                     "AutoAWQ dequantize_gemm (published formula)",
                     lambda info, keys, config, read: _packed_find(info, keys, config, read, "awq"), _awq_rows))


# ---- MXFP4 (gpt-oss experts) ----------------------------------------------------------------------------

FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)  # e2m1


def _mxfp4_find(info, keys, config, read):
    found = {}
    keyset = set(keys)
    for bk in keys:
        if not bk.endswith("_blocks"):
            continue
        stem = bk[:-len("_blocks")]
        bi, si = _dt(info, bk), _dt(info, stem + "_scales")
        if bi is None or si is None or bi[1] != "U8" or si[1] != "U8" or len(bi[0]) != 4 or bi[0][:3] != si[0]:
            continue
        if stem in keyset:
            continue
        E, R, G, B = bi[0]
        found[stem] = QuantWeight(stem, "mxfp4", (E, G * B * 2, R), bk, (bk, stem + "_scales"), {})
    return found


def _mxfp4_rows(reader, qw, r0, r1):
    E, K, R = qw.shape
    bk, sk = qw.owned
    per = math.prod(qw.shape[1:])
    blocks = _span(reader, bk, r0 * per // 2, r1 * per // 2).reshape(r1 - r0, R, -1, 16)
    G = blocks.shape[2]
    exp = _span(reader, sk, r0 * R * G, r1 * R * G).reshape(r1 - r0, R, G, 1).astype(np.int32) - 127
    vals = np.empty(blocks.shape[:3] + (32,), np.float32)
    vals[..., 0::2], vals[..., 1::2] = FP4_VALUES[blocks & 0x0F], FP4_VALUES[blocks >> 4]  # low nibble first
    W = np.ldexp(vals, exp).reshape(r1 - r0, R, K)
    return np.ascontiguousarray(W.transpose(0, 2, 1)).reshape(r1 - r0, per)  # (E, R, K) -> (E, K, R)


register(QuantScheme("mxfp4", "MXFP4 expert blocks (gpt-oss): e2m1 codes with a power-of-two scale per 32 values",
                     "transformers integrations/mxfp4.py convert_moe_packed_tensors", _mxfp4_find, _mxfp4_rows))


# ---- the dequantized view of a base ---------------------------------------------------------------------

class DequantizedView:
    """A base reader seen as the float model its quantized weights stand for: each QuantWeight is a float32
    tensor under its own key and shape (read dequantized, row window by row window), the keys it owns are
    hidden, every other tensor is the reader's. `scheme(key)` names a weight's scheme (None for the others).
    The reader is not closed by the view."""

    def __init__(self, reader, weights: dict[str, QuantWeight]):
        self._r = reader
        self.weights = dict(weights)
        hidden = {k for q in self.weights.values() for k in q.owned}
        self._keys = [k for k in reader.keys() if k not in hidden or k in self.weights]
        self._keys += [k for k in self.weights if k not in set(self._keys)]

    def __getattr__(self, name):  # path, files, shared_keys, ... of the reader
        if name.startswith("__") or name == "_r":  # copy/pickle probes before __init__: no recursion
            raise AttributeError(name)
        return getattr(self._r, name)

    def keys(self):
        return list(self._keys)

    def scheme(self, key: str) -> str | None:
        q = self.weights.get(key)
        return None if q is None else q.scheme

    def info(self, key):
        q = self.weights.get(key)
        if q is not None:
            return q.shape, "F32"
        return None if key not in self._keys else self._r.info(key)

    def read(self, key):
        q = self.weights.get(key)
        return dequantize(self._r, q) if q is not None else self._r.read(key)

    @contextlib.contextmanager
    def mapped(self, key, start: int = 0, stop: int | None = None):
        q = self.weights.get(key)
        if q is None:
            with self._r.mapped(key, start, stop) as flat:
                yield flat
            return
        rows, cols = q.rows_cols
        stop = rows * cols if stop is None else stop
        r0, r1 = start // cols, -(-stop // cols)
        yield dequantize_rows(self._r, q, r0, r1).reshape(-1)[start - r0 * cols:stop - r0 * cols]

    def sha256(self, key):
        import hashlib

        if key in self.weights:
            return hashlib.sha256(self.read(key).tobytes()).hexdigest()
        return self._r.sha256(key)

    def check_unchanged(self) -> None:
        self._r.check_unchanged()

    def close(self) -> None:
        pass


class Dequantizing:
    """The merge transform of a quantized weight written dequantized: rows from the registry's `rows`, merged
    by ops.merge's Merger in float32 and rounded once to `out_dtype`. The Rewriter hands it placeholders of the
    rows' count (io.stream computed outputs): it reads the quantized tensors itself. Duck-typed as Merger."""

    def __init__(self, qw: QuantWeight, terms, reader, out_dtype: str, *, device=None, probe: bool = False):
        from .merge import Merger

        self.qw, self.reader = qw, reader
        self.merger = Merger(qw.key, qw.shape, "F32", list(terms), out_dtype, device=device, probe=probe)
        self.block_rows = self.merger.block_rows

    def block(self, V, r0: int):
        return self.merger.block(dequantize_rows(self.reader, self.qw, r0, r0 + V.shape[0]), r0)

    def probe_error(self) -> float:
        return self.merger.probe_error()


def refusal_hint() -> str:
    """The schemes the merge reads, for messages about tensors none of them reads."""
    return ", ".join(SCHEMES)


__all__ = ["QuantWeight", "QuantScheme", "SCHEMES", "register", "find_weights", "dequantize_rows", "dequantize",
           "DequantizedView", "Dequantizing", "quant_config", "refusal_hint", "FP4_VALUES", "AWQ_ORDER"]
