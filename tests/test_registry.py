"""The dialect registry: it alone decides detection, reader options, the writer of an output and `--to`;
`structure` (headers and configs only) describes what `load` reads; inspect of PEFT and kohya never
imports torch; an output name the command cannot write is one error line."""

import contextlib
import json
import os
import re
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from arrays import skeleton
from builders import sample_adapter
from clitools import one_error_line, run
from loratool.adapter import Adapter
from loratool.errors import UnsupportedError, UsageError
from loratool.io import detect as D, native, registry
from loratool.io._common import Dialect
from models import base_state_dict, peft_model, tiny_gpt2, tiny_llama

warnings.filterwarnings("ignore", category=UserWarning)
ROOT = Path(__file__).resolve().parents[1]


# ---- fixtures: one file or folder of every dialect ---------------------------------------------------------

def _kohya_sd():
    g = torch.Generator().manual_seed(0)
    return {"lora_unet_a_b.lora_down.weight": torch.randn(2, 3, generator=g),
            "lora_unet_a_b.lora_up.weight": torch.randn(4, 2, generator=g),
            "lora_unet_a_b.alpha": torch.tensor(3.0, dtype=torch.bfloat16),
            "lora_unet_c.lora_down.weight": torch.randn(2, 3, 3, 3, generator=g),
            "lora_unet_c.lora_up.weight": torch.randn(5, 2, 1, 1, generator=g),
            "lora_unet_d.lora_down.0.weight": torch.randn(2, 3, generator=g),
            "lora_unet_d.lora_up.0.weight": torch.randn(2, 2, generator=g),
            "lora_unet_d.lora_down.1.weight": torch.randn(2, 3, generator=g),
            "lora_unet_d.lora_up.1.weight": torch.randn(4, 2, generator=g),
            "lora_unet_d.alpha": torch.tensor(0.0)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dialects")
    native.save(sample_adapter(), d / "native.safetensors")
    save_file(_kohya_sd(), str(d / "kohya.safetensors"))
    save_file({"a.b.weight": torch.zeros(4, 3), "c.weight": torch.zeros(5, 3, 3, 3), "d.weight": torch.zeros(6, 3)},
              str(d / "kohya_base.safetensors"))
    llama = tiny_llama(layers=1)
    save_file(base_state_dict(llama), str(d / "llama.safetensors"))
    pm = peft_model(llama, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], use_rslora=True,
                    rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}, modules_to_save=["lm_head"])
    pm.save_pretrained(str(d / "peft"))
    pm.save_pretrained(str(d / "peft_bin"), safe_serialization=False)
    gpt2 = tiny_gpt2(layers=1)
    save_file(base_state_dict(gpt2), str(d / "gpt2.safetensors"))
    peft_model(gpt2, target_modules=["c_attn", "c_fc"], use_dora=True).save_pretrained(str(d / "dora"))
    import loralib

    torch.manual_seed(0)
    m = torch.nn.Module()
    m.qkv = loralib.MergedLinear(4, 6, r=1, lora_alpha=2, enable_lora=[True, False, True])
    m.fc = loralib.Linear(4, 3, r=2, lora_alpha=2)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape))
    torch.save(m.state_dict(), d / "loralib.pt")
    return d


# (name, path under the fixture folder, reader options, dialect detected)
CASES = [
    ("native", "native.safetensors", {}, "loratool"),
    ("kohya", "kohya.safetensors", {}, "kohya"),
    ("kohya+base", "kohya.safetensors", {"base": "kohya_base.safetensors"}, "kohya"),
    ("peft+base", "peft", {"base": "llama.safetensors"}, "peft"),
    ("peft-weights-file+base", "peft/adapter_model.safetensors", {"base": "llama.safetensors"}, "peft"),
    ("peft-bin+base", "peft_bin", {"base": "llama.safetensors"}, "peft"),
    ("dora+base", "dora", {"base": "gpt2.safetensors"}, "peft"),
    ("loralib", "loralib.pt", {"alpha": 2, "enable_lora": "1,0,1"}, "loralib"),
]


def _opts(files, opts):
    return {k: (files / v if k == "base" else v) for k, v in opts.items()}


@pytest.mark.parametrize("name, rel, opts, dialect", CASES, ids=[c[0] for c in CASES])
def test_detect_reads_the_registry(files, name, rel, opts, dialect):
    assert D.detect(files / rel) == dialect
    assert registry.detect(files / rel) is registry.get(dialect)


@pytest.mark.parametrize("name, rel, opts, dialect", CASES, ids=[c[0] for c in CASES])
def test_structure_equals_what_load_reads(files, name, rel, opts, dialect):
    s = registry.structure(files / rel, **_opts(files, opts))
    full = registry.load(files / rel, **_opts(files, opts))
    assert all(b.A is None and b.B is None for t in s for b in t.blocks)
    assert all(t.delta is None for t in s if t.kind == "full")
    # A saved whole tensor equal to the base's is dropped when read (only the data says so); structure lists
    # it, and names those on layers LoRA also adapts. Everything else agrees exactly.
    unchanged = set(full.info.get("unchanged_keys", []))
    dropped = {t.key for t in s if t.key not in full.targets}
    assert all(any(n.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".modules_to_save.", ".")
                   .endswith(k) for n in unchanged) for k in dropped)
    kept = replace(s.replace_targets(t for t in s if t.key in full.targets),
                   info={k: v for k, v in s.info.items() if k != "saved_beside_lora"})
    want = replace(skeleton(full), info={k: v for k, v in full.info.items() if k != "unchanged_keys"})
    assert kept == want
    assert set(s.info.get("saved_beside_lora", [])) <= unchanged
    assert len(dropped) + len(s.info.get("saved_beside_lora", [])) == len(unchanged)


def test_peft_fixture_exercises_saved_tensors(files):
    s = registry.structure(files / "peft", base=files / "llama.safetensors")
    full = registry.load(files / "peft", base=files / "llama.safetensors")
    assert s.info["saved_beside_lora"] == ["base_model.model.model.embed_tokens.base_layer.weight"]
    assert "lm_head.weight" in s.targets and s.targets["lm_head.weight"].kind == "full"
    assert "base_model.model.model.embed_tokens.base_layer.weight" in full.info["unchanged_keys"]


def test_structure_without_a_base_describes_what_load_refuses(files):
    s = registry.structure(files / "dora")  # DoRA needs no base: the merge reads the base's rows
    assert {t.key: (t.kind, t.shape) for t in s} == {"transformer.h.0.attn.c_attn.weight": ("dora", (16, 48)),
                                                     "transformer.h.0.mlp.c_fc.weight": ("dora", (16, 64))}
    assert "needs_base" not in s.info
    assert all(t.kind == "dora" and t.magnitude.shape == (t.shape[1],) for t in registry.load(files / "dora"))
    with pytest.raises(UnsupportedError, match=re.escape("is a whole saved tensor")):
        registry.load(files / "peft")
    s = registry.structure(files / "peft")
    assert s.targets["lm_head.weight"].kind == "full" and s.targets["lm_head.weight"].shape == (64, 16)


@pytest.mark.parametrize("name, rel, opts, dialect", CASES, ids=[c[0] for c in CASES])
def test_lazy_load_reads_each_target_as_load_does(files, name, rel, opts, dialect):
    """`lazy=True` (merge's read) gives load's targets with no factor in memory, and each target's `loaded()`
    gives load's factors, bit for bit: the same names, scales, transposes and dtypes."""
    from loratool.io.base import open_base

    opts = _opts(files, opts)
    with contextlib.ExitStack() as stack:
        if "base" in opts:  # an open base outlives the adapter, so DoRA and saved tensors are deferred too
            opts["base"] = stack.enter_context(open_base(opts["base"]))
        full = registry.load(files / rel, **opts)
        lazy = registry.load(files / rel, lazy=True, **opts)
        assert lazy == skeleton(full) and lazy.info == full.info
        assert all(x is None for x in lazy.arrays())
        for t in lazy:
            got, want = t.loaded(), full.targets[t.key]
            assert skeleton(Adapter({t.key: got})) == skeleton(Adapter({t.key: want}))
            for x, y in zip(Adapter({t.key: got}).arrays(), Adapter({t.key: want}).arrays()):
                assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
            assert got.load is None


def test_loaded_factors_are_numpy(files):
    for name, rel, opts, _ in CASES:
        a = registry.load(files / rel, **_opts(files, opts))
        xs = [t.delta for t in a if t.kind == "full"] + [x for t in a for b in t.blocks for x in (b.A, b.B)]
        assert xs and all(type(x) is np.ndarray for x in xs), name


def test_accepted_options_are_what_each_reader_takes():
    import inspect

    for d in registry.DIALECTS:
        for fn in (d.load, d.structure):
            params = set(inspect.signature(fn).parameters) - {"path"}
            # `lazy` is the registry's own keyword (registry.load), never a user's option; structure takes the
            # structure-only ones (partial)
            want = set(d.options) | ({"lazy"} if fn is d.load else d.structure_options)
            assert params == want, (d.name, fn.__name__)
        assert not d.structure_options & d.options, d.name
        assert D.accepted_options(d.name) == set(d.options)
        if d.save is not None:
            params = set(inspect.signature(d.save).parameters) - {"adapter", "path"}
            assert params == set(d.save_options), d.name


def test_host_option_is_still_accepted_when_not_strict(files):
    a = D.load_adapter(files / "kohya.safetensors", strict=False, host=True)
    assert all(type(b.A) is np.ndarray for t in a for b in t.blocks)
    with pytest.raises(UsageError, match=re.escape("is a kohya adapter, which does not take --host")):
        D.load_adapter(files / "kohya.safetensors", host=True)


def test_a_registered_dialect_is_detected_read_and_written(files, tmp_path, monkeypatch):
    """Registering one Dialect is all it takes: detect, load, structure and writer_for use it."""
    made = Adapter(targets={})

    def save(adapter, path, *, flavour="x"):
        Path(path).write_text(flavour)
        return 1

    fake = Dialect(name="fake", description="a test dialect", detect=lambda src: 500 * (src.path.suffix == ".fake"),
                   structure=lambda path, *, level=0: made, load=lambda path, *, level=0: made,
                   options=frozenset({"level"}), reads=(".fake",), save=save, writes="file", suffix=".fake",
                   save_options=frozenset({"flavour"}))
    monkeypatch.setattr(registry, "DIALECTS", (*registry.DIALECTS, fake))
    monkeypatch.setitem(registry._BY_NAME, "fake", fake)
    (tmp_path / "a.fake").write_text("")
    assert D.detect(tmp_path / "a.fake") == "fake" and D.load_adapter(tmp_path / "a.fake", level=2) is made
    assert D.accepted_options("fake") == {"level"}
    assert "fake" in registry.writable()
    w = registry.writer_for(tmp_path / "out.fake")
    assert w is fake and w.write(made, tmp_path / "out.fake", flavour="y", prefix="ignored") == 1
    assert (tmp_path / "out.fake").read_text() == "y"
    with pytest.raises(UsageError, match=re.escape("is a fake adapter, which does not take --alpha")):
        D.load_adapter(tmp_path / "a.fake", alpha=3)


def test_convert_to_choices_are_the_registry_writers():
    from loratool.cli.convert_cmd import convert

    to = next(p for p in convert.params if p.name == "to")
    assert list(to.type.choices) == registry.writable() == ["loratool", "peft", "kohya", "diffusers", "comfy", "mlx", "gguf"]


def test_unknown_file_type_names_what_the_registry_reads(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"ONNX")
    code, _, err = run("inspect", tmp_path / "x.onnx")
    assert code == 3 and one_error_line(err) == (f"error: {tmp_path / 'x.onnx'}: unknown adapter file type; expected "
                                                 ".safetensors, .bin, .gguf, .pt, .pth or a PEFT folder")


def test_a_truncated_gguf_adapter_is_one_clean_error(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    code, _, err = run("inspect", tmp_path / "x.gguf")
    assert code == 3 and one_error_line(err).startswith(f"error: {tmp_path / 'x.gguf'}: not a readable GGUF file (")


# ---- the writer of an output ---------------------------------------------------------------------------------

@pytest.mark.parametrize("output, to, choices, want", [
    ("a.safetensors", None, None, "loratool"),
    ("a.safetensors", "kohya", None, "kohya"),
    ("out/", None, None, "peft"),
    ("newdir", None, None, "peft"),
    ("out.v2/", "peft", None, "peft"),
    ("half.safetensors", None, ("loratool",), "loratool"),
])
def test_writer_for_picks_one_dialect(output, to, choices, want):
    assert registry.writer_for(output, to, choices=choices).name == want


@pytest.mark.parametrize("output, to, choices, message", [
    ("half.pt", None, ("loratool",), "half.pt: this command cannot write a .pt file; it writes a .safetensors file "
                                     "(loratool): choose -o accordingly"),
    ("out.onnx", None, None, "out.onnx: this command cannot write a .onnx file; it writes a .safetensors file "
                             "(loratool, kohya, diffusers, comfy) or a folder (peft, mlx) or a .gguf file (gguf): choose -o accordingly or pass --to"),
    ("newdir/", None, ("loratool",), "newdir/: this command cannot write a folder; it writes a .safetensors file "
                                     "(loratool): choose -o accordingly"),
    ("x.safetensors", "peft", None, "--to peft writes a folder (adapter_config.json + adapter_model.safetensors); "
                                    "give -o a folder name, not x.safetensors"),
    ("x", "kohya", None, "--to kohya writes one .safetensors file; give -o a name ending in .safetensors"),
    ("x.safetensors", "peft", ("loratool",), "--to peft: this command writes a .safetensors file (loratool); choose "
                                             "one of loratool"),
])
def test_writer_for_refuses_what_it_cannot_write(output, to, choices, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        registry.writer_for(output, to, choices=choices)


@pytest.mark.parametrize("out, extra", [("out.onnx", []), ("half.pt", []), ("x.bin", ["--to", "loratool"]),
                                        ("k", ["--to", "kohya"])])
def test_convert_refuses_an_output_it_cannot_write(files, tmp_path, out, extra):
    code, stdout, err = run("convert", files / "native.safetensors", "-o", tmp_path / out, *extra)
    assert code == 2 and stdout == ""
    assert "cannot write" in one_error_line(err) or "writes" in one_error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_convert_without_to_follows_the_output_name(files, tmp_path):
    code, _, err = run("convert", files / "native.safetensors", "-o", tmp_path / "copy.safetensors", "--json", "-q")
    assert code == 0, err
    assert native.load(tmp_path / "copy.safetensors") is not None
    code, out, err = run("convert", files / "peft", "-o", tmp_path / "p", "--base", files / "llama.safetensors",
                         "--json")
    assert code == 0, err
    assert json.loads(out)["to"] == "peft" and (tmp_path / "p" / "adapter_config.json").is_file()


# ---- inspect ---------------------------------------------------------------------------------------------

def test_inspect_of_peft_and_kohya_imports_neither_torch_nor_numpy(files):
    for path in (files / "peft", files / "kohya.safetensors"):
        code = ("import sys, runpy; sys.argv=['loratool','inspect',%r,'--json'];\n"
                "try:\n runpy.run_module('loratool', run_name='__main__')\n"
                "except SystemExit as e:\n assert not e.code, e.code\n"
                "heavy = sorted(m for m in ('torch', 'numpy') if m in sys.modules)\n"
                "assert not heavy, heavy\n"
                "print('LIGHT')" % str(path))
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ})
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout.strip().rsplit("\n", 1)[0])
        assert doc["targets"] > 0 and r.stdout.strip().endswith("LIGHT")


def test_inspect_of_peft_summarises_the_header(files):
    code, out, err = run("inspect", files / "peft", "--json")
    assert code == 0, err
    doc = json.loads(out)
    st = (files / "peft" / "adapter_model.safetensors").stat().st_size
    assert doc["dialect"] == "peft" and doc["format"] is None and doc["bytes"] == st
    assert doc["dtypes"] == {"F32": 2 * 4 + 2}  # q, v, down, embedding pairs + lm_head + the embedding copy
    by = {r["target"]: r for r in doc["per_target"]}
    assert by["model.layers.0.self_attn.v_proj.weight"]["rank"] == 2
    assert by["model.layers.0.mlp.down_proj.weight"]["blocks"][0]["alpha"] == 3
    assert by["model.embed_tokens.weight"]["layout"] == "embedding"
    assert {b["scale_rule"] for r in doc["per_target"] for b in r["blocks"]} == {"rslora"}
    code, out, _ = run("inspect", files / "dora")
    assert code == 0 and "transformer.h.0.attn.c_attn.weight" in out
    assert "transformer.h.0.mlp.c_fc.weight     dora  fan_in_fan_out" in out and "needs base" not in out


def test_inspect_stats_of_kohya_reads_the_factors(files):
    from arrays import dense_delta

    code, out, err = run("inspect", files / "kohya.safetensors", "--stats", "--json")
    assert code == 0, err
    rows = {r["target"]: r["stats"] for r in json.loads(out)["per_target"]}
    a = registry.load(files / "kohya.safetensors")
    for t in a:
        # the norm from the factors agrees with the dense one to float32 rounding
        assert rows[t.key]["norm"] == pytest.approx(float(dense_delta(t).double().norm()), rel=1e-5)


def test_reading_and_writing_safetensors_dialects_imports_no_torch(files, tmp_path):
    """Every safetensors reader and writer works on numpy alone: torch is for torch files and CUDA only."""
    code = f"""
import sys
from loratool.io import registry
a = registry.load({str(files / 'kohya.safetensors')!r})
registry.get("kohya").write(a, {str(tmp_path / 'k.safetensors')!r})
registry.get("loratool").write(a, {str(tmp_path / 'n.safetensors')!r})
p = registry.load({str(files / 'peft')!r}, base={str(files / 'llama.safetensors')!r})
registry.writer_for({str(tmp_path / 'p')!r}).write(p, {str(tmp_path / 'p')!r})
back = registry.load({str(tmp_path / 'p')!r})
assert sorted(back.targets) == sorted(t.key for t in p if t.kind == "lora"), sorted(back.targets)
assert "torch" not in sys.modules, "torch imported"
print("NO_TORCH")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "NO_TORCH"
    assert registry.load(tmp_path / "n.safetensors").targets.keys() == registry.load(files / "kohya.safetensors")\
        .targets.keys()
