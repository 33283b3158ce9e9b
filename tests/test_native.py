"""Native reader/writer: round trips, determinism, compatibility with the reference safetensors library."""

import os
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import loratool
from arrays import dense_delta, same_array, skeleton
from builders import fused_target, linear_target, sample_adapter
from loratool.adapter import Adapter, Block, Target
from loratool.errors import FileError, NumericError
from loratool.fsutil import atomic_file, check_output
from loratool.io.native import load, save, structure


def _assert_same(a: Adapter, b: Adapter):
    assert list(a.targets) == list(b.targets)
    assert dict(a.metadata) == dict(b.metadata)
    for key in a.targets:
        ta, tb = a.targets[key], b.targets[key]
        assert (ta.kind, ta.layout, ta.shape, ta.delta_scale, ta.dtype, ta.sha256) == \
               (tb.kind, tb.layout, tb.shape, tb.delta_scale, tb.dtype, tb.sha256)
        if ta.kind == "full":
            assert same_array(ta.delta, tb.delta)
        for ba, bb in zip(ta.blocks, tb.blocks, strict=True):
            assert (ba.rank, ba.alpha, ba.scale_rule, ba.rows, ba.cols) == (bb.rank, bb.alpha, bb.scale_rule, bb.rows,
                                                                             bb.cols)
            assert same_array(ba.A, bb.A)  # dtype, shape and bits
            assert same_array(ba.B, bb.B)


def test_round_trip_sample(tmp_path):
    a = sample_adapter()
    save(a, tmp_path / "a.safetensors")
    b = load(tmp_path / "a.safetensors")
    _assert_same(a, b)
    assert all(isinstance(x, np.ndarray) for t in b for x in [t.delta] if t.kind == "full")
    assert all(isinstance(x, np.ndarray) for t in b for blk in t.blocks for x in (blk.A, blk.B))


def test_numpy_and_torch_factors_write_the_same_bytes(tmp_path):
    a = sample_adapter()
    save(a, tmp_path / "torch.safetensors")
    save(load(tmp_path / "torch.safetensors"), tmp_path / "numpy.safetensors")
    assert (tmp_path / "torch.safetensors").read_bytes() == (tmp_path / "numpy.safetensors").read_bytes()


def test_structure_is_load_without_factors(tmp_path):
    save(sample_adapter(), tmp_path / "a.safetensors")
    s, full = structure(tmp_path / "a.safetensors"), load(tmp_path / "a.safetensors")
    assert s == skeleton(full)
    assert all(b.A is None and b.B is None for t in s for b in t.blocks)


def test_writer_is_deterministic(tmp_path):
    save(sample_adapter(), tmp_path / "1.safetensors")
    save(sample_adapter(), tmp_path / "2.safetensors")
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()


def test_reference_safetensors_reads_our_files(tmp_path):
    a = sample_adapter()
    save(a, tmp_path / "a.safetensors")
    got = load_file(str(tmp_path / "a.safetensors"))
    t = a.targets["h.0.attn.c_attn.weight"]
    assert torch.equal(got["h.0.attn.c_attn.weight.lora.1.B"], t.blocks[1].B)
    b = load(tmp_path / "a.safetensors").targets["h.0.attn.c_attn.weight"]
    assert same_array(got["h.0.attn.c_attn.weight.lora.1.B"], b.blocks[1].B)
    assert len(got) == 2 + 2 + 4 + 2 + 1


def test_save_refuses_non_finite_and_writes_nothing(tmp_path):
    t = linear_target()
    bad = t.with_blocks([Block(**{**t.blocks[0].__dict__, "A": t.blocks[0].A.clone().fill_(float("nan"))})])
    with pytest.raises(NumericError, match=re.escape('target "layers.0.q_proj.weight": tensor '
                                                     '"layers.0.q_proj.weight.lora.0.A" has 30 non-finite values')):
        save(Adapter(targets={bad.key: bad}), tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []


def test_atomic_file_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "out.bin") as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_check_output_refuses_inputs_and_existing(tmp_path):
    src = tmp_path / "a.safetensors"
    src.write_bytes(b"x")
    link = tmp_path / "link.safetensors"
    link.symlink_to(src)
    with pytest.raises(FileError, match="output would overwrite or sit inside input"):
        check_output(src, [src], overwrite=True)
    with pytest.raises(FileError, match="output would overwrite or sit inside input"):
        check_output(link, [src], overwrite=True)
    with pytest.raises(FileError, match=re.escape("already exists; pass --overwrite to replace it")):
        check_output(tmp_path / "a.safetensors", [tmp_path / "other"])
    with pytest.raises(FileError, match="output would overwrite or sit inside input"):
        check_output(tmp_path / "folder" / "x", [tmp_path], overwrite=True)


dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64])
finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)


@st.composite
def targets(draw, key):
    layout = draw(st.sampled_from(["linear", "fan_in_fan_out", "embedding", "conv"]))
    if layout == "conv":
        shape = (draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    else:
        shape = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    tmp = Target(key=key, layout=layout, shape=shape)
    out, inp = tmp.matrix_shape
    blocks = []
    for i in range(draw(st.integers(1, 3))):
        r0 = draw(st.integers(0, out - 1))
        r1 = draw(st.integers(r0 + 1, out))
        c0 = draw(st.integers(0, inp - 1))
        c1 = draw(st.integers(c0 + 1, inp))
        rank = draw(st.integers(1, 4))
        dt = draw(dtypes)
        seed = draw(st.integers(0, 2**31))
        g = torch.Generator().manual_seed(seed)
        blocks.append(Block(rank, draw(finite), draw(st.sampled_from(["standard", "rslora"])), (r0, r1), (c0, c1),
                            torch.randn(rank, c1 - c0, generator=g).to(dt), torch.randn(r1 - r0, rank, generator=g)
                            .to(dt)))
    return tmp.with_blocks(blocks)


names = st.text(alphabet=st.characters(codec="utf-8", categories=["L", "N", "P", "S"]), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), keys=st.lists(names, min_size=1, max_size=4, unique=True),
       meta=st.dictionaries(st.text(max_size=8).filter(lambda k: not k.startswith("loratool.")), st.text(max_size=8),
                            max_size=3))
def test_save_load_is_identity(tmp_path, data, keys, meta):
    a = Adapter(targets={k: data.draw(targets(k)) for k in keys}, metadata=meta)
    path = tmp_path / "h.safetensors"
    if path.exists():
        path.unlink()
    save(a, path)
    b = load(path)
    _assert_same(a, b)
    for k in keys:
        assert torch.equal(dense_delta(a.targets[k]), dense_delta(b.targets[k]))


def test_public_api_lazy_and_complete(tmp_path):
    save(Adapter(targets={"x.weight": fused_target("x.weight")}), tmp_path / "a.safetensors")
    rep = loratool.validate(tmp_path / "a.safetensors")
    assert rep.errors == [] and rep.warnings == []
    assert loratool.load(tmp_path / "a.safetensors").targets["x.weight"].rank == 4
