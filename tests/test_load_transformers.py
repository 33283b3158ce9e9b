"""Merged folders load in transformers and compute what the adapter computes.

Each case merges a PEFT adapter into a tiny Llama saved with `save_pretrained`, loads the merged folder with
`AutoModelForCausalLM.from_pretrained`, and compares its logits with the PeftModel on the base, unmerged
(or, with --keep-tied, with PEFT's merge_and_unload). Tied bases (tie_word_embeddings: the file has no
lm_head.weight) with an adapter on the embedding, the head, both, or attention only; a torch state dict whose
head and embedding share storage; a sharded tied base; an fp16 base merged with --dtype float32; and a base
that is a Hugging Face cache snapshot (links into blobs/) with its tokenizer.
"""

import json
import os
import warnings

import pytest
import torch

from clitools import run
from loratool.io.base import open_base
from loratool.io.ties import Tie, find_ties
from loratool.tasks.merge import merge
from models import peft_model, sample_input, tiny_llama

LOGIT_ATOL = 1e-5  # float32 logits of two forward passes through weights equal to 1 ulp (merge rounding)
EXTRACT_ATOL = 1e-4  # logits through float32 SVD factors of an exactly low-rank delta (rel. error ~1e-6)

warnings.filterwarnings("ignore", category=UserWarning)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(autouse=True)
def _quiet_transformers():
    from transformers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    yield
    logging.set_verbosity(before)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(sample_input()).logits.float()


def load(folder, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), **kw).eval()


def base_folder(tmp_path, tied, dtype=torch.float32, **save):
    folder = tmp_path / ("tied" if tied else "untied")
    tiny_llama(tied=tied).to(dtype).save_pretrained(str(folder), **save)
    return folder


def adapter_for(tmp_path, base, modules, name="adapter", **save):
    """A PEFT adapter folder on `base` (loaded as transformers loads it) and its PeftModel, unmerged."""
    pm = peft_model(load(base, dtype=torch.float32), target_modules=modules)
    pm.save_pretrained(str(tmp_path / name), **save)
    return tmp_path / name, pm


def tie_of(folder) -> bool | None:
    return json.loads((folder / "config.json").read_text()).get("tie_word_embeddings")


def test_untied_llama_loads_with_the_adapters_logits(tmp_path):
    base = base_folder(tmp_path, tied=False)
    ad, pm = adapter_for(tmp_path, base, ["embed_tokens", "lm_head", *ATTENTION, "gate_proj", "up_proj", "down_proj"])
    r = merge(base, [ad], tmp_path / "out")
    assert r.ties == [] and r.warnings == []
    torch.testing.assert_close(logits(load(tmp_path / "out")), logits(pm), atol=LOGIT_ATOL, rtol=0)
    assert tie_of(tmp_path / "out") is False


@pytest.mark.parametrize("modules,untied", [(["embed_tokens"], True), (["lm_head"], True),
                                            (["embed_tokens", "lm_head"], True), (ATTENTION, False)])
def test_tied_llama_merges_to_the_adapter_model(tmp_path, modules, untied):
    """By default a tied pair an adapter touches is untied: the merged model is the adapter model unmerged
    (PEFT's own merge moves both sides and is not)."""
    base = base_folder(tmp_path, tied=True)
    assert open_base(base).info("lm_head.weight") is None  # save_pretrained stores the embedding alone
    ad, pm = adapter_for(tmp_path, base, modules)
    want = logits(pm)
    r = merge(base, [ad], tmp_path / "out")
    merged = load(tmp_path / "out")
    torch.testing.assert_close(logits(merged), want, atol=LOGIT_ATOL, rtol=0)
    assert tie_of(tmp_path / "out") is (not untied)
    assert (open_base(tmp_path / "out").info("lm_head.weight") is not None) is untied
    assert len(r.ties) == int(untied) and r.warnings == []
    if untied:
        assert r.ties[0].startswith("untied lm_head.weight from model.embed_tokens.weight (config.json)")
        # the side no adapter targets keeps the base's tensor
        original = load(base)
        side = "lm_head" if modules == ["embed_tokens"] else "model.embed_tokens" if modules == ["lm_head"] else None
        if side:
            torch.testing.assert_close(merged.get_submodule(side).weight, original.get_submodule(side).weight,
                                       atol=0, rtol=0)
        # PEFT's merge_and_unload differs from its own unmerged model here: the case untying fixes
        assert (logits(pm.merge_and_unload()) - want).abs().max() > 100 * LOGIT_ATOL


@pytest.mark.parametrize("modules", [["embed_tokens"], ["lm_head"]])
def test_keep_tied_matches_peft_merge_and_unload(tmp_path, modules):
    base = base_folder(tmp_path, tied=True)
    ad, pm = adapter_for(tmp_path, base, modules)
    code, out, err = run("merge", base, ad, "-o", tmp_path / "out", "--keep-tied")
    assert code == 0, err
    text = " ".join(err.split())  # the console wraps long lines
    assert text.startswith("warning: --keep-tied: lm_head.weight is tied to model.embed_tokens.weight (config.json)")
    assert text.count("warning:") == 1 and "note:" not in text
    assert tie_of(tmp_path / "out") is True
    assert open_base(tmp_path / "out").info("lm_head.weight") is None
    torch.testing.assert_close(logits(load(tmp_path / "out")), logits(pm.merge_and_unload()), atol=LOGIT_ATOL,
                               rtol=0)


def test_default_cli_prints_the_untie_note(tmp_path):
    base = base_folder(tmp_path, tied=True)
    ad, _ = adapter_for(tmp_path, base, ["embed_tokens"])
    code, out, err = run("merge", base, ad, "-o", tmp_path / "out")
    assert code == 0, err
    assert " ".join(err.split()).startswith(  # the console wraps long lines
        "note: untied lm_head.weight from model.embed_tokens.weight (config.json): the adapter changes "
        "model.embed_tokens.weight, lm_head.weight keeps the original tensor (lm_head.weight is written as a tensor "
        "of its own)")


def test_unmerge_of_a_tied_merge_returns_the_base(tmp_path):
    """A tied merged model (--keep-tied, or PEFT's merge) is unmerged out of both sides at once."""
    base = base_folder(tmp_path, tied=True)
    # without the saved embedding, which would have to equal the merged model's (it is the base's)
    ad, _ = adapter_for(tmp_path, base, ["embed_tokens", *ATTENTION], save_embedding_layers=False)
    merge(base, [ad], tmp_path / "merged", keep_tied=True)
    r = merge(tmp_path / "merged", [ad], tmp_path / "back", unmerge=True)
    assert r.ties and "taken out of both" in r.ties[0]
    assert tie_of(tmp_path / "back") is True
    torch.testing.assert_close(logits(load(tmp_path / "back")), logits(load(base)), atol=LOGIT_ATOL, rtol=0)


def test_sharded_tied_base_gets_the_head_in_the_embeddings_shard(tmp_path):
    base = base_folder(tmp_path, tied=True, max_shard_size="20KB")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ad, pm = adapter_for(tmp_path, base, ["lm_head", "q_proj"])
    merge(base, [ad], tmp_path / "out")
    got = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert got["weight_map"]["lm_head.weight"] == index["weight_map"]["model.embed_tokens.weight"]
    assert set(got["weight_map"]) == set(index["weight_map"]) | {"lm_head.weight"}
    sizes = sum(os.path.getsize(tmp_path / "out" / n) for n in set(got["weight_map"].values()))
    assert got["metadata"]["total_size"] < sizes  # tensor bytes only, headers excluded
    torch.testing.assert_close(logits(load(tmp_path / "out")), logits(pm), atol=LOGIT_ATOL, rtol=0)


def test_torch_state_dict_with_shared_storage_is_untied(tmp_path):
    """A pytorch_model.bin keeps tied keys on one storage: that is the tie, whatever the config says."""
    model = tiny_llama(tied=True)
    folder = tmp_path / "pt"
    model.config.save_pretrained(str(folder))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    assert find_ties(open_base(folder), folder) == [Tie("model.embed_tokens.weight", "lm_head.weight", True,
                                                        "shared storage")]
    ad, pm = adapter_for(tmp_path, folder, ["embed_tokens"])
    r = merge(folder, [ad], tmp_path / "out")
    assert r.ties and tie_of(tmp_path / "out") is False
    torch.testing.assert_close(logits(load(tmp_path / "out")), logits(pm), atol=LOGIT_ATOL, rtol=0)


def test_dtype_float32_of_an_fp16_base_loads_as_float32(tmp_path):
    base = base_folder(tmp_path, tied=False, dtype=torch.float16)
    cfg = json.loads((base / "config.json").read_text())
    cfg["torch_dtype"] = "float16"  # transformers 5 writes "dtype"; older ones "torch_dtype": both are updated
    (base / "config.json").write_text(json.dumps(cfg))
    ad, pm = adapter_for(tmp_path, base, ATTENTION)
    merge(base, [ad], tmp_path / "out", dtype="float32")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "float32"
    merged = load(tmp_path / "out")  # no dtype given: transformers takes the config's
    assert merged.dtype == torch.float32
    torch.testing.assert_close(logits(merged), logits(pm), atol=LOGIT_ATOL, rtol=0)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(63)} | {"[UNK]": 63}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def hub_snapshot(tmp_path, source) -> "os.PathLike":
    """The Hugging Face cache layout of `source`'s files: models--org--name/blobs/<digest> holds the bytes,
    snapshots/<revision>/<name> are relative links into blobs/."""
    import hashlib

    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / ("0123456789abcdef" * 2 + "01234567")
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snap.name)
    for f in sorted(source.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return snap


def test_hub_cache_snapshot_base_loads_after_merge_with_config_and_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    plain = base_folder(tmp_path, tied=True)
    _tokenizer().save_pretrained(str(plain))
    snap = hub_snapshot(tmp_path, plain)
    assert all(p.is_symlink() for p in snap.iterdir())
    ad, pm = adapter_for(tmp_path, snap, ["embed_tokens", *ATTENTION])
    r = merge(snap, [ad], tmp_path / "out")
    assert r.skipped_files == []
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    assert not any(p.is_symlink() for p in out.iterdir())
    torch.testing.assert_close(logits(load(out)), logits(pm), atol=LOGIT_ATOL, rtol=0)
    assert AutoTokenizer.from_pretrained(str(out))("t1 t5")["input_ids"] == [1, 5]


def _write_config(folder, **cfg):
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("cfg,head,wanted,want", [
    ({"tie_word_embeddings": True}, False, (), "config.json"),
    ({"tie_word_embeddings": True}, True, (), "config.json"),
    ({"tie_word_embeddings": False}, False, (), None),
    ({"text_config": {"tie_word_embeddings": True}}, False, (), "config.json"),
    ({"model_type": "gpt2"}, False, (), "config.json (default)"),  # absent: the default, as the weights show
    ({"model_type": "gpt2"}, True, (), None),  # absent, and the head is stored: it is its own tensor
    (None, False, (), None),  # no config: an encoder's embedding without a head is no tie
    (None, False, ("lm_head.weight",), "adapter targets the missing head"),
])
def test_find_ties(tmp_path, cfg, head, wanted, want):
    from safetensors.torch import save_file

    folder = tmp_path / "m"
    folder.mkdir()
    if cfg is not None:
        _write_config(folder, **cfg)
    t = {"model.embed_tokens.weight": torch.zeros(8, 4), "model.norm.weight": torch.zeros(4)}
    if head:
        t["lm_head.weight"] = torch.ones(8, 4)
    save_file(t, str(folder / "model.safetensors"))
    got = find_ties(open_base(folder), folder, wanted=wanted)
    assert got == ([] if want is None else [Tie("model.embed_tokens.weight", "lm_head.weight", head, want)])


def test_single_file_output_of_a_tied_base_says_the_config_must_untie(tmp_path):
    base = base_folder(tmp_path, tied=True)
    ad, pm = adapter_for(tmp_path, base, ["lm_head"])
    r = merge(base, [ad], tmp_path / "out.safetensors")
    assert r.ties[-1].startswith("the output has no config.json: load it with tie_word_embeddings=False")
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "out.safetensors"))
    model = tiny_llama(tied=False)
    model.load_state_dict(sd)
    torch.testing.assert_close(logits(model.eval()), logits(pm), atol=LOGIT_ATOL, rtol=0)


def test_background_copy_started_before_the_tie_is_known_gives_the_same_output(tmp_path):
    """The head's extra tensor moves every offset: a copy already under way starts over at the new ones."""
    base = base_folder(tmp_path, tied=True, max_shard_size="20KB")
    ad, _ = adapter_for(tmp_path, base, ["embed_tokens", "q_proj"])
    merge(base, [ad], tmp_path / "a", speculate=True)
    merge(base, [ad], tmp_path / "b", speculate=False)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def _finetune(base, folder, embed_delta=None, head_delta=None):
    """`base` with low-rank changes: the embedding (the head moves with it while tied), or a head of its own
    (the finetune then unties: tie_word_embeddings false, lm_head.weight stored)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(base, folder)
    sd = load_file(str(base / "model.safetensors"))
    E = sd["model.embed_tokens.weight"]
    if embed_delta is not None:
        sd["model.embed_tokens.weight"] = E + embed_delta
    if head_delta is not None:
        sd["lm_head.weight"] = E + head_delta
        cfg = json.loads((folder / "config.json").read_text())
        cfg["tie_word_embeddings"] = False
        (folder / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _low_rank(seed, shape=(64, 16), rank=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)) * 0.05


def test_extract_on_a_tied_pair_reports_the_error_of_the_adapter_as_loaded(tmp_path):
    """Both tied: the finetune's head moved with its embedding, the adapter's embedding target changes the
    input side only in PEFT. The report counts the head's change as missed (sqrt((1 + eps^2)/2) for the
    row), and the number matches the logits: the adapter model is no nearer the finetune than the base."""
    from peft import PeftModel

    from loratool.tasks.extract import extract

    base = base_folder(tmp_path, tied=True)
    ft = _finetune(base, tmp_path / "ft", embed_delta=_low_rank(3))
    r = extract(ft, base, output=tmp_path / "ad", to="peft", rank=4, embeddings=True)
    row = next(x for x in r.rows if x["key"] == "model.embed_tokens.weight")
    assert row["tied"] == "lm_head.weight"
    assert row["rel_error"] == pytest.approx((0.5 * (1 + 1e-12)) ** 0.5, abs=1e-6)  # exact rank: eps ~ 0
    assert r.summary["rel_error"] == pytest.approx(row["rel_error"])
    assert [x["key"] for x in r.not_extracted] == ["lm_head.weight"]
    assert r.summary["ties"][0].startswith("lm_head.weight is tied to model.embed_tokens.weight (config.json)")
    pm = PeftModel.from_pretrained(load(base), str(tmp_path / "ad")).eval()
    got, want, before = logits(pm), logits(load(ft)), logits(load(base))
    # the head's missed change is why: the model with the adapter equals neither the finetune nor the base
    assert (got - want).abs().max() > 100 * LOGIT_ATOL and (before - want).abs().max() > 100 * LOGIT_ATOL
    # merged tied, as the note says, it is the finetune
    merge(base, [tmp_path / "ad"], tmp_path / "merged", keep_tied=True)
    torch.testing.assert_close(logits(load(tmp_path / "merged")), want, atol=EXTRACT_ATOL, rtol=0)


def test_extract_pairs_an_untied_finetune_head_with_the_tied_base_embedding(tmp_path):
    """A finetune that untied its head (lm_head.weight stored) against a tied base (none stored): the head is
    paired with the base's embedding, which is the head transformers loads, and the adapter is exact."""
    from peft import PeftModel

    from loratool.tasks.extract import extract

    base = base_folder(tmp_path, tied=True)
    ft = _finetune(base, tmp_path / "ft", embed_delta=_low_rank(3), head_delta=_low_rank(4))
    r = extract(ft, base, output=tmp_path / "ad", to="peft", rank=4, embeddings=True)
    assert {x["key"] for x in r.rows} == {"model.embed_tokens.weight", "lm_head.weight"}
    assert r.summary["ties"] == [] and r.not_extracted == []
    assert r.summary["rel_error"] < 1e-5
    pm = PeftModel.from_pretrained(load(base), str(tmp_path / "ad")).eval()
    torch.testing.assert_close(logits(pm), logits(load(ft)), atol=EXTRACT_ATOL, rtol=0)
    # and merged (untied, the default), it loads as the finetune
    merge(base, [tmp_path / "ad"], tmp_path / "merged")
    torch.testing.assert_close(logits(load(tmp_path / "merged")), logits(load(ft)), atol=EXTRACT_ATOL, rtol=0)


def test_gpt2_whose_config_leaves_the_tie_to_the_default_is_untied(tmp_path):
    """GPT-2 configs written by transformers 4 omit tie_word_embeddings (its default, true): the file without
    lm_head.weight shows the tie."""
    from models import tiny_gpt2

    base = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(str(base))
    cfg = json.loads((base / "config.json").read_text())
    cfg.pop("tie_word_embeddings", None)
    (base / "config.json").write_text(json.dumps(cfg))
    ad, pm = adapter_for(tmp_path, base, ["wte", "c_attn"])
    r = merge(base, [ad], tmp_path / "out")
    assert r.ties[0].startswith("untied lm_head.weight from transformer.wte.weight (config.json (default))")
    torch.testing.assert_close(logits(load(tmp_path / "out")), logits(pm), atol=LOGIT_ATOL, rtol=0)


def test_tied_safetensors_base_to_a_torch_file_writes_the_head_too(tmp_path):
    base = base_folder(tmp_path, tied=True)
    ad, pm = adapter_for(tmp_path, base, ["embed_tokens"])
    merge(base, [ad], tmp_path / "out.pt")
    sd = torch.load(tmp_path / "out.pt", weights_only=True)
    assert "lm_head.weight" in sd
    model = tiny_llama(tied=False)
    model.load_state_dict(sd)
    torch.testing.assert_close(logits(model.eval()), logits(pm), atol=LOGIT_ATOL, rtol=0)
