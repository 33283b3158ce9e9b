"""Hostile inputs and file-system faults end in one `error:` line with their exit code: deeply nested JSON,
pipes given as files, a full disk, escape sequences in names (nothing hangs, nothing is left behind)."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from loratool.cli import main
from loratool.container import write_file

DEEP = "[" * 20000 + "]" * 20000  # far past the json module's recursion limit


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err.strip()


def small_model(folder):
    folder.mkdir()
    write_file(folder / "model.safetensors", {"w": np.ones((4, 4), np.float32)}, {"format": "pt"})
    return folder


def test_deeply_nested_safetensors_header_is_a_spec_error(tmp_path, capsys):
    body = ('{"__metadata__":{"a":' + DEEP + '}}').encode()
    (tmp_path / "deep.safetensors").write_bytes(struct.pack("<Q", len(body)) + body)
    assert main(["inspect", tmp_path / "deep.safetensors"]) == 3
    assert "nested too deeply" in one_line(capsys)


def test_deeply_nested_config_and_index_are_spec_errors(tmp_path, capsys):
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text('{"x": ' + DEEP + "}")
    write_file(peft / "adapter_model.safetensors", {"a": np.ones(2, np.float32)}, {})
    assert main(["inspect", peft]) == 3
    assert "adapter_config.json: not valid JSON (nested too deeply)" in one_line(capsys)
    base = small_model(tmp_path / "base")
    (base / "model.safetensors").rename(base / "model-00001-of-00001.safetensors")
    (base / "model.safetensors.index.json").write_text('{"weight_map": ' + DEEP + "}")
    assert main(["merge", base, peft, "-o", tmp_path / "out"]) == 3
    assert "model.safetensors.index.json: not valid JSON (nested too deeply)" in one_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_a_pipe_given_as_a_file_is_refused_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "pipe.safetensors")
    base = small_model(tmp_path / "base")
    for args, what in ((["inspect", tmp_path / "pipe.safetensors"], "pipe.safetensors"),
                       (["merge", tmp_path / "pipe.safetensors", tmp_path / "a.safetensors", "-o",
                         tmp_path / "o.safetensors"], "pipe.safetensors"),
                       (["merge", base, tmp_path / "pipe.safetensors", "-o", tmp_path / "o2"], "pipe.safetensors")):
        r = subprocess.run([sys.executable, "-m", "loratool", *map(str, args)], capture_output=True, text=True,
                           timeout=60)  # a read of the pipe would block forever
        assert r.returncode == 6, r.stderr
        assert r.stderr.count("\n") == 1 and "is not a regular file" in r.stderr and what in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "pipe.safetensors"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
@pytest.mark.parametrize("pipe", ["adapter_config.json", "adapter_model.safetensors"])
def test_a_pipe_inside_a_peft_folder_is_named_as_a_pipe(tmp_path, pipe):
    """A pipe in place of a PEFT folder's config or weights: refused as a pipe (not "no adapter_config.json",
    not a read that waits for a writer)."""
    from loratool.adapter import Adapter, whole_target
    from loratool.tasks.convert import save

    t = whole_target("l.weight", "linear", (4, 4), np.ones((1, 4), np.float32), np.ones((4, 1), np.float32), 1.0)
    save(Adapter({t.key: t}), tmp_path / "peft", to="peft")
    (tmp_path / "peft" / pipe).unlink()
    os.mkfifo(tmp_path / "peft" / pipe)
    for args in (["inspect", tmp_path / "peft"], ["convert", tmp_path / "peft", "-o", tmp_path / "o.safetensors"]):
        r = subprocess.run([sys.executable, "-m", "loratool", *map(str, args)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 6, r.stderr
        assert r.stderr == f"error: {tmp_path / 'peft' / pipe}: is not a regular file (a pipe, device or socket); " \
            f"pass the {'PEFT adapter_config.json' if pipe.endswith('json') else 'safetensors file'} itself\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]


def test_a_full_disk_is_one_line_and_exit_6_with_nothing_left(tmp_path, monkeypatch, capsys):
    from loratool.io import stream

    base = small_model(tmp_path / "base")
    ad = tmp_path / "a.safetensors"
    from loratool.adapter import Adapter, whole_target
    from loratool.io.native import save

    t = whole_target("w", "linear", (4, 4), np.ones((1, 4), np.float32), np.ones((4, 1), np.float32), 1.0)
    save(Adapter({"w": t}), ad)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(stream, "pwrite_all", full)
    out = tmp_path / "out"
    assert main(["merge", base, ad, "-o", out, "-q"]) == 6
    assert one_line(capsys) == (f"error: {out}: no space left on the device; free some space or write elsewhere; "
                                "nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "base"]  # no temporary left


class _FullFile:
    """A file object whose writes fail as on a full disk (the rest is the real file's)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("command", ["merge", "extract", "convert", "rescale", "combine"])
@pytest.mark.parametrize("fault", ["write", "fsync"])
def test_every_writer_maps_a_full_disk_to_one_file_error(tmp_path, monkeypatch, command, fault):
    """The library, not only the CLI, raises FileError (exit 6) naming the output and what ENOSPC means, with
    the temporary output removed: a write that fails (os.write, os.pwrite, a file object's write), or a fsync
    that reports it late (as a file system with delayed allocation does)."""
    from dataclasses import replace

    import loratool
    from loratool.adapter import Adapter, whole_target
    from loratool.errors import FileError

    base = small_model(tmp_path / "base")
    ft = tmp_path / "ft"
    ft.mkdir()
    write_file(ft / "model.safetensors", {"w": np.ones((4, 4), np.float32) + np.outer(np.arange(4), np.ones(4))
                                          .astype(np.float32)}, {"format": "pt"})
    t = whole_target("w", "linear", (4, 4), np.ones((1, 4), np.float32), np.ones((4, 1), np.float32), 1.0)
    loratool.save(Adapter({"w": t}), tmp_path / "a.safetensors")
    loratool.save(Adapter({"w": t}), tmp_path / "b.safetensors")
    loratool.save(Adapter({"l.weight": replace(t, key="l.weight")}), tmp_path / "c.safetensors")  # PEFT: a module
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / ("out" if command == "convert" else "out.safetensors")  # convert: a PEFT folder
    if fault == "write":
        real_fdopen = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _FullFile(real_fdopen(fd, *a, **k)))
        monkeypatch.setattr(os, "write", _no_space)
        monkeypatch.setattr(os, "pwrite", _no_space)
    else:
        monkeypatch.setattr(os, "fsync", _no_space)
    run = {
        "merge": lambda: loratool.merge(base, tmp_path / "a.safetensors", out),
        "extract": lambda: loratool.extract(ft, base, rank=1, output=out),
        "convert": lambda: loratool.convert(tmp_path / "c.safetensors", out),
        "rescale": lambda: loratool.rescale(tmp_path / "a.safetensors", scale=2.0, output=out),
        "combine": lambda: loratool.combine([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], output=out),
    }[command]
    with pytest.raises(FileError) as e:
        run()
    assert str(e.value) == (f"{out}: no space left on the device; free some space or write elsewhere; nothing "
                            "was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_name_too_long_is_one_file_error_naming_the_output(tmp_path, capsys):
    """ENAMETOOLONG, from the file system itself: the temporary name beside the output is longer still, and the
    message names the output the user gave, not that temporary name."""
    from loratool.adapter import Adapter, whole_target
    from loratool.io.native import save

    t = whole_target("w", "linear", (4, 4), np.ones((1, 4), np.float32), np.ones((4, 1), np.float32), 1.0)
    save(Adapter({"w": t}), tmp_path / "a.safetensors")
    out = tmp_path / ("x" * 240 + ".safetensors")
    assert main(["rescale", tmp_path / "a.safetensors", "--scale", "2", "-o", out]) == 6
    assert one_line(capsys) == (f"error: {out}: name too long for the file system; choose a shorter name; nothing "
                                "was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_folder_without_write_permission_is_one_file_error(tmp_path, capsys):
    from loratool.adapter import Adapter, whole_target
    from loratool.io.native import save

    t = whole_target("w", "linear", (4, 4), np.ones((1, 4), np.float32), np.ones((4, 1), np.float32), 1.0)
    save(Adapter({"w": t}), tmp_path / "a.safetensors")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["rescale", tmp_path / "a.safetensors", "--scale", "2", "-o", ro / "o.safetensors"]) == 6
        assert one_line(capsys) == (f"error: {ro / 'o.safetensors'}: permission denied; check the permissions or "
                                    "use another path; nothing was written")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_escape_sequences_in_a_path_never_reach_the_terminal(tmp_path, capsys):
    evil = tmp_path / "\x1b[31mred\x07.safetensors"
    assert main(["inspect", evil]) == 6
    line = one_line(capsys)
    assert "\x1b" not in line and "\x07" not in line and "\\x1b[31mred\\x07" in line


def test_extract_refuses_to_write_inside_an_input_folder(tmp_path, capsys):
    base = small_model(tmp_path / "base")
    ft = small_model(tmp_path / "ft")
    assert main(["extract", ft, base, "--rank", "1", "-o", base / "adapter.safetensors"]) == 6
    assert "sit inside input" in one_line(capsys)
    assert sorted(p.name for p in base.iterdir()) == ["model.safetensors"]


def test_a_bf16_overflow_is_refused_for_a_torch_base_too(tmp_path, capsys):
    import torch

    from loratool.adapter import Adapter, whole_target
    from loratool.io.native import save

    # float32 holds W + ΔW (bf16(3.3e38) = 3.2963e38, + 1.03e37 = 3.3993e38) but bf16 does not: Inf past 3.3962e38
    torch.save({"w": torch.full((4, 4), 3.3e38).bfloat16()}, tmp_path / "base.pt")
    t = whole_target("w", "linear", (4, 4), np.ones((1, 4), np.float32), np.full((4, 1), 1.03e37, np.float32), 1.0)
    save(Adapter({"w": t}), tmp_path / "a.safetensors")
    for out in ("out.pt", "out.safetensors"):
        assert main(["merge", tmp_path / "base.pt", tmp_path / "a.safetensors", "-o", tmp_path / out]) == 5
        assert "overflows BF16" in one_line(capsys) and not (tmp_path / out).exists()


def test_an_output_that_appears_meanwhile_is_never_replaced(tmp_path, capsys):
    """Two writers on one -o without --overwrite: the one that publishes second refuses, and the first one's
    file stays as it was (a rename would have replaced it)."""
    import loratool
    from loratool.errors import FileError

    base = small_model(tmp_path / "base")
    from loratool.adapter import Adapter, whole_target
    from loratool.io.native import save

    t = whole_target("w", "linear", (4, 4), np.ones((1, 4), np.float32), np.ones((4, 1), np.float32), 1.0)
    save(Adapter({"w": t}), tmp_path / "a.safetensors")
    out = tmp_path / "m.safetensors"

    def other_writer(n, total=None):  # the output appears while the merge is running
        if total is None and not out.exists():
            out.write_bytes(b"theirs")

    with pytest.raises(FileError, match="appeared while this command was writing it"):
        loratool.merge(base, tmp_path / "a.safetensors", out, progress=other_writer)
    assert out.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "base", "m.safetensors"]
    res = loratool.rescale(tmp_path / "a.safetensors", scale=2.0, output=tmp_path / "r.safetensors")
    assert res.bytes == (tmp_path / "r.safetensors").stat().st_size
    out.unlink()
    loratool.merge(base, tmp_path / "a.safetensors", out, progress=other_writer, overwrite=True)
    assert out.read_bytes() != b"theirs"  # --overwrite: replaced, as asked


@pytest.mark.parametrize("command", ["merge", "extract"])
def test_a_base_written_in_place_meanwhile_is_refused(tmp_path, command):
    """A base rewritten while it is read would give a torn output (tensors of both versions) with exit 0: the
    file's size and modification time are checked after the last read, before anything is published."""
    import loratool
    from loratool.adapter import Adapter, whole_target
    from loratool.errors import FileError
    from loratool.io.native import save

    base = small_model(tmp_path / "base")
    ft = small_model(tmp_path / "ft")
    write_file(ft / "model.safetensors", {"w": np.full((4, 4), 2.0, np.float32)}, {"format": "pt"})
    t = whole_target("w", "linear", (4, 4), np.ones((1, 4), np.float32), np.ones((4, 1), np.float32), 1.0)
    save(Adapter({"w": t}), tmp_path / "a.safetensors")
    shard = base / "model.safetensors"

    def rewrite(n=0, total=None, **kw):  # another program writes the base in place, same size
        if total is None and not rewrite.done:
            rewrite.done = True
            data = bytearray(shard.read_bytes())
            data[-4:] = np.float32(7.0).tobytes()
            with open(shard, "r+b") as f:
                f.write(bytes(data))
            st = os.stat(shard)
            os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))

    rewrite.done = False
    out = tmp_path / "out.safetensors"
    with pytest.raises(FileError, match="changed while it was being read"):
        if command == "merge":
            loratool.merge(base, tmp_path / "a.safetensors", out, progress=rewrite)
        else:
            loratool.extract(ft, base, rank=1, output=out, progress=rewrite)
    assert rewrite.done and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "base", "ft"]


def _folder_case(tmp_path):
    from loratool.adapter import Adapter, whole_target
    from loratool.io.native import save

    t = whole_target("w", "linear", (4, 4), np.ones((1, 4), np.float32), np.ones((4, 1), np.float32), 1.0)
    save(Adapter({"w": t}), tmp_path / "a.safetensors")
    return tmp_path / "a.safetensors"


def test_a_model_folder_is_copied_as_data_never_as_links(tmp_path):
    """Links out of the folder (a secret beside it), link loops, pipes and stale weight copies are not copied
    and are reported; links inside the folder are copied as the files they point to."""
    import loratool

    ad = _folder_case(tmp_path)
    base = small_model(tmp_path / "base")
    (tmp_path / "secret").write_text("outside")
    (base / "config.json").write_text('{"model_type": "llama"}')
    (base / "extra").mkdir()
    (base / "extra" / "shadow").symlink_to(tmp_path / "secret")
    (base / "extra" / "up").symlink_to("..")  # a loop
    (base / "tokenizer.json").symlink_to(base / "config.json")  # inside: copied as a file
    (base / "original").mkdir()
    (base / "original" / "consolidated.00.pth").write_bytes(b"stale weights")
    if hasattr(os, "mkfifo"):
        os.mkfifo(base / "extra" / "fifo")
    res = loratool.merge(base, ad, tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.rglob("*")) == ["config.json", "extra", "model.safetensors", "original",
                                                      "tokenizer.json"]
    tok = out / "tokenizer.json"
    assert not tok.is_symlink() and tok.read_text() == '{"model_type": "llama"}'
    reasons = "\n".join(res.skipped_files)
    assert "extra/shadow (a link that leads outside" in reasons and "extra/up (a link to a folder)" in reasons
    assert "original/consolidated.00.pth (weights that are not the base's" in reasons
    assert ("extra/fifo (not a regular file)" in reasons) == hasattr(os, "mkfifo")


def test_a_hugging_face_cache_snapshot_is_copied_from_its_blobs(tmp_path):
    """In a cache snapshot every file is a link into the repository's blobs/: they are the model's files."""
    import loratool

    ad = _folder_case(tmp_path)
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    write_file(repo / "blobs" / "b1", {"w": np.ones((4, 4), np.float32)}, {"format": "pt"})
    (repo / "blobs" / "b2").write_text('{"model_type": "llama"}')
    (snap / "model.safetensors").symlink_to("../../blobs/b1")
    (snap / "config.json").symlink_to("../../blobs/b2")
    res = loratool.merge(snap, ad, tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert (out / "config.json").read_text() == '{"model_type": "llama"}' and not (out / "config.json").is_symlink()
    assert res.skipped_files == []


def test_a_killed_runs_temporary_is_removed_by_the_next_run_and_named(tmp_path, capsys):
    """A SIGKILL leaves a temporary output nobody can clean up at once; its name carries the dead process's
    id, so the next run writing the same output removes it and says so, and never touches a live one's."""
    dead = 2 ** 22 + 12345  # above the default pid_max of 2^22: no such process
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)
    ad = _folder_case(tmp_path)
    base = small_model(tmp_path / "base")
    stale = tmp_path / f".out.safetensors.{dead}-0123456789ab.tmp"
    stale.write_bytes(b"x" * 100)
    stale_dir = tmp_path / f".out.safetensors.{dead}-abcdefabcdef.old"
    stale_dir.mkdir()
    live = tmp_path / f".out.safetensors.{os.getppid()}-0123456789ab.tmp"  # a running writer's
    live.write_bytes(b"y")
    assert main(["merge", base, ad, "-o", tmp_path / "out.safetensors", "-q"]) == 0
    err = capsys.readouterr().err
    assert not stale.exists() and not stale_dir.exists() and live.exists()
    assert f"note: removed {stale}, a temporary output left by a run that was killed" in err
    assert (tmp_path / "out.safetensors").is_file()


def test_peft_target_modules_that_match_nothing_in_the_base_are_refused(tmp_path, capsys):
    """PEFT refuses to load an adapter whose target_modules name no module of the model; merging it by its
    tensors' names alone would apply what PEFT never would."""
    import loratool

    base = tmp_path / "base"
    base.mkdir()
    write_file(base / "model.safetensors", {"model.layers.0.q_proj.weight": np.ones((4, 4), np.float32)},
               {"format": "pt"})
    from loratool.adapter import Adapter, whole_target

    t = whole_target("model.layers.0.q_proj.weight", "linear", (4, 4), np.ones((1, 4), np.float32),
                     np.ones((4, 1), np.float32), 1.0)
    loratool.save(Adapter({t.key: t}), tmp_path / "peft", to="peft")
    cfg_path = tmp_path / "peft" / "adapter_config.json"
    assert main(["merge", base, tmp_path / "peft", "-o", tmp_path / "ok.safetensors", "-q"]) == 0  # as written
    capsys.readouterr()
    cfg = json.loads(cfg_path.read_text())
    for targets in (["v_proj"], "model\\.layers\\.0\\.k_proj"):
        cfg["target_modules"] = targets
        cfg_path.write_text(json.dumps(cfg))
        assert main(["merge", base, tmp_path / "peft", "-o", tmp_path / "out.safetensors"]) == 4
        assert "match no module of the base" in one_line(capsys)
        assert not (tmp_path / "out.safetensors").exists()
    cfg["target_modules"] = "model\\.layers\\.\\d+\\.q_proj"
    cfg_path.write_text(json.dumps(cfg))
    assert main(["merge", base, tmp_path / "peft", "-o", tmp_path / "re.safetensors", "-q"]) == 0


def test_kohya_metadata_describes_the_file_as_written(tmp_path):
    """A kohya file rescaled keeps sd-scripts' ss_network_alpha in step with its alpha tensors."""
    import loratool
    from loratool.adapter import Adapter, whole_target
    from loratool.container import read_header

    t = whole_target("lora_unet_down_blocks_0.weight", "linear", (4, 4), np.ones((2, 4), np.float32),
                     np.ones((4, 2), np.float32), 2.0)
    a = Adapter({t.key: t}, metadata={"ss_network_dim": "2", "ss_network_alpha": "2.0", "ss_output_name": "x"})
    loratool.save(a, tmp_path / "k.safetensors", to="kohya")
    loratool.rescale(tmp_path / "k.safetensors", scale=0.5, output=tmp_path / "half.safetensors", to="kohya")
    meta = read_header(tmp_path / "half.safetensors").metadata
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_output_name"]) == ("2", "1", "x")
