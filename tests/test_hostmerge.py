"""The torch-free merge route: torch's MKL sgemm through ctypes, numpy conversions, and bit-identity with the
torch route (and so with PEFT) on every layout, dtype and block boundary."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from builders import conv_target, full_target, fused_target, linear_target, rand
from loratool.adapter import GEMM_MIN_ROWS, Adapter, row_spans, whole_target
from loratool.cli.merge_cmd import run_merge
from loratool.container import write_file
from loratool.errors import NumericError
from loratool.hostarray import HostTensor, first_nonfinite, from_f32, to_f32
from loratool.io.native import save
from loratool.ops import blas

ROOT = Path(__file__).resolve().parents[1]
X86_LINUX = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")
needs_blas = pytest.mark.skipif(not blas.available(), reason="torch's BLAS has no MKL sgemm here (not x86 Linux)")


def bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).numpy()


# ---- torch's sgemm without torch -----------------------------------------------------------------------

def test_blas_is_found_where_torch_ships_mkl():
    # The CI machine and the development machine are x86-64 Linux with torch's CPU wheel, which links MKL:
    # there the fast route must be taken, not silently skipped.
    if X86_LINUX and torch.backends.mkl.is_available():
        assert blas.available()


@needs_blas
@pytest.mark.parametrize("m,k,n", [(5632, 16, 2048), (2048, 16, 5632), (37, 8, 101), (1, 16, 300), (3, 4, 5),
                                   (200, 64, 256), (64, 1, 77)])
def test_gemm_equals_torch_mm_bit_for_bit(m, k, n):
    g = np.random.default_rng(m * 7 + n)
    X = g.standard_normal((m, k)).astype(np.float32)
    Y = (g.standard_normal((k, n)) * 0.01).astype(np.float32)
    out = np.empty((m, n), np.float32)
    blas.single_threaded()
    blas.gemm_f32(X, Y, out)
    assert np.array_equal(out.view(np.int32), torch.mm(torch.from_numpy(X), torch.from_numpy(Y)).numpy().view(np.int32))
    # A window of Y's columns with its row stride, as a transposed piece passes it.
    c0, c1 = n // 3, n // 3 + max(1, n // 2)
    out2 = np.empty((m, c1 - c0), np.float32)
    blas.gemm_f32(X, Y[:, c0:c1], out2)
    want = torch.mm(torch.from_numpy(X), torch.from_numpy(Y)[:, c0:c1]).numpy()
    assert np.array_equal(out2.view(np.int32), want.view(np.int32))


@needs_blas
def test_blocks_of_gemm_min_rows_equal_the_whole_product():
    """What the merge relies on: a product over GEMM_MIN_ROWS rows or more (any offset) rounds as the whole
    product does. (MKL sums thin products, 3 rows or 11 columns or fewer on AVX2, in another order.)"""
    g = np.random.default_rng(5)
    X = g.standard_normal((2048, 16)).astype(np.float32)
    Y = g.standard_normal((16, 5632)).astype(np.float32)
    full = np.empty((2048, 5632), np.float32)
    blas.gemm_f32(X, Y, full)
    for a, w in [(0, GEMM_MIN_ROWS), (100, GEMM_MIN_ROWS), (1000, 2 * GEMM_MIN_ROWS - 1), (2048 - 70, 70)]:
        part = np.empty((w, 5632), np.float32)
        blas.gemm_f32(X[a:a + w], Y, part)
        assert np.array_equal(part, full[a:a + w])
        cols = np.empty((2048, w), np.float32)
        blas.gemm_f32(X, Y[:, a:a + w], cols)
        assert np.array_equal(cols, full[:, a:a + w])


def test_row_spans_never_leave_a_thin_tail():
    for rows in [1, 3, 63, 64, 65, 127, 128, 129, 259, 1000, 5632]:
        for step in [1, 8, 64, 100, 128]:
            spans = row_spans(rows, step)
            assert spans[0][0] == 0 and spans[-1][1] == rows
            assert all(a1 == b0 for (_, a1), (b0, _) in zip(spans, spans[1:]))
            assert all(b - a >= min(rows, GEMM_MIN_ROWS) for a, b in spans)
            assert all(b - a < max(step, GEMM_MIN_ROWS) + GEMM_MIN_ROWS for a, b in spans)
            if len(spans) > 1:
                assert spans[-1][1] - spans[-1][0] >= GEMM_MIN_ROWS


# ---- numpy conversions are torch's ---------------------------------------------------------------------

def edge_values() -> np.ndarray:
    """Finite and infinite float32 values of every magnitude, random bit patterns and exact bf16 ties (no
    NaN: a merge refuses those before rounding)."""
    g = np.random.default_rng(0)
    with np.errstate(over="ignore"):
        x = (g.standard_normal(200_000) * 10.0 ** g.integers(-44, 39, 200_000)).astype(np.float32)
    u = g.integers(0, 2 ** 32, 50_000, dtype=np.uint64).astype(np.uint32)
    u = u[(u & 0x7F800000) != 0x7F800000]  # every finite bit pattern, incl. subnormals and exact bf16 ties
    ties = (g.integers(0, 2 ** 16, 1000).astype(np.uint32) << 16) | 0x8000
    special = np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38, 65504.0, 65520.0, 1e-45, 6e-8],
                       np.float32)
    v = np.concatenate([x, u.view(np.float32), ties.view(np.float32), special])
    return v[~np.isnan(v)]


@pytest.mark.parametrize("st,tdt", [("BF16", torch.bfloat16), ("F16", torch.float16), ("F32", torch.float32)])
def test_rounding_to_each_dtype_equals_torch(st, tdt):
    x = edge_values()
    out = np.empty(x.shape, {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}[st])
    with np.errstate(all="ignore"):
        from_f32(x, st, out)
    want = bits(torch.from_numpy(x).to(tdt))
    assert np.array_equal(out.view(want.dtype), want)
    # and back: widening is exact
    back = np.empty(x.shape, np.float32)
    to_f32(out, st, back)
    assert np.array_equal(back.view(np.int32), bits(torch.from_numpy(x).to(tdt).float()))


@pytest.mark.parametrize("st,tdt", [("BF16", torch.bfloat16), ("F16", torch.float16), ("F32", torch.float32)])
def test_first_nonfinite_finds_inf_and_nan_of_either_sign(st, tdt):
    raw = bits(torch.linspace(-3, 3, 1000).to(tdt)).copy()
    assert first_nonfinite(raw, st) is None
    for i, v in [(7, float("inf")), (500, float("-inf")), (999, float("nan")), (0, -float("nan"))]:
        r = raw.copy()
        r[i] = bits(torch.tensor([v], dtype=tdt))[0]
        assert first_nonfinite(r, st) == i


def test_host_tensor_answers_as_a_torch_tensor():
    t = rand(4, 6, dtype=torch.bfloat16)
    h = HostTensor(bits(t).view(np.uint16), "BF16")
    r = h.reshape(2, -1)
    assert isinstance(r, HostTensor) and r.st_dtype == "BF16" and r.shape == (2, 12) and r.ndim == 2
    assert h.is_floating_point() and h.numel() == 24
    assert torch.equal(h.torch(), t) and np.array_equal(h.float32(), t.float().numpy())
    assert HostTensor(np.array([3], np.int64), "I64").item_float() == 3.0
    assert not HostTensor(np.array([1], np.int64), "I64").is_floating_point()


# ---- the two routes agree bit for bit ------------------------------------------------------------------

def both_routes(tmp_path, base_tensors, adapters, **kw):
    base = tmp_path / "base.safetensors"
    write_file(base, base_tensors, {"format": "pt"})
    paths = []
    for i, ad in enumerate(adapters):
        p = tmp_path / f"a{i}.safetensors"
        save(ad, p)
        paths.append(p)
    outs = {}
    for engine in ("numpy", "torch"):
        out = tmp_path / f"out-{engine}.safetensors"
        outs[engine] = run_merge(base, paths, out, engine=engine, **kw), out.read_bytes()
    return outs


def big_cases():
    # 259 rows: blocks of 64 and a 3-row tail, which must join the block before it (a 3-row product would
    # take MKL's thin kernel and round differently from PEFT's whole product).
    lin = whole_target("layers.0.mlp.up_proj.weight", "linear", (259, 4100), rand(16, 4100, seed=1) * 0.02,
                       rand(259, 16, seed=2) * 0.02, alpha=32.0)
    fio = whole_target("h.0.mlp.c_fc.weight", "fan_in_fan_out", (259, 4100), rand(8, 259, seed=3) * 0.02,
                       rand(4100, 8, seed=4) * 0.02, alpha=3.0)
    emb = whole_target("embed.weight", "embedding", (300, 64), rand(4, 300, seed=5), rand(64, 4, seed=6), alpha=7.0)
    base = {lin.key: rand(259, 4100, seed=7), fio.key: rand(259, 4100, seed=8), emb.key: rand(300, 64, seed=9)}
    return [lin, fio, emb], base


@needs_blas
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("out_dtype", [None, "F32", "BF16", "F16"])
def test_routes_agree_on_layouts_dtypes_and_tails(tmp_path, dtype, out_dtype):
    big, base = big_cases()
    small = [linear_target("layers.1.q_proj.weight", rank=3, alpha=6.0), fused_target(), conv_target(),
             full_target("layers.0.norm.weight")]
    base.update({"layers.1.q_proj.weight": rand(12, 10, seed=10), "h.0.attn.c_attn.weight": rand(8, 24, seed=11),
                 "unet.conv_in.weight": rand(6, 4, 3, 3, seed=12), "layers.0.norm.weight": rand(12, seed=13),
                 "untouched": rand(5, 5, seed=14), "step": torch.tensor([3])})
    base = {k: v.to(dtype) if v.is_floating_point() else v for k, v in base.items()}
    a1 = Adapter({t.key: t for t in big + small})
    a2 = Adapter({t.key: t for t in [linear_target("layers.1.q_proj.weight", rank=2, alpha=1.0, seed=40)]})
    outs = both_routes(tmp_path, base, [a1, a2], weights=[0.7, -0.3], scale=1.5, dtype=out_dtype)
    assert outs["numpy"][1] == outs["torch"][1]
    assert outs["numpy"][0]["targets"] == outs["torch"][0]["targets"] == 7  # q_proj takes both adapters
    assert outs["numpy"][0]["terms"] == 8


@needs_blas
def test_whole_product_reference_with_a_thin_tail(tmp_path):
    """W + (B @ A) * s with PEFT's single whole product, against the block-wise merge of both routes."""
    big, base = big_cases()
    lin, fio = big[0], big[1]
    base = {k: v for k, v in base.items() if k in (lin.key, fio.key)}  # float32: a 1-ulp product difference shows
    outs = both_routes(tmp_path, base, [Adapter({lin.key: lin, fio.key: fio})])
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "out-numpy.safetensors"))
    for t in (lin, fio):
        b = t.blocks[0]
        d = (b.B @ b.A) * b.scale  # PEFT's get_delta_weight: one product, then the scale
        want = base[t.key] + (d.T if t.layout == "fan_in_fan_out" else d)
        assert torch.equal(got[t.key], want), t.key
    assert outs["numpy"][1] == outs["torch"][1]


@needs_blas
def test_unmerge_and_verify_on_the_numpy_route(tmp_path):
    big, base = big_cases()
    base = {k: v.to(torch.bfloat16) for k, v in base.items()}
    ad = tmp_path / "a.safetensors"
    save(Adapter({t.key: t for t in big}), ad)
    write_file(tmp_path / "b.safetensors", base, {})
    s = run_merge(tmp_path / "b.safetensors", [ad], tmp_path / "m.safetensors", verify=True, engine="numpy")
    assert 0 < s["verify"]["max_rel_error"] < 2.0 ** -7
    s = run_merge(tmp_path / "m.safetensors", [ad], tmp_path / "u.safetensors", unmerge=True, verify=True,
                  engine="numpy")
    assert s["operation"] == "unmerge" and s["verify"]["max_rel_error"] < 2.0 ** -7


@needs_blas
def test_numpy_route_refuses_fp16_overflow_naming_the_target(tmp_path):
    t = whole_target("w", "linear", (70, 8), torch.full((1, 8), 300.0), torch.full((70, 1), 300.0), alpha=1.0)
    write_file(tmp_path / "b.safetensors", {"w": torch.zeros(70, 8, dtype=torch.float16)}, {})
    save(Adapter({"w": t}), tmp_path / "a.safetensors")
    with pytest.raises(NumericError, match=r'target "w": merged value 90000 \(row 0\) overflows F16'):
        run_merge(tmp_path / "b.safetensors", [tmp_path / "a.safetensors"], tmp_path / "o.safetensors",
                  engine="numpy")
    assert not (tmp_path / "o.safetensors").exists()


@needs_blas
def test_kohya_and_peft_files_take_the_numpy_route_without_torch(tmp_path):
    """A whole `loratool merge` of safetensors inputs never imports torch (it costs seconds)."""
    from loratool.io import kohya, peft

    t = linear_target("model.layers.0.self_attn.q_proj.weight", out=70, inp=10, rank=3, alpha=6.0)
    base = {t.key: rand(70, 10, seed=3, dtype=torch.bfloat16), "model.norm.weight": rand(10, seed=4)}
    write_file(tmp_path / "base.safetensors", base, {})
    kohya.save(Adapter({t.key: t}), tmp_path / "k.safetensors", prefix="lora_unet_")
    peft.save(Adapter({t.key: t}), tmp_path / "peft")
    save(Adapter({t.key: t}), tmp_path / "n.safetensors")
    outs = []
    for ad in ("k.safetensors", "peft", "n.safetensors"):
        out = tmp_path / f"o-{ad}.safetensors"
        code = ("import sys, runpy; sys.argv = ['loratool', 'merge', *sys.argv[1:]]\n"
                "try:\n    runpy.run_module('loratool', run_name='__main__')\n"
                "except SystemExit as e:\n    assert not e.code, e.code\n"
                "assert 'torch' not in sys.modules, 'torch was imported'\n")
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "base.safetensors"), str(tmp_path / ad),
                            "-o", str(out), "-q"], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]
    ref = tmp_path / "ref.safetensors"
    run_merge(tmp_path / "base.safetensors", [tmp_path / "n.safetensors"], ref, engine="torch")
    assert ref.read_bytes() == outs[2]


def test_an_early_refusal_exits_cleanly_while_the_blas_loads(tmp_path):
    """The library loads in a thread from the start of a merge; a refusal a few milliseconds later must
    still exit with its one line and code (exiting during the library's initialisers aborted the process)."""
    write_file(tmp_path / "b.safetensors", {"w": rand(4, 4)}, {})
    t = linear_target("w", out=4, inp=4)
    save(Adapter({"w": t}), tmp_path / "a.safetensors")
    (tmp_path / "out.safetensors").write_bytes(b"keep")
    for _ in range(2):
        r = subprocess.run([sys.executable, "-m", "loratool", "merge", str(tmp_path / "b.safetensors"),
                            str(tmp_path / "a.safetensors"), "-o", str(tmp_path / "out.safetensors")],
                           capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 6, r.stderr[-2000:]
        assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'out.safetensors'}: already exists; pass "
                                                 "--overwrite to replace it"]
    assert (tmp_path / "out.safetensors").read_bytes() == b"keep"


@needs_blas
def test_torch_file_adapters_merge_on_the_numpy_route(tmp_path):
    """A loralib .pt and a PEFT folder with adapter_model.bin are read with torch; the merge itself still takes
    the numpy route, with the same bytes as the torch route (the readers' `host` option is not a user option)."""
    from loratool.io import peft

    t = linear_target("model.layers.0.self_attn.q_proj.weight", out=70, inp=10, rank=3, alpha=6.0)
    write_file(tmp_path / "base.safetensors", {t.key: rand(70, 10, seed=3, dtype=torch.bfloat16)}, {})
    b = t.blocks[0]
    torch.save({"model.layers.0.self_attn.q_proj.lora_A": b.A, "model.layers.0.self_attn.q_proj.lora_B": b.B},
               tmp_path / "lora.pt")
    peft.save(Adapter({t.key: t}), tmp_path / "peft")
    sd = load_st_file(tmp_path / "peft" / "adapter_model.safetensors")
    (tmp_path / "peft" / "adapter_model.safetensors").unlink()
    torch.save(sd, tmp_path / "peft" / "adapter_model.bin")
    for ad, opts in [(tmp_path / "lora.pt", {"alpha": 6.0}), (tmp_path / "peft", {})]:
        outs = []
        for engine in ("numpy", "torch"):
            out = tmp_path / f"{ad.stem}-{engine}.safetensors"
            s = run_merge(tmp_path / "base.safetensors", [ad], out, engine=engine, reader=opts)
            assert s["route"] == engine and s["targets"] == 1
            outs.append(out.read_bytes())
        assert outs[0] == outs[1], ad


def load_st_file(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@needs_blas
def test_dora_and_saved_whole_tensors_merge_on_both_routes_alike(tmp_path):
    """DoRA modules and saved whole tensors are computed with torch inside the PEFT reader even on the numpy
    route; the merged bytes equal the torch route's."""
    from safetensors.torch import save_file

    from models import base_state_dict, peft_model, tiny_llama

    model = tiny_llama(layers=1)
    save_file(base_state_dict(model), str(tmp_path / "base.safetensors"))
    pm = peft_model(model, target_modules=["q_proj", "down_proj"], use_dora=True, modules_to_save=["lm_head"])
    pm.save_pretrained(str(tmp_path / "peft"))
    outs = []
    for engine in ("numpy", "torch"):
        out = tmp_path / f"{engine}.safetensors"
        s = run_merge(tmp_path / "base.safetensors", [tmp_path / "peft"], out, engine=engine)
        assert s["route"] == engine and s["targets"] >= 2
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
