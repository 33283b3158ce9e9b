"""mlx-lm LoRA adapters: mlx-lm's fuse formula on a tiny Llama, header-only structure, exact round trips with
PEFT, the one-scale writer, detection beside PEFT folders, and refusals."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import loratool
from arrays import dense_delta, same_array
from loratool.errors import SpecError, UnsupportedError
from loratool.io import registry
from models import base_state_dict, peft_model, tiny_llama

ATOL = 1e-6  # float32 products of unit-scale factors computed by two code paths


def mlx_fuse(weight, lora_a, lora_b, scale):
    """W' as mlx-lm fuses it (mlx_lm/tuner/lora.py LoRALinear.fuse): weight + (scale * lora_b.T) @ lora_a.T."""
    return weight + (scale * lora_b.T) @ lora_a.T


def write_mlx(folder, tensors, **cfg):
    folder.mkdir()
    save_file(tensors, folder / "adapters.safetensors", metadata={"format": "mlx"})
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 2, "scale": 20.0, "dropout": 0.0}}
    config.update(cfg)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def rnd(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


@pytest.fixture
def llama(tmp_path):
    model = tiny_llama()
    save_file(base_state_dict(model), tmp_path / "llama.safetensors")
    return tmp_path / "llama.safetensors", base_state_dict(model)


def test_merge_matches_mlx_fuse(llama, tmp_path):
    base, W = llama
    q, e = "model.layers.1.self_attn.q_proj", "model.embed_tokens"
    sd = {q + ".lora_a": rnd(16, 2, seed=1), q + ".lora_b": rnd(2, 16, seed=2),
          e + ".lora_a": rnd(64, 2, seed=3), e + ".lora_b": rnd(2, 16, seed=4)}
    folder = write_mlx(tmp_path / "mlx", sd)
    assert registry.detect(folder).name == "mlx"
    loratool.merge(base, [folder], tmp_path / "out.safetensors")
    got = load_file(tmp_path / "out.safetensors")
    torch.testing.assert_close(got[q + ".weight"], mlx_fuse(W[q + ".weight"], sd[q + ".lora_a"], sd[q + ".lora_b"],
                                                            20.0), rtol=0, atol=ATOL)
    # LoRAEmbedding.fuse: weight + (scale * lora_a) @ lora_b on the (num_embeddings, dims) table.
    torch.testing.assert_close(got[e + ".weight"], W[e + ".weight"] + (20.0 * sd[e + ".lora_a"]) @ sd[e + ".lora_b"],
                               rtol=0, atol=ATOL)


def test_structure_reads_no_tensor(tmp_path):
    q = "model.layers.0.self_attn.q_proj"
    folder = write_mlx(tmp_path / "mlx", {q + ".lora_a": rnd(16, 2, seed=1), q + ".lora_b": rnd(2, 12, seed=2)})
    a = loratool.structure(folder)
    t = a.targets[q + ".weight"]
    assert (t.layout, t.shape, t.blocks[0].rank, t.blocks[0].scale, t.blocks[0].A) == ("linear", (12, 16), 2, 20.0, None)
    assert loratool.structure(folder / "adapters.safetensors").targets.keys() == a.targets.keys()


def test_peft_to_mlx_and_back_is_exact(llama, tmp_path):
    base, _ = llama
    pm = peft_model(tiny_llama(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])
    pm.save_pretrained(tmp_path / "peft")
    loratool.convert(tmp_path / "peft", tmp_path / "mlx", to="mlx", base=base)
    cfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    lp = cfg["lora_parameters"]
    assert (lp["rank"], lp["scale"]) == (4, 2.0) and {"self_attn.q_proj", "self_attn.v_proj"} <= set(lp["keys"])
    a = loratool.load(tmp_path / "peft", base=base)
    b = loratool.load(tmp_path / "mlx", base=base)
    assert a.targets.keys() == b.targets.keys()
    for k, t in a.targets.items():
        u = b.targets[k]
        assert u.layout == t.layout and u.blocks[0].scale == t.blocks[0].scale
        assert same_array(u.blocks[0].A, t.blocks[0].A) and same_array(u.blocks[0].B, t.blocks[0].B)
    loratool.convert(tmp_path / "mlx", tmp_path / "peft2", to="peft", base=base)
    c = loratool.load(tmp_path / "peft2", base=base)
    assert all(same_array(c.targets[k].blocks[0].B, t.blocks[0].B) for k, t in a.targets.items())


def test_other_scales_are_folded_into_lora_b(tmp_path):
    from builders import linear_target
    from loratool.adapter import Adapter

    t1 = linear_target("model.layers.0.mlp.up_proj.weight", rank=2, alpha=4.0, seed=1)  # scale 2
    t2 = linear_target("model.layers.1.mlp.up_proj.weight", rank=2, alpha=4.0, seed=2)  # scale 2
    t3 = linear_target("model.layers.1.mlp.down_proj.weight", rank=2, alpha=1.0, seed=3)  # scale 0.5
    a = Adapter(targets={t.key: t for t in (t1, t2, t3)})
    loratool.save(a, tmp_path / "mlx", to="mlx")
    b = loratool.load(tmp_path / "mlx")
    assert json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())["lora_parameters"]["scale"] == 2.0
    for t in (t1, t2, t3):
        # float32 factors, the fold rounded once: within a few ulps of values below 10.
        torch.testing.assert_close(dense_delta(b.targets[t.key]), dense_delta(t), rtol=0, atol=ATOL)


def test_refusals(tmp_path):
    q = "model.layers.0.self_attn.q_proj"
    sd = {q + ".lora_a": rnd(16, 2, seed=1), q + ".lora_b": rnd(2, 12, seed=2)}
    with pytest.raises(UnsupportedError, match=re.escape("fine_tune_type is \"dora\": DoRA")):
        loratool.structure(write_mlx(tmp_path / "d", sd, fine_tune_type="dora"))
    with pytest.raises(SpecError, match=re.escape("lora_parameters.scale is null")):
        loratool.structure(write_mlx(tmp_path / "s", sd, lora_parameters={"rank": 2}))
    with pytest.raises(SpecError, match=re.escape("has rank 2 but lora_parameters.rank is 8")):
        loratool.structure(write_mlx(tmp_path / "r", sd, lora_parameters={"rank": 8, "scale": 1.0}))
    moe = {"model.layers.0.mlp.switch_mlp.up_proj.lora_a": rnd(4, 2, 16, seed=1),
           "model.layers.0.mlp.switch_mlp.up_proj.lora_b": rnd(4, 12, 2, seed=2)}
    with pytest.raises(UnsupportedError, match="mixture-of-experts"):
        loratool.structure(write_mlx(tmp_path / "m", moe))
    with pytest.raises(UnsupportedError, match="DoRA magnitude"):
        loratool.structure(write_mlx(tmp_path / "m2", {**sd, q + ".m": torch.ones(12)}))


def test_peft_folders_stay_peft(tmp_path):
    pm = peft_model(tiny_llama(), target_modules=["q_proj"])
    pm.save_pretrained(tmp_path / "peft")
    assert registry.detect(tmp_path / "peft").name == "peft"


# Fused by mlx-lm itself: float32 rounding of two summation orders (measured 1.2e-7 on weights of size ~0.1).
MLX_ATOL = 1e-6


def test_mlx_lm_loads_and_fuses_the_written_adapter(tmp_path):
    """The adapter loratool writes, loaded by mlx-lm (mlx_lm.tuner.utils.load_adapters on the model its
    load_model builds from the Hugging Face folder) and fused by its LoRA layers' own fuse(): every weight
    equals loratool's merge of the PEFT adapter it was converted from."""
    import mlx.core as mx  # noqa: F401  (mlx-lm's array library; the CPU backend comes with mlx[cpu])
    import numpy as np
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    model = tiny_llama(layers=2)
    model.save_pretrained(tmp_path / "base")
    peft_model(model, target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8,
               rank_pattern={"down_proj": 2}).save_pretrained(tmp_path / "peft")
    loratool.convert(tmp_path / "peft", tmp_path / "mlx", to="mlx", base=tmp_path / "base")
    loratool.merge(tmp_path / "base", tmp_path / "peft", tmp_path / "merged.safetensors")

    mlx_model, _ = load_model(tmp_path / "base")
    mlx_model = load_adapters(mlx_model, str(tmp_path / "mlx"))
    fused = [(n, m.fuse()) for n, m in mlx_model.named_modules() if hasattr(m, "fuse")]
    assert len(fused) == 6  # q, v and down of both layers
    mlx_model.update_modules(tree_unflatten(fused))
    got = {k: np.array(v) for k, v in tree_flatten(mlx_model.parameters())}
    want = load_file(str(tmp_path / "merged.safetensors"))
    assert got.keys() == want.keys()
    for k, w in want.items():
        assert np.abs(got[k] - w.numpy()).max() <= MLX_ATOL, k
