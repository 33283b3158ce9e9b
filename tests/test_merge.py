"""`loratool merge`: equality with PEFT, loralib and kohya formulas; unmerge; bases of every kind; refusals."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from builders import conv_target, fused_target, linear_target, rand
from ulp import assert_within_ulp
from loratool import spec
from loratool.adapter import Adapter, whole_target
from loratool.cli import cli
from loratool.tasks.merge import merge as run_merge
from loratool.container import read_header, write_file
from loratool.errors import FileError, MismatchError, NumericError, SpecError
from loratool.io.native import save
from loratool.ops.merge import Merger, Term, merge_tensor, plan_merge

BF16_TOL = 2.0 ** -8  # one bf16 rounding, relative to the merged magnitude


def load_st(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def adapter_from_peft(pm, path):
    """A native adapter holding exactly the PeftModel's lora_A/lora_B (and layout) as base-key targets."""
    targets = []
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            key = name.removeprefix("base_model.model.") + ".weight"
            W = mod.base_layer.weight
            layout = "fan_in_fan_out" if mod.fan_in_fan_out else "linear"
            rule = "rslora" if mod.use_rslora["default"] else "standard"
            A = mod.lora_A["default"].weight.detach().float().clone()
            B = mod.lora_B["default"].weight.detach().float().clone()
            targets.append(whole_target(key, layout, tuple(W.shape), A, B, mod.lora_alpha["default"], rule))
    save(Adapter({t.key: t for t in targets}), path)
    return path


def peft_case(tmp_path, build, dtype=torch.float32, **cfg):
    """(base file, adapter file, PEFT's merge_and_unload state dict) for a tiny model."""
    from models import base_state_dict, peft_model

    model = build().to(dtype)
    base = tmp_path / "base.safetensors"
    write_file(base, base_state_dict(model), {"format": "pt"})
    pm = peft_model(model, **cfg)
    ad = adapter_from_peft(pm, tmp_path / "adapter.safetensors")
    oracle = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return base, ad, oracle


def assert_equal_sd(got, want):
    assert set(got) == set(want)
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, f"differ: {bad}"


def assert_like_peft(got, want):
    """Within one rounding of PEFT's merged weights: the same float32 operations in the same order, but the
    BLAS may sum the r products of an element in another order (one ulp of the output dtype at most; two
    for float32, whose ulp is the size of that reordering's error)."""
    ulps = 2 if all(v.dtype == torch.float32 for v in want.values()) else 1
    assert_within_ulp(got, want, ulps=ulps, identical=0.99)


# ---- equality with PEFT's merge_and_unload -------------------------------------------------------------

@pytest.mark.parametrize("name,cfg", [
    ("tiny_llama", {}),
    ("tiny_llama", {"use_rslora": True, "r": 8, "lora_alpha": 4}),
    ("tiny_gpt2", {"fan_in_fan_out": True, "target_modules": ["c_attn", "c_proj", "c_fc"]}),
    ("tiny_neox", {}),
])
def test_merge_equals_peft_bit_for_bit(tmp_path, name, cfg):
    import models

    base, ad, oracle = peft_case(tmp_path, getattr(models, name), **cfg)
    out = tmp_path / "out.safetensors"
    s = run_merge(base, [ad], out, verify=True)
    assert_like_peft(load_st(out), oracle)
    assert s.targets == len(json.loads(read_header(ad).metadata["loratool.targets"])) == len(s.probe_errors)
    assert s.verify["max_rel_error"] < 1e-6  # float32 output: rounding only


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_base_equals_peft_bit_for_bit(tmp_path, dtype):
    from models import tiny_llama

    base, ad, oracle = peft_case(tmp_path, tiny_llama, dtype=dtype)
    out = tmp_path / "out.safetensors"
    run_merge(base, [ad], out)
    got = load_st(out)
    assert all(v.dtype == dtype for v in got.values())
    assert_like_peft(got, oracle)  # float32 arithmetic, one rounding to bf16, like PEFT's unsafe merge


@pytest.mark.parametrize("name,cfg", [("tiny_llama", {}), ("tiny_gpt2", {"target_modules": ["c_attn", "c_fc"]})])
def test_peft_folder_read_by_the_peft_dialect(tmp_path, name, cfg):
    """The adapter as PEFT saves it (save_pretrained folder), read through load_adapter with the base."""
    import models
    from models import base_state_dict, peft_model

    model = getattr(models, name)()
    write_file(tmp_path / "base.safetensors", base_state_dict(model), {"format": "pt"})
    pm = peft_model(model, **cfg)
    pm.save_pretrained(tmp_path / "adapter")
    oracle = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    s = run_merge(tmp_path / "base.safetensors", [tmp_path / "adapter"], tmp_path / "out.safetensors", verify=True)
    assert_like_peft(load_st(tmp_path / "out.safetensors"), oracle)
    assert s.targets > 0 and s.skipped == []


# ---- loralib target index, kohya conv, several adapters -----------------------------------------------

def test_loralib_target_index_fan_in_fan_out(tmp_path):
    t = fused_target(d=8, rank=2, alpha=4.0)  # blocks on rows [0, 8) and [16, 24) of M = W^T (24, 8)
    W = rand(8, 24, seed=99)
    write_file(tmp_path / "b.safetensors", {t.key: W}, {})
    save(Adapter({t.key: t}), tmp_path / "a.safetensors")
    run_merge(tmp_path / "b.safetensors", [tmp_path / "a.safetensors"], tmp_path / "o.safetensors")
    # loralib MergedLinear.eval(): zero-pad the enabled groups' B@A into (out, in), scale, transpose (fan_in_fan_out).
    delta = torch.zeros(24, 8)
    for b in t.blocks:
        delta[b.rows[0]:b.rows[1]] = b.B @ b.A
    want = W + (delta * (4.0 / 2)).T
    got = load_st(tmp_path / "o.safetensors")[t.key]
    assert torch.allclose(got, want, rtol=0, atol=1e-6)  # float32; loralib sums in a different order


def test_kohya_conv_formula(tmp_path):
    t = conv_target(out=6, inp=4, k=3, rank=2, alpha=2.0)
    W = rand(6, 4, 3, 3, seed=98)
    write_file(tmp_path / "b.safetensors", {t.key: W}, {})
    save(Adapter({t.key: t}), tmp_path / "a.safetensors")
    run_merge(tmp_path / "b.safetensors", [tmp_path / "a.safetensors"], tmp_path / "o.safetensors")
    b = t.blocks[0]
    up, down = b.B.reshape(6, 2, 1, 1), b.A.reshape(2, 4, 3, 3)  # kohya stores lora_up (out, r, 1, 1)
    want = W + (up.squeeze(3).squeeze(2) @ down.flatten(start_dim=1)).reshape(W.shape) * (2.0 / 2)
    assert torch.equal(load_st(tmp_path / "o.safetensors")[t.key], want)


def test_several_adapters_with_weights_and_scale(tmp_path):
    t1, t2 = linear_target(seed=1), linear_target(seed=5, rank=2, alpha=1.0)
    W = rand(12, 10, seed=97)
    write_file(tmp_path / "b.safetensors", {t1.key: W, "other": rand(3, seed=3)}, {})
    save(Adapter({t1.key: t1}), tmp_path / "a1.safetensors")
    save(Adapter({t2.key: t2}), tmp_path / "a2.safetensors")
    run_merge(tmp_path / "b.safetensors", [tmp_path / "a1.safetensors", tmp_path / "a2.safetensors"],
              tmp_path / "o.safetensors", weights=[1.0, -0.5], scale=2.0)
    d1 = (t1.blocks[0].B @ t1.blocks[0].A) * t1.blocks[0].scale
    d2 = (t2.blocks[0].B @ t2.blocks[0].A) * t2.blocks[0].scale
    got = load_st(tmp_path / "o.safetensors")
    assert torch.allclose(got[t1.key], W + 2.0 * d1 - 1.0 * d2, rtol=0, atol=1e-5)  # float32 sums
    assert torch.equal(got["other"], rand(3, seed=3))


# ---- unmerge --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_then_unmerge_returns_the_base(tmp_path, dtype):
    from models import tiny_llama

    base, ad, _ = peft_case(tmp_path, tiny_llama, dtype=dtype)
    run_merge(base, [ad], tmp_path / "m.safetensors")
    run_merge(tmp_path / "m.safetensors", [ad], tmp_path / "u.safetensors", unmerge=True, verify=True)
    W, M, U = load_st(base), load_st(tmp_path / "m.safetensors"), load_st(tmp_path / "u.safetensors")
    for k in W:
        # W'' = round(round(W + d) - d): one rounding of W' (float32: 2^-24, bf16: 2^-8 relative) each way.
        ulp = 2.0 ** -23 if dtype == torch.float32 else BF16_TOL
        err = (U[k].float() - W[k].float()).abs()
        assert bool((err <= ulp * M[k].float().abs().maximum(W[k].float().abs())).all()), k
    assert any(not torch.equal(M[k], W[k]) for k in W)


def test_unmerge_is_exact_when_the_sum_is_exact(tmp_path):
    # Integers well inside 2^24 make W + d exact in float32, so W + d - d == W bit for bit.
    A = torch.tensor([[1.0, 2.0, 0.0]])  # (1, 3)
    B = torch.tensor([[3.0], [-1.0]])  # (2, 1)
    t = whole_target("w", "linear", (2, 3), A, B, alpha=1.0)
    W = torch.tensor([[5.0, -7.0, 9.0], [11.0, 13.0, -15.0]])
    merged, _ = merge_tensor(W, "w", [Term(t, 1.0)])
    back, _ = merge_tensor(merged, "w", [Term(t, -1.0)])
    assert np.array_equal(merged, (W + B @ A).numpy()) and np.array_equal(back, W.numpy())


# ---- bases and outputs of every kind ---------------------------------------------------------------------

def write_sharded(folder, tensors, n_shards=2):
    folder.mkdir()
    keys = sorted(tensors)
    weight_map = {}
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::n_shards]}
        write_file(folder / name, part, {"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0},
                                                                      "weight_map": weight_map}))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def small_case(tmp_path, dtype=torch.float32):
    t = linear_target(seed=2)
    tensors = {t.key: rand(12, 10, seed=96, dtype=dtype), "layers.0.k_proj.weight": rand(12, 10, seed=95, dtype=dtype),
               "embed.weight": rand(16, 10, seed=94, dtype=dtype), "step": torch.tensor([3], dtype=torch.int64)}
    save(Adapter({t.key: t}), tmp_path / "a.safetensors")
    d = (t.blocks[0].B @ t.blocks[0].A) * t.blocks[0].scale
    want = dict(tensors)
    want[t.key] = (tensors[t.key].float() + d).to(dtype)
    return tensors, tmp_path / "a.safetensors", want


def test_sharded_folder_keeps_shards_and_copies_other_files(tmp_path):
    tensors, ad, want = small_case(tmp_path)
    base = write_sharded(tmp_path / "base", tensors)
    out = tmp_path / "out"
    s = run_merge(base, [ad], out)
    assert s.format == "folder" and s.targets == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())
    assert (out / "config.json").read_text() == '{"model_type": "llama"}'
    index = json.loads((out / "model.safetensors.index.json").read_text())
    got = {}
    for name in set(index["weight_map"].values()):
        got.update(load_st(out / name))
    assert_equal_sd(got, want)
    # Shards nobody touched, and the headers, are byte-for-byte copies.
    for name in set(index["weight_map"].values()):
        src, dst = (base / name).read_bytes(), (out / name).read_bytes()
        assert len(src) == len(dst) and src[:read_header(base / name).data_start] == \
            dst[:read_header(out / name).data_start]
        if "layers.0.q_proj.weight" not in load_st(base / name):
            assert src == dst


def test_pt_base_keeps_torch_format(tmp_path):
    tensors, ad, want = small_case(tmp_path)
    torch.save(tensors, tmp_path / "base.pt")
    run_merge(tmp_path / "base.pt", [ad], tmp_path / "out.pt")
    assert_equal_sd(torch.load(tmp_path / "out.pt", weights_only=True), want)


def test_pt_base_to_safetensors_and_folder_to_single_file(tmp_path):
    tensors, ad, want = small_case(tmp_path)
    torch.save(tensors, tmp_path / "base.bin")
    run_merge(tmp_path / "base.bin", [ad], tmp_path / "out.safetensors")
    assert_equal_sd(load_st(tmp_path / "out.safetensors"), want)
    base = write_sharded(tmp_path / "folder", tensors)
    run_merge(base, [ad], tmp_path / "one.safetensors")
    assert_equal_sd(load_st(tmp_path / "one.safetensors"), want)


def test_dtype_option_casts_every_float_tensor(tmp_path):
    tensors, ad, want = small_case(tmp_path, dtype=torch.bfloat16)
    write_file(tmp_path / "b.safetensors", tensors, {})
    run_merge(tmp_path / "b.safetensors", [ad], tmp_path / "o.safetensors", dtype="F32")
    got = load_st(tmp_path / "o.safetensors")
    assert got["step"].dtype == torch.int64 and got["embed.weight"].dtype == torch.float32
    assert torch.equal(got["embed.weight"], tensors["embed.weight"].float())


def test_fp16_overflow_is_refused_unless_dtype_widens(tmp_path):
    t = linear_target(seed=2, alpha=3.0e5)  # scale 1e5: the merged values pass 65504
    W = rand(12, 10, seed=96, dtype=torch.float16)
    write_file(tmp_path / "b.safetensors", {t.key: W}, {})
    save(Adapter({t.key: t}), tmp_path / "a.safetensors")
    with pytest.raises(NumericError, match=re.escape('target "layers.0.q_proj.weight": merged value')) as e:
        run_merge(tmp_path / "b.safetensors", [tmp_path / "a.safetensors"], tmp_path / "o.safetensors")
    assert "overflows F16; pass --dtype float32" in str(e.value)
    assert not (tmp_path / "o.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    run_merge(tmp_path / "b.safetensors", [tmp_path / "a.safetensors"], tmp_path / "o.safetensors", dtype="F32")
    assert load_st(tmp_path / "o.safetensors")[t.key].dtype == torch.float32


# ---- refusals: nothing written ------------------------------------------------------------------------

def no_output(tmp_path, out):
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_mismatches_are_all_listed_before_writing(tmp_path):
    a = linear_target("layers.0.q_proj.weight", out=12, inp=10)
    b = linear_target("layers.9.q_proj.weight", out=12, inp=10)
    c = linear_target("step", out=12, inp=10)
    write_file(tmp_path / "b.safetensors",
               {a.key: rand(10, 12, seed=1), "step": torch.zeros(12, 10, dtype=torch.int32)}, {})
    save(Adapter({t.key: t for t in (a, b, c)}), tmp_path / "a.safetensors")
    out = tmp_path / "o.safetensors"
    with pytest.raises(MismatchError) as e:
        run_merge(tmp_path / "b.safetensors", [tmp_path / "a.safetensors"], out)
    ad = str(tmp_path / "a.safetensors")
    assert str(e.value) == (
        f'3 adapter targets do not fit the base: {ad}: target "layers.0.q_proj.weight" has shape [12, 10] but the '
        f'base tensor is [10, 12] (rule B002); {ad}: target "layers.9.q_proj.weight" is not in the base (rule B001); '
        f'{ad}: target "step": base tensor is I32, {spec.QUANTIZED_REFUSAL} (rule B003); '
        "use the adapter's own base, or pass --allow-partial to skip them")
    no_output(tmp_path, out)


def test_allow_partial_skips_and_reports(tmp_path):
    a, b = linear_target("x.weight"), linear_target("missing.weight")
    write_file(tmp_path / "b.safetensors", {"x.weight": rand(12, 10, seed=1)}, {})
    save(Adapter({t.key: t for t in (a, b)}), tmp_path / "a.safetensors")
    s = run_merge(tmp_path / "b.safetensors", [tmp_path / "a.safetensors"], tmp_path / "o.safetensors",
                  allow_partial=True)
    assert s.targets == 1 and len(s.skipped) == 1 and "missing.weight" in s.skipped[0]


def test_index_pointing_outside_the_folder_is_refused(tmp_path):
    tensors, ad, _ = small_case(tmp_path)
    base = write_sharded(tmp_path / "base", tensors)
    idx = json.loads((base / "model.safetensors.index.json").read_text())
    first = sorted(idx["weight_map"])[0]
    idx["weight_map"][first] = "../evil.safetensors"
    (base / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(SpecError, match=re.escape('shard "../evil.safetensors" is not a file name inside the folder')):
        run_merge(base, [ad], tmp_path / "out")
    no_output(tmp_path, tmp_path / "out")


def test_missing_shard_is_refused(tmp_path):
    tensors, ad, _ = small_case(tmp_path)
    base = write_sharded(tmp_path / "base", tensors)
    (base / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileError, match=re.escape('shard "model-00002-of-00002.safetensors" is missing')):
        run_merge(base, [ad], tmp_path / "out")
    no_output(tmp_path, tmp_path / "out")


def test_torch_base_that_is_not_weights_only_is_refused(tmp_path):
    tensors, ad, _ = small_case(tmp_path)
    torch.save({"w": tensors["embed.weight"], "obj": Adapter({})}, tmp_path / "evil.pt")
    with pytest.raises(SpecError, match=re.escape(f"{tmp_path / 'evil.pt'}: not a weights-only torch state dict")):
        run_merge(tmp_path / "evil.pt", [ad], tmp_path / "out.pt")
    no_output(tmp_path, tmp_path / "out.pt")


def test_truncated_shard_is_refused(tmp_path):
    tensors, ad, _ = small_case(tmp_path)
    base = write_sharded(tmp_path / "base", tensors)
    shard = base / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(SpecError, match="rule C009"):
        run_merge(base, [ad], tmp_path / "out")
    no_output(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("where", ["same", "symlink", "inside"])
def test_output_that_is_an_input_is_refused(tmp_path, where):
    tensors, ad, _ = small_case(tmp_path)
    base = write_sharded(tmp_path / "base", tensors)
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    out = {"same": base, "symlink": tmp_path / "link", "inside": base / "sub"}[where]
    if where == "symlink":
        os.symlink(base, out)
    with pytest.raises(FileError, match="output would overwrite or sit inside input"):
        run_merge(base, [ad], out, overwrite=True)
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before


def test_existing_output_needs_overwrite(tmp_path):
    tensors, ad, want = small_case(tmp_path)
    write_file(tmp_path / "b.safetensors", tensors, {})
    (tmp_path / "o.safetensors").write_bytes(b"old")
    with pytest.raises(FileError, match=re.escape("already exists; pass --overwrite to replace it")):
        run_merge(tmp_path / "b.safetensors", [ad], tmp_path / "o.safetensors")
    run_merge(tmp_path / "b.safetensors", [ad], tmp_path / "o.safetensors", overwrite=True)
    assert_equal_sd(load_st(tmp_path / "o.safetensors"), want)


# ---- verify probe ---------------------------------------------------------------------------------------

def test_probe_catches_a_wrong_orientation():
    t = linear_target("w", out=12, inp=12, seed=3)
    W = rand(12, 12, seed=4)
    good = Merger("w", (12, 12), "F32", [Term(t, 1.0)], "F32", probe=True)
    good.block(W, 0)
    assert good.probe_error() < 1e-6  # float32 rounding only
    from loratool.device import cpu
    from loratool.ops.merge import _pieces

    wrong = Merger("w", (12, 12), "F32", [Term(t, 1.0)], "F32", probe=True)
    wrong.pieces = _pieces(wrong.terms, cpu(), "F32")  # built ahead of the first block, to be broken
    wrong.pieces[0].transposed = True  # a merge that applies (B @ A)^T
    wrong.pieces[0].r0, wrong.pieces[0].r1 = 0, 12
    wrong.block(W, 0)
    assert wrong.probe_error() > 0.05


def test_plan_rejects_weight_count():
    t = linear_target()
    with pytest.raises(MismatchError, match=re.escape("--weights has 2 values for 1 adapters")):
        plan_merge([("a", Adapter({t.key: t}))], lambda k: ((12, 10), "F32"), weights=[1, 2])


# ---- CLI ------------------------------------------------------------------------------------------------

def test_cli_json_summary_and_error_line(tmp_path):
    tensors, ad, want = small_case(tmp_path)
    write_file(tmp_path / "b.safetensors", tensors, {})
    r = CliRunner().invoke(cli, ["merge", str(tmp_path / "b.safetensors"), str(ad), "-o",
                                 str(tmp_path / "o.safetensors"), "--json", "--verify"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["targets"] == 1 and doc["operation"] == "merge" and doc["verify"]["max_rel_error"] < 1e-6
    r = CliRunner().invoke(cli, ["merge", str(tmp_path / "b.safetensors"), str(ad), "-o",
                                 str(tmp_path / "o.safetensors")])
    assert r.exit_code == FileError.exit_code
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


@pytest.mark.gpu
def test_cuda_equals_cpu(tmp_path):
    tensors, ad, want = small_case(tmp_path)
    write_file(tmp_path / "b.safetensors", tensors, {})
    run_merge(tmp_path / "b.safetensors", [ad], tmp_path / "c.safetensors", device="cuda")
    assert_like_peft(load_st(tmp_path / "c.safetensors"), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_device_layers_torch_path_merges_as_numpy_does(dtype):
    """The lines --device cuda runs (torch tensors through loratool.device), run here on the CPU: they give the
    numpy route's result within one ulp of the output dtype (two for float32), for every layout."""
    import array_api_compat.torch as txp

    from loratool.device import Device

    torch_cpu = Device("cpu:0", txp)  # not "cpu": the device layer takes its torch branch
    for t in (linear_target(out=300, inp=70), fused_target(d=40), conv_target()):
        W = rand(*t.shape, seed=7, dtype=dtype)
        got, e1 = merge_tensor(W, t.key, [Term(t, 1.5)], device=torch_cpu, probe=True)
        want, e2 = merge_tensor(W, t.key, [Term(t, 1.5)], probe=True)
        assert_within_ulp({t.key: got}, {t.key: want}, ulps=2 if dtype == torch.float32 else 1)
        assert got.dtype == want.dtype and e1 < 1e-2 and e2 < 1e-2


# ---- the background copy (the CLI's path: torch not yet imported) ------------------------------------

def test_background_copy_gives_the_same_output(tmp_path):
    tensors, ad, want = small_case(tmp_path)
    base = write_sharded(tmp_path / "base", tensors)
    run_merge(base, [ad], tmp_path / "a", speculate=True)
    run_merge(base, [ad], tmp_path / "b", speculate=False)
    for p in (tmp_path / "a").iterdir():
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes(), p.name


def test_background_copy_then_mismatch_leaves_nothing(tmp_path):
    t = linear_target("not.in.base")
    tensors, _, _ = small_case(tmp_path)
    base = write_sharded(tmp_path / "base", tensors)
    save(Adapter({t.key: t}), tmp_path / "bad.safetensors")
    with pytest.raises(MismatchError, match=re.escape('target "not.in.base" is not in the base (rule B001)')):
        run_merge(base, [tmp_path / "bad.safetensors"], tmp_path / "out", speculate=True)
    no_output(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("alpha", [8.0, 6.0, -4.0])
def test_bf16_merge_is_within_one_ulp_of_product_then_scale(alpha):
    A, B = rand(4, 300, seed=11), rand(200, 4, seed=12) * 0.01
    t = whole_target("w", "linear", (200, 300), A, B, alpha=alpha)
    W = rand(200, 300, seed=13, dtype=torch.bfloat16)
    got, _ = merge_tensor(W, "w", [Term(t, 1.0)])
    want = W.clone()
    want += (B @ A) * (alpha / 4)  # PEFT's unsafe merge
    assert_within_ulp({"w": got}, {"w": want}, ulps=1, identical=0.99)


@pytest.mark.parametrize("weights_name", ["model.safetensors", "pytorch_model.bin"])
def test_unsharded_folder_keeps_its_file_and_copies_the_rest(tmp_path, weights_name):
    tensors, ad, want = small_case(tmp_path)
    base = tmp_path / "base"
    base.mkdir()
    if weights_name.endswith(".bin"):
        torch.save(tensors, base / weights_name)
    else:
        write_file(base / weights_name, tensors, {"format": "pt"})
    (base / "tokenizer.json").write_text("{}")
    run_merge(base, [ad], tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([weights_name, "tokenizer.json"])
    got = torch.load(tmp_path / "out" / weights_name, weights_only=True) if weights_name.endswith(".bin") \
        else load_st(tmp_path / "out" / weights_name)
    assert_equal_sd(got, want)


def test_tensor_in_two_shards_is_refused(tmp_path):
    tensors, ad, _ = small_case(tmp_path)
    base = write_sharded(tmp_path / "base", tensors)
    idx = json.loads((base / "model.safetensors.index.json").read_text())
    key, shard = sorted(idx["weight_map"].items())[0]
    other = next(n for n in set(idx["weight_map"].values()) if n != shard)
    extra = load_st(base / other)
    extra[key] = tensors[key]
    write_file(base / other, extra, {"format": "pt"})
    with pytest.raises(SpecError, match=re.escape(f'"{key}" is in shard {other} but the index does not map it')):
        run_merge(base, [ad], tmp_path / "out")
    no_output(tmp_path, tmp_path / "out")


def test_output_suffix_chooses_the_format_and_unknown_ones_are_refused(tmp_path):
    tensors, ad, want = small_case(tmp_path)
    write_file(tmp_path / "b.safetensors", tensors, {})
    r = CliRunner().invoke(cli, ["merge", str(tmp_path / "b.safetensors"), str(ad), "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "not as .gguf" in r.output
    assert not (tmp_path / "m.gguf").exists()
    s = run_merge(tmp_path / "b.safetensors", [ad], str(tmp_path / "newdir") + "/")
    assert s.format == "folder" and sorted(p.name for p in (tmp_path / "newdir").iterdir()) == ["model.safetensors"]
    assert_like_peft(load_st(tmp_path / "newdir" / "model.safetensors"), want)


def test_in_memory_adapters_merge_like_their_files(tmp_path):
    tensors, ad, want = small_case(tmp_path)
    write_file(tmp_path / "b.safetensors", tensors, {})
    from loratool.io.native import load

    adapter = load(ad)
    s = run_merge(tmp_path / "b.safetensors", adapter, tmp_path / "m.safetensors", weights=[1.0])
    assert s.adapters == ["adapter 1"] and s.targets == 1
    assert_like_peft(load_st(tmp_path / "m.safetensors"), want)
    both = run_merge(tmp_path / "b.safetensors", [adapter, ad], tmp_path / "u.safetensors", weights=[1.0, -1.0])
    assert both.adapters == ["adapter 1", str(ad)]
    got = load_st(tmp_path / "u.safetensors")
    for k, v in tensors.items():  # W + d - d in float32: half an ulp of |W + d| < 16 (2^-21) each way
        assert torch.allclose(got[k].float(), v.float(), rtol=0, atol=8 * 2.0 ** -23), k


def test_dtype_option_updates_the_config_so_transformers_loads_that_dtype(tmp_path):
    tensors, ad, want = small_case(tmp_path, dtype=torch.float16)
    base = write_sharded(tmp_path / "base", tensors)
    (base / "config.json").write_text('{"model_type": "llama", "torch_dtype": "float16"}')
    run_merge(base, [ad], tmp_path / "out", dtype="float32")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float32"
    run_merge(base, [ad], tmp_path / "same")
    assert (tmp_path / "same" / "config.json").read_text() == (base / "config.json").read_text()


@pytest.mark.parametrize("base_name,out_name", [("b.safetensors", "o.safetensors"), ("b.pt", "o.pt")])
def test_a_recorded_fingerprint_is_checked_on_the_bytes_merged(tmp_path, base_name, out_name):
    """Rule B004: a target recording its base tensor's sha256 merges into that base and refuses any other
    (the digest is taken of the bytes the merge reads, for safetensors and torch bases alike)."""
    import dataclasses
    import hashlib

    from loratool.io.native import load

    tensors, ad, want = small_case(tmp_path)
    if base_name.endswith(".pt"):
        torch.save(tensors, tmp_path / base_name)
    else:
        write_file(tmp_path / base_name, tensors, {})
    a = load(ad)
    key = next(iter(a.targets))
    right = hashlib.sha256(tensors[key].numpy().tobytes()).hexdigest()
    for sha, ok in ((right, True), ("0" * 64, False)):
        t = dataclasses.replace(a.targets[key], sha256=sha)
        save(Adapter({key: t}), tmp_path / "fp.safetensors")
        out = tmp_path / out_name
        if ok:
            run_merge(tmp_path / base_name, [tmp_path / "fp.safetensors"], out, overwrite=True)
            assert out.exists()
        else:
            out.unlink()
            with pytest.raises(MismatchError, match=re.escape(f"this base has {right[:12]}... (rule B004)")):
                run_merge(tmp_path / base_name, [tmp_path / "fp.safetensors"], out)
            assert not out.exists()
