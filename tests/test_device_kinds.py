"""The lines `--device cuda` runs, on the CPU, for what merge learned after its first device test: LyCORIS kinds
and DoRA (a dense delta, a row-norm rescale), fused mixture-of-experts tensors, float8 bases requantized with
their scheme and quantized bases dequantized. Each merge runs twice, through the numpy device and through the
torch one (array-api-compat's torch namespace on the CPU: every Device method takes its torch branch), and the
two outputs must agree within one ulp of the output dtype (two for float32: a BLAS may sum products in
another order)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import loratool
from loratool import device as devices
from loratool.container import read_arrays, read_header, write_file
from ulp import ulp_distance


def _torch_device(mp) -> None:
    import array_api_compat.torch as xp

    dev = devices.Device("cpu:0", xp)  # not "cpu": the torch side of every Device method
    assert not dev.is_cpu
    mp.setattr(devices, "session", lambda name: contextlib.nullcontext(dev))


# The torch branch on the CPU everywhere; on a real GPU too where there is one (marked gpu: skipped without CUDA,
# run by benchmarks/gpu_check.sh).
DEVICES = ["torch-cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _both(base, adapter, tmp_path, where: str = "torch-cpu", **kw) -> None:
    """Merge through both device branches; outputs agree within one ulp (two for float32), with --verify."""
    loratool.merge(base, adapter, tmp_path / "numpy.safetensors", verify=True, **kw)
    with pytest.MonkeyPatch.context() as mp:
        if where == "torch-cpu":
            _torch_device(mp)
        loratool.merge(base, adapter, tmp_path / "torch.safetensors", verify=True,
                       device="cuda" if where == "cuda" else "cpu", **kw)
    a = read_arrays(tmp_path / "numpy.safetensors", read_header(tmp_path / "numpy.safetensors"))
    b = read_arrays(tmp_path / "torch.safetensors", read_header(tmp_path / "torch.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        if a[k].dtype.kind == "f" and a[k].dtype.itemsize >= 2:
            ulps = 2 if a[k].dtype == np.float32 else 1
            assert ulp_distance(a[k], b[k]).max() <= ulps, k
        else:  # float8 and integer tensors: the requantization of the same float32 values
            assert np.mean(a[k].view(np.uint8) == b[k].view(np.uint8)) > 0.999, k


@pytest.mark.parametrize("where", DEVICES)
@pytest.mark.parametrize("label", ["loha-conv", "lokr-w2-decomposed", "dora-locon"])
def test_lycoris_kinds_and_dora_on_the_torch_device(tmp_path, label, where):
    from test_lycoris import CASES, NAME, build, write

    _, cls, kw, conv = next(c for c in CASES if c[0] == label)
    layer, W0, m = build(cls, kw, conv)
    # A kohya name maps to a base key through the base: a one-tensor base whose key the name spells.
    key = NAME.removeprefix("lora_unet_").replace("_", ".") + ".weight"
    save_file({key: W0.contiguous()}, str(tmp_path / "base.safetensors"))
    _both(tmp_path / "base.safetensors", write(tmp_path, m), tmp_path, where)


@pytest.mark.parametrize("where", DEVICES)
def test_fused_experts_on_the_torch_device(tmp_path, where):
    from models import tiny_mixtral
    from test_moe import fused_case

    base, peft, _ = fused_case(tmp_path, tiny_mixtral)
    _both(base, peft, tmp_path, where)


@pytest.mark.parametrize("where", DEVICES)
@pytest.mark.parametrize("kind", ["block", "tensor", "channel"])
def test_float8_base_on_the_torch_device(tmp_path, where, kind):
    """Decoding, the merge, the block maxima, the encoder and the survival sums all run on the device."""
    from loratool.adapter import Adapter, Block, Target
    from test_fp8 import _base_file

    name, _ = _base_file(tmp_path / "base.safetensors", kind, rows=300, cols=200)  # partial edge blocks
    rng = np.random.default_rng(9)
    rows = (0, 128) if kind == "block" else (0, 300)  # for "block", the scale blocks below keep their bytes
    blk = Block(2, 2.0, "standard", rows, (0, 200), rng.standard_normal((2, 200)).astype(np.float32) * 0.3,
                rng.standard_normal((rows[1], 2)).astype(np.float32) * 0.3)
    ad = Adapter(targets={name: Target(key=name, layout="linear", shape=(300, 200), blocks=(blk,))})
    loratool.save(ad, tmp_path / "ad.safetensors")
    _both(tmp_path / "base.safetensors", tmp_path / "ad.safetensors", tmp_path, where)


@pytest.mark.parametrize("where", DEVICES)
def test_float8_base_with_dora_on_the_torch_device(tmp_path, where):
    """DoRA on a float8 weight: the rows reach the merger on the device, and --verify's float64 reference
    (DoRA is not linear in ΔW) reads them from there."""
    import dataclasses

    from loratool.adapter import Adapter, whole_target
    from test_fp8 import _base_file

    name, _ = _base_file(tmp_path / "base.safetensors", "block", rows=300, cols=200)
    rng = np.random.default_rng(1)
    t = whole_target(name, "linear", (300, 200), rng.standard_normal((2, 200)).astype(np.float32) * 0.1,
                     rng.standard_normal((300, 2)).astype(np.float32) * 0.1, alpha=2.0)
    t = dataclasses.replace(t, kind="dora", magnitude=(np.abs(rng.standard_normal(300)) + 0.5).astype(np.float32))
    loratool.save(Adapter(targets={name: t}), tmp_path / "ad.safetensors")
    _both(tmp_path / "base.safetensors", tmp_path / "ad.safetensors", tmp_path, where)


def test_float8_dequantized_merge_on_the_torch_device(tmp_path):
    from test_fp8 import _adapter, _base_file

    name, _ = _base_file(tmp_path / "base.safetensors", "block")
    ad, _ = _adapter(name, 256, 384, size=0.2)
    loratool.save(ad, tmp_path / "ad.safetensors")
    _both(tmp_path / "base.safetensors", tmp_path / "ad.safetensors", tmp_path, dtype="bfloat16")


def test_a_plain_lora_on_a_bf16_base_still_agrees(tmp_path):
    """The reference case of tests/test_merge.py's device test, through the whole task."""
    from loratool.adapter import Adapter, whole_target

    rng = np.random.default_rng(3)
    W = torch.from_numpy(rng.standard_normal((64, 48)).astype(np.float32)).to(torch.bfloat16)
    write_file(tmp_path / "base.safetensors", {"l.weight": W}, {})
    t = whole_target("l.weight", "linear", (64, 48), rng.standard_normal((4, 48)).astype(np.float32),
                     rng.standard_normal((64, 4)).astype(np.float32), 8.0)
    loratool.save(Adapter({t.key: t}), tmp_path / "ad.safetensors")
    _both(tmp_path / "base.safetensors", tmp_path / "ad.safetensors", tmp_path)
