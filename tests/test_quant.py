"""Quantized bases: the scheme registry (ops/quant.py) against each scheme's library or published formula, and
merges of quantized bases into their dequantized weights."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from loratool import dtypes
from loratool.ops import quant


class Arrays:
    """A mapping of name -> numpy array seen as a base reader (keys, info, read, mapped)."""

    def __init__(self, tensors):
        self.t = {k: dtypes.as_numpy(v) if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in tensors.items()}

    def keys(self):
        return list(self.t)

    def info(self, key):
        a = self.t.get(key)
        return None if a is None else (tuple(a.shape), dtypes.dtype_of(a))

    def read(self, key):
        return self.t[key]

    @contextlib.contextmanager
    def mapped(self, key, start=0, stop=None):
        yield np.ascontiguousarray(self.t[key]).reshape(-1)[start:stop]


def found(tensors, config=None):
    r = Arrays(tensors)
    return r, quant.find_weights(r.info, r.keys(), config, r.read)


def rows_in_pieces(r, qw, step):
    """The weight read in row blocks of `step` rows (as the merge and extract read it), stacked."""
    rows = qw.rows_cols[0]
    return np.concatenate([quant.dequantize_rows(r, qw, a, min(rows, a + step)) for a in range(0, rows, step)])


# ---- bitsandbytes ----------------------------------------------------------------------------------------

def bnb4_tensors(W, kind="nf4", nested=False, prefix="m.q_proj.weight", blocksize=64):
    import bitsandbytes.functional as F

    q, st = F.quantize_4bit(W, blocksize=blocksize, quant_type=kind, compress_statistics=nested)
    out = {prefix: q}
    out.update({f"{prefix}.{k}": v for k, v in st.as_dict(packed=True).items()})
    return out, F.dequantize_4bit(q, st)


@pytest.mark.parametrize("kind,nested,blocksize", [("nf4", False, 64), ("nf4", True, 64), ("fp4", False, 128),
                                                   ("fp4", True, 128)])
def test_bnb4_equals_bitsandbytes(kind, nested, blocksize):
    # Rows of 128, a multiple of the block size as in real models: bitsandbytes' CPU kernel reads a block that
    # straddles two rows differently from its reference (backends/default) and CUDA kernels, which ops/quant.py
    # follows. 160 rows: 320 absmax values, two blocks of the nested absmax (256 each).
    W = torch.randn(160, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    tensors, ref = bnb4_tensors(W, kind, nested, blocksize=blocksize)
    r, f = found(tensors)
    qw = f["m.q_proj.weight"]
    assert qw.scheme == f"bnb-{kind}" and qw.shape == (160, 128) and len(qw.owned) == (6 if nested else 4)
    # bitsandbytes computes code * absmax in float32 and rounds once to its dtype: the same rounding of ours
    ours = rows_in_pieces(r, qw, 7)  # 7-row pieces: the nested absmax blocks are split
    assert np.array_equal(dtypes.cast(ours, "BF16"), dtypes.as_numpy(ref))


def test_int8_equals_bitsandbytes():
    import bitsandbytes.functional as F

    W = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    CB, SCB, _ = F.int8_vectorwise_quant(W.half())
    r, f = found({"m.fc.weight": CB, "m.fc.SCB": SCB, "m.fc.weight_format": torch.tensor(0, dtype=torch.uint8)})
    qw = f["m.fc.weight"]
    assert qw.scheme == "bnb-int8" and set(qw.owned) == {"m.fc.weight", "m.fc.SCB", "m.fc.weight_format"}
    assert np.array_equal(rows_in_pieces(r, qw, 5), F.int8_vectorwise_dequant(CB, SCB).numpy())


# ---- GPTQ and AWQ: the published formulas, written out with torch as their sources do -------------------

def pack_rows(codes, bits):
    """GPTQ's qweight: codes (in, out) packed 32 // bits per int32 along the input dimension, low bits first."""
    pf = 32 // bits
    c = codes.astype(np.uint32).reshape(-1, pf, codes.shape[1])
    return sum(c[:, t] << (bits * t) for t in range(pf)).astype(np.uint32).view(np.int32)


def pack_cols(codes, bits, order=None):
    """codes (n, m) packed along the columns; `order[t]` is the packed slot of logical column t (AWQ)."""
    pf = 32 // bits
    c = codes.astype(np.uint32).reshape(codes.shape[0], -1, pf)
    slot = order or list(range(pf))
    return sum(c[:, :, t] << (bits * slot[t]) for t in range(pf)).astype(np.uint32).view(np.int32)


def gptq_reference(qweight, qzeros, scales, g_idx, bits):
    """AutoGPTQ auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py forward (torch fallback), in float32:
    zeros = ((qzeros >> wf) & maxq) + 1; weight = (qweight >> wf) & maxq;
    weights = scales[g_idx] * (weight - zeros[g_idx]) -> (in, out); nn.Linear's weight is its transpose."""
    wf = torch.arange(0, 32, bits, dtype=torch.int32)
    qz, qwt = torch.from_numpy(qzeros), torch.from_numpy(qweight)
    zeros = torch.bitwise_right_shift(qz.unsqueeze(2).expand(-1, -1, 32 // bits), wf.view(1, 1, -1))
    zeros = (torch.bitwise_and(zeros, 2 ** bits - 1) + 1).reshape(scales.shape)
    weight = torch.bitwise_right_shift(qwt.unsqueeze(1).expand(-1, 32 // bits, -1), wf.view(1, -1, 1))
    weight = torch.bitwise_and(weight, 2 ** bits - 1).reshape(-1, qwt.shape[1])
    g = torch.from_numpy(g_idx).long()
    return (torch.from_numpy(scales).float()[g] * (weight - zeros[g]).float()).T.numpy()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_equals_published_formula(bits, act_order):
    rng = np.random.default_rng(2)
    n_in, out, group = 64, 48, 16
    codes = rng.integers(0, 2 ** bits, (n_in, out))
    zeros = rng.integers(0, 2 ** bits - 1, (n_in // group, out))  # stored as z - 1 ("gptq" format)
    scales = (rng.random((n_in // group, out)) * 0.01 + 0.001).astype(np.float16)
    g_idx = (rng.permutation(n_in) if act_order else np.arange(n_in)) // group
    t = {"m.q.qweight": pack_rows(codes, bits), "m.q.qzeros": pack_cols(zeros, bits), "m.q.scales": scales,
         "m.q.g_idx": g_idx.astype(np.int32), "m.q.bias": np.zeros(out, np.float16)}
    r, f = found(t, {"quantization_config": {"quant_method": "gptq", "bits": bits, "group_size": group}})
    qw = f["m.q.weight"]
    assert qw.scheme == "gptq" and qw.shape == (out, n_in) and "m.q.bias" not in qw.owned
    ref = gptq_reference(t["m.q.qweight"], t["m.q.qzeros"], scales, t["m.q.g_idx"], bits)
    assert np.array_equal(rows_in_pieces(r, qw, 5), ref)  # integer times float16 scale: exact in float32


def awq_reference(qweight, qzeros, scales, bits, group):
    """AutoAWQ awq/utils/packing_utils.py dequantize_gemm: unpack columnwise (shifts 0, bits, ...), undo the AWQ
    order with AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7], (iweight - izeros) * scales -> (in, out)."""
    shifts = torch.arange(0, 32, bits)
    qwt, qz = torch.from_numpy(qweight), torch.from_numpy(qzeros)
    iw = torch.bitwise_right_shift(qwt[:, :, None], shifts[None, None, :]).to(torch.int8).view(qwt.shape[0], -1)
    iz = torch.bitwise_right_shift(qz[:, :, None], shifts[None, None, :]).to(torch.int8).view(qz.shape[0], -1)
    rev = torch.arange(iz.shape[-1]).view(-1, 32 // bits)[:, [0, 4, 1, 5, 2, 6, 3, 7]].view(-1)
    iw, iz = iw[:, rev] & (2 ** bits - 1), iz[:, rev] & (2 ** bits - 1)
    s = torch.from_numpy(scales).float().repeat_interleave(group, dim=0)
    return ((iw - iz.repeat_interleave(group, dim=0)).float() * s).T.numpy()


def test_awq_equals_published_formula():
    rng = np.random.default_rng(3)
    n_in, out, group, bits = 64, 32, 16, 4
    codes, zeros = rng.integers(0, 16, (n_in, out)), rng.integers(0, 16, (n_in // group, out))
    scales = (rng.random((n_in // group, out)) * 0.01).astype(np.float16)
    awq_slot = [0, 2, 4, 6, 1, 3, 5, 7]  # AWQ_ORDER: logical column t packed at slot position awq_slot.index(t)
    order = [awq_slot.index(t) for t in range(8)]
    t = {"m.k.qweight": pack_cols(codes, bits, order), "m.k.qzeros": pack_cols(zeros, bits, order),
         "m.k.scales": scales}
    r, f = found(t, {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": group,
                                             "version": "gemm"}})
    qw = f["m.k.weight"]
    assert qw.scheme == "awq" and qw.shape == (out, n_in)
    ref = awq_reference(t["m.k.qweight"], t["m.k.qzeros"], scales, bits, group)
    assert np.array_equal(ref.T, ((codes - np.repeat(zeros, group, 0)) * np.repeat(scales, group, 0)).astype(
        np.float32))  # the packing above is AWQ's
    assert np.array_equal(rows_in_pieces(r, qw, 3), ref)


# ---- MXFP4 ----------------------------------------------------------------------------------------------

def test_mxfp4_equals_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(4)
    E, R, G = 3, 10, 2
    blocks = rng.integers(0, 256, (E, R, G, 16), dtype=np.uint8)
    scales = rng.integers(118, 134, (E, R, G), dtype=np.uint8)
    r, f = found({"l.mlp.experts.gate_up_proj_blocks": blocks, "l.mlp.experts.gate_up_proj_scales": scales,
                  "l.mlp.experts.gate_up_proj_bias": np.zeros((E, R), np.float32)})
    qw = f["l.mlp.experts.gate_up_proj"]
    assert qw.scheme == "mxfp4" and qw.shape == (E, G * 32, R)
    ref = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    assert np.array_equal(rows_in_pieces(r, qw, 2).reshape(qw.shape), ref.numpy())


# ---- compressed-tensors float8 (ops/fp8.py through the registry) --------------------------------------

@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_fp8_compressed_tensors_equals_library(strategy):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle import dequantize, quantize

    W = torch.randn(20, 32, generator=torch.Generator().manual_seed(5))
    amax = W.abs().amax() if strategy == "tensor" else W.abs().amax(dim=1, keepdim=True)
    scale = (amax / 448.0).reshape(() if strategy == "tensor" else (20, 1)).float()
    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True)
    q = quantize(W, scale, torch.zeros_like(scale), args, dtype=torch.float8_e4m3fn)
    ref = dequantize(q, scale, torch.zeros_like(scale), args, dtype=torch.float32)
    r, f = found({"m.o.weight": q, "m.o.weight_scale": scale.reshape(1) if strategy == "tensor" else scale,
                  "m.o.input_scale": torch.ones(1)})
    qw = f["m.o.weight"]
    assert qw.scheme == f"fp8-{strategy}" and "m.o.input_scale" in qw.owned
    assert np.array_equal(rows_in_pieces(r, qw, 3), ref.numpy())


# ---- the view ------------------------------------------------------------------------------------------

def test_view_presents_the_float_model():
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    tensors, ref = bnb4_tensors(W, "nf4", True)
    tensors["m.norm.weight"] = torch.ones(64)
    r, f = found(tensors)
    v = quant.DequantizedView(r, f)
    assert sorted(v.keys()) == ["m.norm.weight", "m.q_proj.weight"]
    assert v.info("m.q_proj.weight") == ((16, 64), "F32") and v.scheme("m.q_proj.weight") == "bnb-nf4"
    assert v.info("m.q_proj.weight.absmax") is None and v.scheme("m.norm.weight") is None
    with v.mapped("m.q_proj.weight", 100, 300) as flat:  # a window not on row bounds
        assert np.array_equal(dtypes.cast(flat, "BF16"), dtypes.as_numpy(ref).reshape(-1)[100:300])


def test_unknown_layouts_are_not_claimed():
    bad_state = np.frombuffer(json.dumps({"shape": [4, 4]}).encode(), np.uint8)  # no blocksize
    r, f = found({"a.weight": np.zeros((8, 1), np.uint8), "a.weight.absmax": np.ones(1, np.float32),
                  "a.weight.quant_map": np.zeros(16, np.float32),
                  "a.weight.quant_state.bitsandbytes__nf4": bad_state,
                  "b.qweight": np.zeros((4, 5), np.int32), "b.qzeros": np.zeros((1, 3), np.int32),
                  "b.scales": np.zeros((1, 5), np.float16)})  # 3 x 32 / 5 bits: no scheme
    assert f == {}


# ---- merges into quantized bases -----------------------------------------------------------------------

def save_folder(path, tensors, config=None):
    from safetensors.numpy import save_file

    path.mkdir()
    save_file({k: np.ascontiguousarray(dtypes.as_numpy(v) if isinstance(v, torch.Tensor) else v)
               for k, v in tensors.items()}, str(path / "model.safetensors"))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


def read_folder(path):
    from loratool.container import read_arrays, read_header

    return read_arrays(path / "model.safetensors", read_header(path / "model.safetensors"))


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_qlora_merge_equals_peft_on_dequantized_nf4(tmp_path):
    """A PEFT adapter merged into an nf4 base (double quantization) equals PEFT's merge_and_unload into the
    dequantized weights, the model the adapter was trained against, within one bfloat16 rounding."""
    import bitsandbytes.functional as F

    from tests.models import base_state_dict, peft_model, tiny_llama
    from tests.ulp import ulp_distance

    model = tiny_llama(hidden=64)  # in_features 64 and 128: whole nf4 blocks per row
    sd, stored, deq = base_state_dict(model), {}, {}
    for k, W in sd.items():
        if k.rsplit(".", 2)[-2] in LINEARS:
            q, st = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
            stored[k] = q
            stored.update({f"{k}.{n}": v for n, v in st.as_dict(packed=True).items()})
            deq[k] = F.dequantize_4bit(q, st)  # float32, as bitsandbytes dequantizes a float32 weight
        else:
            stored[k] = W
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    base = save_folder(tmp_path / "base", stored, config)
    model.load_state_dict({**sd, **deq})
    pm = peft_model(model, target_modules=["q_proj", "v_proj", "down_proj"])
    pm.save_pretrained(tmp_path / "ad")
    want = {k: v.detach() for k, v in pm.merge_and_unload().state_dict().items()}

    result = __import__("loratool").merge(base, tmp_path / "ad", tmp_path / "out")
    got = read_folder(tmp_path / "out")
    assert set(got) == set(want)  # companions dropped, every weight under its own key
    assert result.targets == 6 and set(result.dequantized) == set(deq)
    assert set(result.dequantized.values()) == {"bnb-nf4"}
    for k in deq:  # float32 arithmetic as PEFT's, rounded once to bfloat16
        assert dtypes.dtype_of(got[k]) == "BF16"
        assert ulp_distance(got[k], dtypes.cast(dtypes.as_numpy(want[k]), "BF16")).max() <= 1, k
    assert np.array_equal(got["model.norm.weight"], dtypes.as_numpy(want["model.norm.weight"]))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg


def gptq_files(rng, n_in=64, out=32, group=16, bits=4, prefix="m.q."):
    codes = rng.integers(0, 2 ** bits, (n_in, out))
    zeros = rng.integers(0, 2 ** bits - 1, (n_in // group, out))
    scales = (rng.random((n_in // group, out)) * 0.01 + 0.001).astype(np.float16)
    t = {prefix + "qweight": pack_rows(codes, bits), prefix + "qzeros": pack_cols(zeros, bits),
         prefix + "scales": scales, prefix + "g_idx": (np.arange(n_in) // group).astype(np.int32)}
    return t, gptq_reference(t[prefix + "qweight"], t[prefix + "qzeros"], scales, t[prefix + "g_idx"], bits)


@pytest.mark.parametrize("out_name", ["o", "o.pt"])
def test_gptq_merge_writes_weight(tmp_path, out_name):
    import loratool
    from loratool.adapter import Adapter
    from tests.builders import as_numpy_target, linear_target

    t, W = gptq_files(np.random.default_rng(7))
    t["m.q.bias"] = np.ones(32, np.float16)
    cfg = {"model_type": "llama", "torch_dtype": "float16",
           "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 16}}
    base = save_folder(tmp_path / "base", t, cfg)
    target = as_numpy_target(linear_target("m.q.weight", out=32, inp=64, rank=2, alpha=2.0))
    out = tmp_path / out_name
    res = loratool.merge(base, Adapter({target.key: target}), out, dtype="float16")
    assert res.dequantized == {"m.q.weight": "gptq"}
    if out_name.endswith(".pt"):
        got = {k: dtypes.as_numpy(v) for k, v in torch.load(out, weights_only=True).items()}
    else:
        got = read_folder(out)
        assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert set(got) == {"m.q.weight", "m.q.bias"}
    B, A = target.blocks[0].B, target.blocks[0].A
    want = dtypes.cast(W + (B @ A).astype(np.float32), "F16")
    from tests.ulp import ulp_distance

    assert dtypes.dtype_of(got["m.q.weight"]) == "F16" and ulp_distance(got["m.q.weight"], want).max() <= 1


def test_int8_and_mxfp4_bases_are_written_dequantized(tmp_path):
    import bitsandbytes.functional as F
    import loratool
    from loratool.adapter import Adapter
    from tests.builders import as_numpy_target, linear_target

    CB, SCB, _ = F.int8_vectorwise_quant(torch.randn(8, 16, generator=torch.Generator().manual_seed(8)).half())
    rng = np.random.default_rng(9)
    blocks = rng.integers(0, 256, (2, 6, 1, 16), dtype=np.uint8)
    scales = rng.integers(120, 130, (2, 6, 1), dtype=np.uint8)
    t = {"a.fc.weight": CB, "a.fc.SCB": SCB, "a.fc.weight_format": torch.tensor(0, dtype=torch.uint8),
         "a.experts.down_proj_blocks": blocks, "a.experts.down_proj_scales": scales,
         "a.norm.weight": np.ones(16, np.float32)}
    base = save_folder(tmp_path / "base", t)
    target = as_numpy_target(linear_target("a.fc.weight", out=8, inp=16, rank=2, alpha=2.0))
    res = loratool.merge(base, Adapter({target.key: target}), tmp_path / "out")
    got = read_folder(tmp_path / "out")
    assert set(got) == {"a.fc.weight", "a.experts.down_proj", "a.norm.weight"}
    assert res.dequantized == {"a.fc.weight": "bnb-int8", "a.experts.down_proj": "mxfp4"}
    W = F.int8_vectorwise_dequant(CB, SCB).numpy()
    B, A = target.blocks[0].B, target.blocks[0].A
    assert np.array_equal(got["a.fc.weight"], dtypes.cast(W + (B @ A).astype(np.float32), "BF16"))
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    ref = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales))  # bfloat16
    assert np.array_equal(got["a.experts.down_proj"], dtypes.as_numpy(ref))


def test_keep_quantized_is_refused_for_4bit(tmp_path):
    import loratool
    from loratool.adapter import Adapter
    from loratool.errors import UnsupportedError, UsageError
    from tests.builders import as_numpy_target, linear_target

    t, _ = bnb4_tensors(torch.randn(8, 64, generator=torch.Generator().manual_seed(1)), prefix="m.q.weight")
    base = save_folder(tmp_path / "base", t)
    t_ = as_numpy_target(linear_target("m.q.weight", out=8, inp=64, rank=2))
    ad = Adapter({t_.key: t_})
    with pytest.raises(UnsupportedError, match="is quantized as bnb-nf4 .*requantizes FP8 only.*drop --keep-quantized"):
        loratool.merge(base, ad, tmp_path / "o", keep_quantized=True)
    with pytest.raises(UsageError, match="pass one of them"):
        loratool.merge(base, ad, tmp_path / "o", keep_quantized=True, dtype="float32")
    assert not (tmp_path / "o").exists()
    from tests.clitools import one_error_line, run

    loratool.save(ad, tmp_path / "ad.safetensors")
    code, _, err = run("merge", base, tmp_path / "ad.safetensors", "-o", tmp_path / "o", "--keep-quantized")
    assert code == 7 and "writing bnb-nf4 again is out of scope" in one_error_line(err)
    assert not (tmp_path / "o").exists()


def test_unknown_integer_tensor_is_refused_as_quantized(tmp_path):
    import loratool
    from loratool.adapter import Adapter
    from loratool.errors import MismatchError
    from tests.builders import as_numpy_target, linear_target

    base = save_folder(tmp_path / "base", {"m.q.weight": np.zeros((8, 2), np.int32)})  # a layout nobody reads
    t_ = as_numpy_target(linear_target("m.q.weight", out=8, inp=16, rank=2))
    ad = Adapter({t_.key: t_})
    with pytest.raises(MismatchError, match=r"\"m.q.weight\": base tensor is I32, a quantized or integer tensor "
                                            r"in a layout loratool does not read .*\(rule B003\)"):
        loratool.merge(base, ad, tmp_path / "o")


# ---- validate --base and extract against quantized models ------------------------------------------------

def test_validate_fits_a_peft_adapter_to_a_gptq_base(tmp_path):
    import loratool
    from tests.clitools import run

    t, _ = gptq_files(np.random.default_rng(10), prefix="model.layers.0.self_attn.q_proj.")
    cfg = {"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 16}}
    base = save_folder(tmp_path / "base", t, cfg)
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                        "target_modules": ["q_proj"]}))
    rng = np.random.default_rng(11)
    from safetensors.numpy import save_file

    p = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{p}.lora_A.weight": rng.standard_normal((2, 64)).astype(np.float32),
               f"{p}.lora_B.weight": rng.standard_normal((32, 2)).astype(np.float32)},
              str(ad / "adapter_model.safetensors"))
    code, out, err = run("validate", ad, "--base", base, "--json")
    doc = json.loads(out)
    assert code == 0, doc
    (row,) = doc["fit"]["rows"]
    assert row["base_key"] == "model.layers.0.self_attn.q_proj.weight" and row["quantized"] == "gptq"
    assert row["ok"] and row["base_shape"] == [32, 64]
    # and the merge of the same adapter
    res = loratool.merge(base, ad, tmp_path / "out")
    assert res.targets == 1 and res.dequantized == {"model.layers.0.self_attn.q_proj.weight": "gptq"}


def test_extract_from_fp8_and_nf4_pairs(tmp_path):
    """extract pairs quantized models dequantized in float32: a float8 finetune against its nf4 base recovers
    the difference of the two dequantized weights."""
    import loratool
    from loratool.ops import fp8

    rng = np.random.default_rng(12)
    W = torch.from_numpy(rng.standard_normal((32, 128)).astype(np.float32))
    t, _ = bnb4_tensors(W, "nf4", True, prefix="m.q.weight")
    base = save_folder(tmp_path / "base", {**t, "m.norm.weight": np.ones(128, np.float32)})
    r, f = found(t)
    Wq = quant.dequantize(r, f["m.q.weight"])
    delta = (rng.standard_normal((32, 2)) @ rng.standard_normal((2, 128))).astype(np.float32) * 0.1
    q, s = fp8.quantize(Wq + delta, fp8.Scheme("channel", "", "F32"))
    ft = save_folder(tmp_path / "ft", {"m.q.weight": q, "m.q.weight_scale": s,
                                       "m.norm.weight": np.ones(128, np.float32)})
    Wft = fp8.dequantize(q, s, fp8.Scheme("channel", "", "F32"))
    res = loratool.extract(ft, base, output=tmp_path / "ad.safetensors", rank=32)
    (tgt,) = res.adapter.targets.values()
    b = tgt.blocks[0]
    got = (b.B.astype(np.float64) @ b.A.astype(np.float64)) * b.scale
    # full rank (32): the factors hold the difference of the two dequantized weights, FP8 rounding included
    assert np.abs(got - (Wft - Wq)).max() < 1e-4


def test_sharded_gptq_base_keeps_its_sharding(tmp_path):
    import loratool
    from safetensors.numpy import save_file

    from loratool.container import read_arrays, read_header

    t, W = gptq_files(np.random.default_rng(13))
    base = tmp_path / "base"
    base.mkdir()
    save_file({"m.norm.weight": np.ones(4, np.float32)}, str(base / "model-00001-of-00002.safetensors"))
    save_file(t, str(base / "model-00002-of-00002.safetensors"))
    index = {"metadata": {"total_size": 0}, "weight_map": {"m.norm.weight": "model-00001-of-00002.safetensors",
                                                           **{k: "model-00002-of-00002.safetensors" for k in t}}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    loratool.merge(base, loratool.Adapter({}), tmp_path / "out")
    got = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert got == {"m.norm.weight": "model-00001-of-00002.safetensors",
                   "m.q.weight": "model-00002-of-00002.safetensors"}
    shard = tmp_path / "out" / "model-00002-of-00002.safetensors"
    arrays = read_arrays(shard, read_header(shard))
    assert list(arrays) == ["m.q.weight"] and np.array_equal(arrays["m.q.weight"], dtypes.cast(W, "BF16"))
