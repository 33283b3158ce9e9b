"""Conformance: `combine --method concat` against PEFT's add_weighted_adapter(combination_type="cat").

The oracle is PEFT itself on tiny models built from transformers configs (tests/models.py): each LoRA
layer's get_delta_weight for the "cat" adapter must equal our Σ w_i ΔW_i on the same target. With rsLoRA,
PEFT 0.21's cat is sqrt(r_total) too strong (FORMATS.md), so there the oracle is Σ w_i of PEFT's own
per-adapter deltas.
"""

from __future__ import annotations

import math

import pytest
import torch

from loratool.adapter import Adapter, whole_target
from loratool.ops.combine import combine
from loratool.ops.linalg import delta_tensor
from models import peft_model, tiny_gpt2, tiny_llama
from test_rescale import close

pytestmark = pytest.mark.slow

PREFIX = "base_model.model."
WEIGHTS = [0.7, -0.3]


def _lora_layers(pm):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in pm.named_modules() if isinstance(m, LoraLayer)]


def _add_second(pm, seed=5, **kw):
    from peft import LoraConfig

    pm.add_adapter("b", LoraConfig(lora_dropout=0.0, **kw))
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if ".lora_A.b." in name or ".lora_B.b." in name:  # PEFT starts B at zero: make ΔW non-trivial
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                n += 1
    assert n >= 4


def _ours(pm, adapter: str, layout: str) -> Adapter:
    """The adapter `adapter` of a PeftModel as loratool targets, keyed by base tensor key."""
    cfg = pm.peft_config[adapter]
    targets = []
    for name, m in _lora_layers(pm):
        if adapter not in m.lora_A:
            continue
        key = name.removeprefix(PREFIX) + ".weight"
        A, B = m.lora_A[adapter].weight.detach(), m.lora_B[adapter].weight.detach()
        rule = "rslora" if cfg.use_rslora else "standard"
        targets.append(whole_target(key, layout, tuple(m.get_base_layer().weight.shape), A, B, cfg.lora_alpha, rule))
    return Adapter(targets={t.key: t for t in targets})


def _check_cat(pm, layout, expected_factor=1.0):
    pm.add_weighted_adapter(["default", "b"], WEIGHTS, "cat", combination_type="cat")
    ours = combine([_ours(pm, "default", layout), _ours(pm, "b", layout)], WEIGHTS).adapter
    seen = 0
    for name, m in _lora_layers(pm):
        if "cat" not in m.lora_A:
            continue
        key = name.removeprefix(PREFIX) + ".weight"
        with torch.no_grad():
            peft_cat = m.get_delta_weight("cat")
            per_adapter = sum(w * m.get_delta_weight(a) for a, w in zip(["default", "b"], WEIGHTS) if a in m.lora_A)
        mine = delta_tensor(ours.targets[key])
        assert close(mine, per_adapter, 1e-5), key  # 1e-5: float32 round-off on 16-wide layers
        assert close(peft_cat, expected_factor * mine, 1e-5), key
        seen += 1
    assert seen == len(ours)


def test_concat_matches_peft_cat_on_llama():
    pm = peft_model(tiny_llama(), r=4, lora_alpha=8)  # all-linear: q, k, v, o, gate, up, down
    _add_second(pm, r=2, lora_alpha=3, target_modules=["q_proj", "v_proj", "down_proj"])
    _check_cat(pm, "linear")


def test_concat_matches_peft_cat_on_gpt2_conv1d():
    pm = peft_model(tiny_gpt2(), r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    _add_second(pm, r=3, lora_alpha=6, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    _check_cat(pm, "fan_in_fan_out")


def test_rslora_concat_is_the_weighted_sum_where_peft_cat_is_sqrt_r_too_strong():
    pm = peft_model(tiny_llama(), r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"])
    _add_second(pm, r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "v_proj"])
    # PEFT's cat adapter gets r = lora_alpha = 4 + 2 and keeps use_rslora: scaling 6 / sqrt(6) instead of 1.
    _check_cat(pm, "linear", expected_factor=math.sqrt(6))


def test_cli_combine_of_peft_folders_matches_peft_cat(tmp_path):
    """End to end: PEFT folders (with rank and alpha patterns) read by the PEFT dialect reader, combined by the CLI."""
    from click.testing import CliRunner

    from loratool.cli import cli
    from loratool.io.native import load

    pm = peft_model(tiny_llama(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                    rank_pattern={"v_proj": 2}, alpha_pattern={"up_proj": 3})
    _add_second(pm, r=3, lora_alpha=6, target_modules=["q_proj", "down_proj"], alpha_pattern={"down_proj": 1})
    pm.save_pretrained(tmp_path / "peft")  # "default" at the root, "b" in peft/b
    out = tmp_path / "cat.safetensors"
    res = CliRunner().invoke(cli, ["combine", str(tmp_path / "peft"), str(tmp_path / "peft" / "b"), "-o", str(out),
                                   "--weights", ",".join(map(str, WEIGHTS)), "--json"])
    assert res.exit_code == 0, res.output
    ours = load(out)
    pm.add_weighted_adapter(["default", "b"], WEIGHTS, "cat", combination_type="cat")
    seen = 0
    for name, m in _lora_layers(pm):
        if "cat" in m.lora_A:
            with torch.no_grad():
                assert close(delta_tensor(ours.targets[name.removeprefix(PREFIX) + ".weight"]),
                             m.get_delta_weight("cat"), 1e-5), name
            seen += 1
    assert seen == len(ours) == 2 * 4  # q, v, up, down in each of 2 layers
