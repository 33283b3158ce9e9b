"""Mixture-of-experts: PEFT `target_parameters` adapters on transformers 5's fused expert tensors, per-expert
adapters on fused bases and fused adapters on per-expert bases, against PEFT's merge_and_unload."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ulp import assert_within_ulp, ulp_distance
from loratool.container import write_file
from loratool.tasks.merge import merge as run_merge

PARAMS = ["experts.gate_up_proj", "experts.down_proj"]


def load_st(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def fused_case(tmp_path, build, dtype=torch.float32, **cfg):
    """(fused base file, PEFT folder with target_parameters, PEFT's merge_and_unload state dict)."""
    from models import base_state_dict, peft_model

    model = build().to(dtype)
    base = tmp_path / "base.safetensors"
    write_file(base, base_state_dict(model), {"format": "pt"})
    kw = {"target_modules": [], "target_parameters": PARAMS, **cfg}
    pm = peft_model(model, **kw)
    pm.save_pretrained(tmp_path / "peft")
    oracle = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return base, tmp_path / "peft", oracle


@pytest.mark.parametrize("name", ["tiny_mixtral", "tiny_qwen2_moe", "tiny_gpt_oss"])
def test_target_parameters_merge_equals_peft(tmp_path, name):
    import models

    base, ad, oracle = fused_case(tmp_path, getattr(models, name))
    out = tmp_path / "out.safetensors"
    s = run_merge(base, [ad], out, verify=True)
    assert s.targets == 2 and s.verify["max_rel_error"] < 1e-6
    assert_within_ulp(load_st(out), oracle, ulps=2, identical=0.99)


def test_qwen_moe_mixed_modules_and_parameters_rank_pattern(tmp_path):
    """Linear targets (attention, the shared expert) beside parameter targets, and a per-parameter rank."""
    from models import tiny_qwen2_moe

    base, ad, oracle = fused_case(tmp_path, tiny_qwen2_moe, target_modules=["q_proj", "shared_expert.up_proj"],
                                  rank_pattern={"down_proj": 3}, alpha_pattern={"gate_up_proj": 5})
    out = tmp_path / "out.safetensors"
    s = run_merge(base, [ad], out, verify=True)
    assert s.targets == 4
    assert_sum_order(load_st(out), oracle, load_st(base))


def assert_sum_order(got, want, base, ulps=2):
    """Within `ulps` of PEFT's merged weights, plus the reordering of the r products of an element: PEFT's
    expert delta is an einsum, whose order of summation may differ from a matmul's; that costs a few float32
    epsilons of the delta's size, which near a zero merged value is many ulps of the value."""
    assert set(got) == set(want)
    for k in want:
        g, w, b = (x.double().numpy() for x in (got[k], want[k], base[k]))
        allowed = ulps * np.spacing(np.abs(w).astype(np.float32)) + 8 * np.finfo(np.float32).eps * np.abs(w - b).max()
        assert (np.abs(g - w) <= allowed).all(), k


# ---- per-expert adapters on fused bases, and fused adapters on per-expert bases ---------------------------

NAMES = {"mixtral": ("block_sparse_moe.experts.{e}.{p}", {"gate": "w1", "up": "w3", "down": "w2"}),
         "qwen": ("mlp.experts.{e}.{p}", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})}


def per_expert_adapter(path, model, naming, r=2, alpha=5.0, seed=3):
    """A PEFT folder as PEFT writes for transformers 4's per-expert nn.Linear experts (random factors), and the
    fused merged state dict it must give: per expert W' = W + s B A in float32, stacked and concatenated as
    transformers 5's conversion mapping does (MergeModulelist, Concatenate(dim=1))."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pattern, names = NAMES[naming]
    tensors, s = {}, alpha / r
    for layer in range(model.config.num_hidden_layers):
        pre = f"model.layers.{layer}"
        gu, dn = sd[f"{pre}.mlp.experts.gate_up_proj"], sd[f"{pre}.mlp.experts.down_proj"]
        i = gu.shape[1] // 2
        for e in range(gu.shape[0]):
            for part, W in (("gate", gu[e, :i]), ("up", gu[e, i:]), ("down", dn[e])):
                A = torch.randn(r, W.shape[1], generator=g) * 0.3
                B = torch.randn(W.shape[0], r, generator=g) * 0.3
                mod = f"base_model.model.{pre}." + pattern.format(e=e, p=names[part])
                tensors[mod + ".lora_A.weight"], tensors[mod + ".lora_B.weight"] = A, B
                W += (B @ A) * s  # in place: a view of the fused tensor, as PEFT's merge of the nn.Linear
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"), {"format": "pt"})
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted(set(names.values())),
           "fan_in_fan_out": False, "lora_dropout": 0.0, "bias": "none"}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path, sd


@pytest.mark.parametrize("name,naming", [("tiny_mixtral", "mixtral"), ("tiny_qwen2_moe", "qwen")])
@pytest.mark.parametrize("fused_base", [True, False])
def test_per_expert_adapter_maps_onto_either_base(tmp_path, name, naming, fused_base):
    import models

    model = getattr(models, name)()
    ad, want = per_expert_adapter(tmp_path / "peft", model, naming)
    base = tmp_path / "base"
    model.save_pretrained(base, save_original_format=not fused_base)
    out = tmp_path / "out.safetensors"
    s = run_merge(base, [ad], out, verify=True)
    assert s.verify["max_rel_error"] < 1e-6
    got = load_st(out)
    if fused_base:
        assert s.targets == 2
        assert_within_ulp({k: got[k] for k in want}, want, ulps=0)  # the same float32 operations: bit for bit
    else:  # the per-expert base merged per expert: the oracle cut back into its keys
        assert s.targets == 3 * model.config.num_local_experts if naming == "mixtral" else s.targets == 12
        assert_within_ulp(got, split_experts(want, got, naming), ulps=0)


def split_experts(fused, like, naming):
    """A fused state dict cut into per-expert keys as save_pretrained's reverse mapping writes them."""
    pattern, names = NAMES[naming]
    out = {}
    for k, v in fused.items():
        if not k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[k.replace(".mlp.", ".block_sparse_moe.") if naming == "mixtral" else k] = v  # Mixtral's renaming
            continue
        pre = k.split(".mlp.experts.")[0]
        i = v.shape[1] // 2
        for e in range(v.shape[0]):
            parts = (("gate", v[e, :i]), ("up", v[e, i:])) if k.endswith("gate_up_proj") else (("down", v[e]),)
            for part, W in parts:
                out[f"{pre}." + pattern.format(e=e, p=names[part]) + ".weight"] = W.contiguous()
    return {k: out[k] for k in like}


def test_fused_adapter_maps_onto_a_per_expert_base(tmp_path):
    """A target_parameters adapter (transformers 5 training) merged into a per-expert checkpoint equals PEFT's
    merge of the fused model written back per expert."""
    from models import tiny_mixtral

    base_f, ad, oracle = fused_case(tmp_path, tiny_mixtral)
    model = tiny_mixtral()
    base = tmp_path / "per_expert"
    model.save_pretrained(base)  # save_original_format: block_sparse_moe.experts.N.w1/w2/w3
    out = tmp_path / "out.safetensors"
    s = run_merge(base, [ad], out, verify=True)
    got = load_st(out)
    assert s.targets == 9 and "model.layers.0.block_sparse_moe.experts.2.w3.weight" in got
    assert_within_ulp(got, split_experts(oracle, got, "mixtral"), ulps=2, identical=0.99)


def test_validate_fit_report_names_the_expert_layouts(tmp_path):
    from loratool.tasks.validate import validate
    from models import tiny_mixtral

    model = tiny_mixtral()
    ad, _ = per_expert_adapter(tmp_path / "peft", model, "mixtral")
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    model.save_pretrained(tmp_path / "per_expert")
    rep = validate(ad, base=tmp_path / "fused")
    assert not rep.errors, rep.findings
    assert rep.fit["experts"] == {"base": ["experts"], "targets": {"experts": 2}, "moved": 2}
    assert rep.fit["fit"] == 2 and {r["base_key"] for r in rep.fit["rows"]} == {
        "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"}
    rep = validate(ad, base=tmp_path / "per_expert")
    assert not rep.errors and rep.fit["experts"] == {"base": ["per_expert"], "targets": {"per_expert": 9}, "moved": 0}
    _, pw, _ = fused_case(tmp_path, tiny_mixtral)
    rep = validate(pw, base=tmp_path / "per_expert")
    assert not rep.errors and rep.fit["experts"]["moved"] == 9


def test_fused_adapter_converts_to_native_and_merges_the_same(tmp_path):
    """convert keeps the expert layout (spec layouts "experts"/"experts_t"), and writes it back to PEFT as the
    ParamWrapper factors it was read from, bit for bit (names, nesting, lora_A/lora_B layout)."""
    import loratool
    from models import tiny_gpt_oss

    base, ad, oracle = fused_case(tmp_path, tiny_gpt_oss)
    native = tmp_path / "a.safetensors"
    loratool.convert(ad, native, base=base)
    a = loratool.load(native)
    assert {t.layout for t in a} == {"experts_t"} and all(len(t.blocks) == 3 for t in a)
    assert not loratool.validate(native).errors
    out = tmp_path / "out.safetensors"
    run_merge(base, [native], out)
    assert_within_ulp(load_st(out), oracle, ulps=2, identical=0.99)
    loratool.convert(native, tmp_path / "p", to="peft")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == [] and cfg["target_parameters"] == sorted(f"model.layers.0.mlp.{p}" for p in PARAMS)
    want, got = load_st(ad / "adapter_model.safetensors"), load_st(tmp_path / "p" / "adapter_model.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_per_expert_adapter_converts_for_a_fused_base_and_back(tmp_path):
    """convert --base moves targets between expert forms as merge does: a per-expert PEFT adapter written for
    a fused base is a target_parameters folder PEFT loads (each expert's gate and up pairs folded into one of
    rank 2r, exactly), and a fused adapter written for a per-expert base has a target per expert linear."""
    import loratool
    from peft import PeftModel
    from models import tiny_mixtral

    model = tiny_mixtral()
    ad, want = per_expert_adapter(tmp_path / "peft_pe", model, "mixtral")
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    model.save_pretrained(tmp_path / "per_expert")
    loratool.convert(ad, tmp_path / "for_fused", base=tmp_path / "fused", to="peft")
    cfg = json.loads((tmp_path / "for_fused" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == [] and len(cfg["target_parameters"]) == 2 and cfg["r"] == 2
    assert cfg["rank_pattern"] == {r"model\.layers\.0\.mlp\.experts\.gate_up_proj": 4}  # gate and up: 2 + 2
    pm = PeftModel.from_pretrained(tiny_mixtral(), str(tmp_path / "for_fused")).eval()
    merged = pm.merge_and_unload().state_dict()
    assert_sum_order({k: merged[k] for k in want}, want, model.state_dict())
    _, _, oracle = fused_case(tmp_path, tiny_mixtral)
    back = tmp_path / "back.safetensors"
    loratool.convert(tmp_path / "peft", back, base=tmp_path / "per_expert")  # the fused adapter of fused_case
    assert {t.layout for t in loratool.load(back)} == {"linear"} and len(loratool.load(back)) == 9
    out = tmp_path / "out.safetensors"
    run_merge(tmp_path / "per_expert", [back], out)
    got = load_st(out)
    assert_within_ulp(got, split_experts(oracle, got, "mixtral"), ulps=2, identical=0.99)


def test_fused_float8_experts_are_refused_by_name(tmp_path):
    """A fused float8 expert tensor with per-expert block scales (transformers' FP8Experts: (E, out, in) and
    `_scale_inv` (E, out/128, in/128)) is not read: merge and validate --base refuse it in one line (B003) that
    says why and how to dequantize, and nothing is written."""
    import re

    import ml_dtypes

    import loratool
    from loratool.adapter import Adapter, Block, Target
    from loratool.errors import MismatchError
    from loratool.spec import FUSED_FP8_REFUSAL

    E, out, inp = 2, 256, 128
    key = "model.layers.0.mlp.experts.gate_up_proj"
    w = np.random.default_rng(0).standard_normal((E, out, inp)).astype(ml_dtypes.float8_e4m3fn)
    base = tmp_path / "base.safetensors"
    write_file(base, {key: w, key + "_scale_inv": np.ones((E, 2, 1), np.float32)}, {})
    blocks = tuple(Block(rank=1, alpha=1.0, scale_rule="standard", rows=(e * out, (e + 1) * out), cols=(0, inp),
                         A=np.ones((1, inp), np.float32), B=np.ones((out, 1), np.float32)) for e in range(E))
    ad = tmp_path / "a.safetensors"
    loratool.save(Adapter({key: Target(key=key, layout="experts", shape=(E, out, inp), blocks=blocks)}), ad)
    with pytest.raises(MismatchError, match=re.escape(f"base tensor is F8_E4M3, {FUSED_FP8_REFUSAL} (rule B003)")):
        run_merge(base, [ad], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    rep = loratool.validate(ad, base=base)
    assert [f.rule for f in rep.errors] == ["B003"] and FUSED_FP8_REFUSAL in rep.errors[0].message


def test_bf16_fused_experts_round_once_where_peft_rounds_twice(tmp_path):
    """A bf16 fused base (tiny Qwen2-MoE): PEFT's merge_and_unload casts the expert delta (float32 factors) to
    bf16 and adds it to the bf16 weight, rounding twice: bf16(W + bf16(ΔW)); loratool adds ΔW to W in float32
    and rounds once: bf16(W + ΔW).

    Measured on this model: loratool equals the float64 oracle rounded once to bf16 in every element (ONCE_ULPS
    allows the float32 sum to fall on the other side of a rounding tie); PEFT's weights are bit-identical to it
    in about 73% (gate_up_proj) and 75% (down_proj) of the elements, at most 36 ulp away where W + ΔW cancels
    (an ulp of the small result is far below the rounding of ΔW). The two agree within PEFT's extra rounding:
    half an ulp of ΔW plus one ulp of the result (TWICE_BOUND)."""
    from models import tiny_qwen2_moe

    ONCE_ULPS = 1

    base, ad, oracle = fused_case(tmp_path, tiny_qwen2_moe, dtype=torch.bfloat16)
    out = tmp_path / "out.safetensors"
    run_merge(base, [ad], out)
    got, bsd = load_st(out), load_st(base)
    import loratool

    a = loratool.load(ad, base=base).as_numpy()
    same = []
    for key in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        t = a.targets[key]
        D = np.zeros(t.matrix_shape)  # ΔW on the (E·out, in) view, float64
        for b in t.blocks:
            D[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] += b.scale * (b.B.astype(np.float64) @ b.A.astype(np.float64))
        exact = bsd[key].double().numpy() + D.reshape(t.shape)
        once = torch.from_numpy(exact).to(torch.bfloat16)
        assert ulp_distance(got[key], once).max() <= ONCE_ULPS, key
        TWICE_BOUND = 0.5 * bf16_ulp(D.reshape(t.shape)) + bf16_ulp(exact)
        g, p = got[key].double().numpy(), oracle[key].double().numpy()
        assert (np.abs(g - p) <= TWICE_BOUND).all(), key
        same.append((ulp_distance(got[key], oracle[key]) == 0).mean())
    assert min(same) > 0.6  # most elements round the same both ways



def bf16_ulp(x):
    """One bf16 ulp at |x| (8 significant bits: 2^(floor(log2 |x|) - 7)), for normal values."""
    return 2.0 ** (np.floor(np.log2(np.maximum(np.abs(x), 2.0 ** -126))) - 7)
