"""`inspect` describes whatever it is given, from headers alone: adapters without alpha or config, PEFT's saved
whole tensors, kohya SDXL/FLUX files with their training metadata, model folders, files and shards; and it
guesses the base model from key names and shapes (loratool/guess.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clitools import run
from loratool.container import write_file
from loratool.guess import FAMILIES, guess, training, trigger_words
from loratool.tasks.inspect import inspect

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


def f16(*shape):
    return RNG.standard_normal(shape).astype(np.float16)


def kohya_pair(sd, name, out, inp, rank=1, alpha=1.0):
    """One kohya module: lora_down (r, in), lora_up (out, r), alpha (0-d)."""
    sd[f"{name}.lora_down.weight"] = f16(rank, inp)
    sd[f"{name}.lora_up.weight"] = f16(out, rank)
    sd[f"{name}.alpha"] = np.array(alpha, np.float32)


def peft_pair(sd, module, out, inp, rank=2):
    sd[f"base_model.model.{module}.lora_A.weight"] = f16(rank, inp)
    sd[f"base_model.model.{module}.lora_B.weight"] = f16(out, rank)


TAGS = {"10_style": {"mystyle": 40, "1girl": 12, "outdoors": 3},
        "5_extra": {"mystyle": 10, "1girl": 8, "sky": 7, "tree": 6, "cloud": 5, "river": 4, "sun": 4, "hill": 2,
                    "road": 2, "car": 1, "bird": 1}}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """An SDXL-like kohya file: UNet cross-attention from the 2048-wide context, both text encoders."""
    sd = {}
    kohya_pair(sd, "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 640, 2048, alpha=0.5)
    kohya_pair(sd, "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 640, 640, alpha=0.5)
    kohya_pair(sd, "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v", 1280, 2048, alpha=0.5)
    kohya_pair(sd, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768, alpha=0.5)
    kohya_pair(sd, "lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280, alpha=0.5)
    kohya_pair(sd, "lora_te2_text_model_encoder_layers_0_mlp_fc1", 5120, 1280, alpha=0.5)
    meta = {"ss_base_model_version": "sdxl_base_v1-0", "ss_sd_model_name": "sd_xl_base_1.0.safetensors",
            "ss_resolution": "(1024, 1024)", "ss_network_module": "networks.lora", "ss_network_dim": "1",
            "ss_network_alpha": "0.5", "ss_network_args": '{"conv_dim": "4"}', "ss_num_train_images": "60",
            "ss_epoch": "10", "ss_learning_rate": "0.0001", "ss_output_name": "mystyle",
            "ss_tag_frequency": json.dumps(TAGS), "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.title": "My style", "modelspec.thumbnail": "data:image/png;base64," + "A" * 1000}
    path = tmp_path_factory.mktemp("sdxl") / "sdxl_lora.safetensors"
    write_file(path, sd, meta)
    return path


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A FLUX-like kohya file (double and single blocks, 3072 wide) with a CLIP-L text encoder module."""
    sd = {}
    kohya_pair(sd, "lora_unet_double_blocks_0_img_attn_qkv", 9216, 3072)
    kohya_pair(sd, "lora_unet_double_blocks_0_img_attn_proj", 3072, 3072)
    kohya_pair(sd, "lora_unet_single_blocks_0_linear1", 21504, 3072)
    kohya_pair(sd, "lora_unet_single_blocks_0_linear2", 3072, 15360)
    kohya_pair(sd, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768)
    path = tmp_path_factory.mktemp("flux") / "flux_lora.safetensors"
    write_file(path, sd, {"ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux"})
    return path


def llama_keys(sd, hidden, kv, inter, layers=2, prefix="model."):
    for i in range(layers):
        p = f"{prefix}layers.{i}."
        for name, (out, inp) in {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
                                 "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
                                 "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
                                 "mlp.down_proj": (hidden, inter)}.items():
            peft_pair(sd, p + name, out, inp, rank=1)


@pytest.fixture(scope="module")
def peft_lone(tmp_path_factory):
    """A Llama-3-8B-shaped adapter_model.safetensors alone in a folder (its adapter_config.json lost)."""
    sd = {}
    llama_keys(sd, 4096, 1024, 14336)
    folder = tmp_path_factory.mktemp("lone")
    write_file(folder / "adapter_model.safetensors", sd, {"format": "pt"})
    return folder / "adapter_model.safetensors"


@pytest.fixture(scope="module")
def peft_saved(tmp_path_factory):
    """A PEFT folder with modules_to_save (lm_head) and an adapted embedding whose base layer is saved too."""
    sd = {}
    llama_keys(sd, 16, 8, 32, layers=1)
    sd["base_model.model.model.embed_tokens.lora_embedding_A"] = f16(2, 64)
    sd["base_model.model.model.embed_tokens.lora_embedding_B"] = f16(16, 2)
    sd["base_model.model.model.embed_tokens.base_layer.weight"] = f16(64, 16)
    sd["base_model.model.lm_head.weight"] = f16(64, 16)
    folder = tmp_path_factory.mktemp("saved") / "peft"
    folder.mkdir()
    write_file(folder / "adapter_model.safetensors", sd, {"format": "pt"})
    cfg = {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "rank_pattern": {"embed_tokens": 2},
           "target_modules": ["q_proj", "embed_tokens"], "modules_to_save": ["lm_head"],
           "base_model_name_or_path": "my-org/tiny-llama", "task_type": "CAUSAL_LM", "peft_version": "0.17.0"}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def tiny_model_sd(hidden=16, inter=32, vocab=64, layers=2, head=True):
    sd = {"model.embed_tokens.weight": f16(vocab, hidden), "model.norm.weight": f16(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": f16(hidden, hidden), p + "self_attn.k_proj.weight": f16(8, hidden),
                   p + "mlp.gate_proj.weight": f16(inter, hidden), p + "mlp.down_proj.weight": f16(hidden, inter),
                   p + "input_layernorm.weight": f16(hidden)})
    if head:
        sd["lm_head.weight"] = f16(vocab, hidden)
    return sd


CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16, "num_hidden_layers": 2,
          "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
          "tie_word_embeddings": False, "torch_dtype": "float16"}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    single = d / "single"
    single.mkdir()
    sd = tiny_model_sd()
    write_file(single / "model.safetensors", sd, {"format": "pt"})
    (single / "config.json").write_text(json.dumps(CONFIG))
    sharded = d / "sharded"
    sharded.mkdir()
    keys = sorted(sd)
    parts = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
             "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in parts.items():
        write_file(sharded / name, {k: sd[k] for k in ks}, {"format": "pt"})
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, ks in parts.items() for k in ks}}))
    (sharded / "config.json").write_text(json.dumps({k: v for k, v in CONFIG.items() if k != "tie_word_embeddings"}))
    tied = d / "tied.safetensors"  # a lone model file with no config: tying read from the keys
    write_file(tied, tiny_model_sd(head=False), {})
    return {"single": single, "sharded": sharded, "tied": tied, "sd": sd}


def inspect_json(*args):
    code, out, err = run("inspect", *args, "--json")
    assert code == 0, err
    return json.loads(out)


# ---- adapters that used to be refused ------------------------------------------------------------------

def test_loralib_file_without_alpha_shows_ranks_and_alpha_unknown(tmp_path):
    import torch

    g = torch.Generator().manual_seed(0)
    torch.save({"layers.0.q.lora_A": torch.randn(4, 10, generator=g), "layers.0.q.lora_B": torch.randn(12, 4, generator=g),
                "layers.1.v.lora_A": torch.randn(2, 10, generator=g), "layers.1.v.lora_B": torch.randn(8, 2, generator=g)},
               tmp_path / "lora.pt")
    doc = inspect_json(tmp_path / "lora.pt")
    assert doc["kind"] == "adapter" and doc["dialect"] == "loralib"
    assert doc["rank_histogram"] == {"2": 1, "4": 1}
    assert "pass --alpha" in doc["alpha_unknown"]
    assert doc["alphas"] == {} and doc["scales"] == {}
    assert {b["alpha"] for r in doc["per_target"] for b in r["blocks"]} == {None}
    code, out, err = run("inspect", tmp_path / "lora.pt")
    assert code == 0, err
    assert "alphas:           unknown (loralib keeps lora_alpha in code, not in the file; pass --alpha)" in out
    # with --alpha it is the loralib adapter it always was; --stats needs the alpha and still says so
    assert inspect_json(tmp_path / "lora.pt", "--alpha", 8)["alphas"] == {"8.0": 2}
    code, _, err = run("inspect", tmp_path / "lora.pt", "--stats")
    assert code == 3 and "pass it (--alpha)" in err


def test_peft_weights_without_config_are_described_from_their_keys(peft_lone):
    doc = inspect_json(peft_lone)
    assert doc["dialect"] == "peft" and doc["targets"] == 14
    assert doc["rank_histogram"] == {"1": 14}
    assert "no adapter_config.json" in doc["alpha_unknown"]
    by = {r["target"]: r for r in doc["per_target"]}
    assert by["model.layers.0.self_attn.k_proj.weight"]["shape"] == [1024, 4096]
    assert doc["guess"]["model"] == "Llama-3-8B or Mistral-7B" and doc["guess"]["confidence"] == "medium"
    code, out, _ = run("inspect", peft_lone)
    assert code == 0 and "alphas:           unknown (no adapter_config.json beside the weights" in out


def test_peft_saved_whole_tensors_are_replacements_without_base(peft_saved):
    doc = inspect_json(peft_saved)
    reps = {r["tensor"]: r for r in doc["replacements"]}
    assert reps["base_model.model.lm_head.weight"] == {"key": "lm_head.weight",
                                                       "tensor": "base_model.model.lm_head.weight",
                                                       "shape": [64, 16], "dtype": "F16"}
    beside = reps["base_model.model.model.embed_tokens.base_layer.weight"]
    assert beside["beside_lora"] is True and beside["shape"] == [64, 16] and beside["dtype"] == "F16"
    assert "lm_head.weight" not in {r["target"] for r in doc["per_target"]}
    assert {r["target"]: r["layout"] for r in doc["per_target"]}["model.embed_tokens.weight"] == "embedding"
    assert doc["training"]["peft"] == {"base_model_name_or_path": "my-org/tiny-llama", "task_type": "CAUSAL_LM",
                                       "peft_version": "0.17.0"}
    code, out, _ = run("inspect", peft_saved)
    assert code == 0 and "replacements (saved whole tensors" in out and "lm_head.weight" in out


# ---- kohya files: guesses and training metadata ----------------------------------------------------------

def test_kohya_sdxl_is_guessed_and_its_training_metadata_shown(sdxl):
    doc = inspect_json(sdxl)
    assert doc["dialect"] == "kohya" and doc["alphas"] == {"0.5": 6}
    g = doc["guess"]
    assert (g["family"], g["model"], g["confidence"]) == ("stable-diffusion", "SDXL 1.0", "high")
    assert g["dims"] == {"context": 2048, "te": 768, "te2": 1280}
    assert "metadata modelspec.architecture = stable-diffusion-xl-v1-base/lora agrees" in g["evidence"]
    tr = doc["training"]
    assert tr["kohya"]["ss_base_model_version"] == "sdxl_base_v1-0" and tr["kohya"]["ss_epoch"] == "10"
    assert tr["kohya"]["ss_network_args"] == '{"conv_dim": "4"}'
    # counts summed over both datasets, most frequent first, ties by tag, ten at most
    assert tr["trigger_words"] == [["mystyle", 50], ["1girl", 20], ["sky", 7], ["tree", 6], ["cloud", 5],
                                   ["river", 4], ["sun", 4], ["outdoors", 3], ["hill", 2], ["road", 2]]
    assert tr["modelspec"]["modelspec.title"] == "My style"
    assert tr["modelspec"]["modelspec.thumbnail"].endswith("... (1022 characters)")
    code, out, _ = run("inspect", sdxl)
    assert code == 0
    assert "base guess:       SDXL 1.0 (confidence high)" in out
    assert "trigger words:    mystyle (50), 1girl (20), sky (7)" in out


def test_kohya_flux_is_guessed(flux):
    g = inspect_json(flux)["guess"]
    assert (g["family"], g["model"], g["confidence"]) == ("flux", "FLUX.1 (dev or schnell)", "high")
    assert g["dims"]["hidden"] == 3072 and "metadata ss_base_model_version = flux1 agrees" in g["evidence"]


def test_a_bad_tag_frequency_is_a_note_not_a_failure():
    assert trigger_words("{not json") [0] == []
    assert "not valid JSON" in trigger_words("{not json")[1]
    assert training({"ss_tag_frequency": "[1, 2]"})["notes"] == [
        "ss_tag_frequency is not a JSON object of dataset -> {tag: count}"]
    deep = "[" * 100000 + "]" * 100000  # the bounded loader turns the parser's recursion error into a note
    assert "nested too deeply" in trigger_words(deep)[1]


# ---- models ---------------------------------------------------------------------------------------------

def test_a_model_folder_is_described_as_a_model(model_dirs):
    sd = model_dirs["sd"]
    for name in ("single", "sharded"):
        doc = inspect_json(model_dirs[name])
        assert doc["kind"] == "model" and doc["format"] == "safetensors"
        assert doc["files"] == (1 if name == "single" else 2)
        assert doc["tensors"] == len(sd) and doc["parameters"] == sum(x.size for x in sd.values())
        assert doc["dtypes"] == {"F16": len(sd)} and doc["bytes"] == 2 * doc["parameters"]
        assert doc["config"]["architecture"] == "LlamaForCausalLM" and doc["config"]["hidden_size"] == 16
        assert doc["config"]["num_layers"] == 2 and doc["config"]["model_type"] == "llama"
        assert doc["guess"]["family"] == "llama" and doc["guess"]["confidence"] == "low"
        assert "use it as BASE of merge" in doc["hint"]
    assert inspect_json(model_dirs["single"])["tied_embeddings"] == {"tied": False,
                                                                     "from": "config.json tie_word_embeddings"}
    assert inspect_json(model_dirs["sharded"])["tied_embeddings"] == {"tied": False,
                                                                      "from": "keys (lm_head.weight present)"}
    code, out, err = run("inspect", model_dirs["single"])
    assert code == 0, err
    assert "kind:             model (safetensors, 1 file(s))" in out and "hint:" in out


def test_a_model_file_and_a_shard_are_models(model_dirs):
    doc = inspect_json(model_dirs["tied"])
    assert doc["kind"] == "model" and doc["config"] is None
    assert doc["tied_embeddings"] == {"tied": True, "from": "keys (lm_head.weight absent)"}
    shard = model_dirs["sharded"] / "model-00001-of-00002.safetensors"
    doc = inspect_json(shard)
    assert doc["kind"] == "model" and doc["tensors"] < len(model_dirs["sd"])
    assert doc["notes"] == ["one shard of 2 listed in model.safetensors.index.json; inspect the folder for the "
                            "whole model"]
    assert doc["config"]["hidden_size"] == 16 and doc["tied_embeddings"] is None  # the head may be in another shard


def test_adapter_options_on_a_model_are_refused_not_ignored(model_dirs):
    code, out, err = run("inspect", model_dirs["single"], "--stats", "--alpha", 4)
    assert code == 2 and out == ""
    assert err.strip().endswith("is a model, not an adapter; --stats, --alpha describe(s) adapters: drop it")


def test_a_folder_without_weights_or_config_is_still_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run("inspect", tmp_path / "empty")
    assert code == 3 and "folder has no adapter_config.json" in err


def test_header_only_inspect_imports_no_torch(sdxl, peft_lone, model_dirs):
    for path in (sdxl, peft_lone, model_dirs["sharded"]):
        code = ("import sys, runpy; sys.argv=['loratool','inspect',%r,'--json'];\n"
                "try:\n runpy.run_module('loratool', run_name='__main__')\n"
                "except SystemExit as e:\n assert not e.code, e.code\n"
                "assert 'torch' not in sys.modules, 'torch imported'\n" % str(path))
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ})
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["guess"]["family"] in ("stable-diffusion", "llama")


# ---- the guess table ------------------------------------------------------------------------------------

def llama_shapes(hidden, kv, inter, vocab=None):
    d = {}
    for i in range(2):
        p = f"model.layers.{i}."
        d.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                  p + "self_attn.o_proj.weight": (hidden, hidden), p + "mlp.gate_proj.weight": (inter, hidden),
                  p + "mlp.down_proj.weight": (hidden, inter)})
    if vocab:
        d["model.embed_tokens.weight"] = (vocab, hidden)
    return d


@pytest.mark.parametrize("dims, model, confidence", [
    ((2048, 256, 5632), "TinyLlama-1.1B", "high"),
    ((4096, 4096, 11008), "Llama-2-7B", "high"),
    ((4096, 1024, 14336), "Llama-3-8B or Mistral-7B", "medium"),  # the same shapes but for the vocabulary
    ((4096, 1024, 14336, 128256), "Llama-3-8B", "high"),
    ((4096, 1024, 14336, 32768), "Mistral-7B", "high"),
    ((5120, 5120, 13824), "Llama-2-13B", "high"),
    ((8192, 1024, 28672), "Llama-2-70B or Llama-3-70B", "medium"),
    ((3072, 1024, 8192), "Llama-3.2-3B", "high"),
    ((1000, 1000, 3000), None, "low"),
])
def test_llm_guesses_from_shapes(dims, model, confidence):
    g = guess(llama_shapes(*dims))
    assert (g["family"], g["model"], g["confidence"]) == ("llama", model, confidence)


def test_metadata_breaks_a_tie_and_a_contradiction_lowers_confidence():
    g = guess(llama_shapes(4096, 1024, 14336), {"base_model_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct"})
    assert (g["model"], g["confidence"]) == ("Llama-3-8B", "high")
    g = guess(llama_shapes(4096, 4096, 11008), {"ss_base_model_version": "sdxl_base_v1-0"})
    assert (g["model"], g["confidence"]) == ("Llama-2-7B", "medium")
    assert "metadata ss_base_model_version = sdxl_base_v1-0 does not fit the keys" in g["evidence"]


def test_other_families_from_their_key_names():
    gpt2 = guess({"base_model.model.transformer.h.0.attn.c_attn.weight": (768, 2304),  # Conv1D: stored (in, out)
                  "transformer.h.0.mlp.c_fc.weight": (3072, 768)})
    assert (gpt2["family"], gpt2["model"], gpt2["confidence"]) == ("gpt2", "GPT-2 (124M)", "high")
    sd15 = guess({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.weight": (320, 768),
                  "lora_te_text_model_encoder_layers_0_self_attn_q_proj.weight": (768, 768)})
    assert (sd15["model"], sd15["confidence"]) == ("Stable Diffusion 1.x (1.5)", "high")
    sd2 = guess({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": (640, 1024)})
    assert (sd2["model"], sd2["confidence"]) == ("Stable Diffusion 2.x", "medium")
    sd3 = guess({"lora_unet_joint_blocks_0_x_block_attn_qkv.weight": (4608, 1536),
                 "lora_unet_joint_blocks_0_context_block_attn_qkv.weight": (4608, 1536)})
    assert (sd3["family"], sd3["model"]) == ("sd3", "SD3 Medium / SD3.5 Medium")
    flux = guess({"transformer.single_transformer_blocks.0.attn.to_q.weight": (3072, 3072),
                  "transformer.transformer_blocks.0.attn.add_q_proj.weight": (3072, 3072)})
    assert flux["family"] == "flux" and flux["model"] == "FLUX.1 (dev or schnell)"
    te = guess({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.weight": (768, 768),
                "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.weight": (1280, 1280)})
    assert te["family"] == "clip-text-encoder" and te["model"].startswith("SDXL")
    none = guess({"encoder.block.0.weight": (4, 4)})
    assert (none["family"], none["model"], none["confidence"]) == (None, None, "none")


def test_the_table_is_data_every_model_names_dimensions_its_family_measures():
    for fam in FAMILIES:
        measured = {p.dim for p in fam.probes}
        for m in fam.models:
            assert m.dims and set(m.dims) <= measured, (fam.name, m.name)
