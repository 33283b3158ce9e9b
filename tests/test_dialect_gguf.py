"""GGUF LoRA adapters (llama.cpp): a PEFT adapter of a tiny Llama written through gguf's GGUFWriter, read back
with GGUFReader, compared with llama.cpp's merge of the permuted q/k weights, and read by loratool again."""

import re

import numpy as np
import pytest
import torch

import loratool
from arrays import dense_delta, same_array
from loratool.errors import MismatchError, SpecError, UnsupportedError
from loratool.io import registry
from models import peft_model, tiny_llama

ATOL = 1e-6  # float32 products of unit-scale factors computed by two code paths


def llama_permute(w, n_head, n_head_kv):
    """convert_hf_to_gguf.py LlamaModel.permute, applied by the converter to q/k weights and their lora_b."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture
def setup(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")  # config.json: 4 heads, 2 key/value heads
    pm = peft_model(tiny_llama(), r=4, lora_alpha=8,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm.save_pretrained(tmp_path / "peft")
    return tmp_path, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_written_file_is_what_llama_cpp_reads(setup):
    import gguf

    tmp, W = setup
    res = loratool.convert(tmp / "peft", tmp / "lora.gguf", base=tmp / "base")
    assert res.to == "gguf" and registry.detect(tmp / "lora.gguf").name == "gguf"
    r = gguf.GGUFReader(tmp / "lora.gguf")
    assert r.fields["general.type"].contents() == "adapter" and r.fields["adapter.type"].contents() == "lora"
    alpha = r.fields["adapter.lora.alpha"].contents()
    assert alpha == 8.0
    t = {x.name: np.array(x.data) for x in r.tensors}
    assert len(t) == 2 * 7 * 2
    peft = loratool.load(tmp / "peft", base=tmp / "base")
    for key, target in peft.targets.items():
        name = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2).get_name(key.removesuffix(".weight"))
        A, B = t[name + ".weight.lora_a"], t[name + ".weight.lora_b"]
        base = W[key].numpy()
        heads = {"attn_q": (4, 4), "attn_k": (4, 2)}.get(name.split(".")[-1])
        # llama.cpp merges into the permuted weight: W_gguf + (alpha / r) * B @ A (llama-adapter.h scale rule).
        merged = (llama_permute(base, *heads) if heads else base) + (alpha / A.shape[0]) * (B @ A)
        want = base + dense_delta(target).numpy()
        want = llama_permute(want, *heads) if heads else want
        np.testing.assert_allclose(merged, want, rtol=0, atol=ATOL, err_msg=key)


def test_round_trip_is_exact(setup):
    tmp, _ = setup
    loratool.convert(tmp / "peft", tmp / "lora.gguf", base=tmp / "base")
    peft = loratool.load(tmp / "peft", base=tmp / "base")
    s = loratool.structure(tmp / "lora.gguf")  # head counts written by loratool; no tensor read
    assert s.targets.keys() == peft.targets.keys() and all(b.A is None for t in s for b in t.blocks)
    g = loratool.load(tmp / "lora.gguf")
    for k, t in peft.targets.items():
        u = g.targets[k]
        assert u.blocks[0].scale == t.blocks[0].scale
        assert same_array(u.blocks[0].A, t.blocks[0].A) and same_array(u.blocks[0].B, t.blocks[0].B), k
    loratool.save(g, tmp / "again.gguf")
    assert (tmp / "again.gguf").read_bytes() == (tmp / "lora.gguf").read_bytes()


def test_per_target_scales_are_folded(setup):
    tmp, _ = setup
    pm = peft_model(tiny_llama(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                    alpha_pattern={"v_proj": 2})
    pm.save_pretrained(tmp / "p2")
    loratool.convert(tmp / "p2", tmp / "mixed.gguf", base=tmp / "base")
    peft, g = loratool.load(tmp / "p2", base=tmp / "base"), loratool.load(tmp / "mixed.gguf")
    assert {t.blocks[0].alpha for t in g} == {4.0}  # alpha = rank: scale 1, each scale in its lora_b
    for k, t in peft.targets.items():
        torch.testing.assert_close(dense_delta(g.targets[k]), dense_delta(t), rtol=0, atol=ATOL)


def test_refusals(setup, tmp_path):
    import gguf

    tmp, _ = setup
    with pytest.raises(MismatchError, match=re.escape("llama.cpp needs the base model's architecture")):
        loratool.convert(tmp / "peft", tmp_path / "x.gguf")  # no --base: no architecture, no head counts
    g = loratool.load(tmp / "peft")
    with pytest.raises(MismatchError, match="permutes q/k rows by head"):
        loratool.save(g, tmp_path / "x.gguf", arch="llama")  # an architecture but no head counts
    w = gguf.GGUFWriter(tmp_path / "model.gguf", "llama")
    w.add_string("general.type", "model")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(SpecError, match=re.escape("general.type is \"model\", not \"adapter\"")):
        loratool.structure(tmp_path / "model.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 12)
    with pytest.raises(SpecError, match="not a readable GGUF file"):
        loratool.structure(tmp_path / "bad.gguf")


def _tiny(model_type: str):
    """A 2-layer model of `model_type` (hidden 16, 4 heads, 2 key/value heads, head_dim 4), random weights."""
    import transformers

    cfg = transformers.AutoConfig.for_model(model_type, vocab_size=64, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=4, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("model_type, arch, permuted", [
    ("mistral", "llama", True), ("qwen2", "qwen2", False), ("qwen3", "qwen3", False), ("gemma", "gemma", False),
    ("gemma2", "gemma2", False)])
def test_architectures_round_trip_with_gguf_names(tmp_path, model_type, arch, permuted):
    """PEFT -> GGUF -> loratool gives the PEFT factors bit for bit; the file has the base's architecture and the
    tensor names gguf's own map gives for it; q/k lora_b rows are permuted only where the converter permutes
    (convert_hf_to_gguf.py LlamaModel, which Mistral uses)."""
    import gguf

    _tiny(model_type).save_pretrained(tmp_path / "base")
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model(_tiny(model_type), r=2, lora_alpha=4, target_modules=modules).save_pretrained(tmp_path / "peft")
    loratool.convert(tmp_path / "peft", tmp_path / "lora.gguf", base=tmp_path / "base")
    r = gguf.GGUFReader(tmp_path / "lora.gguf")
    assert r.fields["general.architecture"].contents() == arch
    tmap = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], 2)
    peft = loratool.load(tmp_path / "peft", base=tmp_path / "base")
    want = {tmap.get_name(k.removesuffix(".weight")) + ".weight.lora_" + f for k in peft.targets for f in "ab"}
    t = {x.name: x for x in r.tensors}
    assert set(t) == want and len(want) == 2 * 7 * 2
    q = peft.targets["model.layers.0.self_attn.q_proj.weight"].blocks[0].B
    stored = np.array(t["blk.0.attn_q.weight.lora_b"].data).reshape(q.shape)
    assert np.array_equal(stored, llama_permute(q, 4, 4) if permuted else q)
    assert ("loratool.head_count" in r.fields) == permuted
    g = loratool.load(tmp_path / "lora.gguf")  # the architecture (and llama's head counts) from the file alone
    assert g.targets.keys() == peft.targets.keys() and g.info["gguf_arch"] == arch
    for k, u in g.targets.items():
        b, c = u.blocks[0], peft.targets[k].blocks[0]
        assert b.scale == c.scale and same_array(b.A, c.A) and same_array(b.B, c.B), k
    loratool.save(g, tmp_path / "again.gguf")
    assert (tmp_path / "again.gguf").read_bytes() == (tmp_path / "lora.gguf").read_bytes()


def test_unknown_architectures_are_refused(setup, tmp_path):
    import gguf

    tmp, _ = setup
    g = loratool.load(tmp / "peft")
    with pytest.raises(UnsupportedError, match=re.escape("model_type is \"gpt2\"; loratool writes GGUF LoRA for "
                                                         "gemma, gemma2, llama, mistral, qwen2, qwen3 only")):
        loratool.save(g, tmp_path / "x.gguf", arch="gpt2")
    w = gguf.GGUFWriter(tmp_path / "phi.gguf", "phi3")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_tensor("blk.0.attn_qkv.weight.lora_a", np.zeros((2, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(UnsupportedError, match=re.escape("general.architecture is \"phi3\"; loratool reads GGUF "
                                                         "LoRA for gemma, gemma2, llama, qwen2, qwen3 only")):
        loratool.structure(tmp_path / "phi.gguf")
