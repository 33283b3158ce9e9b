"""combine: concat is exactly Σ w_i ΔW_i; svd, ties and dare follow their stated semantics; the registry of
methods is what the CLI offers and what README lists."""

from __future__ import annotations

import json
import re

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, strategies as st

from builders import as_numpy_target, full_target, fused_target, linear_target, sample_adapter
from loratool.adapter import Adapter, Target, whole_target
from loratool import save
from loratool.cli import cli
from loratool.errors import MismatchError, NumericError
from loratool.io.native import load
from loratool.ops.combine import combine
from loratool.ops.combine_methods import METHODS, dare_merge, ties_merge, trim, usage_problem
from loratool.ops.linalg import delta_matrix, delta_tensor
from test_rescale import SETTINGS, adapters_on, close, deltas, nrand, skeletons

weights_st = st.floats(-3, 3, allow_nan=False).filter(lambda w: abs(w) > 1e-3)


def weighted_sum(adapters, weights) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for a, w in zip(adapters, weights):
        for k, d in deltas(a).items():
            out[k] = out.get(k, 0) + w * d
    return out


@st.composite
def several(draw, max_adapters=3):
    sk = draw(skeletons())
    n = draw(st.integers(1, max_adapters))
    ads = [draw(adapters_on(sk, subset=True)) for _ in range(n)]
    return ads, [draw(weights_st) for _ in range(n)]


# ---------------------------------------------------------------- properties


@SETTINGS
@given(skeletons().flatmap(adapters_on))
def test_combine_one_adapter_weight_one_is_the_identity(a):
    c = combine([a], [1.0]).adapter
    assert list(c.targets) == list(a.targets)
    for t0, t1 in zip(a, c):
        assert np.array_equal(delta_tensor(t1), delta_tensor(t0))  # bit for bit: factors and alphas untouched
        for b0, b1 in zip(t0.blocks, t1.blocks):
            assert b1.A is b0.A and b1.B is b0.B and b1.alpha == b0.alpha


@SETTINGS
@given(several())
def test_concat_is_the_weighted_sum(case):
    ads, ws = case
    c = combine(ads, ws).adapter
    expected = weighted_sum(ads, ws)
    assert set(c.targets) == set(expected)  # the union of target sets
    for k, d in expected.items():
        assert close(delta_tensor(c.targets[k]), d, 1e-5)
    assert c.info["combine"] == {"method": "concat", "weights": ws}


@SETTINGS
@given(several(), st.integers(1, 3))
def test_svd_is_the_truncated_weighted_sum(case, k):
    ads, ws = case
    res = combine(ads, ws, method="svd", rank=k)
    exact = combine(ads, ws).adapter
    for t_exact in exact:
        t = res.adapter.targets[t_exact.key]
        if t.kind == "full":
            continue
        M, M0 = delta_matrix(t).astype(np.float64), delta_matrix(t_exact).astype(np.float64)
        S = np.linalg.svd(M0, compute_uv=False)
        total = float((S ** 2).sum())
        # Optimal per-group truncation is at least as good as the whole-matrix rank-k truncation of each
        # group; globally ||M - M0||^2 <= the sum of per-group optima <= ||M0||^2 - (top-k energy of M0).
        err = float(((M - M0) ** 2).sum())
        row = next(r for r in res.rows if r["target"] == t.key)
        assert err == pytest.approx(total * (1 - row["energy_retained"]), abs=1e-4 * total + 1e-10)
        for b in t.blocks:
            assert b.rank <= k


@SETTINGS
@given(several(max_adapters=2), st.sampled_from(["ties", "dare"]))
def test_ties_and_dare_at_density_one_and_full_rank(case, method):
    ads, ws = case
    big = 64  # above every rectangle's size: no truncation
    res = combine(ads, ws, method=method, rank=big, density=1.0).adapter
    if method == "dare":  # nothing dropped, nothing rescaled: plain task arithmetic
        expected = weighted_sum(ads, ws)
        for k, d in expected.items():
            assert close(delta_tensor(res.targets[k]), d, 1e-4)  # 1e-4: dense SVD round-off
    else:  # no trimming: per entry, the mean of the weighted deltas that agree with the sign of their sum
        for t in res:
            taus = [w * delta_tensor(a.targets[t.key]) for a, w in zip(ads, ws) if t.key in a.targets]
            T = np.stack(taus)
            gamma = np.where(T.sum(0) >= 0, 1.0, -1.0)
            agree = np.sign(T) == gamma
            expected = (T * agree).sum(0) / np.maximum(agree.sum(0), 1)
            assert close(delta_tensor(t), expected, 1e-4)


# ---------------------------------------------------------------- ties and dare, by hand


def f32(*values) -> np.ndarray:
    return np.array(values, np.float32)


def test_ties_by_hand():
    t1 = f32(3.0, -2.0, 1.0, 0.0)
    t2 = f32(-1.0, -4.0, 2.0, 5.0)
    # density 1: sum [2, -6, 3, 5] elects [+, -, +, +]; entry 3 averages over t2 alone (t1 has a 0 there)
    got = ties_merge([t1, t2], [4, 4], 1.0)
    assert got.dtype == np.float32 and np.array_equal(got, f32(3.0, -3.0, 1.5, 5.0))
    # density 0.5 keeps 2 of 4: t1 -> [3, -2, 0, 0], t2 -> [0, -4, 0, 5]
    assert np.array_equal(trim(t1, 4, 0.5), f32(3.0, -2.0, 0.0, 0.0))
    assert np.array_equal(ties_merge([t1, t2], [4, 4], 0.5), f32(3.0, -3.0, 0.0, 5.0))
    # halves round up: 0.5 * 5 keeps 3 entries (Python's round would give 2)
    assert int((trim(np.arange(1.0, 6.0, dtype=np.float32), 5, 0.5) != 0).sum()) == 3


def test_ties_through_combine_on_full_targets_uses_weighted_deltas():
    a = Adapter(targets={"n": Target("n", "full", (4,), kind="full", delta=f32(3.0, -2.0, 1.0, 0.0))})
    b = Adapter(targets={"n": Target("n", "full", (4,), kind="full", delta=torch.tensor([1.0, 4.0, -2.0, -5.0]),
                                     delta_scale=0.5)})  # a torch delta beside a numpy one: both are accepted
    # τ_2 = -2 * 0.5 * [1, 4, -2, -5] = [-1, -4, 2, 5]: the hand example above
    c = combine([a, b], [1.0, -2.0], method="ties", rank=1, density=0.5).adapter
    assert np.array_equal(delta_tensor(c.targets["n"]), f32(3.0, -3.0, 0.0, 5.0))


def test_trim_counts_only_the_entries_the_adapter_can_change():
    t = fused_target(d=4, rank=2)  # 2 of 3 slices: 32 of 48 entries
    a = Adapter(targets={t.key: t})
    res = combine([a], [1.0], method="ties", rank=8, density=0.25).adapter
    M = delta_matrix(res.targets[t.key])
    assert int((np.abs(M) > 1e-6).sum()) == 8  # round(0.25 * 32), not round(0.25 * 48)
    assert float(np.abs(M[4:8]).max()) == 0.0  # the slice no block touched stays zero


def test_dare_mask_semantics_and_seed():
    tau = nrand(100, 100, seed=3)
    out = dare_merge([tau], 0.3, seed=5, key="w")
    kept = out != 0
    assert np.allclose(out[kept], tau[kept] / 0.3, rtol=1e-6)
    frac = float(kept.mean())
    assert abs(frac - 0.3) < 0.02  # 4.4 binomial standard deviations on 10,000 entries
    assert np.array_equal(out, dare_merge([tau], 0.3, seed=5, key="w"))
    assert not np.array_equal(out, dare_merge([tau], 0.3, seed=6, key="w"))
    assert not np.array_equal(out, dare_merge([tau], 0.3, seed=5, key="v"))


def test_dare_mask_of_a_target_does_not_depend_on_other_targets():
    q = linear_target()
    v = linear_target("layers.0.v_proj.weight", seed=4)
    one = combine([Adapter(targets={q.key: q})], method="dare", rank=3, density=0.5, seed=1).adapter
    two = combine([Adapter(targets={q.key: q, v.key: v})], method="dare", rank=3, density=0.5, seed=1).adapter
    assert np.array_equal(delta_tensor(one.targets[q.key]), delta_tensor(two.targets[q.key]))


# ---------------------------------------------------------------- exact behaviours and refusals


def test_concat_keeps_each_scale_rule_no_rslora_overscaling():
    a = Adapter(targets={"w": linear_target("w", rank=4, alpha=8.0, rule="rslora")})
    b = Adapter(targets={"w": linear_target("w", rank=2, alpha=2.0, seed=9)})
    c = combine([a, b], [0.5, -1.0]).adapter
    blocks = c.targets["w"].blocks
    assert [(x.rank, x.alpha, x.scale_rule) for x in blocks] == [(4, 4.0, "rslora"), (2, -2.0, "standard")]
    assert close(delta_tensor(c.targets["w"]), 0.5 * delta_tensor(a.targets["w"]) - delta_tensor(b.targets["w"]))


def test_svd_keeps_a_common_scale_and_dtype():
    a = Adapter(targets={"w": linear_target("w", rank=4, alpha=8.0, dtype=torch.float16)})
    b = Adapter(targets={"w": linear_target("w", rank=4, alpha=8.0, seed=9, dtype=torch.float16)})
    (t,) = combine([a, b], [1.0, 1.0], method="svd", rank=3).adapter
    (blk,) = t.blocks
    assert (blk.rank, blk.scale, blk.scale_rule, blk.A.dtype, blk.B.dtype) == (3, 2.0, "standard", np.float16,
                                                                             np.float16)
    (t,) = combine([a, b], [1.0, 0.5], method="svd", rank=3).adapter  # scales 2 and 1: scale 1
    assert (t.blocks[0].alpha, t.blocks[0].scale) == (3.0, 1.0)


def test_full_target_with_one_contributor_keeps_its_tensor():
    f = as_numpy_target(full_target())
    c = combine([Adapter(targets={f.key: f}), Adapter(targets={"w": linear_target("w")})], [2.0, 1.0]).adapter
    assert c.targets[f.key].delta is f.delta and c.targets[f.key].delta_scale == 2.0


def test_shape_mismatch_is_refused_naming_the_target():
    a = Adapter(targets={"w": linear_target("w", out=12, inp=10)})
    b = Adapter(targets={"w": linear_target("w", out=10, inp=12)})
    msg = ('target "w": b.safetensors has lora layout linear shape 10x12 but a.safetensors has lora layout linear '
           'shape 12x10; combine only adapters made for the same base')
    with pytest.raises(MismatchError, match=re.escape(msg)):
        combine([a, b], names=["a.safetensors", "b.safetensors"])


def test_layout_mismatch_and_fingerprint_mismatch_are_refused():
    A, B = nrand(2, 10, seed=1), nrand(10, 2, seed=2)
    a = Adapter(targets={"w": whole_target("w", "linear", (10, 10), A, B, 2.0)})
    b = Adapter(targets={"w": whole_target("w", "fan_in_fan_out", (10, 10), A, B, 2.0)})
    with pytest.raises(MismatchError, match=re.escape('target "w": adapter 2 has lora layout fan_in_fan_out shape '
                                                      '10x10 but adapter 1 has lora layout linear shape 10x10')):
        combine([a, b])
    c = Adapter(targets={"w": whole_target("w", "linear", (10, 10), A, B, 2.0, sha256="a" * 64)})
    d = Adapter(targets={"w": whole_target("w", "linear", (10, 10), A, B, 2.0, sha256="b" * 64)})
    with pytest.raises(MismatchError, match=re.escape(f'target "w": adapter 2 records base sha256 {"b" * 64} but '
                                                      f'adapter 1 records {"a" * 64}; the adapters were made for '
                                                      'different bases')):
        combine([c, d])


def test_argument_errors():
    a = sample_adapter()
    with pytest.raises(NumericError, match=re.escape("method svd needs a rank of at least 1 (got None)")):
        combine([a], method="svd")
    with pytest.raises(NumericError, match=re.escape("method ties needs a density in (0, 1] (got 0.0)")):
        combine([a], method="ties", rank=2, density=0.0)
    with pytest.raises(NumericError, match=re.escape("weight nan is not a finite number; pass finite weights")):
        combine([a], [float("nan")])
    with pytest.raises(ValueError, match=re.escape("2 weights for 1 adapters; give one weight per adapter")):
        combine([a], [1.0, 2.0])


# ---------------------------------------------------------------- the registry, the CLI and README agree

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_combine_section() -> str:
    text = README.read_text()
    return text.split("### `loratool combine", 1)[1].split("\n### ", 1)[0]


def test_readme_lists_the_registered_methods_their_papers_and_options():
    section = _readme_combine_section()
    heading = section.split("\n", 1)[0]
    assert f"[--method {'|'.join(METHODS)}]" in heading
    bullets = dict(re.findall(r"^- `(\w+)`(?: \(default\))?:(.*?)(?=^- |^`--|\Z)", section, re.M | re.S))
    assert list(bullets) == list(METHODS)  # one bullet per method, in registry order
    for m in METHODS.values():
        if m.arxiv:
            assert f"arXiv:{m.arxiv}" in bullets[m.name], m.name
            assert m.paper.split(",")[0] in bullets[m.name], m.name  # "Yadav et al. 2023"
        for p in m.parameters:
            if not p.required:
                assert f"`--{p.name}`" in bullets[m.name], (m.name, p.name)
    for name in ("rank", "density"):
        required = [f"`{m.name}`" for m in METHODS.values() if (p := m.parameter(name)) and p.required]
        listed = ", ".join(required[:-1]) + " and " + required[-1] if len(required) > 1 else required[0]
        assert f"`--{name}` is required for {listed}" in " ".join(section.split()), name


def test_cli_offers_the_registered_methods_with_their_papers():
    res = run("combine", "--help")
    assert res.exit_code == 0
    assert f"[{'|'.join(METHODS)}]" in " ".join(res.output.split())
    for m in METHODS.values():
        if m.arxiv:
            assert f"arXiv:{m.arxiv}" in " ".join(res.output.split()), m.name


def test_usage_problem_reads_the_registry():
    assert usage_problem("concat", set()) is None
    assert usage_problem("concat", {"rank"}) == "--rank applies to --method svd, ties and dare"
    assert usage_problem("svd", {"rank", "density"}) == "--density applies to --method ties and dare"
    assert usage_problem("dare", {"rank"}) == "--method dare needs --density"
    assert usage_problem("dare", {"rank", "density"}) is None  # seed is optional
    assert usage_problem("ties", {"rank", "density", "seed"}) == "--seed applies to --method dare"


def test_library_refuses_a_parameter_the_method_does_not_take():
    with pytest.raises(ValueError, match=re.escape("method concat does not take rank; drop it")):
        combine([sample_adapter()], method="concat", rank=2)


# ---------------------------------------------------------------- library API: paths or adapters in, results out


def test_api_combine_takes_paths_and_adapters_and_returns_the_report(tmp_path):
    import loratool

    p = tmp_path / "a.safetensors"
    save(sample_adapter(), p)
    other = Adapter(targets={"layers.0.q_proj.weight": linear_target(seed=40, rank=2, alpha=1.0)})
    calls = []
    res = loratool.combine([p, other], weights=[0.5, 2.0], method="svd", rank=2,
                           progress=lambda n, total=None: calls.append((n, total)))
    assert calls[0] == (0, len(res.adapter)) and sum(n for n, _ in calls) == len(res.adapter)
    exact = weighted_sum([load(p), other], [0.5, 2.0])
    q = res.adapter.targets["layers.0.q_proj.weight"]
    assert q.rank == 2 and isinstance(q.blocks[0].A, np.ndarray)
    row = next(r for r in res.rows if r["target"] == q.key)
    err = float(((delta_tensor(q).astype(np.float64) - exact[q.key]) ** 2).sum())
    assert err == pytest.approx(float((exact[q.key].astype(np.float64) ** 2).sum()) * (1 - row["energy_retained"]),
                                rel=1e-3)
    rep = res.report()
    assert (rep["method"], rep["weights"], rep["rank"], rep["parameters"]) == ("svd", [0.5, 2.0], 2,
                                                                               res.adapter.n_params)
    assert rep["targets"] is res.rows and row["adapters"] == [0, 1]
    out = tmp_path / "c.safetensors"
    assert loratool.save(res.adapter, out) == out.stat().st_size
    assert load(out).info["combine"] == {"method": "svd", "weights": [0.5, 2.0], "rank": 2}


def test_api_combine_refuses_a_reader_option_no_input_takes(tmp_path):
    import loratool
    from loratool.errors import UsageError

    p = tmp_path / "a.safetensors"
    save(sample_adapter(), p)
    with pytest.raises(UsageError, match=re.escape("no input is of a dialect that takes --enable-lora; "
                                                         "drop the option")):
        loratool.combine([p], enable_lora="1,0,1")
    with pytest.raises(ValueError, match=re.escape("reader options base apply to paths")):
        loratool.rescale(sample_adapter(), scale=2.0, base=p)


# ---------------------------------------------------------------- CLI


@pytest.fixture
def two_files(tmp_path):
    p1, p2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save(sample_adapter(), p1)
    other = Adapter(targets={t.key: t for t in [linear_target(seed=40, rank=2, alpha=1.0),
                                                linear_target("layers.1.k_proj.weight", seed=41)]})
    save(other, p2)
    return p1, p2


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_concat_json_and_negative_weights(two_files, tmp_path):
    p1, p2 = two_files
    out = tmp_path / "c.safetensors"
    res = run("combine", p1, p2, "-o", out, "--weights", "-1,0.5", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["method"] == "concat" and doc["weights"] == [-1.0, 0.5]
    rows = {r["target"]: r for r in doc["targets"]}
    assert rows["layers.0.q_proj.weight"]["adapters"] == [0, 1] and rows["layers.1.k_proj.weight"]["adapters"] == [1]
    expected = weighted_sum([load(p1), load(p2)], [-1.0, 0.5])
    got = deltas(load(out))
    for k, d in expected.items():
        assert close(got[k], d, 1e-6)


def test_cli_svd_table(two_files, tmp_path):
    p1, p2 = two_files
    res = run("combine", p1, p2, "-o", tmp_path / "s.safetensors", "--method", "svd", "--rank", 2)
    assert res.exit_code == 0, res.output
    assert "energy retained" in res.stdout and "layers.0.q_proj.weight" in res.stdout
    assert load(tmp_path / "s.safetensors").targets["layers.0.q_proj.weight"].rank == 2


@pytest.mark.parametrize("args,message", [
    (["--weights", "1"], "--weights has 1 values for 2 adapters; give one weight per adapter"),
    (["--weights", "1,x"], "'1,x' is not a comma-separated list of numbers"),
    (["--rank", "2"], "--rank applies to --method svd, ties and dare"),
    (["--method", "svd"], "--method svd needs --rank"),
    (["--method", "ties", "--rank", "2"], "--method ties needs --density"),
    (["--seed", "3"], "--seed applies to --method dare"),
])
def test_cli_usage_errors(two_files, tmp_path, args, message):
    p1, p2 = two_files
    out = tmp_path / "x.safetensors"
    res = run("combine", p1, p2, "-o", out, *args)
    assert res.exit_code == 2 and message in res.stderr
    assert not out.exists()


def test_cli_mismatch_is_one_line_exit_4(tmp_path):
    p1, p2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save(Adapter(targets={"w": linear_target("w", out=12, inp=10)}), p1)
    save(Adapter(targets={"w": linear_target("w", out=10, inp=12)}), p2)
    out = tmp_path / "c.safetensors"
    res = run("combine", p1, p2, "-o", out)
    assert res.exit_code == MismatchError.exit_code
    assert res.stderr == (f'error: target "w": {p2} has lora layout linear shape 10x12 but {p1} has lora layout '
                          'linear shape 12x10; combine only adapters made for the same base\n')
    assert not out.exists()


def test_cli_refuses_output_that_is_an_input(two_files):
    p1, p2 = two_files
    before = p2.read_bytes()
    res = run("combine", p1, p2, "-o", p2, "--overwrite")
    assert res.exit_code == 6 and "output would overwrite or sit inside input" in res.stderr
    assert p2.read_bytes() == before


def test_cli_help_states_the_papers():
    res = run("combine", "--help")
    assert res.exit_code == 0 and "Example:" in res.output
    assert "Yadav et al. 2023" in res.output and "Yu et al. 2023" in res.output
