"""inspect and validate from the command line: exit codes, JSON on stdout, one error line on stderr."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from builders import sample_adapter, torch_delta
from loratool.cli import cli
from loratool.io.native import save

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "spec" / "conformance"
EXPECTED = json.loads((CORPUS / "expected.json").read_text())


def run(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture
def adapter_file(tmp_path):
    p = tmp_path / "a.safetensors"
    save(sample_adapter(), p)
    return p


def test_inspect_json(adapter_file):
    code, out, err = run("inspect", adapter_file, "--json")
    assert code == 0 and err == ""
    doc = json.loads(out)
    assert doc["dialect"] == "loratool" and doc["spec_version"] == "1.0"
    assert doc["targets"] == 5
    assert doc["rank_histogram"] == {"0": 1, "3": 2, "4": 1, "2": 1} or doc["rank_histogram"] == {
        "0": 1, "2": 1, "3": 2, "4": 1}
    assert doc["parameters"] == sample_adapter().n_params
    assert doc["bytes"] == adapter_file.stat().st_size


def test_inspect_stats_from_factors(adapter_file):
    code, out, _ = run("inspect", adapter_file, "--json", "--stats")
    assert code == 0
    rows = {r["target"]: r["stats"] for r in json.loads(out)["per_target"]}
    for t in sample_adapter():
        dense = torch_delta(t).double()
        # Frobenius norm from the factors agrees with the dense norm to float32 rounding.
        assert rows[t.key]["norm"] == pytest.approx(float(dense.norm()), rel=1e-5)
        assert rows[t.key]["nonfinite"] == 0
        if t.kind == "lora":
            assert rows[t.key]["rank99"] <= t.rank


def test_inspect_table(adapter_file):
    code, out, _ = run("inspect", adapter_file)
    assert code == 0
    assert "h.0.attn.c_attn.weight" in out and "fan_in_fan_out" in out and "[0:8] [16:24]" in out


def test_validate_valid_and_json(adapter_file):
    code, out, err = run("validate", adapter_file, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["valid"] is True and doc["errors"] == 0


@pytest.mark.parametrize("name", sorted(EXPECTED["invalid"]))
def test_validate_invalid_exit_1_and_lists_rules(name):
    code, out, err = run("validate", CORPUS / "invalid" / name, "--json")
    assert code == 1
    doc = json.loads(out)
    assert sorted({f["rule"] for f in doc["findings"] if f["severity"] == "error"}) == \
        sorted(EXPECTED["invalid"][name]["errors"])


DATA_ONLY = {"nan_factor.safetensors", "nan_magnitude.safetensors"}  # header-only inspect cannot see values; --stats counts them


@pytest.mark.parametrize("name", sorted(set(EXPECTED["invalid"]) - DATA_ONLY))
def test_inspect_hostile_one_error_line(name):
    code, out, err = run("inspect", CORPUS / "invalid" / name)
    assert code == 3, err
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "\x1b" not in err  # names from files are escaped


def test_inspect_stats_counts_non_finite_values():
    code, out, _ = run("inspect", CORPUS / "invalid" / "nan_factor.safetensors", "--stats", "--json")
    assert code == 0
    assert json.loads(out)["per_target"][0]["stats"] == {"norm": None, "rank90": None, "rank99": None,
                                                         "nonfinite": 1}


def test_strict_fails_on_warnings():
    path = CORPUS / "valid" / "zero_factor.safetensors"
    assert run("validate", path)[0] == 0
    assert run("validate", path, "--strict")[0] == 1


def test_validate_with_base():
    code, out, _ = run("validate", CORPUS / "base_checks" / "shape_differs.safetensors", "--base",
                       CORPUS / "base.safetensors", "--json")
    assert code == 1
    assert [f["rule"] for f in json.loads(out)["findings"]] == ["B002"]


def test_missing_file_is_a_file_error(tmp_path):
    code, out, err = run("inspect", tmp_path / "nope.safetensors")
    assert code == 6
    assert err == f"error: {tmp_path / 'nope.safetensors'}: no such file or folder\n"


def test_missing_base_shard_is_one_line(tmp_path, adapter_file):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../evil.safetensors"}}))
    code, _, err = run("validate", adapter_file, "--base", folder)
    assert code == 3 and err.count("\n") == 1
    assert "is not a file name inside the folder" in err
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    code, _, err = run("validate", adapter_file, "--base", folder)
    assert code == 6 and 'shard "gone.safetensors" is missing' in err


def test_torch_base_loads_weights_only(tmp_path, adapter_file):
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    code, _, err = run("validate", adapter_file, "--base", tmp_path / "evil.pt")
    assert code == 3 and "not a weights-only torch state dict" in err and err.count("\n") == 1
    assert not (tmp_path / "pwned").exists()


def _subprocess(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT)


def test_inspect_never_imports_torch(adapter_file):
    code = ("import sys, runpy; sys.argv=['loratool','inspect',%r,'--json'];\n"
            "try:\n runpy.run_module('loratool', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'heavy import'\n"
            "print('NO_TORCH')" % str(adapter_file))
    r = _subprocess("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("NO_TORCH")


def test_inspect_stats_of_a_native_file_never_imports_torch(adapter_file):
    code = ("import sys, json, io, contextlib, runpy; sys.argv=['loratool','inspect',%r,'--json','--stats'];\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            " try:\n  runpy.run_module('loratool', run_name='__main__')\n"
            " except SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "rows = json.loads(buf.getvalue())['per_target']\n"
            "assert all(r['stats']['norm'] > 0 for r in rows), rows\n"
            "print('NO_TORCH')" % str(adapter_file))
    r = _subprocess("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("NO_TORCH")


def test_help_never_imports_torch():
    r = _subprocess("-X", "importtime", "-m", "loratool", "--help")
    assert r.returncode == 0
    assert not re.search(r"\|\s+torch$", r.stderr, re.M)


def test_python_dash_m_and_version():
    r = _subprocess("-m", "loratool", "--version")
    assert r.returncode == 0 and r.stdout.startswith("loratool, version ")


def test_progress_bar_on_a_terminal(monkeypatch):
    import io

    from loratool.cli import render

    class Tty(io.StringIO):
        def isatty(self):
            return True

    fake = Tty()
    monkeypatch.setattr(sys, "stderr", fake)
    monkeypatch.setattr(render, "_consoles", {})
    with render.Progress("tensors", total=3) as p:
        p(1)
        p(2)
    assert render.__getattr__("err").file is fake
    with render.Progress("quiet", total=3, enabled=False) as q:
        q(1)
    assert q._p is None
