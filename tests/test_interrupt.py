"""Interruption at the CLI boundary (STYLE.md section 8): Ctrl-C and SIGTERM at random moments of real commands.

The subprocess tests run `python -m loratool` on a base of about 40 MB and send SIGINT or SIGTERM at seeded
moments spread over the command's whole run (one moment drawn in each of n equal slices of the duration of
an uninterrupted run). The moments count from when the CLI's handlers are installed (read from
/proc/PID/status): before that, for the 20-40 ms the interpreter takes to start, no code of loratool runs and
Python's own handling applies. Every run must end, by itself, either interrupted (exit 128 + signal, last
stderr line `interrupted; nothing was written`, the output folder empty, hidden files included) or finished
(exit 0, and then the output byte-identical to that of the uninterrupted run); never a traceback, a native
crash (a negative return code) or a hang; the inputs byte-identical afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import click
import ml_dtypes
import numpy as np
import pytest

from loratool import fsutil
from loratool.cli import COMMANDS, main
from loratool.cli.interrupts import LINE

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's loratool, whatever the venv has installed
RUN_TIMEOUT = 60  # seconds: the slowest run here takes about 4 s on a busy 2-core machine; past this it hung
HIDDEN, LAYERS, FFN = 768, 3, 2048  # 21 bf16 matrices, 40.5 MiB: runs of 0.5-4 s

linux_only = pytest.mark.skipif(not Path("/proc/self/status").exists(),
                                reason="the moment the handlers are installed is read from /proc/PID/status")


# ---- inputs -----------------------------------------------------------------------------------------------------

def _write_safetensors(path: Path, tensors: dict) -> None:
    """A plain safetensors file, written here so that the inputs do not depend on the code under test."""
    header, blobs, pos = {}, [], 0
    for key in sorted(tensors):
        data = np.ascontiguousarray(tensors[key]).tobytes()
        header[key] = {"dtype": "BF16", "shape": list(tensors[key].shape), "data_offsets": [pos, pos + len(data)]}
        blobs.append(data)
        pos += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for data in blobs:
            f.write(data)


def _models(seed: int = 0) -> tuple[dict, dict]:
    """A Llama-shaped bf16 base and its finetuned twin (base + a rank-4 change per matrix)."""
    rng = np.random.default_rng(seed)
    shapes = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN),
              "o_proj": (HIDDEN, HIDDEN), "gate_proj": (FFN, HIDDEN), "up_proj": (FFN, HIDDEN),
              "down_proj": (HIDDEN, FFN)}
    base, ft = {}, {}
    for layer in range(LAYERS):
        for name, (m, n) in shapes.items():
            key = f"model.layers.{layer}.{name}.weight"
            w = rng.standard_normal((m, n), dtype=np.float32) * 0.02
            change = rng.standard_normal((m, 4), dtype=np.float32) @ rng.standard_normal((4, n), dtype=np.float32)
            base[key] = w.astype(ml_dtypes.bfloat16)
            ft[key] = (w + 1e-3 * change).astype(ml_dtypes.bfloat16)
    return base, ft


def _digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and bytes, hidden ones included)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _cli(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "loratool", *map(str, args)], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# command -> (arguments with {inp} and {out}, output name, runs, seed)
COMMANDS_UNDER_TEST = {
    "extract": ("extract {inp}/ft.safetensors {inp}/base.safetensors --rank 8 -o {out}/ad.safetensors",
                "ad.safetensors", 8, 1),
    "merge": ("merge {inp}/base.safetensors {inp}/ad.safetensors -o {out}/merged.safetensors",
              "merged.safetensors", 7, 2),
    "merge-folder": ("merge {inp}/model {inp}/ad.safetensors -o {out}/merged", "merged", 6, 3),
    "convert": ("convert {inp}/ad.safetensors --to peft -o {out}/peft", "peft", 4, 4),
    "rescale": ("rescale {inp}/ad.safetensors --rank 4 -o {out}/small.safetensors", "small.safetensors", 4, 5),
}


def _args(name: str, inp: Path, out: Path) -> list[str]:
    return COMMANDS_UNDER_TEST[name][0].format(inp=inp, out=out).split()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The input folder (base file, base folder of two shards, finetuned file, an extracted adapter), each
    command's uninterrupted duration and output digest, and the inputs' digests."""
    inp = tmp_path_factory.mktemp("inputs")
    base, ft = _models()
    _write_safetensors(inp / "base.safetensors", base)
    _write_safetensors(inp / "ft.safetensors", ft)
    folder = inp / "model"
    folder.mkdir()
    keys = sorted(base)
    shards = {"model-00001-of-00002.safetensors": keys[:10], "model-00002-of-00002.safetensors": keys[10:]}
    for shard, ks in shards.items():
        _write_safetensors(folder / shard, {k: base[k] for k in ks})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}))
    (folder / "config.json").write_text('{"model_type": "llama"}\n')
    reference = {}
    for name in ["extract", *[n for n in COMMANDS_UNDER_TEST if n != "extract"]]:  # extract makes the adapter
        out = tmp_path_factory.mktemp(f"reference-{name}")
        t0 = time.monotonic()
        proc = _cli(*_args(name, inp, out), cwd=out)
        _, err = proc.communicate(timeout=RUN_TIMEOUT)
        assert proc.returncode == 0, err.decode()
        output = out / COMMANDS_UNDER_TEST[name][1]
        reference[name] = (time.monotonic() - t0, _digest(output))
        if name == "extract":
            os.replace(output, inp / "ad.safetensors")
    digests = {p: _digest(p) for p in inp.iterdir()}
    return inp, reference, digests


# ---- interrupted runs -------------------------------------------------------------------------------------------

def _handlers_installed(pid: int) -> bool:
    """Whether the process catches SIGTERM, i.e. loratool.cli has installed its handlers (Python itself
    installs none for SIGTERM)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except OSError:  # already gone
        pass
    return False


def _interrupted_run(args, out: Path, sig: int, delay: float):
    """Start the command in `out`, send `sig` `delay` seconds after its handlers are installed; returns
    (return code, stderr). Fails on a run that does not end by itself within RUN_TIMEOUT."""
    proc = _cli(*args, cwd=out)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not _handlers_installed(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(args)}: still running {RUN_TIMEOUT} s after {signal.Signals(sig).name} "
                        f"at {delay:.3f} s (a hang)")
        return proc.returncode, err.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@linux_only
@pytest.mark.parametrize("name", list(COMMANDS_UNDER_TEST))
def test_interrupt_at_random_moments(inputs, tmp_path, name):
    inp, reference, digests = inputs
    _, output, runs, seed = COMMANDS_UNDER_TEST[name]
    duration, want = reference[name]
    rng = random.Random(seed)
    finished = 0
    for i in range(runs):
        sig = (signal.SIGINT, signal.SIGTERM)[i % 2]
        delay = (i + rng.random()) * duration / runs  # one moment in each slice of the run
        if i == runs - 1 and finished == i:
            # Every run so far outran its signal (the reference ran on a busier machine): the last one aims at
            # the first slice, so that the test interrupts something whatever the load.
            delay = rng.random() * duration / runs / 4
        out = tmp_path / f"run{i}"
        out.mkdir()
        args = _args(name, inp, out)
        code, err = _interrupted_run(args, out, sig, delay)
        what = f"{name} run {i}: {signal.Signals(sig).name} at {delay:.3f} s of {duration:.2f} s"
        assert code >= 0, f"{what}: killed by signal {-code} (a native crash); stderr:\n{err[-3000:]}"
        assert "Traceback" not in err and "Exception ignored" not in err, f"{what}: stderr:\n{err}"
        left = sorted(p.name for p in out.iterdir())  # hidden temporaries included
        if code == 128 + sig:
            assert err.splitlines()[-1] == LINE, f"{what}: stderr:\n{err}"
            assert left == [], f"{what}: left behind {left}"
        else:
            assert code == 0, f"{what}: exit {code}; stderr:\n{err}"
            assert left == [output], f"{what}: finished but left {left}"
            assert _digest(out / output) == want, f"{what}: the output differs from an uninterrupted run's"
            finished += 1
    assert finished < runs, f"{name}: every run finished before its signal; the moments miss the run"
    assert {p: _digest(p) for p in inp.iterdir()} == digests, f"{name}: an input changed"


# ---- the boundary in-process ------------------------------------------------------------------------------------

@click.command()
@click.argument("action")
@click.argument("path", required=False)
def probe(action, path):
    """A command that misbehaves on demand (registered in COMMANDS by the tests below)."""
    if action == "keyboard-interrupt":
        raise KeyboardInterrupt
    if action == "sigterm":
        signal.raise_signal(signal.SIGTERM)
        time.sleep(5)  # the handler's exception ends the sleep
        raise AssertionError("not interrupted")
    if action == "after-publish":
        with fsutil.atomic_file(path) as f:
            f.write(b"data")
        signal.raise_signal(signal.SIGINT)  # the output exists: noted, not raised
        click.echo("done")
    if action == "twice":
        try:
            with fsutil.atomic_file(path) as f:
                f.write(b"data")
                signal.raise_signal(signal.SIGINT)
        finally:
            signal.raise_signal(signal.SIGTERM)  # while unwinding: noted, not raised
            click.echo("cleaned")
    if action == "broken-pipe":
        raise BrokenPipeError(32, "Broken pipe")
    if action == "during-import":
        import interrupt_probe_module  # noqa: F401  (its body signals, then finishes)

        time.sleep(5)
        raise AssertionError("not interrupted")
    if action == "swallowed":
        _Swallow()  # its __del__ runs at once and swallows the interrupt
        for _ in range(500):  # Python code between short waits: where the handler runs again
            time.sleep(0.01)
        raise AssertionError("not interrupted")


class _Swallow:
    def __del__(self):
        signal.raise_signal(signal.SIGINT)
        time.sleep(1)  # the handler's exception ends this and is reported as unraisable, not raised


@pytest.fixture
def with_probe(monkeypatch):
    monkeypatch.setitem(COMMANDS, "probe", (__name__, "probe", "test command"))
    yield


def _handlers():
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def test_main_maps_keyboard_interrupt_to_130_with_one_line(with_probe, capsys):
    before = _handlers()
    assert main(["probe", "keyboard-interrupt"]) == 130
    out, err = capsys.readouterr()
    assert (out, err) == ("", LINE + "\n")
    assert _handlers() == before


def test_sigterm_raises_in_the_main_thread_and_exits_143(with_probe, capsys):
    before = _handlers()
    assert main(["probe", "sigterm"]) == 143
    assert capsys.readouterr().err == LINE + "\n"
    assert _handlers() == before


def test_a_signal_once_the_output_is_in_place_lets_the_command_finish(with_probe, tmp_path, capsys):
    assert main(["probe", "after-publish", tmp_path / "out.bin"]) == 0
    assert capsys.readouterr() == ("done\n", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_second_signal_while_unwinding_is_noted_not_raised(with_probe, tmp_path, capsys):
    assert main(["probe", "twice", tmp_path / "out.bin"]) == 130  # the first signal's code
    assert capsys.readouterr() == ("cleaned\n", LINE + "\n")
    assert list(tmp_path.iterdir()) == []


def test_a_signal_during_an_import_is_raised_once_the_import_returns(with_probe, tmp_path, monkeypatch, capsys):
    (tmp_path / "interrupt_probe_module.py").write_text(
        "import signal, time\nsignal.raise_signal(signal.SIGINT)\ntime.sleep(0.2)\nCOMPLETE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "interrupt_probe_module", raising=False)
    assert main(["probe", "during-import"]) == 130
    assert capsys.readouterr().err == LINE + "\n"
    assert sys.modules["interrupt_probe_module"].COMPLETE  # C++ initialisers inside imports are not cut short
    del sys.modules["interrupt_probe_module"]


def test_a_swallowed_interrupt_is_raised_again(with_probe, capsys):
    t0 = time.monotonic()
    assert main(["probe", "swallowed"]) == 130
    assert capsys.readouterr().err == LINE + "\n"  # nothing reported from the __del__
    assert time.monotonic() - t0 < 2  # the watchdog raised it again (the command would run 5 s)


def test_broken_pipe_is_quiet(with_probe, capsys):
    assert main(["probe", "broken-pipe"]) == 141
    assert capsys.readouterr().err == ""


def test_usage_errors_keep_2_and_tool_errors_their_code(tmp_path, capsys):
    assert main(["merge"]) == 2
    assert "Error: Missing argument 'BASE'." in capsys.readouterr().err
    missing = tmp_path / "nope.safetensors"
    assert main(["inspect", missing]) == 6
    assert capsys.readouterr().err == f"error: {missing}: no such file or folder\n"


def test_too_many_weights_is_a_usage_error_in_merge_and_combine(tmp_path, capsys):
    a, b = tmp_path / "base.safetensors", tmp_path / "a.safetensors"
    assert main(["merge", a, b, "--weights", "0.5,1", "-o", tmp_path / "m.safetensors"]) == 2
    merge_err = capsys.readouterr().err.splitlines()[-1]
    assert main(["combine", b, "--weights", "0.5,1", "-o", tmp_path / "c.safetensors"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == merge_err == (
        "error: --weights has 2 values for 1 adapters; give one weight per adapter")


# ---- fsutil: temporary outputs under interrupts -----------------------------------------------------------------

def test_interrupt_between_the_renames_of_an_overwrite_puts_the_old_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        real(src, dst)
        if len(calls) == 1:  # the old folder has just been moved aside
            raise KeyboardInterrupt

    monkeypatch.setattr(fsutil.os, "replace", replace)
    before = fsutil.published()
    with pytest.raises(KeyboardInterrupt):
        with fsutil.atomic_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert fsutil.published() == before


def test_clean_up_runs_to_its_end_through_a_further_interrupt(tmp_path, monkeypatch):
    real = fsutil.shutil.rmtree
    calls = []

    def rmtree(path, ignore_errors=False):
        calls.append(path)
        if len(calls) == 1:
            raise KeyboardInterrupt  # a second Ctrl-C at the start of the clean-up
        real(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(fsutil.shutil, "rmtree", rmtree)
    with pytest.raises(KeyboardInterrupt):
        with fsutil.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
            raise ValueError("the command failed")
    assert list(tmp_path.iterdir()) == []


def test_interrupt_just_after_the_temporary_file_is_made_removes_it(tmp_path, monkeypatch):
    def fdopen(fd, mode):
        os.close(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(fsutil.os, "fdopen", fdopen)
    with pytest.raises(KeyboardInterrupt):
        with fsutil.atomic_file(tmp_path / "out.bin"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_published_counts_outputs_not_renames_inside_a_temporary_folder(tmp_path):
    before = fsutil.published()
    with fsutil.atomic_dir(tmp_path / "folder") as tmp:
        with fsutil.atomic_file(tmp / "inner.bin") as f:
            f.write(b"x")
        assert fsutil.published() == before
    assert fsutil.published() == before + 1
    with contextlib.suppress(ValueError), fsutil.atomic_file(tmp_path / "failed.bin"):
        raise ValueError
    assert fsutil.published() == before + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]
