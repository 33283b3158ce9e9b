"""Spec 1.1 in the native format: DoRA and the LyCORIS kinds (LoHa, LoKr, LoCon-Tucker) written and read bit for
bit, converted from LyCORIS files and merged to the same weights, the version a writer declares, and why a 1.0
reader cannot misread a 1.1 file.

The LyCORIS modules are lycoris-lora's own (tests/test_lycoris.py builds them); the oracle of the merge is the merge
of the kohya file itself, which tests/test_lycoris.py checks against the modules' forward.
"""

import dataclasses
import json
import re

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

import loratool
from arrays import same_array
from clitools import run
from loratool import spec
from loratool.adapter import Adapter, Block, Target
from loratool.container import read_header
from loratool.errors import UnsupportedError
from loratool.io import native
from loratool.tasks.validate import validate as validate_file
from test_lycoris import CASES, build, write

IDS = [c[0] for c in CASES]


def _kohya_and_base(tmp_path, cls, kw, conv):
    _, W0, m = build(cls, kw, conv)
    f = write(tmp_path, m)
    base = tmp_path / "base.safetensors"
    save_file({"x.weight": W0.contiguous()}, str(base))
    return f, base


def _same_target(a: Target, b: Target) -> None:
    """Every field that changes the merge equal, every array the same bits."""
    for f in ("key", "kind", "layout", "shape", "delta_scale", "dora_axis", "dora_eps", "is_dora"):
        assert getattr(a, f) == getattr(b, f), f
    assert sorted(a.factors) == sorted(b.factors)
    for k in a.factors:
        assert same_array(a.factors[k], b.factors[k]), k
    assert (a.magnitude is None) == (b.magnitude is None)
    if a.magnitude is not None:
        assert same_array(np.asarray(a.magnitude).reshape(-1), b.magnitude)
    assert len(a.blocks) == len(b.blocks)
    for x, y in zip(a.blocks, b.blocks):
        assert (x.rank, x.alpha, x.scale_rule, x.rows, x.cols) == (y.rank, y.alpha, y.scale_rule, y.rows, y.cols)
        assert same_array(x.A, y.A) and same_array(x.B, y.B)


@pytest.mark.parametrize("label, cls, kw, conv", CASES, ids=IDS)
def test_every_lycoris_kind_round_trips_bit_for_bit(tmp_path, label, cls, kw, conv):
    f, base = _kohya_and_base(tmp_path, cls, kw, conv)
    lyco = loratool.load(f, base=base)
    out = tmp_path / "n.safetensors"
    native.save(lyco, out)
    back = native.load(out)
    (t,) = lyco
    _same_target(t, back.targets[t.key])
    assert read_header(out).metadata[spec.KEY_VERSION] == ("1.0" if label == "locon" else "1.1")  # LoCon is LoRA
    again = tmp_path / "again.safetensors"
    native.save(back, again)
    assert again.read_bytes() == out.read_bytes()  # read and written again: the same bytes
    lazy = native.load(out, lazy=True).targets[t.key]
    assert lazy.magnitude is None and all(v is None for v in lazy.factors.values())
    _same_target(lazy.loaded(), back.targets[t.key])
    rep = validate_file(out)
    assert not rep.findings, [f.as_dict() for f in rep.findings]


@pytest.mark.parametrize("label, cls, kw, conv", CASES, ids=IDS)
def test_convert_cli_to_native_then_merge_equals_the_kohya_merge(tmp_path, label, cls, kw, conv):
    f, base = _kohya_and_base(tmp_path, cls, kw, conv)
    code, _, err = run("convert", f, "-o", tmp_path / "x.safetensors", "--base", base)
    assert code == 0, err
    code, _, err = run("merge", base, tmp_path / "x.safetensors", "-o", tmp_path / "m1.safetensors")
    assert code == 0, err
    code, _, err = run("merge", base, f, "-o", tmp_path / "m2.safetensors")
    assert code == 0, err
    a, b = (load_file(str(tmp_path / n))["x.weight"] for n in ("m1.safetensors", "m2.safetensors"))
    assert same_array(a, b), label


def test_structure_is_header_only_with_ranks_and_parameters(tmp_path):
    f, base = _kohya_and_base(tmp_path, *next(c[1:] for c in CASES if c[0] == "dora-loha-conv"))
    lyco = loratool.load(f, base=base)
    native.save(lyco, tmp_path / "n.safetensors")
    s = native.structure(tmp_path / "n.safetensors")
    (t,) = s
    assert t.kind == "loha" and t.is_dora and t.magnitude is None and t.rank == 2 == next(iter(lyco)).rank
    assert s.n_params == lyco.n_params


def _lora(key="w", layout="linear", shape=(4, 3)):
    out, inp = (shape[0], shape[1]) if layout == "linear" else (shape[0] * shape[1], shape[2])
    b = Block(1, 1.0, "standard", (0, out), (0, inp), np.ones((1, inp), np.float32), np.ones((out, 1), np.float32))
    return Target(key=key, layout=layout, shape=shape, blocks=(b,))


def test_writer_declares_the_lowest_version_that_defines_the_file(tmp_path):
    for targets, want in [([_lora()], "1.0"),
                          ([_lora(), _lora("e", "experts", (2, 4, 3))], "1.1"),
                          ([dataclasses.replace(_lora(), kind="dora", magnitude=np.ones(4, np.float32))], "1.1")]:
        p = tmp_path / "v.safetensors"
        native.save(Adapter({t.key: t for t in targets}), p)
        assert read_header(p).metadata[spec.KEY_VERSION] == want
        assert not validate_file(p).findings


def test_writer_refuses_what_the_spec_cannot_hold(tmp_path):
    t = dataclasses.replace(_lora("e", "experts", (2, 4, 3)), kind="dora", magnitude=np.ones(8, np.float32))
    with pytest.raises(UnsupportedError, match=re.escape("target \"e\": DoRA axis out is not defined on layout "
                                                         "experts (only on linear, fan_in_fan_out, embedding, conv): "
                                                         "spec 1.1 cannot hold it (rule D003)")):
        native.save(Adapter({"e": t}), tmp_path / "d.safetensors")
    t = dataclasses.replace(_lora(), kind="dora", magnitude=np.ones(3, np.float32))
    with pytest.raises(UnsupportedError, match=re.escape("magnitude has shape [3], expected [4]")):
        native.save(Adapter({"w": t}), tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()


def test_a_1_0_reader_refuses_every_1_1_addition_rather_than_misread_it(tmp_path, monkeypatch):
    # Spec section 7: additions a 1.0 reader refuses are a minor version. Made to read as a 1.0 reader does (its
    # kinds and layouts; the 1.1 tensor names unknown), each 1.1 file is refused with M005 or T001, never read.
    files = {}
    for label in ("loha", "lokr-whole", "dora-locon", "dora-lokr-in"):
        cls, kw, conv = next(c[1:] for c in CASES if c[0] == label)
        f, base = _kohya_and_base(tmp_path, cls, kw, conv)
        files[label] = tmp_path / f"{label}.safetensors"
        native.save(loratool.load(f, base=base), files[label])
    files["experts"] = tmp_path / "experts.safetensors"
    native.save(Adapter({"e": _lora("e", "experts", (2, 4, 3))}), files["experts"])
    monkeypatch.setattr(spec, "KINDS", ("lora", "full"))
    monkeypatch.setattr(spec, "LAYOUTS", ("linear", "fan_in_fan_out", "embedding", "conv"))
    monkeypatch.setattr(spec, "parse_kind_factor", lambda name: None)
    monkeypatch.setattr(spec, "MAGNITUDE_NAME", re.compile(r"(?!)"))
    for label, p in files.items():
        rules = {f.rule for f in validate_file(p).errors}
        assert "M005" in rules, (label, rules)
        with pytest.raises(loratool.LoraToolError, match=r"\(rule M005\)"):
            native.load(p)


def test_a_file_marked_1_0_with_a_1_1_kind_warns(tmp_path):
    cls, kw, conv = next(c[1:] for c in CASES if c[0] == "loha")
    f, base = _kohya_and_base(tmp_path, cls, kw, conv)
    p = tmp_path / "n.safetensors"
    native.save(loratool.load(f, base=base), p)
    hdr = read_header(p)
    meta = {**hdr.metadata, spec.KEY_VERSION: "1.0"}
    tensors = load_file(str(p))
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    rep = validate_file(tmp_path / "old.safetensors")
    assert [f.rule for f in rep.findings] == ["W006"]
    assert "declares spec 1.0 but uses kinds or layouts of spec 1.1" in rep.findings[0].message
    assert native.load(tmp_path / "old.safetensors").targets["x.weight"].kind == "loha"


def test_rescale_of_a_lycoris_file_writes_native_exactly(tmp_path):
    cls, kw, conv = next(c[1:] for c in CASES if c[0] == "lokr-w2-decomposed")
    f, base = _kohya_and_base(tmp_path, cls, kw, conv)
    code, out, err = run("rescale", f, "-o", tmp_path / "r.safetensors", "--scale", "0.3", "--base", base, "--json")
    assert code == 0, err
    t0 = loratool.load(f, base=base).targets["x.weight"]
    t = native.load(tmp_path / "r.safetensors").targets["x.weight"]
    assert t.delta_scale == t0.delta_scale * 0.3  # the scale is written as it is, never through an alpha
    entry = json.loads(read_header(tmp_path / "r.safetensors").metadata[spec.KEY_TARGETS])["x.weight"]
    assert entry["kind"] == "lokr" and entry["scale"] == t.delta_scale and "factor_shapes" not in entry.get("info", {})
