"""ComfyUI "original key" LoRA files: merge against ComfyUI's formula, structure from headers, exact write-back,
conversions, detection and refusals."""

import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import loratool
from arrays import same_array
from loratool.errors import MismatchError, SpecError, UnsupportedError
from loratool.io import registry

ATOL = 1e-6  # float32 products of unit-scale factors computed by two code paths


def comfy_merge(weight, lora: dict, module: str, strength: float = 1.0):
    """W' as ComfyUI computes it (comfy/weight_adapter/lora.py LoRAAdapter.calculate_weight: alpha / mat2.shape[0]
    with mat2 the down factor, 1.0 without `.alpha`; lora_diff = mat1.flatten(1) @ mat2.flatten(1) reshaped to the
    weight; comfy/lora.py calculate_weight: a "diff" patch adds strength * diff)."""
    w = weight.clone().float()
    if module + ".diff" in lora:
        return w + strength * lora[module + ".diff"].float()
    up = lora.get(module + ".lora_up.weight", lora.get(module + ".lora_B.weight"))
    down = lora.get(module + ".lora_down.weight", lora.get(module + ".lora_A.weight"))
    alpha = lora[module + ".alpha"].item() / down.shape[0] if module + ".alpha" in lora else 1.0
    diff = torch.mm(up.float().flatten(start_dim=1), down.float().flatten(start_dim=1)).reshape(w.shape)
    return w + (strength * alpha) * diff


def rnd(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


BASE = {
    "double_blocks.0.img_attn.qkv.weight": rnd(12, 8, seed=1),
    "double_blocks.0.img_attn.qkv.bias": rnd(12, seed=2),
    "double_blocks.0.img_attn.proj.weight": rnd(8, 8, seed=3),
    "img_in.weight": rnd(8, 4, 3, 3, seed=4),
    "final_layer.linear.weight": rnd(6, 8, seed=5),
    "double_blocks.0.img_attn.norm.query_norm.scale": rnd(4, seed=6),
}
P = "diffusion_model."


def lora_sd():
    return {
        P + "double_blocks.0.img_attn.qkv.lora_down.weight": rnd(3, 8, seed=10),
        P + "double_blocks.0.img_attn.qkv.lora_up.weight": rnd(12, 3, seed=11),
        P + "double_blocks.0.img_attn.qkv.alpha": torch.tensor(1.5),
        P + "double_blocks.0.img_attn.qkv.diff_b": rnd(12, seed=12),
        P + "double_blocks.0.img_attn.proj.lora_A.weight": rnd(2, 8, seed=13),  # PEFT names, no alpha: scale 1
        P + "double_blocks.0.img_attn.proj.lora_B.weight": rnd(8, 2, seed=14),
        P + "img_in.lora_down.weight": rnd(2, 4, 3, 3, seed=15),
        P + "img_in.lora_up.weight": rnd(8, 2, 1, 1, seed=16),
        P + "img_in.alpha": torch.tensor(4.0),
        P + "final_layer.linear.lora_down.weight": rnd(2, 8, 1, 1, seed=17),  # 1x1 factors onto a Linear
        P + "final_layer.linear.lora_up.weight": rnd(6, 2, 1, 1, seed=18),
        P + "double_blocks.0.img_attn.norm.query_norm.diff": rnd(4, seed=19),  # a .diff of a non-".weight" tensor
    }


@pytest.fixture
def files(tmp_path):
    save_file(BASE, tmp_path / "model.safetensors")
    save_file(lora_sd(), tmp_path / "lora.safetensors")
    return tmp_path


def test_merge_matches_comfyui(files):
    # The norm scale is a ".scale" tensor: ComfyUI's diff on `<module>.weight` cannot name it; drop it here.
    sd = lora_sd()
    del sd[P + "double_blocks.0.img_attn.norm.query_norm.diff"]
    save_file(sd, files / "lora.safetensors")
    assert registry.detect(files / "lora.safetensors").name == "comfy"
    loratool.merge(files / "model.safetensors", [files / "lora.safetensors"], files / "out.safetensors")
    got = load_file(files / "out.safetensors")
    for module in ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "img_in", "final_layer.linear"):
        want = comfy_merge(BASE[module + ".weight"], sd, P + module)
        torch.testing.assert_close(got[module + ".weight"], want, rtol=0, atol=ATOL, msg=module)
    # .diff_b: the bias delta added as it is (comfy/lora.py: a "diff" patch on `<module>.bias`).
    bias = BASE["double_blocks.0.img_attn.qkv.bias"] + sd[P + "double_blocks.0.img_attn.qkv.diff_b"]
    assert torch.equal(got["double_blocks.0.img_attn.qkv.bias"], bias)


def test_structure_from_header(files):
    a = loratool.structure(files / "lora.safetensors")
    qkv = a.targets[P + "double_blocks.0.img_attn.qkv.weight"]
    assert (qkv.layout, qkv.shape, qkv.blocks[0].rank, qkv.blocks[0].alpha) == ("linear", (12, 8), 3, 1.5)
    conv = a.targets[P + "img_in.weight"]
    assert (conv.layout, conv.shape, conv.blocks[0].scale) == ("conv", (8, 4, 3, 3), 2.0)
    bias = a.targets[P + "double_blocks.0.img_attn.qkv.bias"]
    assert (bias.kind, bias.shape, bias.delta) == ("full", (12,), None)
    assert a.targets[P + "double_blocks.0.img_attn.proj.weight"].blocks[0].scale == 1.0
    assert "alpha_defaulted" in a.info


def test_write_back_is_bit_for_bit(files):
    a = loratool.load(files / "lora.safetensors")
    loratool.save(a, files / "again.safetensors", to="comfy")
    src, got = load_file(files / "lora.safetensors"), load_file(files / "again.safetensors")
    assert src.keys() == got.keys()
    assert all(same_array(src[k], got[k]) for k in src)


def test_checkpoint_keys_write_comfy_names(files):
    """A target keyed as in a checkpoint (`model.diffusion_model.…`) is written under ComfyUI's part of it."""
    a = loratool.load(files / "lora.safetensors")
    b = a.replace_targets(replace(t, key="model." + t.key) for t in a)
    loratool.save(b, files / "ckpt.safetensors", to="comfy")
    assert load_file(files / "ckpt.safetensors").keys() == load_file(files / "lora.safetensors").keys()


def test_base_resolves_prefix_and_checks_shapes(files):
    ckpt = {"model.diffusion_model." + k: v for k, v in BASE.items()}
    save_file(ckpt, files / "ckpt.safetensors")
    sd = lora_sd()
    del sd[P + "double_blocks.0.img_attn.norm.query_norm.diff"]
    save_file(sd, files / "l.safetensors")
    a = loratool.structure(files / "l.safetensors", base=files / "ckpt.safetensors")
    assert "model.diffusion_model.img_in.weight" in a.targets
    assert a.targets["model.diffusion_model.final_layer.linear.weight"].layout == "linear"
    sd[P + "img_in.lora_up.weight"] = rnd(7, 2, 1, 1, seed=1)
    save_file(sd, files / "bad.safetensors")
    with pytest.raises(MismatchError, match=re.escape("factors imply weight [7, 4, 3, 3] but base")):
        loratool.structure(files / "bad.safetensors", base=files / "ckpt.safetensors")


@pytest.mark.parametrize("suffix, what", [
    ("set_weight", "is a replacement weight"),
    ("lora_mid.weight", "Tucker"),
    ("dora_scale", "DoRA"),
    ("hada_w1_a", "LoHa"),
    ("lokr_w1", "LoKr"),
])
def test_refuses_other_kinds(tmp_path, suffix, what):
    key = P + "img_in." + suffix
    save_file({**lora_sd(), key: torch.ones(2)}, tmp_path / "x.safetensors")
    with pytest.raises(UnsupportedError, match=re.escape(f"\"{key}\" ") + ".*" + re.escape(what)):
        loratool.structure(tmp_path / "x.safetensors")


def test_refuses_a_pair_and_a_diff_on_one_weight(tmp_path):
    sd = lora_sd()
    sd[P + "img_in.diff"] = torch.ones(8, 4, 3, 3)
    save_file(sd, tmp_path / "x.safetensors")
    with pytest.raises(SpecError, match="has both a LoRA pair and a .diff"):
        loratool.structure(tmp_path / "x.safetensors")


def test_text_encoder_keys_and_detection(tmp_path):
    te = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    save_file({te + ".lora_A.weight": torch.ones(2, 4), te + ".lora_B.weight": torch.ones(4, 2)},
              tmp_path / "te.safetensors")
    assert registry.detect(tmp_path / "te.safetensors").name == "comfy"
    a = loratool.load(tmp_path / "te.safetensors")
    assert np.array_equal(a.targets[te + ".weight"].blocks[0].B, np.ones((4, 2), np.float32))
