"""Mixture-of-experts: PEFT `target_parameters` adapters on transformers 5's fused expert tensors, per-expert
adapters on fused bases and fused adapters on per-expert bases, against PEFT's merge_and_unload."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ulp import assert_within_ulp
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
