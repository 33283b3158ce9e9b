"""diffusers LoRA files: a tiny UNet2DConditionModel with a PEFT LoRA (rank and alpha patterns, a conv target)
saved by diffusers itself, merged by loratool into the saved model folder and compared with diffusers'
`fuse_lora`; the writer's output loaded back by diffusers; older key spellings; detection; refusals."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import loratool
from arrays import dense_delta, same_array
from loratool.errors import SpecError, UnsupportedError
from loratool.io import diffusers as D, registry

# Two float32 paths (PEFT's fuse in torch, loratool's merge in numpy) over unit-scale weights and factors:
# each element differs by a few ulps of values below 10.
ATOL = 1e-5


def tiny_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, norm_num_groups=4, attention_head_dim=2).eval()


def with_lora(unet):
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
                                rank_pattern={"to_k": 2}, alpha_pattern={"conv1": 3}, init_lora_weights=False))
    return unet


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(base folder, pipeline-level LoRA file, model-level LoRA file, fused state dict) from diffusers."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("diffusers")
    unet = tiny_unet()
    unet.save_pretrained(root / "unet")
    with_lora(unet)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        root / "pipe", unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    unet.save_lora_adapter(root / "model")
    unet.fuse_lora()
    fused = {k.replace(".base_layer.", "."): v.detach().clone() for k, v in unet.state_dict().items() if "lora_" not in k}
    return root, root / "pipe" / D.WEIGHT_NAME, root / "model" / D.WEIGHT_NAME, fused


def test_metadata_is_per_component(saved):
    _, pipe, _, _ = saved
    with safe_open(pipe, "pt") as f:
        meta = json.loads(f.metadata()[D.METADATA_KEY])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8 and meta["unet.rank_pattern"] == {"to_k": 2}


@pytest.mark.parametrize("which", ["pipe", "model"])
def test_structure_reads_patterns(saved, which):
    _, pipe, model, _ = saved
    path = pipe if which == "pipe" else model
    assert registry.detect(path).name == "diffusers"
    a = loratool.structure(path)
    prefix = "unet." if which == "pipe" else ""
    k = a.targets[prefix + "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight"].blocks[0]
    q = a.targets[prefix + "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"].blocks[0]
    c = a.targets[prefix + "down_blocks.0.resnets.0.conv1.weight"]
    assert (k.rank, k.alpha, q.rank, q.alpha) == (2, 8.0, 4, 8.0)
    assert (c.layout, c.shape, c.blocks[0].alpha) == ("conv", (8, 8, 3, 3), 3.0)
    assert all(b.A is None for t in a for b in t.blocks)


@pytest.mark.parametrize("which", ["pipe", "model"])
def test_merge_matches_fuse_lora(saved, tmp_path, which):
    root, pipe, model, fused = saved
    out = tmp_path / "merged"
    loratool.merge(root / "unet", [pipe if which == "pipe" else model], out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    merged = load_file(out / "diffusion_pytorch_model.safetensors")
    assert merged.keys() == fused.keys()
    changed = 0
    for k, v in fused.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=ATOL, msg=k)
        changed += not torch.equal(merged[k], load_file(root / "unet" / "diffusion_pytorch_model.safetensors")[k])
    assert changed == 40  # every adapted weight changed (q/k/v/out of 8 attentions, 8 resnet conv1)


def test_written_file_loads_in_diffusers(saved, tmp_path):
    """loratool's writer, read by diffusers' own loader, fuses to the same weights."""
    from diffusers import UNet2DConditionModel

    root, pipe, _, fused = saved
    a = loratool.load(pipe)
    out = tmp_path / "again.safetensors"
    loratool.save(a, out, to="diffusers")
    # Bit for bit: same tensor names and bits, same configuration.
    src, got = load_file(pipe), load_file(out)
    assert src.keys() == got.keys() and all(same_array(src[k], got[k]) for k in src)
    unet = UNet2DConditionModel.from_pretrained(root / "unet").eval()
    with safe_open(out, "pt") as f:  # diffusers' loader takes the flat "<component>.<field>" metadata
        meta = json.loads(f.metadata()[D.METADATA_KEY])
    unet.load_lora_adapter(load_file(out), prefix="unet", metadata=meta)
    unet.fuse_lora()
    for k, v in unet.state_dict().items():
        if "lora_" not in k:
            torch.testing.assert_close(v, fused[k.replace(".base_layer.", ".")], rtol=0, atol=ATOL)


def test_base_maps_keys_and_skips_other_components(saved, tmp_path):
    root, pipe, _, _ = saved
    sd = load_file(pipe)
    sd["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.ones(2, 5)
    sd["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.ones(6, 2)
    f = tmp_path / "two.safetensors"
    save_file(sd, f)  # no metadata: alpha = rank
    a = loratool.structure(f)
    assert a.targets["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight"].blocks[0].alpha == 2.0
    assert "alpha_defaulted" in a.info
    b = loratool.structure(f, base=root / "unet")
    assert b.info["skipped_components"] == ["text_encoder"] and len(b) == 40
    assert "down_blocks.0.resnets.0.conv1.weight" in b.targets


def test_old_spellings_and_alpha_tensors(tmp_path):
    A, B = torch.randn(2, 6), torch.randn(5, 2)
    f = tmp_path / "old.safetensors"
    save_file({"unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": A,
               "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": B,
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": A.clone(),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": B.clone(),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.alpha": torch.tensor(1.0)}, f)
    a = loratool.load(f)
    t = a.targets["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"]
    q = a.targets["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight"]
    assert t.blocks[0].scale == 1.0 and q.blocks[0].scale == 0.5
    torch.testing.assert_close(dense_delta(q), (B @ A) * 0.5, rtol=0, atol=1e-6)


def test_peft_round_trip_keeps_delta(saved, tmp_path):
    """diffusers -> PEFT folder -> diffusers: the same factors and scales."""
    root, pipe, _, _ = saved
    a = loratool.load(pipe, base=root / "unet")
    loratool.convert(pipe, tmp_path / "peft", to="peft", base=root / "unet")
    loratool.convert(tmp_path / "peft", tmp_path / "back.safetensors", to="diffusers")
    back = loratool.load(tmp_path / "back.safetensors")
    assert back.targets.keys() == a.targets.keys()  # no component: the model-level form
    for k, t in a.targets.items():
        u = back.targets[k]
        assert u.blocks[0].scale == t.blocks[0].scale and same_array(u.blocks[0].A, t.blocks[0].A)
    # A component named by the library writer.
    loratool.save(back, tmp_path / "unet.safetensors", to="diffusers", component="unet")
    assert all(k.startswith("unet.") for k in load_file(tmp_path / "unet.safetensors"))


def test_detection_leaves_peft_and_kohya_alone(tmp_path):
    f = tmp_path / "adapter_model.safetensors"
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.ones(2, 4),
               "base_model.model.layers.0.q_proj.lora_B.weight": torch.ones(4, 2)}, f)
    assert registry.detect(f).name == "peft"
    g = tmp_path / "k.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.ones(2, 4), "lora_unet_a.lora_up.weight": torch.ones(4, 2)}, g)
    assert registry.detect(g).name == "kohya"


@pytest.mark.parametrize("key, kind", [
    ("unet.a.to_q.lora_magnitude_vector", "DoRA magnitude vector"),
    ("unet.a.to_q.lokr_w1", "LoKr"),
    ("unet.a.to_q.hada_w1_a", "LoHa"),
])
def test_refuses_other_kinds(tmp_path, key, kind):
    f = tmp_path / "x.safetensors"
    save_file({"unet.a.to_q.lora_A.weight": torch.ones(2, 4), "unet.a.to_q.lora_B.weight": torch.ones(4, 2),
               key: torch.ones(4)}, f)
    with pytest.raises(UnsupportedError, match=re.escape(f"\"{key}\" is a ") + ".*" + re.escape(kind)):
        loratool.structure(f)


def test_refuses_bad_metadata(tmp_path):
    f = tmp_path / "x.safetensors"
    sd = {"unet.a.to_q.lora_A.weight": torch.ones(2, 4), "unet.a.to_q.lora_B.weight": torch.ones(4, 2)}
    save_file(sd, f, metadata={D.METADATA_KEY: json.dumps({"unet.r": 2, "unet.lora_alpha": "x"})})
    with pytest.raises(SpecError, match=re.escape("\"lora_alpha\" is \"x\"; it must be a finite number")):
        loratool.structure(f)
    save_file(sd, f, metadata={D.METADATA_KEY: json.dumps({"unet.r": 2, "unet.lora_alpha": 2, "unet.use_dora": True})})
    with pytest.raises(UnsupportedError, match="is DoRA"):
        loratool.structure(f)
