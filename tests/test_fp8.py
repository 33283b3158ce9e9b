"""FP8 bases: ops.fp8 against transformers' FP8 formulas, and merges that keep the base's float8 scheme."""

from __future__ import annotations

import json
import types

import ml_dtypes
import numpy as np
import pytest
import torch

import loratool
from loratool.adapter import Adapter, whole_target
from loratool.container import read_arrays, read_header
from loratool.ops import fp8
from tests.clitools import run
from tests.ulp import ulp_distance

E4M3 = ml_dtypes.float8_e4m3fn
BLOCK = fp8.Scheme("block", "w_scale_inv", "F32", (128, 128))


def _fp8_weight(rows, cols, seed=0, block=(128, 128)):
    """A float8 weight and block scales as a producer writes them (transformers' formula, ops.fp8.quantize)."""
    W = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.05
    q, s = fp8.quantize(W, fp8.Scheme("block", "", "F32", block))
    return q, s


def test_decoding_table_is_ml_dtypes():
    codes = np.arange(256, dtype=np.uint8).view(E4M3)
    got = fp8.dequantize(codes.reshape(16, 16), np.ones((1, 1), np.float32), BLOCK)
    want = codes.astype(np.float32).reshape(16, 16)
    assert np.array_equal(got, want, equal_nan=True)  # the two NaN codes too


def test_dequantize_matches_transformers_partial_edge_blocks():
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    q, s = _fp8_weight(300, 200)  # edge blocks of 44 rows and 72 columns
    ours = fp8.dequantize(q, s, BLOCK)
    ref = _dequantize_fp8_weight(torch.from_numpy(q.view(np.uint8)).view(torch.float8_e4m3fn),
                                 torch.from_numpy(s), [128, 128], torch.float32).numpy()
    assert np.array_equal(ours, ref)  # one multiplication per element: exactly the same


@pytest.mark.parametrize("fmt", [None, "ue8m0"])
def test_quantize_matches_transformers(fmt):
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    W = np.random.default_rng(1).standard_normal((256, 384)).astype(np.float32) * 0.02
    W[:128, :128] = 0  # an all-zero block keeps scale 1
    cfg = types.SimpleNamespace(weight_block_size=[128, 128], scale_fmt=fmt)
    out = Fp8Quantize(types.SimpleNamespace(quantization_config=cfg))._quantize_one("x.weight", torch.from_numpy(W))
    q, s = fp8.quantize(W, fp8.Scheme("block", "", "F32", (128, 128), pow2=fmt == "ue8m0"))
    ref_s = out["x.weight_scale_inv"]
    ref_s = ref_s.to(torch.float32).numpy()
    assert np.array_equal(q.view(np.uint8), out["x.weight"].view(torch.uint8).numpy())
    # torch's reciprocal and numpy's division may differ by one float32 rounding
    assert ulp_distance(s, ref_s).max() <= 1
    assert s[0, 0] == 1.0


def _e4m3_ulp(q: np.ndarray) -> np.ndarray:
    """The e4m3 step at each float8 value: 2^(e - 3) for normal values (3 mantissa bits), 2^-9 below 2^-6."""
    a = np.abs(q.astype(np.float32))
    return np.where(a >= 2.0 ** -6, 2.0 ** (np.floor(np.log2(np.maximum(a, 2.0 ** -6))) - 3), 2.0 ** -9)


def test_quantize_is_one_fp8_rounding():
    W = np.random.default_rng(2).standard_normal((200, 130)).astype(np.float32)
    for scheme in (BLOCK, fp8.Scheme("tensor", "", "F32"), fp8.Scheme("channel", "", "F32")):
        q, s = fp8.quantize(W, scheme)
        back = fp8.dequantize(q, s, scheme)
        per_element = fp8.dequantize(np.ones(W.shape, E4M3), s, scheme)  # each value's group scale
        # Half an e4m3 step of the quantized value, in the group's scale (plus float32 rounding of W / s).
        assert np.all(np.abs(back - W) <= (0.5 * _e4m3_ulp(q) + 1e-6) * per_element), scheme.kind


def _base_file(path, kind="block", rows=256, cols=384, seed=3):
    """A tiny model file: q_proj as float8 with scales in `kind`'s scheme, a bf16 v_proj and a norm."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    name = "model.layers.0.self_attn.q_proj.weight"
    if kind == "block":
        q, s = fp8.quantize(W, BLOCK)
        scales = {name + "_scale_inv": s}
    else:
        q, s = fp8.quantize(W, fp8.Scheme(kind, "", "F32"))
        scales = {name.replace("weight", "weight_scale"): s.reshape(() if kind == "tensor" else (rows, 1))}
    tensors = {name: q, **scales,
               "model.layers.0.self_attn.v_proj.weight": W.astype(ml_dtypes.bfloat16),
               "model.norm.weight": np.ones(cols, ml_dtypes.bfloat16)}
    from loratool.container import write_file

    write_file(path, tensors, {})
    return name, tensors


def _adapter(name, rows, cols, rank=4, size=0.05, seed=4, block_rows=None):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((rank, cols)).astype(np.float32) * size
    B = rng.standard_normal((rows, rank)).astype(np.float32) * size
    t = whole_target(name, "linear", (rows, cols), A, B, alpha=float(rank))
    return Adapter(targets={name: t}), B @ A


@pytest.mark.parametrize("kind", ["block", "tensor", "channel"])
def test_merge_keeps_the_fp8_scheme(tmp_path, kind):
    name, tensors = _base_file(tmp_path / "base.safetensors", kind)
    scale_key = next(k for k in tensors if k.startswith(name) and k != name) if kind == "block" else \
        name.replace("weight", "weight_scale")
    ad, delta = _adapter(name, 256, 384, size=0.2)
    loratool.save(ad, tmp_path / "ad.safetensors")
    res = loratool.merge(tmp_path / "base.safetensors", tmp_path / "ad.safetensors", tmp_path / "out.safetensors",
                         verify=True)
    out = read_arrays(tmp_path / "out.safetensors", read_header(tmp_path / "out.safetensors"))
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in tensors.items()}
    assert out[scale_key].shape == tensors[scale_key].shape
    scheme = fp8.Scheme(kind, scale_key, "F32", (128, 128) if kind == "block" else None)
    oracle = fp8.dequantize(tensors[name], tensors[scale_key], scheme) + delta  # float32 W + s·B·A (s = 1)
    got = fp8.dequantize(out[name], out[scale_key], scheme)
    # Within one fp8 rounding of the float32 oracle: half an e4m3 step in the new group scale (and a float32
    # rounding of the sum can move a value onto the other side of a tie, so an exact-requantization comparison
    # is nearly, not always, equal).
    per_element = fp8.dequantize(np.ones(got.shape, E4M3), out[scale_key], scheme)
    assert np.all(np.abs(got - oracle) <= (0.5 * _e4m3_ulp(out[name]) + 1e-5) * per_element)
    q_oracle, s_oracle = fp8.quantize(oracle, scheme)
    assert np.mean(got == fp8.dequantize(q_oracle, s_oracle, scheme)) > 0.999
    assert np.array_equal(out["model.layers.0.self_attn.v_proj.weight"].view(np.uint16),
                          tensors["model.layers.0.self_attn.v_proj.weight"].view(np.uint16))
    kept = res.requantized[name]
    moved = fp8.dequantize(out[name], out[scale_key], scheme) - fp8.dequantize(tensors[name], tensors[scale_key],
                                                                                scheme)
    assert kept == pytest.approx(np.linalg.norm(moved) / np.linalg.norm(delta), rel=1e-4)
    assert kept > 0.9 and not res.warnings


def test_untouched_blocks_keep_their_bytes(tmp_path):
    """A target index covering the first 128 rows: the other scale blocks are written as they were."""
    from loratool.adapter import Block, Target

    name, tensors = _base_file(tmp_path / "base.safetensors", "block")
    rng = np.random.default_rng(9)
    blk = Block(2, 2.0, "standard", (0, 128), (0, 384), rng.standard_normal((2, 384)).astype(np.float32) * 0.3,
                rng.standard_normal((128, 2)).astype(np.float32) * 0.3)
    ad = Adapter(targets={name: Target(key=name, layout="linear", shape=(256, 384), blocks=(blk,))})
    loratool.save(ad, tmp_path / "ad.safetensors")
    loratool.merge(tmp_path / "base.safetensors", tmp_path / "ad.safetensors", tmp_path / "out.safetensors")
    out = read_arrays(tmp_path / "out.safetensors", read_header(tmp_path / "out.safetensors"))
    assert np.array_equal(out[name][128:].view(np.uint8), tensors[name][128:].view(np.uint8))
    assert np.array_equal(out[name + "_scale_inv"][1:], tensors[name + "_scale_inv"][1:])
    assert not np.array_equal(out[name][:128].view(np.uint8), tensors[name][:128].view(np.uint8))


def test_swallowed_adapter_is_reported(tmp_path):
    name, _ = _base_file(tmp_path / "base.safetensors", "block")
    ad, _ = _adapter(name, 256, 384, size=0.002)  # ΔW ~ 1e-5: far under the e4m3 step of weights ~0.05
    loratool.save(ad, tmp_path / "ad.safetensors")
    code, out, err = run("merge", str(tmp_path / "base.safetensors"), str(tmp_path / "ad.safetensors"), "-o",
                         str(tmp_path / "out.safetensors"), "-q")
    assert code == 0, err
    assert "warning: float8 requantization keeps under 50%" in err and name in err


def test_fp8_weight_without_scales_is_refused(tmp_path):
    from loratool.container import write_file

    name = "model.layers.0.self_attn.q_proj.weight"
    write_file(tmp_path / "base.safetensors", {name: np.zeros((8, 8), E4M3)}, {})
    ad, _ = _adapter(name, 8, 8)
    loratool.save(ad, tmp_path / "ad.safetensors")
    code, out, err = run("merge", str(tmp_path / "base.safetensors"), str(tmp_path / "ad.safetensors"), "-o",
                         str(tmp_path / "out.safetensors"))
    assert code == 4 and "F8_E4M3" in err and "quantized" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_block_size_from_config(tmp_path):
    cfg = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}
    info = {"w.weight": ((128, 128), "F8_E4M3"), "w.weight_scale_inv": ((2, 2), "F32")}
    got = fp8.schemes(info.get, list(info), cfg)
    assert got["w.weight"].block == (64, 64)
    # Without a config, a scale of another shape than 128 x 128 blocks gives the block size.
    assert fp8.schemes(info.get, list(info), None)["w.weight"].block == (64, 64)
    assert json.dumps(cfg)  # the config is plain data


def test_dtype_writes_a_dequantized_merge(tmp_path):
    """--dtype bfloat16: every float8 weight dequantized (merged where targeted), scales and the config's
    quantization_config gone; each value one bf16 rounding of the float32 oracle."""
    from loratool.container import write_file

    base = tmp_path / "base"
    base.mkdir()
    name, tensors = _base_file(base / "model.safetensors", "block")
    other = "model.layers.0.self_attn.k_proj.weight"
    Wk = np.random.default_rng(7).standard_normal((256, 384)).astype(np.float32) * 0.05
    tensors[other], tensors[other + "_scale_inv"] = fp8.quantize(Wk, BLOCK)
    write_file(base / "model.safetensors", tensors, {})
    cfg = {"model_type": "llama", "torch_dtype": "bfloat16",
           "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    (base / "config.json").write_text(json.dumps(cfg))
    ad, delta = _adapter(name, 256, 384, size=0.2)
    loratool.save(ad, tmp_path / "ad.safetensors")
    code, _, err = run("merge", str(base), str(tmp_path / "ad.safetensors"), "-o", str(tmp_path / "out"),
                       "--dtype", "bfloat16", "--verify", "-q")
    assert code == 0, err
    out = read_arrays(tmp_path / "out" / "model.safetensors", read_header(tmp_path / "out" / "model.safetensors"))
    assert sorted(out) == sorted(k for k in tensors if not k.endswith("_scale_inv"))
    oracle = fp8.dequantize(tensors[name], tensors[name + "_scale_inv"], BLOCK) + delta
    assert out[name].dtype == ml_dtypes.bfloat16
    assert ulp_distance(out[name], oracle.astype(ml_dtypes.bfloat16)).max() <= 1
    k_deq = fp8.dequantize(tensors[other], tensors[other + "_scale_inv"], BLOCK)
    assert np.array_equal(out[other].view(np.uint16), k_deq.astype(ml_dtypes.bfloat16).view(np.uint16))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in written and written["torch_dtype"] == "bfloat16"
    assert json.loads((base / "config.json").read_text()) == cfg  # the input is untouched


def test_encode_gives_ml_dtypes_codes():
    # A strided sweep of the float32 bit patterns below 464 (the midpoint above 448), both signs, and every
    # e4m3 value, every midpoint between neighbours and the floats either side of each: the ties and the
    # subnormal/normal boundary, where a rounding shortcut would go wrong.
    sweep = np.arange(0, 0x43E80000, 1009, dtype=np.uint32).view(np.float32)
    values = np.unique(np.abs(np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)))
    values = values[np.isfinite(values)]
    mids = ((values[:-1].astype(np.float64) + values[1:]) / 2).astype(np.float32)
    around = np.concatenate([values, mids, np.nextafter(mids, 0), np.nextafter(mids, 1000)])
    y = np.concatenate([sweep, around, np.float32([2.0 ** -10, 464 - 2 ** -6, 0.0])])
    y = np.concatenate([y, -y])
    codes, rounded = fp8.encode(y.copy())
    want = y.astype(E4M3)
    assert np.array_equal(codes.view(np.uint8), want.view(np.uint8))
    assert np.array_equal(rounded, want.astype(np.float32))
    assert np.signbit(rounded[-1]) and codes.view(np.uint8)[-1] == 0x80  # -0.0 keeps its sign
