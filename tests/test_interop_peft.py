"""PEFT conformance: the ΔW loratool reads equals PEFT's get_delta_weight, PEFT -> loratool -> PEFT is
lossless, and the folder loratool writes loads in PeftModel.from_pretrained with the same logits.

Tiny Llama (separate q/k/v/o, MLP), GPT-2 (fused c_attn Conv1D, fan_in_fan_out) and GPT-NeoX (fused
query_key_value) from transformers configs with random init; adapters plain, rsLoRA and rank/alpha-pattern.
"""

import json
import re
import warnings

import pytest
import torch
from safetensors.torch import save_file

from arrays import dense_delta
from builders import fused_target, full_target, linear_target
from loratool.adapter import Adapter
from loratool.errors import MismatchError, SpecError, UnsupportedError
from loratool.io import native, peft as P
from models import base_state_dict, peft_model, sample_input, tiny_gpt2, tiny_llama, tiny_neox

ATOL = 1e-6  # float32 (B @ A) * s computed by two code paths on values of order 1
LOGIT_ATOL = 1e-5  # logits of two float32 forward passes through identical weights

warnings.filterwarnings("ignore", category=UserWarning)

CASES = {
    # name: (model builder, LoraConfig kwargs)
    "llama-plain": (tiny_llama, dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj", "embed_tokens"])),
    "llama-patterns": (tiny_llama, dict(target_modules="all-linear", r=4, lora_alpha=8,
                                        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                                        alpha_pattern={"down_proj": 3, "model.layers.0.mlp.up_proj": 5.5})),
    "gpt2-rslora": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc", "wte"], use_rslora=True, r=4,
                                    lora_alpha=4)),
    "neox-bias-patterns": (tiny_neox, dict(target_modules=["query_key_value", "dense", "dense_h_to_4h"],
                                           lora_bias=True, rank_pattern={"dense_h_to_4h": 2},
                                           alpha_pattern={"query_key_value": 2})),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    build, kw = CASES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    model = build()
    base = d / "base.safetensors"
    save_file(base_state_dict(model), str(base))
    pm = peft_model(model, **kw)
    pm.save_pretrained(str(d / "peft"))
    return {"name": request.param, "build": build, "pm": pm, "dir": d, "peft": d / "peft", "base": base}


def _modules(pm):
    return dict(pm.base_model.model.named_modules())


def test_delta_equals_peft_get_delta_weight(case):
    a = P.load(case["peft"], base=case["base"])
    mods = _modules(case["pm"])
    from peft.tuners.lora import LoraLayer

    n_lora = sum(1 for m in mods.values() if isinstance(m, LoraLayer) and "default" in m.r)
    assert sum(1 for t in a if t.kind == "lora") == n_lora
    for t in a:
        if t.kind == "full":  # lora_bias: the layer's bias gains scaling * lora_B.bias
            m = mods[t.key.removesuffix(".bias")]
            ref = m.lora_B["default"].bias * m.scaling["default"]
        else:
            m = mods[t.key.removesuffix(".weight")]
            ref = m.get_delta_weight("default")
            assert t.blocks[0].rank == m.r["default"] and t.blocks[0].scale == pytest.approx(m.scaling["default"],
                                                                                             rel=1e-15)
        torch.testing.assert_close(dense_delta(t), ref.detach(), atol=ATOL, rtol=0)


def test_layouts_and_patterns(case):
    a = P.load(case["peft"], base=case["base"])
    layouts = {t.key: t.layout for t in a}
    if case["name"].startswith("gpt2"):
        assert layouts["transformer.h.0.attn.c_attn.weight"] == "fan_in_fan_out"
        assert layouts["transformer.wte.weight"] == "embedding"
        assert {b.scale_rule for t in a for b in t.blocks} == {"rslora"}
    if case["name"] == "llama-patterns":
        by = {t.key: t.blocks[0] for t in a}
        assert by["model.layers.0.self_attn.v_proj.weight"].rank == 2
        assert by["model.layers.1.self_attn.q_proj.weight"].rank == 6
        assert by["model.layers.0.self_attn.q_proj.weight"].rank == 4
        assert by["model.layers.1.mlp.down_proj.weight"].alpha == 3
        assert by["model.layers.0.mlp.up_proj.weight"].alpha == 5.5
        assert by["model.layers.1.mlp.up_proj.weight"].alpha == 8
    if case["name"].startswith("neox"):
        assert any(t.kind == "full" and t.key.endswith("query_key_value.bias") for t in a)


def test_peft_to_loratool_to_peft_is_lossless_and_loads_with_same_logits(case):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from safetensors import safe_open

    a = P.load(case["peft"], base=case["base"])
    native.save(a, case["dir"] / "n.safetensors")
    b = native.load(case["dir"] / "n.safetensors")
    out = case["dir"] / "peft2"
    P.save(b, out)
    with safe_open(str(case["peft"] / "adapter_model.safetensors"), "pt") as f1, \
            safe_open(str(out / "adapter_model.safetensors"), "pt") as f2:
        k1 = {k for k in f1.keys() if ".base_layer." not in k}  # saved embedding copies equal to the base
        assert k1 == set(f2.keys())
        for k in k1:
            assert torch.equal(f1.get_tensor(k), f2.get_tensor(k)), k
    pm2 = PeftModel.from_pretrained(case["build"](), str(out)).eval()
    orig, new = _modules(case["pm"]), _modules(pm2)
    for name, m in orig.items():
        if isinstance(m, LoraLayer) and "default" in m.scaling:
            assert new[name].r["default"] == m.r["default"], name
            assert new[name].scaling["default"] == pytest.approx(m.scaling["default"], rel=1e-15), name
    x = sample_input()
    with torch.no_grad():
        torch.testing.assert_close(pm2(x).logits, case["pm"](x).logits, atol=LOGIT_ATOL, rtol=0)


def test_pattern_rule_matches_peft():
    from peft.utils.other import get_pattern_key as peft_rule

    patterns = {"q_proj": 2, r"layers\.1\.self_attn\.q_proj": 6, "mlp.*": 3, "layers.1.mlp.up_proj": 9}
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj",
               "model.layers.11.self_attn.k_proj", "xq_proj", "model.q_proj.inner"]
    for m in modules:
        ours = P.get_pattern_key(patterns, m)
        assert (ours if ours is not None else m) == peft_rule(patterns.keys(), m), m
    # The first key in config order wins, as in PEFT: "q_proj" before the more specific layer-1 key.
    assert P.get_pattern_key(patterns, "model.layers.1.self_attn.q_proj") == "q_proj"


# ---- hostile and unsupported configs --------------------------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    model = tiny_llama(layers=1)
    save_file(base_state_dict(model), str(d / "base.safetensors"))
    pm = peft_model(model, target_modules=["q_proj", "v_proj"])
    pm.save_pretrained(str(d / "peft"))
    return d


def _variant(small, tmp_path, cfg_edit=None, tensors_edit=None):
    d = tmp_path / "v"
    d.mkdir()
    cfg = json.loads((small / "peft" / "adapter_config.json").read_text())
    if cfg_edit:
        cfg_edit(cfg)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file

    t = load_file(str(small / "peft" / "adapter_model.safetensors"))
    if tensors_edit:
        tensors_edit(t)
    save_file(t, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("r"), "\"r\" is missing (PEFT would silently use 8); add the rank the adapter was trained with"),
    (lambda c: c.update(r=0), "\"r\" is 0; it must be a positive integer"),
    (lambda c: c.update(r=4.0), "\"r\" is 4.0; it must be a positive integer"),
    (lambda c: c.update(r="4"), "\"r\" is \"4\"; it must be a positive integer"),
    (lambda c: c.update(r=True), "\"r\" is true; it must be a positive integer"),
    (lambda c: c.pop("lora_alpha"), "\"lora_alpha\" is missing (PEFT would silently use 8)"),
    (lambda c: c.update(rank_pattern={"q_proj": -1}), "rank_pattern[\"q_proj\"] is -1; it must be a positive integer"),
    (lambda c: c.update(lora_alpha=float("nan")), "adapter_config.json: not valid JSON (NaN is not JSON)"),
    (lambda c: c.pop("peft_type"), "\"peft_type\" is missing or not a string; a PEFT LoRA config has \"peft_type\": "
                                   "\"LORA\""),
    (lambda c: c.update(alpha_pattern={"q_proj(": 2}), "alpha_pattern key \"q_proj(\" is not a valid regular "
                                                        "expression"),
])
def test_bad_config_is_refused(small, tmp_path, edit, message):
    d = _variant(small, tmp_path, edit)
    with pytest.raises(SpecError, match=re.escape(message)):
        P.load(d)


def test_rank_disagreeing_with_config_is_refused(small, tmp_path):
    d = _variant(small, tmp_path, lambda c: c.update(r=8))
    with pytest.raises(SpecError, match=re.escape("factors have rank 4 but the config gives r = 8 (after rank_pattern)")):
        P.load(d)


@pytest.mark.parametrize("ptype, reason", [
    ("PREFIX_TUNING", "prefix tuning adds learned key/value prefixes to attention"),
    ("IA3", "IA3 rescales activations element-wise"),
    ("PROMPT_TUNING", "prompt tuning adds virtual input tokens"),
    ("LOKR", "LoKr is a Kronecker product"),
])
def test_non_lora_types_are_refused_with_reason(small, tmp_path, ptype, reason):
    d = _variant(small, tmp_path, lambda c: c.update(peft_type=ptype))
    with pytest.raises(UnsupportedError, match=re.escape(f"is a PEFT {ptype} adapter, not LoRA: {reason}")):
        P.load(d)


def test_dora_without_magnitude_refused_and_stray_magnitude_is_unknown(small, tmp_path):
    d = _variant(small, tmp_path, lambda c: c.update(use_dora=True))
    with pytest.raises(SpecError, match=re.escape("module \"model.layers.0.self_attn.q_proj\" has no "
                                                  "lora_magnitude_vector but the config sets use_dora")):
        P.load(d)

    def add_mag(t):
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(16)

    d2 = tmp_path / "d2"
    d2.mkdir()
    d = _variant(small, d2, None, add_mag)  # use_dora false: PEFT would ignore the vector, so it is not applied
    with pytest.raises(SpecError, match=re.escape("\"base_model.model.model.layers.0.self_attn.q_proj."
                                                  "lora_magnitude_vector\"; pass --allow-unknown")):
        P.load(d)


def _merged(a, base) -> dict:
    """key -> W' of each target of `a` merged into `base` (torch) by loratool's Merger."""
    from loratool.ops.merge import Term, merge_tensor

    return {t.key: torch.from_numpy(merge_tensor(base[t.key].numpy(), t.key, [Term(t, 1.0)])[0]) for t in a}


@pytest.mark.parametrize("build, modules", [(tiny_llama, ["q_proj", "down_proj"]), (tiny_gpt2, ["c_attn", "c_fc"])])
def test_dora_equals_peft_merge(tmp_path, build, modules):
    import copy

    model = build(layers=1)
    base = base_state_dict(model)
    pm = peft_model(model, target_modules=modules, use_dora=True)
    pm.save_pretrained(str(tmp_path / "peft"))
    merged = copy.deepcopy(pm).merge_and_unload().state_dict()
    a = P.load(tmp_path / "peft")  # the adapter alone: the merge reads the base's rows
    assert a.targets and all(t.kind == "dora" for t in a)
    mine = _merged(a, base)
    for k, W in mine.items():
        torch.testing.assert_close(W, merged[k], atol=ATOL, rtol=0)
    with torch.no_grad():  # the base with loratool's merged weights gives PEFT's DoRA outputs
        plain = build(layers=1)
        sd = plain.state_dict()
        sd.update(mine)
        plain.load_state_dict(sd)
        x = sample_input()
        torch.testing.assert_close(plain(x).logits, pm(x).logits, atol=LOGIT_ATOL, rtol=0)


def test_unknown_keys_error_or_recorded(small, tmp_path):
    def add(t):
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.ones(2)

    d = _variant(small, tmp_path, None, add)
    with pytest.raises(SpecError, match=re.escape("1 key(s) that are not PEFT LoRA factors: "
                                                  "\"base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight\"; "
                                                  "pass --allow-unknown")):
        P.load(d)
    a = P.load(d, allow_unknown=True)
    assert a.info["unknown_keys"] == ["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"]
    assert len(a) == 2


def test_lora_bias_without_flag_is_not_applied_silently(small, tmp_path):
    def add(t):
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"] = torch.ones(16)

    d = _variant(small, tmp_path, None, add)
    with pytest.raises(SpecError, match=re.escape("lora_B.bias\"; pass --allow-unknown")):
        P.load(d)


def test_whole_tensors_need_base(small, tmp_path):
    def add(t):
        t["base_model.model.lm_head.weight"] = torch.zeros(64, 16)

    d = _variant(small, tmp_path, None, add)
    with pytest.raises(UnsupportedError, match=re.escape("is a whole saved tensor (modules_to_save or a saved "
                                                         "embedding layer) that replaces the base's; pass --base")):
        P.load(d)
    a = P.load(d, base=small / "base.safetensors")
    t = a.targets["lm_head.weight"]
    from safetensors.torch import load_file

    W = load_file(str(small / "base.safetensors"))["lm_head.weight"]
    assert t.kind == "full" and torch.equal(dense_delta(t), -W)  # saved (zeros) - base, exactly


def test_prefix_resolution_against_base(small, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(str(small / "base.safetensors"))
    bare = {k.removeprefix("model."): v for k, v in sd.items()}  # an AutoModel (LlamaModel) checkpoint
    save_file(bare, str(tmp_path / "bare.safetensors"))
    a = P.load(small / "peft", base=tmp_path / "bare.safetensors")
    assert sorted(a.targets) == ["layers.0.self_attn.q_proj.weight", "layers.0.self_attn.v_proj.weight"]
    other = {"x." + k: v for k, v in sd.items()} | {"y." + k: v.clone() for k, v in sd.items()}
    save_file(other, str(tmp_path / "two.safetensors"))
    with pytest.raises(MismatchError, match=re.escape("fits several base keys")):
        P.load(small / "peft", base=tmp_path / "two.safetensors")


def test_shape_mismatch_against_base(small, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(str(small / "base.safetensors"))
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 8)
    save_file(sd, str(tmp_path / "b.safetensors"))
    with pytest.raises(MismatchError, match=re.escape("LoRA factors imply linear weight [16, 16] but base "
                                                      "\"model.layers.0.self_attn.q_proj.weight\" is [16, 8]")):
        P.load(small / "peft", base=tmp_path / "b.safetensors")


def test_missing_config(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(SpecError, match=re.escape("no adapter_config.json in")):
        P.load(tmp_path / "adapter_model.safetensors")


# ---- writer refusals ---------------------------------------------------------------------------------------

def test_writer_refuses_row_blocks(tmp_path):
    a = Adapter(targets={"h.0.attn.c_attn.weight": fused_target()})
    with pytest.raises(UnsupportedError, match=re.escape("target \"h.0.attn.c_attn.weight\" has 2 block(s) (rows 0:8 "
                                                         "cols 0:8, rows 16:24 cols 0:8); PEFT holds one A/B pair over "
                                                         "the whole weight: fold it first")):
        P.save(a, tmp_path / "out")  # the dialect's own writer; loratool.save folds first (tests/test_fold.py)
    assert not (tmp_path / "out").exists()


def test_writer_refuses_full_target_that_is_not_a_lora_bias(tmp_path):
    a = Adapter(targets={t.key: t for t in (linear_target(), full_target())})
    with pytest.raises(UnsupportedError, match=re.escape("target \"layers.0.norm.weight\" is a whole-tensor delta; "
                                                         "PEFT can hold one only as the lora_B bias")):
        P.save(a, tmp_path / "out")


def test_writer_mixed_rules_keep_each_scale(tmp_path):
    from peft import LoraConfig

    t1 = linear_target("a.weight", rule="rslora", rank=4, alpha=6.0)
    t2 = linear_target("b.weight", rule="standard", rank=4, alpha=6.0, seed=3)
    t3 = linear_target("c.weight", rule="rslora", rank=2, alpha=6.0, seed=5)
    P.save(Adapter(targets={t.key: t for t in (t1, t2, t3)}), tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["r"] == 4 and cfg["lora_alpha"] == 6
    parsed = LoraConfig.from_pretrained(str(tmp_path / "out"))  # the written config must parse in PEFT
    assert parsed.use_rslora is True and parsed.rank_pattern == {"c": 2}
    assert cfg["rank_pattern"] == {"c": 2}
    assert cfg["alpha_pattern"] == {"b": pytest.approx(6.0 / 4 * 2)}  # standard 6/4 = rsLoRA alpha' / sqrt(4)
    back = P.load(tmp_path / "out")
    for t in (t1, t2, t3):
        assert back.targets[t.key].blocks[0].scale == pytest.approx(t.blocks[0].scale, rel=1e-15)


# ---- conv layers and .bin weights (a custom torch model: PEFT wraps any nn.Module) -------------------------

class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 3)
        self.conv3 = torch.nn.Conv2d(3, 5, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(5, 4, 1)
        self.conv1d = torch.nn.Conv1d(4, 6, 2)
        self.head = torch.nn.Linear(6, 2)

    def forward(self, ids):
        x = self.emb(ids).permute(0, 2, 1)[..., None].expand(-1, -1, -1, 4)  # (b, 3, L, 4)
        x = self.conv1(self.conv3(x)).mean(-1)  # (b, 4, L)
        return self.head(self.conv1d(x).mean(-1))


def test_conv_and_bin_weights_match_peft(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model = ConvNet().eval()
    save_file(base_state_dict(model), str(tmp_path / "base.safetensors"))
    pm = peft_model(model, target_modules=["emb", "conv3", "conv1", "conv1d", "head"], r=2, lora_alpha=3,
                    rank_pattern={"conv3": 3})
    pm.save_pretrained(str(tmp_path / "peft"), safe_serialization=False)  # adapter_model.bin
    assert (tmp_path / "peft" / "adapter_model.bin").is_file()
    a = P.load(tmp_path / "peft", base=tmp_path / "base.safetensors")
    mods = _modules(pm)
    assert {t.key: t.layout for t in a} == {"emb.weight": "embedding", "conv3.weight": "conv", "conv1.weight": "conv",
                                            "conv1d.weight": "conv", "head.weight": "linear"}
    for t in a:
        torch.testing.assert_close(dense_delta(t), mods[t.key.removesuffix(".weight")].get_delta_weight("default"),
                                   atol=ATOL, rtol=0)
    P.save(a, tmp_path / "out")
    torch.manual_seed(0)  # the same base weights as `model`
    pm2 = PeftModel.from_pretrained(ConvNet().eval(), str(tmp_path / "out")).eval()
    ids = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(pm2(ids), pm(ids), atol=LOGIT_ATOL, rtol=0)


def test_dora_conv_and_embedding_equal_peft_merge(tmp_path):
    import copy

    torch.manual_seed(0)
    model = ConvNet().eval()
    base = base_state_dict(model)
    pm = peft_model(model, target_modules=["emb", "conv3", "conv1", "conv1d", "head"], use_dora=True, r=2,
                    lora_alpha=3)
    pm.save_pretrained(str(tmp_path / "peft"), save_embedding_layers=False)
    merged = copy.deepcopy(pm).merge_and_unload().state_dict()
    a = P.load(tmp_path / "peft")
    assert sorted(a.targets) == ["conv1.weight", "conv1d.weight", "conv3.weight", "emb.weight", "head.weight"]
    assert a.targets["emb.weight"].magnitude.shape == (3,)  # PEFT's embedding norm: one per embedding dimension
    for k, W in _merged(a, base).items():
        assert float((W - base[k]).norm()) > 0.1
        torch.testing.assert_close(W, merged[k], atol=ATOL, rtol=0)
