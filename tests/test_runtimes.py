"""`validate --for RUNTIME` and loratool.check_runtime: each rule fires on the structure that breaks it and on
nothing else; every rule is documented with its source."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import loratool
from loratool.errors import UnsupportedError
from loratool.tasks import serving
from clitools import run

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")


def _rng_pair(out, inp, r, seed):
    g = np.random.default_rng(seed)
    return g.standard_normal((r, inp), dtype=np.float32), g.standard_normal((out, r), dtype=np.float32)


def peft_dir(tmp_path, name="peft", r=8, alpha=16, ranks=None, cfg=None, tensors=None) -> Path:
    """A PEFT folder written by hand: q_proj and v_proj of an 16x16 model (ranks: module -> its own r)."""
    d = tmp_path / name
    d.mkdir()
    t = {}
    for i, m in enumerate(MODULES):
        A, B = _rng_pair(16, 16, (ranks or {}).get(m, r), i)
        t[f"base_model.model.{m}.lora_A.weight"], t[f"base_model.model.{m}.lora_B.weight"] = A, B
    t.update(tensors or {})
    save_file(t, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    c = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"], "bias": "none",
         "base_model_name_or_path": "tiny/llama", "use_dora": False, "use_rslora": False}
    c.update(cfg or {})
    (d / "adapter_config.json").write_text(json.dumps(c))
    return d


def kohya_file(tmp_path, alphas=None, name="lora.safetensors", prefix="lora_unet_") -> Path:
    """A kohya file with two modules of rank 4; alphas: module index -> alpha (absent: no alpha tensor)."""
    t = {}
    for i, m in enumerate(("down_blocks_0_attentions_0_proj_in", "mid_block_attentions_0_proj_out")):
        A, B = _rng_pair(8, 8, 4, i)
        t[f"{prefix}{m}.lora_down.weight"], t[f"{prefix}{m}.lora_up.weight"] = A, B
        if alphas is not None and i in alphas:
            t[f"{prefix}{m}.alpha"] = np.array(alphas[i], dtype=np.float32)
    p = tmp_path / name
    save_file(t, str(p))
    return p


def ids(findings):
    return [f.id for f in findings]


def test_clean_peft_adapter_has_no_findings_anywhere_it_loads(tmp_path):
    d = peft_dir(tmp_path)
    for rt in ("vllm", "llama.cpp"):
        assert loratool.check_runtime(d, rt) == []
    code, out, err = run("validate", d, "--for", "vllm")
    assert code == 0, err
    assert "0 errors, 0 warnings" in err


def test_rank_24_needs_max_lora_rank_32_and_rank_600_is_refused(tmp_path):
    f = loratool.check_runtime(peft_dir(tmp_path, r=24), "vllm")
    assert ids(f) == ["VLLM003"] and f[0].severity == "warning"
    assert "--max-lora-rank 32" in f[0].message
    assert "vllm/config/lora.py" in f[0].source
    f = loratool.check_runtime(peft_dir(tmp_path, "big", r=600), "vllm")
    assert ids(f) == ["VLLM002"] and f[0].severity == "error"
    # a warning passes, and fails only under --strict (exit 3: the runtime's rules)
    assert run("validate", tmp_path / "peft", "--for", "vllm")[0] == 0
    assert run("validate", tmp_path / "peft", "--for", "vllm", "--strict")[0] == 3


def test_rank_16_is_within_the_default(tmp_path):
    assert loratool.check_runtime(peft_dir(tmp_path, r=16), "vllm") == []


def test_dora_is_reported_for_vllm_llamacpp_and_comfyui(tmp_path):
    mags = {f"base_model.model.{m}.lora_magnitude_vector": np.ones(16, np.float32) for m in MODULES}
    d = peft_dir(tmp_path, cfg={"use_dora": True}, tensors=mags)
    f = loratool.check_runtime(d, "vllm")
    assert ids(f) == ["VLLM004"] and "DoRA" in f[0].message
    assert ids(loratool.check_runtime(d, "llama.cpp")) == ["LCPP003"]
    assert "COMFY008" in ids(loratool.check_runtime(d, "comfyui"))
    code, out, err = run("validate", d, "--for", "vllm")
    assert code == 3 and "VLLM004" in out


def test_modules_to_save_is_refused_by_vllm_and_llamacpp(tmp_path):
    d = peft_dir(tmp_path, cfg={"modules_to_save": ["score"]},
                 tensors={"base_model.model.score.weight": np.zeros((3, 16), np.float32)})
    f = loratool.check_runtime(d, "vllm")
    assert ids(f) == ["VLLM005"] and "modules_to_save" in f[0].message
    assert ids(loratool.check_runtime(d, "llama.cpp")) == ["LCPP004"]


def test_bias_is_refused_by_vllm(tmp_path):
    d = peft_dir(tmp_path, cfg={"bias": "all"})
    assert ids(loratool.check_runtime(d, "vllm")) == ["VLLM006"]


def test_alpha_pattern_is_mishandled_by_llamacpp_and_vllm(tmp_path):
    d = peft_dir(tmp_path, cfg={"alpha_pattern": {"v_proj": 32}})
    f = loratool.check_runtime(d, "llama.cpp")
    assert ids(f) == ["LCPP007"] and f[0].targets == ("model.layers.0.self_attn.v_proj.weight",)
    assert ids(loratool.check_runtime(d, "vllm")) == ["VLLM007"]


def test_rank_pattern_alone_is_fine_for_llamacpp_not_for_vllm(tmp_path):
    # llama.cpp reads each tensor's rank (alpha / rank per tensor); vLLM uses the config's one r.
    v = MODULES[1]
    d = peft_dir(tmp_path, cfg={"rank_pattern": {"v_proj": 4}}, ranks={v: 4})
    assert loratool.check_runtime(d, "llama.cpp") == []
    assert ids(loratool.check_runtime(d, "vllm")) == ["VLLM007"]


def test_rslora_is_right_in_vllm_and_wrong_in_llamacpp(tmp_path):
    d = peft_dir(tmp_path, cfg={"use_rslora": True})
    assert loratool.check_runtime(d, "vllm") == []
    assert ids(loratool.check_runtime(d, "llama.cpp")) == ["LCPP008"]


def test_llamacpp_needs_a_base_config(tmp_path):
    d = peft_dir(tmp_path, cfg={"base_model_name_or_path": None})
    assert ids(loratool.check_runtime(d, "llama.cpp")) == ["LCPP002"]


def test_kohya_file_is_fine_for_comfyui_and_noted_for_diffusers(tmp_path):
    full = kohya_file(tmp_path, alphas={0: 2.0, 1: 2.0})
    assert loratool.check_runtime(full, "comfyui") == []
    assert loratool.check_runtime(full, "diffusers") == []
    # one module without alpha: sd-scripts and ComfyUI use alpha = rank, diffusers the file's common alpha
    mixed = kohya_file(tmp_path, alphas={0: 2.0}, name="mixed.safetensors")
    assert loratool.check_runtime(mixed, "comfyui") == []
    f = loratool.check_runtime(mixed, "diffusers")
    assert ids(f) == ["DIFF003"] and "alpha 2" in f[0].message
    zero = kohya_file(tmp_path, alphas={0: 0.0, 1: 2.0}, name="zero.safetensors")
    assert ids(loratool.check_runtime(zero, "diffusers")) == ["DIFF004"]
    assert ids(loratool.check_runtime(zero, "comfyui")) == ["COMFY005"]
    te3 = kohya_file(tmp_path, alphas={0: 4.0, 1: 4.0}, name="te3.safetensors", prefix="lora_te3_")
    assert ids(loratool.check_runtime(te3, "diffusers")) == ["DIFF002"]
    assert loratool.check_runtime(te3, "comfyui") == []


def test_runtime_that_does_not_read_the_dialect_says_what_to_convert_to(tmp_path):
    k = kohya_file(tmp_path)
    f = loratool.check_runtime(k, "vllm")
    assert ids(f) == ["VLLM001"] and "--to peft" in f[0].message
    f = loratool.check_runtime(peft_dir(tmp_path), "diffusers")
    assert ids(f) == ["DIFF001"] and "--to kohya" in f[0].message
    code, out, err = run("validate", k, "--for", "llama.cpp", "--json")
    assert code == 3
    doc = json.loads(out)
    assert doc["valid"] is False and doc["runtime"] == "llama.cpp"
    assert [x["id"] for x in doc["runtime_findings"]] == ["LCPP001"]
    assert doc["runtime_findings"][0]["source"].startswith("ggml-org/llama.cpp convert_lora_to_gguf.py")


def test_comfyui_drops_peft_alpha(tmp_path):
    f = loratool.check_runtime(peft_dir(tmp_path, r=8, alpha=16), "comfyui")
    assert ids(f) == ["COMFY002", "COMFY003"] and f[1].severity == "error"
    assert ids(loratool.check_runtime(peft_dir(tmp_path, "s1", r=8, alpha=8), "comfyui")) == ["COMFY002"]


def test_json_of_a_clean_adapter(tmp_path):
    code, out, err = run("validate", peft_dir(tmp_path), "--for", "llama.cpp", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc == {"path": str(tmp_path / "peft"), "valid": True, "runtime": "llama.cpp", "runtime_findings": []}


def test_native_file_runs_spec_rules_then_the_runtime(tmp_path):
    from builders import as_numpy_adapter, linear_target

    from loratool.adapter import Adapter

    p = tmp_path / "a.safetensors"
    t = linear_target(rank=3)
    loratool.save(as_numpy_adapter(Adapter(targets={t.key: t})), p)
    code, out, err = run("validate", p, "--for", "vllm", "--json")
    doc = json.loads(out)
    assert code == 3 and doc["errors"] == 0 and [x["id"] for x in doc["runtime_findings"]] == ["VLLM001"]


def test_in_memory_adapter_and_unknown_runtime(tmp_path):
    a = loratool.structure(peft_dir(tmp_path, r=24))
    assert ids(loratool.check_runtime(a, "vllm")) == ["VLLM003"]
    with pytest.raises(UnsupportedError, match=re.escape("\"tgi\" is not a runtime loratool checks")):
        loratool.check_runtime(a, "tgi")
    assert run("validate", tmp_path / "peft", "--for", "tgi")[0] == 2


def test_every_rule_is_documented_with_its_source():
    doc = (ROOT / "docs" / "runtimes.md").read_text()
    for rt, r in serving.rules():
        assert f"**{r.id}**" in doc, r.id
        repo, _, rest = r.source.partition(" ")
        for path in re.findall(r"[\w./-]+\.(?:py|cpp|h)\b", rest):
            assert path in doc, (r.id, path)
    assert set(re.findall(r"\*\*([A-Z]+\d{3})\*\*", doc)) == {r.id for _, r in serving.rules()}
    assert "--for" in (ROOT / "README.md").read_text()


def test_loralib_file_needs_no_alpha_to_be_told_what_to_convert_to(tmp_path):
    import torch

    p = tmp_path / "lora.pt"
    torch.save({"fc.lora_A": torch.zeros(2, 4), "fc.lora_B": torch.zeros(3, 2)}, p)
    for rt, rule in (("vllm", "VLLM001"), ("llama.cpp", "LCPP001"), ("diffusers", "DIFF001"), ("comfyui", "COMFY001")):
        f = loratool.check_runtime(p, rt)
        assert ids(f) == [rule] and "loralib" in f[0].message, rt
