"""Without --overwrite a folder output never replaces what appeared at its name while the command ran, an empty
folder included (POSIX rename() would replace one): the name is claimed with mkdir, then the finished folder
is renamed over the claim."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from loratool import fsutil
from loratool.adapter import Adapter, whole_target
from loratool.container import write_file
from loratool.errors import FileError

APPEARED = "appeared while this command was writing it (another writer?); nothing was written"


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("theirs", ["empty folder", "file", "folder with a file"])
def test_something_that_appears_at_a_folder_output_is_kept(tmp_path, theirs):
    out = tmp_path / "out"
    with pytest.raises(FileError, match=re.escape(f"{out}: {APPEARED}")):
        with fsutil.atomic_dir(out) as tmp:
            (tmp / "ours.txt").write_text("ours")
            if theirs == "file":
                out.write_text("theirs")
            else:
                out.mkdir()
                if theirs == "folder with a file":
                    (out / "theirs.txt").write_text("theirs")
    ino = out.stat().st_ino
    assert _names(tmp_path) == ["out"]  # our temporary folder is gone
    if theirs == "file":
        assert out.read_text() == "theirs"
    else:
        assert _names(out) == ([] if theirs == "empty folder" else ["theirs.txt"])
        assert out.stat().st_ino == ino


def test_a_writer_that_fills_the_claim_keeps_its_files(tmp_path, monkeypatch):
    """Between the claim (mkdir) and the rename another writer puts a file into the claimed folder: the
    rename fails (ENOTEMPTY) and its file stays."""
    out = tmp_path / "out"
    real = os.rename

    def rename(src, dst):
        if os.fspath(dst) == os.fspath(out):
            (out / "theirs.txt").write_text("theirs")
        return real(src, dst)

    monkeypatch.setattr(fsutil.os, "rename", rename)
    with pytest.raises(FileError, match=re.escape(APPEARED)):
        with fsutil.atomic_dir(out) as tmp:
            (tmp / "ours.txt").write_text("ours")
    assert _names(tmp_path) == ["out"] and _names(out) == ["theirs.txt"]


def test_an_interrupt_between_claim_and_rename_removes_the_claim(tmp_path, monkeypatch):
    out = tmp_path / "out"

    def rename(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(fsutil.os, "rename", rename)
    before = fsutil.published()
    with pytest.raises(KeyboardInterrupt):
        with fsutil.atomic_dir(out) as tmp:
            (tmp / "ours.txt").write_text("ours")
    assert _names(tmp_path) == []
    assert fsutil.published() == before


def test_a_new_folder_is_published_whole(tmp_path):
    out = tmp_path / "out"
    before = fsutil.published()
    with fsutil.atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
    assert _names(tmp_path) == ["out"] and _names(out) == ["a.txt", "sub"]
    assert (out / "sub" / "b.txt").read_text() == "b"
    assert fsutil.published() == before + 1


def test_merge_into_a_folder_keeps_an_empty_folder_that_appeared(tmp_path):
    """The library path: a folder output of merge, with an empty folder made at its name while it runs."""
    import loratool

    base = tmp_path / "base"
    base.mkdir()
    write_file(base / "model.safetensors", {"w": np.ones((4, 4), np.float32)}, {"format": "pt"})
    (base / "config.json").write_text("{}")
    t = whole_target("w", "linear", (4, 4), np.ones((1, 4), np.float32), np.ones((4, 1), np.float32), 1.0)
    loratool.save(Adapter({"w": t}), tmp_path / "a.safetensors")
    out = tmp_path / "merged"

    def other_writer(n, total=None):
        if total is None and not out.exists():
            out.mkdir()

    with pytest.raises(FileError, match=re.escape(APPEARED)):
        loratool.merge(base, tmp_path / "a.safetensors", out, progress=other_writer)
    assert out.is_dir() and _names(out) == []
    assert _names(tmp_path) == ["a.safetensors", "base", "merged"]
    os.rmdir(out)
    loratool.merge(base, tmp_path / "a.safetensors", out, progress=other_writer, overwrite=True)
    assert _names(out) == ["config.json", "model.safetensors"]  # --overwrite: replaced, as asked
