"""`validate` on every dialect (PEFT, kohya, loralib, native): each dialect's rules as findings with ids, and with
--base the fit report (base key, shapes, base dtype, effective scale, blocks, ties); every mismatch is listed,
in validate and in merge's refusal; the same usage mistake is exit 2 in every command."""

import json
import math
import re
import warnings

import loralib
import pytest
import torch
from safetensors.torch import load_file, save_file

import loratool
from clitools import run
from loratool.io import native
from models import base_state_dict, peft_model, tiny_llama, tiny_neox

warnings.filterwarnings("ignore", category=UserWarning)

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
EMBED = "model.embed_tokens"


def _rules(doc, severity=None):
    return sorted({f["rule"] for f in doc["findings"] if severity is None or f["severity"] == severity})


def _validate_json(*args):
    code, out, err = run("validate", *args, "--json")
    return code, json.loads(out), err


# ---- PEFT ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A 1-layer Llama saved as a Hugging Face folder, a PEFT adapter with rsLoRA, a rank_pattern and an
    alpha_pattern (random non-zero B), and the same adapter as PEFT initialises it (B = 0)."""
    d = tmp_path_factory.mktemp("llama")
    model = tiny_llama(layers=1)
    (d / "base").mkdir()
    save_file(base_state_dict(model), str(d / "base" / "model.safetensors"))
    (d / "base" / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
    kw = dict(target_modules=["q_proj", "v_proj"], use_rslora=True, r=4, lora_alpha=8, rank_pattern={"v_proj": 2},
              alpha_pattern={"q_proj": 3})
    pm = peft_model(model, **kw)
    pm.save_pretrained(str(d / "peft"))
    scaling = {name: m.scaling["default"] for name, m in pm.base_model.model.named_modules()
               if isinstance(getattr(m, "scaling", None), dict)}
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_llama(layers=1), LoraConfig(**kw)).save_pretrained(str(d / "fresh"))  # PEFT's B = 0
    return {"dir": d, "base": d / "base", "peft": d / "peft", "fresh": d / "fresh", "scaling": scaling}


def _peft_variant(src, dst, cfg_edit=None, tensors_edit=None):
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    if cfg_edit:
        cfg_edit(cfg)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    t = load_file(str(src / "adapter_model.safetensors"))
    if tensors_edit:
        tensors_edit(t)
    save_file(t, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


def test_valid_peft_with_base_fits_and_scales_are_peft_s(llama):
    code, doc, err = _validate_json(llama["peft"], "--base", llama["base"])
    assert code == 0, doc["findings"]
    assert doc["dialect"] == "peft" and doc["valid"] and doc["errors"] == 0
    fit = doc["fit"]
    assert fit["fit"] == fit["targets"] == 2 and fit["changes_base"] and fit["unmatched"] == []
    rows = {r["name"]: r for r in fit["rows"]}
    assert sorted(rows) == [Q, V]
    for name, row in rows.items():
        assert row["base_key"] == name + ".weight" and row["agrees"] and row["base_dtype"] == "F32"
        assert row["layout"] == "linear" and row["whole"] and row["tied_with"] is None and row["changes"]
        # PEFT's own scaling: alpha_pattern, rank_pattern and rsLoRA applied (float64 vs PEFT's Python float).
        assert row["scales"] == [pytest.approx(llama["scaling"][name], rel=1e-12)]
    assert rows[Q]["scales"] == [pytest.approx(3 / math.sqrt(4))] and rows[V]["rank"] == 2
    assert rows[V]["scales"] == [pytest.approx(8 / math.sqrt(2))]


def test_peft_library_call_and_human_report(llama):
    rep = loratool.validate(llama["peft"], base=llama["base"])
    assert rep.dialect == "peft" and not rep.errors and rep.fit["fit"] == 2
    code, out, err = run("validate", llama["peft"], "--base", llama["base"])
    assert code == 0
    assert "fit against" in out and f"{Q}.weight" in out and "linear" in out
    assert err.strip().endswith("peft: valid: 0 errors, 0 warnings, 2 targets")


def test_peft_missing_lora_b_is_a_finding_and_the_rest_is_still_checked(llama, tmp_path):
    d = _peft_variant(llama["peft"], tmp_path / "v", tensors_edit=lambda t: t.pop(f"base_model.model.{Q}.lora_B.weight"))
    code, doc, _ = _validate_json(d, "--base", llama["base"])
    assert code == 1 and not doc["valid"]
    p011 = [f for f in doc["findings"] if f["rule"] == "P011"]
    assert len(p011) == 1 and p011[0]["target"] == Q and "has no lora_B.weight" in p011[0]["message"]
    assert [r["name"] for r in doc["fit"]["rows"]] == [V]  # the other module is still read and fits


def test_peft_config_problems_are_all_reported(llama, tmp_path):
    def edit(c):
        c.pop("r")
        c["lora_alpha"] = "8"
        c["use_rslora"] = "yes"

    code, doc, _ = _validate_json(_peft_variant(llama["peft"], tmp_path / "v", edit))
    assert code == 1 and _rules(doc, "error") == ["P003", "P004", "P008"]


def test_rank_pattern_for_a_module_that_does_not_exist(llama, tmp_path):
    d = _peft_variant(llama["peft"], tmp_path / "v", lambda c: c["rank_pattern"].update(nonexistent_proj=2))
    code, doc, _ = _validate_json(d)
    assert code == 1 and _rules(doc, "error") == ["P007"]
    assert "rank_pattern key \"nonexistent_proj\" matches no module of the adapter" in doc["findings"][0]["message"]


def test_peft_rank_disagreeing_with_config_and_dora_flagged(llama, tmp_path):
    d = _peft_variant(llama["peft"], tmp_path / "v", lambda c: c.update(rank_pattern={}))
    code, doc, _ = _validate_json(d)
    assert code == 1 and _rules(doc, "error") == ["P013"]
    assert {f["target"] for f in doc["findings"]} == {V}  # v_proj has rank 2, the config now says 4
    d = _peft_variant(llama["peft"], tmp_path / "dora", lambda c: c.update(use_dora=True, target_modules=None))
    code, doc, _ = _validate_json(d)
    assert code == 1 and "P009" in _rules(doc, "warning") and "P005" in _rules(doc, "error")
    assert "P014" in _rules(doc, "error")  # use_dora without a lora_magnitude_vector


def test_wrong_base_lists_every_unmatched_module(llama, tmp_path):
    neox = tmp_path / "neox.safetensors"
    save_file(base_state_dict(tiny_neox(layers=1)), str(neox))
    code, doc, _ = _validate_json(llama["peft"], "--base", neox)
    assert code == 1
    fit = doc["fit"]
    assert fit["unmatched"] == [Q, V] and fit["fit"] == 0 and not fit["changes_base"]
    assert "B001" in _rules(doc, "error")
    code, out, _ = run("validate", llama["peft"], "--base", neox)
    assert f"match nothing in the base (2): {Q}, {V}" in out


def test_merge_with_a_wrong_base_names_every_peft_module(llama, tmp_path):
    sd = {k.replace("self_attn", "attn"): v for k, v in load_file(str(llama["base"] / "model.safetensors")).items()}
    save_file(sd, str(tmp_path / "b.safetensors"))
    code, _, err = run("merge", tmp_path / "b.safetensors", llama["peft"], "-o", tmp_path / "m.safetensors")
    assert code == 4 and err.count("\n") == 1
    assert "2 modules are refused" in err and f"\"{Q}.weight\"" in err and f"\"{V}.weight\"" in err
    assert err.rstrip().endswith("check that --base is the model this adapter was trained on")
    assert not (tmp_path / "m.safetensors").exists()


def test_an_adapter_that_changes_nothing_is_an_error(llama):
    code, doc, _ = _validate_json(llama["fresh"], "--base", llama["base"])
    assert code == 1 and _rules(doc, "error") == ["F001"] and not doc["fit"]["changes_base"]
    assert all(r["changes"] is False for r in doc["fit"]["rows"])
    code, doc, _ = _validate_json(llama["fresh"])  # without a base: legal, but each zero factor is warned about
    assert code == 0 and _rules(doc) == ["W003"]


def test_tied_embeddings_and_integer_base_tensors(tmp_path):
    model = tiny_llama(layers=1)
    sd = base_state_dict(model)
    sd.pop("lm_head.weight")  # what save_pretrained writes for a tied model
    (tmp_path / "base").mkdir()
    save_file(sd, str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": True}))
    peft_model(model, target_modules=["embed_tokens", "q_proj"]).save_pretrained(str(tmp_path / "peft"))
    code, doc, _ = _validate_json(tmp_path / "peft", "--base", tmp_path / "base")
    assert code == 0 and _rules(doc) == ["F003"]
    row = next(r for r in doc["fit"]["rows"] if r["name"] == EMBED)
    assert row["layout"] == "embedding" and row["tied_with"].startswith("lm_head.weight (not stored")
    assert "changes both sides" in doc["findings"][0]["message"]
    assert doc["fit"]["tied"] == [{"embed": "model.embed_tokens.weight", "head": "lm_head.weight",
                                   "head_stored": False, "how": "config.json"}]
    assert run("validate", tmp_path / "peft", "--base", tmp_path / "base", "--strict")[0] == 1
    # An adapter on the head of a tied model whose file does not store it: the head is the embedding's tensor.
    tied = tiny_llama(layers=1, tied=True)
    tsd = base_state_dict(tied)
    tsd.pop("lm_head.weight", None)
    (tmp_path / "tbase").mkdir()
    save_file(tsd, str(tmp_path / "tbase" / "model.safetensors"))
    (tmp_path / "tbase" / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": True}))
    peft_model(tied, target_modules=["lm_head"]).save_pretrained(str(tmp_path / "head"))
    code, doc, _ = _validate_json(tmp_path / "head", "--base", tmp_path / "tbase")
    assert code == 0 and _rules(doc) == ["F003"] and doc["fit"]["rows"][0]["base_key"] == "lm_head.weight"
    sd[f"{Q}.weight"] = torch.zeros(16, 16, dtype=torch.int8)
    save_file(sd, str(tmp_path / "base" / "model.safetensors"))
    code, doc, _ = _validate_json(tmp_path / "peft", "--base", tmp_path / "base")
    assert code == 1 and "B003" in _rules(doc, "error")
    assert next(r for r in doc["fit"]["rows"] if r["name"] == Q)["ok"] is False


# ---- kohya -----------------------------------------------------------------------------------------------

def _r(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


KBASE = {"text_model.encoder.layers.0.self_attn.q_proj.weight": _r(6, 5, seed=1),
         "down_blocks.0.resnets.0.conv1.weight": _r(8, 4, 3, 3, seed=2)}
KQ, KC = "lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_unet_down_blocks_0_resnets_0_conv1"


def _kohya(tmp_path, **edits):
    sd = {f"{KQ}.lora_down.weight": _r(2, 5, seed=3), f"{KQ}.lora_up.weight": _r(6, 2, seed=4),
          f"{KQ}.alpha": torch.tensor(1.0),
          f"{KC}.lora_down.weight": _r(2, 4, 3, 3, seed=5), f"{KC}.lora_up.weight": _r(8, 2, 1, 1, seed=6),
          f"{KC}.alpha": torch.tensor(4.0)}
    for k, v in edits.items():
        if v is None:
            sd.pop(k)
        else:
            sd[k] = v
    save_file(KBASE, str(tmp_path / "base.safetensors"))
    save_file(sd, str(tmp_path / "k.safetensors"))
    return tmp_path / "k.safetensors", tmp_path / "base.safetensors"


def test_valid_kohya_with_base_maps_names_to_base_keys(tmp_path):
    k, base = _kohya(tmp_path)
    code, doc, _ = _validate_json(k, "--base", base)
    assert code == 0 and doc["dialect"] == "kohya" and doc["findings"] == []
    rows = {r["name"]: r for r in doc["fit"]["rows"]}
    assert rows[KQ]["base_key"] == "text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert rows[KQ]["scales"] == [0.5] and rows[KC]["scales"] == [2.0]  # alpha / rank
    assert rows[KC]["layout"] == "conv" and rows[KC]["shape"] == [8, 4, 3, 3] == rows[KC]["base_shape"]


def test_kohya_alpha_of_wrong_shape_and_missing_alpha(tmp_path):
    k, base = _kohya(tmp_path, **{f"{KQ}.alpha": torch.tensor([1.0, 2.0]), f"{KC}.alpha": None})
    code, doc, _ = _validate_json(k, "--base", base)
    assert code == 1 and _rules(doc, "error") == ["K005"] and _rules(doc, "warning") == ["K004"]
    k005 = next(f for f in doc["findings"] if f["rule"] == "K005")
    assert k005["target"] == f"{KQ}.alpha" and "has shape [2]; alpha is one number" in k005["message"]
    assert [r["name"] for r in doc["fit"]["rows"]] == [KC]  # the module with a good pair is still read


def test_kohya_broken_pairs_and_lycoris_keys_are_all_reported(tmp_path):
    k, _ = _kohya(tmp_path, **{f"{KQ}.lora_up.weight": None, f"{KC}.lora_up.weight": _r(8, 2, 3, 3, seed=7),
                               f"{KC}.hada_w1_a": _r(2, 2, seed=8), "lora_unet_o.oft_blocks": _r(2, 2, 2, seed=9)})
    code, doc, _ = _validate_json(k)
    # K008: a LoHa factor beside a pair is a LyCORIS module whose factors do not fit together
    assert code == 1 and _rules(doc, "error") == ["K002", "K003", "K008"]


def test_merge_with_a_wrong_base_names_every_kohya_module(tmp_path):
    k, _ = _kohya(tmp_path)
    save_file({"other.weight": torch.ones(2, 2)}, str(tmp_path / "wrong.safetensors"))
    code, _, err = run("merge", tmp_path / "wrong.safetensors", k, "-o", tmp_path / "m.safetensors")
    assert code == 4 and err.count("\n") == 1 and "2 modules are refused" in err
    assert f"\"{KQ.removeprefix('lora_te_')}\"" in err and f"\"{KC.removeprefix('lora_unet_')}\"" in err
    code, doc, _ = _validate_json(k, "--base", tmp_path / "wrong.safetensors")
    assert code == 1 and doc["fit"]["unmatched"] == sorted([KC, KQ])


# ---- loralib ---------------------------------------------------------------------------------------------

class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = loralib.Linear(6, 5, r=2, lora_alpha=8)
        self.qkv = loralib.MergedLinear(6, 12, r=2, lora_alpha=8, enable_lora=[True, False, True])


@pytest.fixture
def lora_pt(tmp_path):
    torch.manual_seed(0)
    net = _Net()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape))
    torch.save(loralib.lora_state_dict(net), tmp_path / "lora.pt")
    save_file({k: v.contiguous() for k, v in net.state_dict().items() if "lora_" not in k},
              str(tmp_path / "base.safetensors"))
    return tmp_path / "lora.pt", tmp_path / "base.safetensors"


def test_valid_loralib_with_base(lora_pt):
    pt, base = lora_pt
    code, doc, _ = _validate_json(pt, "--base", base, "--alpha", 8, "--enable-lora", "1,0,1")
    assert code == 0 and doc["dialect"] == "loralib" and doc["findings"] == []
    rows = {r["name"]: r for r in doc["fit"]["rows"]}
    assert sorted(rows) == ["fc", "qkv"] and rows["qkv"]["base_key"] == "qkv.weight"
    assert rows["qkv"]["scales"] == [4.0] and [b["rows"] for b in rows["qkv"]["blocks"]] == [[0, 4], [8, 12]]
    code, out, _ = run("validate", pt, "--base", base, "--alpha", 8, "--enable-lora", "1,0,1")
    assert "[0:4] [8:12]" in out


def test_loralib_alpha_needed_and_enable_lora_consistency(lora_pt):
    pt, base = lora_pt
    code, doc, _ = _validate_json(pt, "--base", base, "--enable-lora", "1,0,1")
    assert code == 1 and _rules(doc, "error") == ["L001"]
    assert all(r["scales"] == [None] for r in doc["fit"]["rows"]) and doc["fit"]["fit"] == 2  # the rest is checked
    code, doc, _ = _validate_json(pt, "--alpha", 8)
    assert code == 1 and _rules(doc, "error") == ["L004"] and _rules(doc, "warning") == ["L007"]
    code, doc, _ = _validate_json(pt, "--base", base, "--alpha", 8, "--enable-lora", "1,1")
    assert code == 1 and _rules(doc, "error") == ["L005"]


# ---- native, and usage mistakes ----------------------------------------------------------------------------

def test_native_fit_report_and_noop(tmp_path):
    from builders import linear_target

    t = linear_target()
    save_file({t.key: torch.zeros(t.shape)}, str(tmp_path / "base.safetensors"))
    native.save(loratool.Adapter(targets={t.key: t}), tmp_path / "a.safetensors")
    code, doc, _ = _validate_json(tmp_path / "a.safetensors", "--base", tmp_path / "base.safetensors")
    assert code == 0 and doc["fit"]["rows"][0]["base_key"] == t.key and doc["fit"]["rows"][0]["scales"] == [2.0]
    zero = t.with_blocks([t.blocks[0].__class__(**{**t.blocks[0].__dict__, "B": torch.zeros(12, 3)})])
    native.save(loratool.Adapter(targets={t.key: zero}), tmp_path / "z.safetensors")
    code, doc, _ = _validate_json(tmp_path / "z.safetensors", "--base", tmp_path / "base.safetensors")
    assert code == 1 and _rules(doc, "error") == ["F001"]


@pytest.mark.parametrize("command", [
    ["validate", "{peft}"], ["inspect", "{peft}"], ["convert", "{peft}", "-o", "{tmp}/x.safetensors"],
    ["rescale", "{peft}", "--scale", "2", "-o", "{tmp}/x.safetensors"],
    ["combine", "{peft}", "{peft}", "-o", "{tmp}/x.safetensors"],
    ["merge", "{base}", "{peft}", "-o", "{tmp}/m/"],
])
def test_an_option_the_dialect_does_not_take_is_exit_2_everywhere(llama, tmp_path, command):
    args = [a.format(peft=llama["peft"], base=llama["base"], tmp=tmp_path) for a in command]
    flag = "--lora-alpha" if command[0] == "rescale" else "--alpha"
    code, out, err = run(*args, flag, "3")
    assert code == 2, err
    assert re.search(r"takes? --(lora-)?alpha; drop the option", err) and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
