"""benchmarks/make_8b.py at a tiny size: the files safetensors and loratool read, and what the 8B run would write."""

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


make_8b = _load("make_8b")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("b8") / "tiny"
    make_8b.main(["--out", str(out), "--tiny", "--threads", "2"])
    return out


def _read(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a sharded folder as float32, through the reference safetensors reader."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / shard), "pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                assert t.dtype == torch.bfloat16, k
                out[k] = t.float().numpy()
    return out


def _loratool(*args):
    return subprocess.run([sys.executable, "-m", "loratool", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_plan_of_the_8b_model_is_llama3_8b():
    p = make_8b.main(["--plan"])
    assert p["tensors"] == 291  # embed, 32 x 9, norm, lm_head
    assert p["parameters"] == 8_030_261_248  # Llama-3-8B's count
    assert p["total_size"] == 2 * p["parameters"]
    assert len(p["shards"]) == 10 and sum(p["shards"]) == p["total_size"]
    assert max(p["shards"]) < 1.1 * p["total_size"] / 10  # about equal shards (the 1 GB embedding included)
    assert p["adapter_modules"] == 224 and p["adapter_bytes"] == 4 * 16 * 32 * (
        2 * 8192 + 2 * 5120 + 3 * 18432)  # r (in + out) float32 per module


def test_shards_index_config_and_dtypes(tiny):
    s = make_8b.TINY
    expect = dict(make_8b.tensors(s))
    for part in ("base", "finetuned"):
        folder = tiny / part
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        assert set(index["weight_map"].values()) == set(shards)
        total = 0
        for shard in shards:
            with safe_open(str(folder / shard), "pt") as f:
                keys = set(f.keys())
                assert keys == {k for k, v in index["weight_map"].items() if v == shard}
                for k in keys:
                    sl = f.get_slice(k)
                    assert tuple(sl.get_shape()) == expect[k] and sl.get_dtype() == "BF16", k
                    total += 2 * int(np.prod(expect[k]))
        assert set(index["weight_map"]) == set(expect)
        assert index["metadata"]["total_size"] == total
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is False
        assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                cfg["num_key_value_heads"], cfg["vocab_size"]) == (64, 224, 2, 8, 2, 2004)


def test_finetune_changes_projections_by_low_rank_plus_noise_only(tiny):
    s = make_8b.TINY
    base, ft = _read(tiny / "base"), _read(tiny / "finetuned")
    assert set(base) == set(ft)
    for k in base:
        if not make_8b.is_projection(k):
            assert np.array_equal(base[k], ft[k]), f"{k} changed; only projections may"
            continue
        d = (ft[k] - base[k]).astype(np.float64)
        sv = np.linalg.svd(d, compute_uv=False)
        # ||signal|| ~ 1 and noise 20 % of it, plus bf16 rounding of W (|W| ~ 0.02, ulp ~ 1e-4 per element).
        assert 0.5 < np.linalg.norm(d) < 2, k
        top = (sv[: s.signal_rank] ** 2).sum() / (sv ** 2).sum()
        assert top > 0.5, f"{k}: the rank-{s.signal_rank} signal holds {top:.2f} of the change's energy"
        assert sv[s.signal_rank] < 0.5 * sv[s.signal_rank - 1], k  # the signal's last σ stands above the noise


def test_deterministic_and_independent_of_threads(tiny, tmp_path):
    make_8b.main(["--out", str(tmp_path), "--tiny", "--threads", "1", "--what", "finetuned,adapter"])
    for rel in ["finetuned/model-00002-of-00003.safetensors", "adapter/adapter_model.safetensors"]:
        a, b = (tiny / rel).read_bytes(), (tmp_path / rel).read_bytes()
        assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest(), rel
    assert not (tmp_path / "base").exists()


def test_existing_parts_are_kept_and_disk_shortage_is_refused(tiny, tmp_path, monkeypatch, capsys):
    before = (tiny / "base" / "model-00001-of-00003.safetensors").stat().st_mtime_ns
    make_8b.main(["--out", str(tiny), "--tiny"])
    assert (tiny / "base" / "model-00001-of-00003.safetensors").stat().st_mtime_ns == before
    assert "exists, kept" in capsys.readouterr().err

    class Usage:
        free = 10 << 30

    monkeypatch.setattr(make_8b.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(SystemExit, match=re.escape(f"make_8b: {tmp_path} has 10.7 GB free (counting parts it would "
                                                   "replace); base+finetuned+adapter need 32.8 GB")):
        make_8b.main(["--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def test_adapter_is_peft_and_loratool_reads_validates_and_merges_it(tiny, tmp_path):
    s = make_8b.TINY
    cfg = json.loads((tiny / "adapter" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", s.rank, s.alpha)
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with safe_open(str(tiny / "adapter" / "adapter_model.safetensors"), "pt") as f:
        lora = {k: f.get_tensor(k).numpy() for k in f.keys()}
    assert len(lora) == 2 * 7 * s.layers and all(v.dtype == np.float32 for v in lora.values())

    r = _loratool("inspect", tiny / "adapter", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["dialect"] == "peft" and info["targets"] == 7 * s.layers
    assert info["parameters"] == sum(v.size for v in lora.values())
    assert info["rank_histogram"] == {str(s.rank): 7 * s.layers}

    # validate takes the PEFT folder as it is, and its loratool conversion.
    r = _loratool("validate", tiny / "adapter", "--base", tiny / "base", "--strict")
    assert r.returncode == 0, r.stdout + r.stderr
    native = tmp_path / "adapter.safetensors"
    r = _loratool("convert", tiny / "adapter", "-o", native, "--to", "loratool")
    assert r.returncode == 0, r.stderr
    r = _loratool("validate", native, "--base", tiny / "base", "--strict")
    assert r.returncode == 0, r.stdout + r.stderr

    merged = tmp_path / "merged"
    r = _loratool("merge", tiny / "base", tiny / "adapter", "-o", merged)
    assert r.returncode == 0, r.stderr
    base, out = _read(tiny / "base"), _read(merged)
    assert set(out) == set(base)
    bf16 = ml_dtypes.bfloat16
    scale = s.alpha / s.rank
    for k, w in base.items():
        a = lora.get(f"base_model.model.{k.removesuffix('.weight')}.lora_A.weight")
        if a is None:
            assert np.array_equal(out[k], w), k
            continue
        b = lora[f"base_model.model.{k.removesuffix('.weight')}.lora_B.weight"]
        want = (w + scale * (b @ a)).astype(bf16).view(np.uint16).astype(np.int32)  # (out, r) @ (r, in)
        got = out[k].astype(bf16).view(np.uint16).astype(np.int32)
        assert np.abs(got - want).max() <= 1, k  # tolerance: one bf16 ulp (issue 11's bar against PEFT)


def test_e2e_runner_prints_its_table_on_the_tiny_model(tiny, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "e2e_8b.py"), "--work", str(tiny), "--rounds",
                        "1", "--scratch", str(tmp_path), "--json", str(tmp_path / "r.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    assert {row["op"] for row in res["rows"]} == {"merge --no-fsync", "merge", "extract --rank 16"}
    for row in res["rows"]:
        assert len(row["loratool_s"]) == 1 and row["ratio"] > 0 and row["peak_rss_mib"] > 0
    assert "ratio" in r.stdout and "peak RSS" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # outputs removed after each run
