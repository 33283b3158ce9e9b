"""Folding a target's blocks into one A/B pair (ops/fold.py), and what it opens: exact combines, rescales and
target-index adapters written to PEFT and kohya, checked against PEFT itself and sd-scripts' formula.

Tolerances:
  F64_EXACT   folded factors that are exact: both deltas computed in float64 from the factors agree to
              float64 round-off of the sums (the folded product sums the same terms in one matmul).
  ROUNDED     B_i·s_i rounded once to float32: |error| <= 2^-24 Σ_i |s_i| (|B_i| @ |A_i|) per entry.
  LOGITS      a float32 model run two ways (PEFT's unmerged forward vs loratool's merged weights).
  KOHYA       float32 products of the same factors in two code paths, relative to the delta's size.
"""

import json
import warnings
from dataclasses import replace

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import loratool
from arrays import dense_delta
from builders import fused_target, linear_target, rand
from clitools import one_error_line, run
from loratool.adapter import Adapter, Block, Target
from loratool.dtypes import as_numpy
from loratool.io import kohya as K, native, peft as P, registry
from loratool.ops.combine import combine
from loratool.ops.fold import fold_target
from models import base_state_dict, peft_model, sample_input, tiny_gpt2, tiny_llama
from test_interop_kohya import BASE as SD_BASE, N as SD_NAMES, kohya_sd, sd_scripts_delta

warnings.filterwarnings("ignore", category=UserWarning)

F64_EXACT = 1e-12
ROUNDED = 2.0 ** -24
LOGITS = 1e-5
KOHYA = 1e-6


def _f64(x) -> np.ndarray:
    return np.asarray(as_numpy(x), dtype=np.float64)


def delta64(t: Target) -> np.ndarray:
    """Σ s_i B_i A_i on the blocks' rectangles, in float64 from the factors (the exact delta they mean)."""
    M = np.zeros(t.matrix_shape)
    for b in t.blocks:
        M[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] += b.scale * (_f64(b.B) @ _f64(b.A))
    return M


def bound64(t: Target) -> np.ndarray:
    """Σ |s_i| (|B_i| @ |A_i|) per entry: what a relative rounding of every B entry can move the delta by."""
    M = np.zeros(t.matrix_shape)
    for b in t.blocks:
        M[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] += abs(b.scale) * (np.abs(_f64(b.B)) @ np.abs(_f64(b.A)))
    return M


def _concat(*targets, weights):
    """The exact concat of whole targets on one key (several blocks over the same rectangle)."""
    adapters = [Adapter(targets={t.key: t}) for t in targets]
    return combine(adapters, weights).adapter.targets[targets[0].key]


# ---- the fold itself -----------------------------------------------------------------------------------

def test_same_rectangle_power_of_two_scales_fold_exactly_in_the_factor_dtype():
    t1 = linear_target(rank=3, alpha=6.0, dtype=torch.bfloat16)  # scale 2
    t2 = linear_target(rank=2, alpha=2.0, seed=7, dtype=torch.bfloat16)  # scale 1
    t = _concat(t1, t2, weights=[1.0, -0.25])  # scales 2 and -0.25: every ratio to 1 a power of two
    f = fold_target(t)
    b = f.blocks[0]
    assert f.is_whole and b.rank == 5 and b.alpha == 5 and b.scale == 1.0 and b.scale_rule == "standard"
    assert b.A.dtype == b.B.dtype == np.dtype(ml_dtypes.bfloat16)
    assert f.info["folded"] == {"blocks": 2, "rank": 5, "factors": "exact"}
    # A is the blocks' A stacked, bit for bit; B their scaled B side by side.
    assert np.array_equal(_f64(b.A), np.vstack([_f64(x.A) for x in t.blocks]))
    assert np.array_equal(_f64(b.B), np.hstack([x.scale * _f64(x.B) for x in t.blocks]))
    np.testing.assert_allclose(delta64(f), delta64(t), rtol=F64_EXACT, atol=F64_EXACT * np.abs(delta64(t)).max())


def test_scales_without_a_power_of_two_ratio_are_rounded_once_to_float32():
    t = _concat(linear_target(dtype=torch.bfloat16), linear_target(seed=9, dtype=torch.bfloat16), weights=[0.7, 0.3])
    f = fold_target(t)
    b = f.blocks[0]
    assert b.B.dtype == b.A.dtype == np.float32 and b.alpha == 6 and f.info["folded"]["factors"] == "rounded"
    err = np.abs(delta64(f) - delta64(t))
    assert bool(np.all(err <= ROUNDED * bound64(t) + 1e-300))


def test_a_shared_scale_that_is_no_power_of_two_stays_in_alpha():
    t = _concat(linear_target(alpha=2.1), linear_target(seed=3, alpha=4.2), weights=[1.0, 1.0])  # 0.7, 1.4
    f = fold_target(t)
    b = f.blocks[0]
    assert f.info["folded"]["factors"] == "exact" and b.scale == pytest.approx(0.7, rel=1e-15)
    assert np.array_equal(b.B[:, :3], as_numpy(t.blocks[0].B))  # the first block's B is copied as it is
    np.testing.assert_allclose(delta64(f), delta64(t), rtol=F64_EXACT, atol=F64_EXACT * np.abs(delta64(t)).max())


def test_a_power_of_two_that_overflows_the_dtype_falls_back_to_float32():
    # scale 2^16: B·2^16 overflows float16, and the other block's B·2^-16 (keeping 2^16 in alpha) is subnormal
    t1 = linear_target(alpha=3.0 * 2.0 ** 16, dtype=torch.float16)
    t = _concat(t1, linear_target(seed=5, dtype=torch.float16), weights=[1.0, 1.0])
    f = fold_target(t)
    assert f.blocks[0].B.dtype == np.float32 and bool(np.isfinite(f.blocks[0].B).all())
    np.testing.assert_allclose(delta64(f), delta64(t), rtol=0, atol=F64_EXACT * np.abs(delta64(t)).max())


def test_rslora_blocks_keep_rslora_with_unit_scale():
    t = _concat(linear_target(rank=4, alpha=4.0, rule="rslora"), linear_target(rank=4, alpha=2.0, rule="rslora",
                                                                               seed=4), weights=[1.0, 1.0])
    f = fold_target(t)
    b = f.blocks[0]
    assert b.scale_rule == "rslora" and b.rank == 8 and b.scale == 1.0  # alpha = √8
    np.testing.assert_allclose(delta64(f), delta64(t), rtol=F64_EXACT, atol=F64_EXACT * np.abs(delta64(t)).max())


def test_disjoint_rows_fold_block_diagonally_and_columns_too():
    t = fused_target()  # rows 0:8 and 16:24 of a (24, 8) matrix view
    f = fold_target(t)
    B = f.blocks[0].B
    assert B.shape == (24, 4) and not B[8:16].any() and not B[:8, 2:].any() and not B[16:, :2].any()
    np.testing.assert_allclose(delta64(f), delta64(t), rtol=0, atol=F64_EXACT * np.abs(delta64(t)).max())
    cols = Target(key="w.weight", layout="linear", shape=(6, 10), blocks=(
        Block(2, 2.0, "standard", (0, 6), (0, 4), rand(2, 4, seed=1), rand(6, 2, seed=2)),
        Block(3, 1.5, "standard", (2, 6), (4, 10), rand(3, 6, seed=3), rand(4, 3, seed=4))))
    g = fold_target(cols)
    A = g.blocks[0].A
    assert A.shape == (5, 10) and not A[:2, 4:].any() and not A[2:, :4].any()
    np.testing.assert_allclose(delta64(g), delta64(cols), rtol=0, atol=F64_EXACT * np.abs(delta64(cols)).max())


def test_whole_and_full_targets_are_left_alone():
    t = linear_target()
    assert fold_target(t) is t


# ---- combine -> PEFT, loaded by PEFT itself --------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    save_file(base_state_dict(tiny_llama(layers=1)), str(d / "base.safetensors"))
    peft_model(tiny_llama(layers=1), seed=1, r=4, lora_alpha=8,
               target_modules=["q_proj", "v_proj"]).save_pretrained(str(d / "a"))
    peft_model(tiny_llama(layers=1), seed=2, r=2, lora_alpha=4,
               target_modules=["v_proj", "o_proj"]).save_pretrained(str(d / "b"))
    return d


def _logits_merged(model, merged_file) -> torch.Tensor:
    model.load_state_dict(load_file(str(merged_file)))
    with torch.no_grad():
        return model(sample_input()).logits


@pytest.mark.parametrize("weights, factors", [([1.0, 0.5], "exact"), ([0.7, -0.3], "rounded")])
def test_concat_to_peft_loads_in_peft_like_loratools_merge(llama, tmp_path, weights, factors):
    from peft import PeftModel

    d = llama
    res = loratool.combine([d / "a", d / "b"], weights=weights, output=tmp_path / "c", to="peft")
    assert res.to == "peft"
    cfg = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    ranks = {k.removeprefix("base_model.model."): v.shape[0] for k, v in load_file(
        str(tmp_path / "c" / "adapter_model.safetensors")).items() if k.endswith("lora_A.weight")}
    assert sorted(ranks.values()) == [2, 4, 6]  # v_proj: 4 + 2, folded; q_proj and o_proj as they were
    assert cfg["rank_pattern"] and cfg["r"] in (2, 4, 6)
    back = P.load(tmp_path / "c")
    v = next(t for t in back if "v_proj" in t.key)
    assert v.rank == 6 and v.blocks[0].A.dtype == np.float32
    assert fold_target(res.adapter.targets[v.key]).info["folded"]["factors"] == factors
    pm = PeftModel.from_pretrained(tiny_llama(layers=1), str(tmp_path / "c")).eval()
    with torch.no_grad():
        peft_logits = pm(sample_input()).logits
    loratool.merge(d / "base.safetensors", [d / "a", d / "b"], tmp_path / "m.safetensors", weights=weights)
    ours = _logits_merged(tiny_llama(layers=1), tmp_path / "m.safetensors")
    torch.testing.assert_close(peft_logits, ours, atol=LOGITS, rtol=0)


def test_concat_to_kohya_follows_sd_scripts_formula(llama, tmp_path):
    d = llama
    res = loratool.combine([d / "a", d / "b"], weights=[1.0, 0.5], output=tmp_path / "k.safetensors", to="kohya")
    sd = load_file(str(tmp_path / "k.safetensors"))
    for key, t in res.adapter.targets.items():
        name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        got = sd_scripts_delta(sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"],
                               float(sd[f"{name}.alpha"]), t.shape)
        want = dense_delta(t)
        torch.testing.assert_close(got, want, atol=KOHYA * float(want.abs().max()), rtol=0)
    v = next(k for k in sd if "v_proj" in k and k.endswith("lora_down.weight"))
    assert sd[v].shape[0] == 6 and float(sd[v.replace("lora_down.weight", "alpha")]) == 6.0
    # and loratool's own merge of the kohya file equals its merge of the two PEFT adapters
    loratool.merge(d / "base.safetensors", [tmp_path / "k.safetensors"], tmp_path / "mk.safetensors")
    loratool.merge(d / "base.safetensors", [d / "a", d / "b"], tmp_path / "mp.safetensors", weights=[1.0, 0.5])
    mk, mp = load_file(str(tmp_path / "mk.safetensors")), load_file(str(tmp_path / "mp.safetensors"))
    for k in mp:
        torch.testing.assert_close(mk[k], mp[k], atol=KOHYA, rtol=KOHYA)


def test_fused_rows_to_peft_equal_loratools_merge(tmp_path):
    """Row blocks on GPT-2's fused c_attn (Conv1D, fan_in_fan_out), as loralib's enable_lora=[1, 0, 1] makes
    them, folded block-diagonally into one PEFT pair."""
    from peft import PeftModel

    save_file(base_state_dict(tiny_gpt2(layers=1)), str(tmp_path / "base.safetensors"))
    t = fused_target("transformer.h.0.attn.c_attn.weight", d=16)
    native.save(Adapter(targets={t.key: t}), tmp_path / "f.safetensors")
    res = loratool.convert(tmp_path / "f.safetensors", tmp_path / "p", to="peft")
    assert res.folded == (t.key,)
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    pm = PeftModel.from_pretrained(tiny_gpt2(layers=1), str(tmp_path / "p")).eval()
    with torch.no_grad():
        peft_logits = pm(sample_input()).logits
    loratool.merge(tmp_path / "base.safetensors", [tmp_path / "f.safetensors"], tmp_path / "m.safetensors")
    ours = _logits_merged(tiny_gpt2(layers=1), tmp_path / "m.safetensors")
    torch.testing.assert_close(peft_logits, ours, atol=LOGITS, rtol=0)


def test_kohya_split_dims_stay_split_and_other_blocks_fold(tmp_path):
    t = Target(key="a.weight", layout="linear", shape=(10, 5), blocks=(
        Block(2, 3.0, "standard", (0, 4), (0, 5), rand(2, 5, seed=1), rand(4, 2, seed=2)),
        Block(2, 3.0, "standard", (4, 10), (0, 5), rand(2, 5, seed=3), rand(6, 2, seed=4))))
    assert K.holds(t) and not K.holds(t.with_blocks([t.blocks[0], replace(t.blocks[1], alpha=1.0)]))
    loratool.save(Adapter(targets={t.key: t.with_blocks([t.blocks[0], replace(t.blocks[1], alpha=1.0)])}),
                  tmp_path / "k.safetensors", to="kohya")
    assert sorted(load_file(str(tmp_path / "k.safetensors"))) == [
        "lora_unet_a.alpha", "lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight"]


# ---- kohya without a base: rescale and combine write kohya back ------------------------------------------

@pytest.fixture()
def sd(tmp_path):
    save_file(SD_BASE, str(tmp_path / "base.safetensors"))
    save_file(kohya_sd(), str(tmp_path / "lora.safetensors"), metadata={"ss_network_dim": "2",
                                                                          "ss_network_alpha": "1"})
    return tmp_path


def _merged_deltas(path, base) -> dict:
    m = load_file(str(path))
    return {k: m[k].float() - base[k].float() for k in base}


def test_kohya_rescaled_without_base_merges_into_its_base(sd):
    """An SD-like kohya file rescaled with no --base stays kohya (its keys are kohya names), so merge with the
    base accepts it and the delta is half of sd-scripts' own; converted with the base it validates."""
    code, out, err = run("rescale", sd / "lora.safetensors", "--scale", "0.5", "-o", sd / "half.safetensors", "--json")
    assert code == 0 and json.loads(out)["to"] == "kohya"
    assert registry.detect(sd / "half.safetensors").name == "kohya"
    code, _, err = run("merge", sd / "base.safetensors", sd / "half.safetensors", "-o", sd / "m.safetensors")
    assert code == 0, err
    full = loratool.load(sd / "lora.safetensors", base=sd / "base.safetensors")
    for key, got in _merged_deltas(sd / "m.safetensors", SD_BASE).items():
        want = 0.5 * dense_delta(full.targets[key])
        torch.testing.assert_close(got, want, atol=KOHYA * float(want.abs().max()) + 1e-7, rtol=0)
    ref = SD_NAMES["text_model.encoder.layers.0.self_attn.q_proj.weight"]
    sd_in = kohya_sd()
    ref_delta = sd_scripts_delta(sd_in[f"{ref}.lora_down.weight"], sd_in[f"{ref}.lora_up.weight"],
                                 float(sd_in[f"{ref}.alpha"]), (6, 5))
    torch.testing.assert_close(_merged_deltas(sd / "m.safetensors", SD_BASE)[
        "text_model.encoder.layers.0.self_attn.q_proj.weight"], 0.5 * ref_delta, atol=1e-6, rtol=0)
    written, read = set(load_file(str(sd / "half.safetensors"))), set(load_file(str(sd / "lora.safetensors")))
    assert read <= written and all(k.endswith(".alpha") for k in written - read)  # missing alphas written out
    code, _, err = run("convert", sd / "half.safetensors", "-o", sd / "n.safetensors", "--to", "loratool",
                       "--base", sd / "base.safetensors")
    assert code == 0, err
    code, out, err = run("validate", sd / "n.safetensors", "--base", sd / "base.safetensors")
    assert code == 0 and ": valid: 0 errors" in out + err


def test_kohya_without_base_refuses_other_dialects_in_one_line(sd):
    code, _, err = run("rescale", sd / "lora.safetensors", "--scale", "0.5", "-o", sd / "x.safetensors",
                       "--to", "loratool")
    assert code == 4 and one_error_line(err).endswith("cannot be turned back into dotted module paths without the "
                                                      "model; pass --base, or write kohya (--to kohya)")
    assert not (sd / "x.safetensors").exists()


def test_kohya_combined_without_base_folds_and_merges(sd):
    code, out, err = run("combine", sd / "lora.safetensors", sd / "lora.safetensors", "--weights", "1,0.5",
                         "-o", sd / "c.safetensors", "--json")
    assert code == 0 and json.loads(out)["to"] == "kohya", err
    names = {k.split(".")[0] for k in load_file(str(sd / "c.safetensors"))}
    assert names == set(SD_NAMES.values())  # no prefix added twice
    assert run("merge", sd / "base.safetensors", sd / "c.safetensors", "-o", sd / "m.safetensors")[0] == 0
    full = loratool.load(sd / "lora.safetensors", base=sd / "base.safetensors")
    for key, got in _merged_deltas(sd / "m.safetensors", SD_BASE).items():
        want = 1.5 * dense_delta(full.targets[key])
        torch.testing.assert_close(got, want, atol=KOHYA * float(want.abs().max()) + 1e-7, rtol=0)


def test_rescaled_combine_reaches_peft(tmp_path):
    t1, t2 = linear_target(rank=3), linear_target(rank=2, seed=7, alpha=1.0)
    both = combine([Adapter(targets={t1.key: t1}), Adapter(targets={t2.key: t2})], [1.0, 0.7]).adapter
    native.save(both, tmp_path / "c.safetensors")
    code, out, err = run("rescale", tmp_path / "c.safetensors", "--scale", "0.5", "-o", tmp_path / "p", "--json")
    assert code == 0 and json.loads(out)["to"] == "peft", err
    back = P.load(tmp_path / "p").targets[t1.key]
    want = 0.5 * delta64(both.targets[t1.key])
    assert back.rank == 5 and bool(np.all(np.abs(delta64(back) - want) <= ROUNDED * 0.5 * bound64(
        both.targets[t1.key]) + F64_EXACT * np.abs(want).max()))
