"""PEFT DoRA (use_dora, lora_magnitude_vector) as loratool's "dora" kind: read from the adapter alone, merged
as PEFT's merge_and_unload merges it (peft/tuners/lora/variants.py DoraLinearVariant.merge_safe: W' =
m / ‖W + s·BA‖ · (W + s·BA), the norm per row of the (out, in) view and no eps), written back to PEFT bit for
bit, and refused where the result would not be exact (unmerge, kohya's dora_scale, which adds an eps)."""

import copy
import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import loratool
from clitools import run
from loratool.errors import UnsupportedError
from loratool.io import kohya as K
from loratool.io import peft as P
from models import base_state_dict, peft_model, sample_input, tiny_gpt2, tiny_llama
from ulp import ulp_distance

# float32. The one difference from PEFT is the row norm ‖W + s·BA‖: torch sums the squares in vector lanes, numpy
# pairwise, so the norms differ by up to one ulp; with torch's norm substituted loratool's merge is bit-identical
# (measured: 180,224 of 180,224 elements, 8 seeds, hidden 64). One ulp of the norm moves m/‖V‖ and then the product,
# each rounded once: measured 85% identical, 99.8% within 2 ulp, at most 4.
ULPS = 4
IDENTICAL = 0.7

LLAMA = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


def _peft(tmp_path, build=tiny_llama, modules=LLAMA, **kw):
    model = build(layers=1)
    base = base_state_dict(model)
    save_file(base, str(tmp_path / "base.safetensors"))
    pm = peft_model(model, target_modules=modules, use_dora=True, **kw)
    pm.save_pretrained(str(tmp_path / "peft"), save_embedding_layers=False)  # a copy of the base's, read with --base
    return pm, base


@pytest.mark.parametrize("build, modules, kw", [
    (tiny_llama, LLAMA, {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}}),
    (tiny_llama, ["q_proj", "up_proj"], {"use_rslora": True}),
    (tiny_gpt2, ["c_attn", "c_fc"], {}),  # Conv1D: fan_in_fan_out, the norm per column of the stored weight
], ids=["llama-patterns", "llama-rslora", "gpt2"])
def test_merge_equals_peft_merge_and_unload(tmp_path, build, modules, kw):
    pm, base = _peft(tmp_path, build, modules, **kw)
    merged = copy.deepcopy(pm).merge_and_unload().state_dict()
    a = loratool.load(tmp_path / "peft")  # no base needed
    assert a.targets and all(t.kind == "dora" and t.dora_eps == 0.0 and t.dora_axis == "out" for t in a)
    r = loratool.merge(tmp_path / "base.safetensors", [tmp_path / "peft"], tmp_path / "merged.safetensors",
                       verify=True)
    got = load_file(str(tmp_path / "merged.safetensors"))
    changed = n = same = 0
    for k, want in merged.items():
        d = ulp_distance(got[k], want)
        assert int(d.max()) <= ULPS, (k, int(d.max()))
        n, same = n + d.size, same + int((d == 0).sum())
        changed += not torch.equal(want, base[k])
    assert changed == len(a) == r.targets and same >= IDENTICAL * n


def test_structure_and_inspect_show_dora_without_base(tmp_path):
    _peft(tmp_path)
    s = loratool.structure(tmp_path / "peft")
    t = s.targets["model.layers.0.self_attn.q_proj.weight"]
    assert t.kind == "dora" and t.magnitude is None and t.rank == 4 and "needs_base" not in s.info
    assert s.targets["model.embed_tokens.weight"].layout == "embedding"
    # the pair and the magnitude (one per row of M) of q_proj, v_proj (8 rows), embedding (dim 16), down_proj
    assert s.n_params == 4 * (16 + 16) + 16 + 4 * (16 + 8) + 8 + 4 * (64 + 16) + 16 + 4 * (32 + 16) + 16
    code, out, _ = run("inspect", tmp_path / "peft", "--json")
    doc = json.loads(out)
    by = {r["target"]: r for r in doc["per_target"]}
    assert code == 0 and by["model.layers.0.self_attn.q_proj.weight"]["kind"] == "dora"


def test_peft_round_trip_is_bit_for_bit(tmp_path):
    _peft(tmp_path, rank_pattern={"v_proj": 2})
    loratool.save(loratool.load(tmp_path / "peft"), tmp_path / "back", to="peft")
    a = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    cfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["rank_pattern"] == {re.escape("model.layers.0.self_attn.v_proj"): 2}


def test_written_peft_loads_in_peft(tmp_path):
    from peft import PeftModel

    pm, _ = _peft(tmp_path, modules=["q_proj", "down_proj"])
    loratool.save(loratool.load(tmp_path / "peft"), tmp_path / "back", to="peft")
    pm2 = PeftModel.from_pretrained(tiny_llama(layers=1), str(tmp_path / "back")).eval()
    x = sample_input()
    with torch.no_grad():
        assert torch.equal(pm2(x).logits, pm(x).logits)


def test_unmerge_is_refused_with_the_reason(tmp_path):
    _peft(tmp_path)
    code, _, err = run("merge", tmp_path / "base.safetensors", tmp_path / "peft", "-o", tmp_path / "m.safetensors",
                       "--unmerge")
    assert code == 7 and "is DoRA, whose merge W' = m/‖W + ΔW‖·(W + ΔW) is not linear in ΔW" in err
    assert "W cannot be recovered from W' (the norm of W is lost)" in err
    assert not (tmp_path / "m.safetensors").exists()


def test_kohya_refuses_peft_dora_because_of_the_eps(tmp_path):
    _peft(tmp_path, modules=["q_proj"])
    with pytest.raises(UnsupportedError, match=re.escape("is DoRA whose norm adds eps 0 (PEFT adds none), but "
                                                         "LyCORIS and ComfyUI add 1.19209e-07")):
        K.plan(loratool.load(tmp_path / "peft"))
    code, _, err = run("convert", tmp_path / "peft", "-o", tmp_path / "k.safetensors", "--to", "kohya")
    assert code == 7 and "the conversion cannot be exact" in err and not (tmp_path / "k.safetensors").exists()


def test_peft_refuses_lycoris_dora_and_mixed_kinds(tmp_path):
    from lycoris.modules.locon import LoConModule

    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 12, bias=False)
    m = LoConModule("lora_unet_x", layer, 1.0, 4, 4, weight_decompose=True)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    save_file({f"lora_unet_x.{k}": v.detach().clone().contiguous() for k, v in m.state_dict().items()},
              str(tmp_path / "k.safetensors"))
    save_file({"x.weight": layer.weight.detach().clone()}, str(tmp_path / "base.safetensors"))
    with pytest.raises(UnsupportedError, match=re.escape("is DoRA whose norm adds eps 1.19209e-07 (LyCORIS's); "
                                                         "PEFT adds none")):
        P.plan(loratool.load(tmp_path / "k.safetensors", base=tmp_path / "base.safetensors"))
    _peft(tmp_path, modules=["q_proj", "v_proj"])
    a = loratool.load(tmp_path / "peft")
    q = a.targets["model.layers.0.self_attn.q_proj.weight"]
    plain = a.replace_targets([q, q.__class__(**{**q.__dict__, "key": "x.weight", "kind": "lora", "magnitude": None})])
    with pytest.raises(UnsupportedError, match=re.escape("target \"x.weight\" is plain LoRA beside 1 DoRA target(s); "
                                                         "PEFT's use_dora applies to every module")):
        P.plan(plain)


def test_magnitude_of_the_wrong_length_is_refused(tmp_path):
    _peft(tmp_path, modules=["q_proj"])
    f = tmp_path / "peft" / "adapter_model.safetensors"
    t = load_file(str(f))
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(15)
    save_file(t, str(f))
    with pytest.raises(loratool.LoraToolError, match=re.escape("lora_magnitude_vector has shape [15] (F32), expected "
                                                               "16 floating-point values")):
        loratool.load(tmp_path / "peft")


def test_validate_warns_p009_with_the_new_truth(tmp_path):
    _peft(tmp_path, modules=["q_proj"])
    code, out, _ = run("validate", tmp_path / "peft", "--json")
    doc = json.loads(out)
    (p009,) = [f for f in doc["findings"] if f["rule"] == "P009"]
    assert p009["severity"] == "warning" and "merges each DoRA module exactly" in p009["message"]


def test_lazy_load_reads_the_magnitude(tmp_path):
    _peft(tmp_path, modules=["q_proj"])
    full = loratool.load(tmp_path / "peft")
    lazy = loratool.load(tmp_path / "peft", lazy=True)
    (t,) = lazy
    assert t.magnitude is None
    got = t.loaded()
    assert np.array_equal(got.magnitude, full.targets[t.key].magnitude) and got.magnitude.shape == (16,)
