"""Hugging Face Hub ids as inputs, read from a Hub cache built by hand in the layout huggingface_hub uses
(models--org--name/refs/<branch> holding a commit, snapshots/<commit>/<file> linking into blobs/<sha>),
offline (HF_HUB_OFFLINE=1): no network is ever tried."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from clitools import one_error_line, run
from loratool.io import hub

KEY = "layers.0.q_proj.weight"
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32"}


def base_tensors(seed):
    g = np.random.default_rng(seed)
    return {KEY: g.standard_normal((12, 10), dtype=np.float32),
            "layers.0.k_proj.weight": g.standard_normal((12, 10), dtype=np.float32)}


def write_base(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    save_file(base_tensors(seed), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def write_peft(folder: Path, seed: int = 5) -> Path:
    folder.mkdir(parents=True)
    g = np.random.default_rng(seed)
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": g.standard_normal((2, 10), dtype=np.float32),
               "base_model.model.layers.0.q_proj.lora_B.weight": g.standard_normal((12, 2), dtype=np.float32)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    return folder


def cache_repo(cache: Path, repo: str, files: Path, ref: str = "main") -> str:
    """Put the files of a folder into the Hub cache as repo at branch `ref`, as huggingface_hub lays it out."""
    root = cache / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(f"{repo}@{ref}".encode()).hexdigest()
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for f in sorted(files.iterdir()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hub cache holding org/base (main and branch "other", different weights) and org/adapter (PEFT), the
    same files as local folders, and the environment pointing at it, offline."""
    local = tmp_path / "local"
    cache = tmp_path / "cache"
    cache_repo(cache, "org/base", write_base(local / "base", seed=0))
    cache_repo(cache, "org/base", write_base(local / "base-other", seed=1), ref="other")
    cache_repo(cache, "org/adapter", write_peft(local / "adapter"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so that "org/base" is not a local path
    return local


def merged(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def test_merge_hub_base_and_adapter_equals_local_merge(hub_cache, tmp_path):
    code, _, err = run("merge", hub_cache / "base", hub_cache / "adapter", "-o", tmp_path / "want/", "-q")
    assert code == 0, err
    code, _, err = run("merge", "org/base", "org/adapter", "-o", tmp_path / "got/", "-q")
    assert code == 0, err
    want, got = merged(tmp_path / "want"), merged(tmp_path / "got")
    assert want.keys() == got.keys()
    for k in want:
        assert np.array_equal(want[k], got[k]), k  # the same bytes in, the same arithmetic: identical
    assert not np.array_equal(got[KEY], base_tensors(0)[KEY])  # the adapter was applied
    cfg = tmp_path / "got" / "config.json"  # copied from the cache snapshot, through its link into blobs/
    assert cfg.is_file() and not cfg.is_symlink() and json.loads(cfg.read_text()) == CONFIG


@pytest.mark.parametrize("how", [("--revision", "other"), ("@other",)])
def test_revision_picks_another_snapshot(hub_cache, tmp_path, how):
    code, _, err = run("merge", hub_cache / "base-other", hub_cache / "adapter", "-o", tmp_path / "want/", "-q")
    assert code == 0, err
    base = "org/base" + (how[0] if how[0].startswith("@") else "")
    extra = list(how) if how[0] == "--revision" else []
    # --revision applies to every Hub id without its own @REV: the adapter is given as a local path here
    code, _, err = run("merge", base, hub_cache / "adapter", "-o", tmp_path / "got/", "-q", *extra)
    assert code == 0, err
    want, got = merged(tmp_path / "want"), merged(tmp_path / "got")
    assert all(np.array_equal(want[k], got[k]) for k in want)
    # the tensor no adapter touches is the "other" snapshot's, not main's
    assert np.array_equal(got["layers.0.k_proj.weight"], base_tensors(1)["layers.0.k_proj.weight"])


def test_missing_repo_offline_is_one_line(hub_cache, tmp_path):
    code, out, err = run("merge", "org/nothing", "org/adapter", "-o", tmp_path / "out/")
    assert code == 6 and out == ""
    line = one_error_line(err)
    assert line == (f"error: org/nothing: is not a local path, nor is its revision main in the Hub cache "
                    f"{tmp_path / 'cache'}, and HF_HUB_OFFLINE=1 forbids downloading it; download it once online "
                    "(`hf download org/nothing`), or pass a local path")
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_missing_revision_offline_is_one_line(hub_cache, tmp_path):
    code, _, err = run("inspect", "org/adapter", "--revision", "v9")
    assert code == 6
    assert "org/adapter: is not a local path, nor is its revision v9 in the Hub cache" in one_error_line(err)


def test_revision_without_a_hub_id_is_refused(hub_cache, tmp_path):
    code, _, err = run("merge", hub_cache / "base", hub_cache / "adapter", "-o", tmp_path / "o/", "--revision", "x")
    assert code == 2
    assert one_error_line(err) == ("error: --revision x: no input is a Hugging Face Hub id (org/name) that is not "
                                   "a local path; drop the option")


def test_a_local_path_always_wins(hub_cache, tmp_path):
    write_base(tmp_path / "org" / "base", seed=7)  # ./org/base now exists: it is that folder, not the repo
    code, _, err = run("merge", "org/base", "org/adapter", "-o", tmp_path / "got/", "-q")
    assert code == 0, err
    assert np.array_equal(merged(tmp_path / "got")["layers.0.k_proj.weight"],
                          base_tensors(7)["layers.0.k_proj.weight"])


def test_hub_base_for_other_commands(hub_cache, tmp_path):
    code, out, err = run("inspect", "org/adapter", "--base", "org/base", "--json")
    assert code == 0, err
    assert json.loads(out)["per_target"][0]["target"] == KEY
    code, _, err = run("convert", "org/adapter", "-o", tmp_path / "a.safetensors", "-q")
    assert code == 0, err
    code, _, err = run("validate", tmp_path / "a.safetensors", "--base", "org/base")
    assert code == 0, err
    code, _, err = run("extract", "org/base@other", "org/base", "--rank", "2", "-o", tmp_path / "x.safetensors", "-q")
    assert code == 0, err


def test_a_repo_without_a_peft_adapter_is_one_line(hub_cache):
    code, _, err = run("inspect", "org/base")
    assert code == 6
    assert one_error_line(err).startswith("error: org/base: the Hub repository holds no adapter_config.json")
    assert "org/base/FILE.safetensors" in err  # says how to name a single-file adapter


def test_a_single_file_adapter_by_its_hub_file_id(hub_cache, tmp_path):
    """`org/name/FILE`: a kohya file in a repository of its own, merged and inspected from the cache."""
    from loratool.io import registry

    folder = tmp_path / "local" / "kohya"
    folder.mkdir()
    registry.get("kohya").write(registry.load(hub_cache / "adapter", base=hub_cache / "base"),
                                folder / "style_lora.safetensors")
    cache_repo(tmp_path / "cache", "org/kohya", folder)
    code, _, err = run("merge", "org/base", "org/kohya/style_lora.safetensors", "-o", tmp_path / "hub-out",
                       "-q")
    assert code == 0, err
    code, _, err = run("merge", hub_cache / "base", hub_cache / "adapter", "-o", tmp_path / "local-out", "-q")
    assert code == 0, err
    got, want = merged(tmp_path / "hub-out"), merged(tmp_path / "local-out")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    code, out, err = run("inspect", "org/kohya/style_lora.safetensors", "--json")
    assert code == 0 and json.loads(out)["dialect"] == "kohya", err
    code, _, err = run("inspect", "org/kohya/missing.safetensors")
    assert code == 6
    assert one_error_line(err).startswith("error: org/kohya/missing.safetensors: is not a local path")


def _kohya_repo(hub_cache, tmp_path, repo: str, names) -> None:
    """A repository holding the test adapter as kohya files named `names` (no adapter_config.json)."""
    from loratool.io import registry

    folder = tmp_path / "local" / repo.replace("/", "-")
    folder.mkdir()
    for name in names:
        registry.get("kohya").write(registry.load(hub_cache / "adapter", base=hub_cache / "base"), folder / name)
    cache_repo(tmp_path / "cache", repo, folder)


def test_a_repository_of_one_single_file_adapter_is_that_file(hub_cache, tmp_path):
    """`org/name` without adapter_config.json and with one adapter file (as diffusers' load_lora_weights guesses):
    merged as that file; diffusers' own weight name wins over others."""
    _kohya_repo(hub_cache, tmp_path, "org/one", ["style_lora.safetensors"])
    _kohya_repo(hub_cache, tmp_path, "org/diffusers", ["pytorch_lora_weights.safetensors", "other.safetensors"])
    code, _, err = run("merge", hub_cache / "base", hub_cache / "adapter", "-o", tmp_path / "local-out", "-q")
    assert code == 0, err
    want = merged(tmp_path / "local-out")
    for repo in ("org/one", "org/diffusers"):
        out = tmp_path / f"out-{repo[4:]}"
        code, _, err = run("merge", "org/base", repo, "-o", out, "-q")
        assert code == 0, err
        got = merged(out)
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert hub.resolve("org/one", "adapter").name == "style_lora.safetensors"


def test_a_repository_of_several_adapter_files_names_them(hub_cache, tmp_path):
    _kohya_repo(hub_cache, tmp_path, "org/many", ["a.safetensors", "b.safetensors", "optimizer.safetensors"])
    code, _, err = run("merge", "org/base", "org/many", "-o", tmp_path / "out", "-q")
    assert code == 6 and not (tmp_path / "out").exists()
    line = one_error_line(err)
    assert "it holds 2 adapter files: a.safetensors, b.safetensors;" in line  # an optimizer state is no adapter
    assert "org/many/FILE.safetensors" in line


def test_the_hub_lists_a_repository_online(monkeypatch, tmp_path):
    """Online, the repository's files come from the Hub's listing (here a stand-in for list_repo_files)."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "list_repo_files",
                        lambda repo, revision=None: ["README.md", "lora-f16.gguf", "samples/x.png"])
    assert hub._single_adapter_file("org/gguf", None, tmp_path) == "lora-f16.gguf"
    monkeypatch.setattr(huggingface_hub, "list_repo_files",
                        lambda repo, revision=None: ["config.json", "model.safetensors"])
    with pytest.raises(hub.FileError, match="it is a model repository"):
        hub._single_adapter_file("org/model", None, tmp_path)


@pytest.mark.parametrize("text,want", [
    ("org/name/lora.safetensors", ("org/name", "lora.safetensors", None)),
    ("org/name/sub/x.gguf@v2", ("org/name", "sub/x.gguf", "v2")),
    ("org/name", None), ("org/name/readme.md", None), ("org/name/../x.safetensors", None),
])
def test_what_is_a_hub_file_id(tmp_path, monkeypatch, text, want):
    monkeypatch.chdir(tmp_path)
    assert hub.hub_file(text) == want


@pytest.mark.parametrize("text,want", [
    ("org/name", ("org/name", None)), ("org/name@v1.0", ("org/name", "v1.0")),
    ("org/Llama-3.1-8B", ("org/Llama-3.1-8B", None)), ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    ("name", None), ("./org/name", None), ("/org/name", None), ("a/b/c", None), ("org/model.safetensors", None),
    ("org/..", None), ("org/a--b", None), ("org/", None),
])
def test_what_is_a_hub_id(tmp_path, monkeypatch, text, want):
    monkeypatch.chdir(tmp_path)
    assert hub.hub_id(text) == want


def test_local_paths_never_import_huggingface_hub(tmp_path):
    write_peft(tmp_path / "adapter")
    code = ("import sys; from loratool.tasks.inspect import inspect; inspect(sys.argv[1]); "
            "print('huggingface_hub' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "adapter")], capture_output=True, text=True,
                       cwd=Path(__file__).parent.parent, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
