"""rescale: exact strength changes and optimal (Eckart-Young) truncation from the factors.

The hypothesis strategies here (`skeletons`, `adapters_on`) are shared with test_combine.py: they cover
every layout (plain, rsLoRA, per-target ranks and alphas, fan_in_fan_out, conv, embedding, target index,
overlapping blocks) and full targets, with numpy factors as the readers hold them. Results are numpy arrays;
the dense oracles are numpy's float64 SVDs.
"""

from __future__ import annotations

import json
import math
import re

import ml_dtypes
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from builders import as_numpy_adapter, as_numpy_target, full_target, fused_target, linear_target, rand, sample_adapter
from loratool.adapter import Adapter, Block, Target, matrix_shape, whole_target
from loratool import save
from loratool.cli import cli
from loratool.errors import NumericError, UnsupportedError
from loratool.io.native import load
from loratool.ops.factored import group_rects
from loratool.ops.linalg import delta_matrix, delta_tensor
from loratool.ops.rescale import rescale, resize, scale_adapter, set_alpha

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RTOL = 1e-5  # float32 round-off on tiny matrices, relative to the delta's largest entry


def _f64(x) -> np.ndarray:
    return x.detach().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def close(a, b, rtol: float = RTOL) -> bool:
    """max |a - b| <= rtol * max(|a|, |b|), in float64; a and b are numpy arrays or torch tensors (PEFT's)."""
    a, b = _f64(a), _f64(b)
    scale = max(float(np.abs(a).max()), float(np.abs(b).max()), 1e-30)
    return float(np.abs(a - b).max()) <= rtol * scale


def nrand(*shape, seed=0) -> np.ndarray:
    return rand(*shape, seed=seed).numpy()


def svdvals(M) -> np.ndarray:
    """Singular values of M in float64, descending: the dense oracle."""
    return np.linalg.svd(np.asarray(M, dtype=np.float64), compute_uv=False)


# ---------------------------------------------------------------- strategies (shared with test_combine.py)

KINDS = ("plain", "rslora", "ffo", "conv", "embedding", "index", "index_ffo", "overlap", "full")


@st.composite
def skeletons(draw, min_targets=1, max_targets=3):
    """A list of (key, kind, shape): what a base offers, so several adapters can share targets."""
    n = draw(st.integers(min_targets, max_targets))
    out = []
    for i in range(n):
        kind = draw(st.sampled_from(KINDS))
        a, b = draw(st.integers(2, 9)), draw(st.integers(2, 9))
        if kind == "conv":
            shape = (a, draw(st.integers(1, 3)), *([draw(st.integers(1, 3))] * 2))
        elif kind == "index":
            shape = (3 * draw(st.integers(2, 4)), b)  # out = 3 * d: a fused qkv (NeoX query_key_value)
        elif kind == "index_ffo":
            shape = (b, 3 * draw(st.integers(2, 4)))  # stored (in, 3 * d): GPT-2 c_attn
        elif kind == "full":
            shape = (a,)
        else:
            shape = (a, b)
        out.append((f"layers.{i}.{kind}.weight", kind, shape))
    return out


def _pair(rank, rows, cols, seed):
    return nrand(rank, cols, seed=seed), nrand(rows, rank, seed=seed + 1)


@st.composite
def targets_on(draw, key, kind, shape):
    seed = draw(st.integers(0, 10_000))
    rank = draw(st.integers(1, 4))
    alpha = draw(st.sampled_from([0.5, 1.0, 2.0, 4.0, 8.0, 16.0]))  # per-target: rank/alpha patterns
    if kind == "full":
        return Target(key=key, kind="full", layout="full", shape=shape, delta=nrand(*shape, seed=seed),
                      delta_scale=draw(st.sampled_from([1.0, 0.5, -2.0])))
    layout = {"ffo": "fan_in_fan_out", "index_ffo": "fan_in_fan_out", "conv": "conv",
              "embedding": "embedding"}.get(kind, "linear")
    out, inp = matrix_shape(layout, shape)
    rule = "rslora" if kind == "rslora" else "standard"
    if kind.startswith("index"):  # two of three slices adapted, each with its own pair (loralib enable_lora)
        d = out // 3
        blocks = []
        for j, s in enumerate(draw(st.sampled_from([(0, 2), (0, 1), (1, 2), (0, 1, 2)]))):
            A, B = _pair(rank, d, inp, seed + 7 * j)
            blocks.append(Block(rank, alpha, rule, (s * d, (s + 1) * d), (0, inp), A, B))
        return Target(key=key, layout=layout, shape=shape, blocks=tuple(blocks))
    A, B = _pair(rank, out, inp, seed)
    t = whole_target(key, layout, shape, A, B, alpha, rule)
    if kind == "overlap":  # a second block on a sub-rectangle, another rank and rule: blocks sum
        r0 = draw(st.integers(0, out - 1))
        c0 = draw(st.integers(0, inp - 1))
        r2 = draw(st.integers(1, 3))
        A2, B2 = _pair(r2, out - r0, inp - c0, seed + 3)
        t = t.with_blocks(t.blocks + (Block(r2, 2.0 * alpha, "rslora", (r0, out), (c0, inp), A2, B2),))
    return t


@st.composite
def adapters_on(draw, skeleton, subset=False):
    chosen = skeleton
    if subset:
        chosen = [s for s in skeleton if draw(st.booleans())] or [skeleton[0]]
    ts = [draw(targets_on(*s)) for s in chosen]
    return Adapter(targets={t.key: t for t in ts})


@st.composite
def adapters(draw):
    return draw(adapters_on(draw(skeletons())))


def deltas(adapter: Adapter) -> dict[str, np.ndarray]:
    return {t.key: delta_tensor(t) for t in adapter}


# ---------------------------------------------------------------- properties


@SETTINGS
@given(adapters(), st.floats(-4, 4).filter(lambda x: abs(x) > 1e-3), st.floats(-4, 4).filter(lambda x: abs(x) > 1e-3))
def test_scale_composes_and_is_exact(a, s1, s2):
    once = scale_adapter(a, s1 * s2)
    twice = scale_adapter(scale_adapter(a, s1), s2)
    d0, d1, d2 = deltas(a), deltas(once), deltas(twice)
    for k in d0:
        assert close(d1[k], s1 * s2 * d0[k])
        assert close(d2[k], d1[k])
    for t0, t1 in zip(a, once):  # factors are never touched: the change lives in alpha and scale
        for b0, b1 in zip(t0.blocks, t1.blocks):
            assert b1.A is b0.A and b1.B is b0.B


@SETTINGS
@given(adapters())
def test_resize_at_true_rank_is_lossless(a):
    top = max([t.rank for t in a] + [1])
    r = resize(a, rank=top)
    for t0, t1 in zip(a, r.adapter):
        assert close(delta_tensor(t1), delta_tensor(t0), 1e-4)  # 1e-4: QR + SVD round-off on rank <= 7
    for row in r.rows:
        assert row["energy_retained"] == pytest.approx(1.0, abs=1e-5)


@SETTINGS
@given(adapters(), st.integers(1, 4))
def test_resize_is_eckart_young_of_dense_delta(a, k):
    r = resize(a, rank=k)
    for t0, t1, row in zip(a, r.adapter, r.rows):
        if t0.kind == "full":
            assert t1 is t0
            continue
        M0, M1 = delta_matrix(t0), delta_matrix(t1)
        assert isinstance(M1, np.ndarray) and M1.dtype == np.float32
        kept = total = 0.0
        err_opt2 = 0.0
        for (rows, cols), _ in group_rects([(b.rows, b.cols) for b in t0.blocks]):
            G0 = M0[rows[0]:rows[1], cols[0]:cols[1]].astype(np.float64)
            G1 = M1[rows[0]:rows[1], cols[0]:cols[1]].astype(np.float64)
            S = svdvals(G0)  # dense oracle
            kk = min(k, S.size)
            assert np.linalg.matrix_rank(G1, rtol=1e-5) <= kk
            # Optimal error of any rank-kk approximation (Eckart-Young); ours must reach it.
            opt = float((S[kk:] ** 2).sum())
            err = float(((G1 - G0) ** 2).sum())
            tol = 1e-4 * float((S ** 2).sum()) + 1e-12  # 1e-4: float32 factors, relative to ||G0||^2
            assert err <= opt + tol
            S1 = svdvals(G1)[:kk]
            assert np.allclose(S1, S[:kk], rtol=1e-4, atol=1e-4 * float(S[0]) + 1e-12)
            kept += float((S[:kk] ** 2).sum())
            total += float((S ** 2).sum())
            err_opt2 += opt
        # Outside the group rectangles the delta stays zero.
        mask = np.zeros(M0.shape, bool)
        for b in t0.blocks:
            mask[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] = True
        assert not M1[~mask].any()
        assert row["energy_retained"] == pytest.approx(kept / total if total else 1.0, rel=1e-4, abs=1e-6)
        assert t1.info["energy_retained"] == row["energy_retained"]
        assert t1.info["rank_before"] == t0.rank


@SETTINGS
@given(adapters(), st.sampled_from([0.5, 0.9, 0.99, 1.0]))
def test_energy_keeps_the_fewest_values_reaching_the_fraction(a, f):
    r = resize(a, energy=f)
    for t0, t1, row in zip(a, r.adapter, r.rows):
        if t0.kind == "full":
            continue
        assert row["energy_retained"] >= f - 1e-5  # 1e-5: float32 singular values
        for (rows, cols), members in group_rects([(b.rows, b.cols) for b in t0.blocks]):
            S = svdvals(delta_matrix(t0)[rows[0]:rows[1], cols[0]:cols[1]])
            e = np.cumsum(S ** 2) / (S ** 2).sum()
            new = [b for b in t1.blocks if b.rows == rows and b.cols == cols]
            assert len(new) == 1
            k = new[0].rank
            if len(members) == 1 and k == t0.blocks[members[0]].rank:
                continue  # kept unchanged: fewer values might also reach f
            assert float(e[k - 1]) >= f - 1e-5
            if k > 1:
                assert float(e[k - 2]) < f + 1e-5


# ---------------------------------------------------------------- exact behaviours


def test_scale_multiplies_alpha_for_both_rules_and_full_targets():
    a = as_numpy_adapter(sample_adapter())
    out = scale_adapter(a, -0.25)
    for t0, t1 in zip(a, out):
        if t0.kind == "full":
            assert t1.delta_scale == -0.25 * t0.delta_scale and t1.delta is t0.delta
        for b0, b1 in zip(t0.blocks, t1.blocks):
            assert b1.alpha == -0.25 * b0.alpha and b1.scale_rule == b0.scale_rule
            assert b1.scale == pytest.approx(-0.25 * b0.scale, rel=1e-15)


def test_alpha_sets_every_alpha_and_scales_like_scale():
    ts = [linear_target(alpha=8.0), linear_target("layers.0.v_proj.weight", rule="rslora", alpha=8.0, seed=4),
          full_target()]
    a = Adapter(targets={t.key: t for t in ts})
    out, s = set_alpha(a, 2.0)
    assert s == 0.25
    d0, d1 = deltas(a), deltas(out)
    for t in out:
        assert all(b.alpha == 2.0 for b in t.blocks)
        assert close(d1[t.key], 0.25 * d0[t.key], 1e-6)


def test_alpha_refused_on_different_alphas():
    ts = [linear_target(alpha=8.0), linear_target("layers.0.v_proj.weight", alpha=16.0, seed=4)]
    a = Adapter(targets={t.key: t for t in ts})
    msg = ('blocks have different alphas (8 on target "layers.0.q_proj.weight", 16 on target '
           '"layers.0.v_proj.weight"), so no single alpha can be set; use a scale factor instead (rescale --scale)')
    with pytest.raises(UnsupportedError, match=re.escape(msg)):
        set_alpha(a, 4.0)


def test_alpha_refused_on_zero_alpha_and_on_full_only():
    a = Adapter(targets={"w": linear_target("w", alpha=0.0)})
    with pytest.raises(NumericError, match=re.escape("every block has alpha 0, so its delta is zero and no new "
                                                     "alpha changes that")):
        set_alpha(a, 4.0)
    f = Adapter(targets={"n": full_target("n")})
    with pytest.raises(UnsupportedError, match=re.escape("adapter has no low-rank blocks, so it has no alpha")):
        set_alpha(f, 4.0)


def test_non_finite_scale_refused():
    with pytest.raises(NumericError, match=re.escape("scale inf is not a finite number; pass a finite value")):
        scale_adapter(sample_adapter(), math.inf)


def test_resize_keeps_disjoint_blocks_separate_without_zero_rows():
    t = fused_target(d=8, rank=4)
    r = resize(Adapter(targets={t.key: t}), rank=2)
    (t1,) = r.adapter
    assert [(b.rows, b.cols, b.rank) for b in t1.blocks] == [((0, 8), (0, 8), 2), ((16, 24), (0, 8), 2)]
    assert r.rows[0]["rank_after"] == 4 and r.rows[0]["blocks_after"] == 2


def test_overlapping_blocks_collapse_to_their_bounding_box():
    A1, B1 = nrand(2, 6, seed=1), nrand(5, 2, seed=2)
    A2, B2 = nrand(3, 4, seed=3), nrand(6, 3, seed=4)
    A3, B3 = nrand(1, 6, seed=5), nrand(2, 1, seed=6)
    t = Target("w", "linear", (12, 10), blocks=(
        Block(2, 2.0, "standard", (0, 5), (0, 6), A1, B1),
        Block(3, 3.0, "rslora", (3, 9), (4, 8), A2, B2),  # overlaps the first
        Block(1, 1.0, "standard", (10, 12), (0, 6), A3, B3),  # disjoint from both
    ))
    assert group_rects([(b.rows, b.cols) for b in t.blocks]) == [(((0, 9), (0, 8)), [0, 1]), (((10, 12), (0, 6)), [2])]
    r = resize(Adapter(targets={"w": t}), rank=5)
    (t1,) = r.adapter
    assert [(b.rows, b.cols) for b in t1.blocks] == [((0, 9), (0, 8)), ((10, 12), (0, 6))]
    assert t1.blocks[1] is t.blocks[2]  # rank 1 <= 5: kept bit for bit
    assert close(delta_matrix(t1), delta_matrix(t), 1e-5)
    # mixed scales and rules in the first group: the new block has scale 1, rule standard, alpha = rank
    b = t1.blocks[0]
    assert (b.scale_rule, b.alpha, b.scale) == ("standard", 5.0, 1.0)


def test_group_rects_merges_transitively():
    rects = [((0, 2), (0, 2)), ((4, 6), (4, 6)), ((1, 5), (1, 5))]
    assert group_rects(rects) == [(((0, 6), (0, 6)), [0, 1, 2])]
    assert group_rects([((0, 2), (0, 2)), ((2, 4), (0, 2))]) == [(((0, 2), (0, 2)), [0]), (((2, 4), (0, 2)), [1])]


@pytest.mark.parametrize("rule,expected_alpha", [("standard", 0.5 * 2), ("rslora", 0.5 * math.sqrt(2))])
def test_truncation_keeps_the_scale(rule, expected_alpha):
    t = linear_target(rank=4, alpha=2.0 if rule == "standard" else 1.0, rule=rule)  # scale 0.5 either way
    assert t.blocks[0].scale == 0.5
    (t1,) = resize(Adapter(targets={t.key: t}), rank=2).adapter
    b = t1.blocks[0]
    assert b.scale_rule == rule and b.rank == 2
    assert b.alpha == pytest.approx(expected_alpha, rel=1e-12) and b.scale == pytest.approx(0.5, rel=1e-12)


def test_truncation_keeps_dtype_and_rank_at_or_above_is_bit_exact():
    t = as_numpy_target(linear_target(rank=4, dtype=torch.bfloat16))
    (t1,) = resize(Adapter(targets={t.key: t}), rank=2).adapter
    assert t1.blocks[0].A.dtype == ml_dtypes.bfloat16 and t1.blocks[0].B.dtype == ml_dtypes.bfloat16
    (t2,) = resize(Adapter(targets={t.key: t}), rank=4).adapter
    assert t2.blocks[0] is t.blocks[0]


def test_torch_factors_are_accepted_and_numpy_comes_back():
    a = sample_adapter()  # torch tensors, bfloat16 included
    a = a.replace_targets([*a, linear_target("layers.1.q_proj.weight", rank=4, dtype=torch.bfloat16, seed=7)])
    n = as_numpy_adapter(a)
    for kw in ({"scale": -0.5}, {"rank": 2}, {"energy": 0.9}):
        got, want = rescale(a, **kw).adapter, rescale(n, **kw).adapter
        for t, u in zip(got, want):
            for x, y in zip(*[[t.delta] if t.kind == "full" else [z for b in s.blocks for z in (b.A, b.B)]
                              for s in (t, u)]):
                assert isinstance(x, np.ndarray) and x.dtype == y.dtype
                assert np.array_equal(x.view(np.uint8), y.view(np.uint8))  # the same bits from either input


def test_resize_never_forms_out_by_in():
    # A 1,000,000 x 1,000,000 delta would need 4 TB as a dense float32 matrix; the factors need 64 MB.
    n, r = 1_000_000, 8
    t = whole_target("huge.weight", "linear", (n, n), nrand(r, n, seed=1), nrand(n, r, seed=2), 8.0)
    res = resize(Adapter(targets={t.key: t}), rank=2)
    (t1,) = res.adapter
    assert t1.blocks[0].B.shape == (n, 2) and t1.blocks[0].A.shape == (2, n)
    assert 0.0 < res.rows[0]["energy_retained"] < 1.0


def test_resize_argument_errors():
    a = sample_adapter()
    with pytest.raises(NumericError, match=re.escape("energy 1.5 is outside (0, 1]; pass a fraction such as 0.99")):
        resize(a, energy=1.5)
    with pytest.raises(NumericError, match=re.escape("rank 0 is below 1; pass a rank of at least 1")):
        resize(a, rank=0)
    with pytest.raises(ValueError, match=re.escape("rescale takes exactly one of scale, alpha, rank, energy "
                                                   "(got scale, rank)")):
        rescale(a, scale=2.0, rank=2)


def test_non_finite_factors_refused_naming_the_target():
    t = as_numpy_target(linear_target("w"))
    bad = t.with_blocks([Block(3, 6.0, "standard", (0, 12), (0, 10), t.blocks[0].A, t.blocks[0].B.copy())])
    bad.blocks[0].B[0, 0] = float("nan")
    msg = 'target "w": block 0 has non-finite factors, so its delta has no truncation; fix or drop that target first'
    with pytest.raises(NumericError, match=re.escape(msg)):
        resize(Adapter(targets={"w": bad}), rank=1)


def test_info_survives_save_and_load(tmp_path):
    r = rescale(sample_adapter(), rank=1)
    p = tmp_path / "r.safetensors"
    save(r.adapter, p)
    back = load(p)
    assert back.info["rescale"] == {"rank": 1}
    for t in back:
        if t.kind != "full":
            assert t.info["energy_retained"] == pytest.approx(r.adapter.targets[t.key].info["energy_retained"])
            assert t.info["rank_before"] == sample_adapter().targets[t.key].rank


# ---------------------------------------------------------------- CLI


@pytest.fixture
def adapter_file(tmp_path):
    p = tmp_path / "a.safetensors"
    save(sample_adapter(), p)
    return p


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_rank_json(adapter_file, tmp_path):
    out = tmp_path / "r.safetensors"
    res = run("rescale", adapter_file, "-o", out, "--rank", 1, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["operation"] == "rank" and doc["value"] == 1
    rows = {r["target"]: r for r in doc["targets"]}
    assert rows["h.0.attn.c_attn.weight"]["rank_after"] == 2  # two disjoint blocks, rank 1 each
    assert rows["layers.0.q_proj.weight"]["rank_after"] == 1
    assert 0 < rows["layers.0.q_proj.weight"]["energy_retained"] < 1
    assert load(out).targets["layers.0.q_proj.weight"].rank == 1


def test_cli_scale_matches_library(adapter_file, tmp_path):
    out = tmp_path / "s.safetensors"
    res = run("rescale", adapter_file, "-o", out, "--scale", "-0.5", "-q")
    assert res.exit_code == 0, res.output
    a, b = deltas(load(adapter_file)), deltas(load(out))
    for k in a:
        assert close(b[k], -0.5 * a[k], 1e-6)


def test_cli_needs_exactly_one_option(adapter_file, tmp_path):
    res = run("rescale", adapter_file, "-o", tmp_path / "x.safetensors", "--scale", 2, "--rank", 2)
    assert res.exit_code == 2
    assert "give exactly one of --scale, --alpha, --rank, --energy (got --scale, --rank)" in res.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_errors_are_one_line_and_write_nothing(adapter_file, tmp_path):
    out = tmp_path / "x.safetensors"
    res = run("rescale", adapter_file, "-o", out, "--alpha", 4)
    assert res.exit_code == UnsupportedError.exit_code
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: blocks have different alphas")
    assert not out.exists()
    res = run("rescale", adapter_file, "-o", adapter_file, "--scale", 2, "--overwrite")
    assert res.exit_code == 6 and "output would overwrite or sit inside input" in res.stderr
    res = run("rescale", adapter_file, "-o", out, "--energy", 0)
    assert res.exit_code == 2  # click range check
    before = adapter_file.read_bytes()
    assert run("rescale", adapter_file, "-o", out, "--scale", 2).exit_code == 0
    res = run("rescale", adapter_file, "-o", out, "--scale", 3)
    assert res.exit_code == 6 and res.stderr == f"error: {out}: already exists; pass --overwrite to replace it\n"
    assert adapter_file.read_bytes() == before


def test_cli_help_has_example():
    res = run("rescale", "--help")
    assert res.exit_code == 0 and "Example:" in res.output and "--energy" in res.output
