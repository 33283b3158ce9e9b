"""The README's Python API example runs as written, and `import loratool` names every operation."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python API"):text.index("## Exit codes")]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)
    import loratool

    # What the example wrote is what it says: half the delta, a PEFT folder, a merge and an extraction.
    half = loratool.load("half.safetensors")
    full = loratool.load("examples/adapter.safetensors")
    for key, t in full.targets.items():
        assert [b.scale * 0.5 for b in t.blocks] == [b.scale for b in half.targets[key].blocks]
    assert (tmp_path / "half_peft" / "adapter_config.json").is_file()
    assert all(abs(r["energy_retained"] - 1.0) < 1e-12 for r in scope["both"].rows)
    assert scope["merged"].verify["max_rel_error"] < 1e-6 and (tmp_path / "merged.safetensors").is_file()
    assert scope["lora"].summary["rel_error"] < 0.5 and (tmp_path / "extracted.safetensors").is_file()
    assert isinstance(next(iter(half)).blocks[0].A, np.ndarray)
    assert capsys.readouterr().out.count("\n") >= len(full)


def test_every_command_is_a_library_function():
    import loratool
    from loratool.cli import COMMANDS

    for name in COMMANDS:
        fn = getattr(loratool, name)
        assert callable(fn) and fn.__doc__ and "Args:" in fn.__doc__, name
    assert {"load", "save", "structure", "open_base", "Adapter", "LoraToolError"} <= set(dir(loratool))
