"""extract: recovery of exact low-rank deltas, error against the Eckart-Young optimum, rank rules, layouts,
streaming, and the library's refusals. CLI behaviour is in test_extract_cli.py."""

import math
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from loratool import device as devices
from loratool.dtypes import as_f32
from loratool.errors import MismatchError, NumericError
from loratool.ops import extract as ex
from loratool.ops import extract_run as lanes
from loratool.ops.extract import ExtractOptions, extract, plan
from loratool.ops.svd import exact_svd, gaussian_sketch, quantile, randomized_svd, seed_for, sum_squares

F32_REL = 1e-5  # float32 recovery of an exactly low-rank delta: relative Frobenius error
EY_FACTOR = 1.01  # randomized error within 1% of the Eckart-Young optimum
CPU = devices.cpu()


def g(seed):
    return torch.Generator().manual_seed(seed)


def low_rank(m, n, r, seed, scale=1.0):
    return (torch.randn(m, r, generator=g(seed)) @ torch.randn(r, n, generator=g(seed + 1))) * scale


def noisy(m, n, seed, r=6, noise=0.3):
    """Low-rank signal (decaying) plus Gaussian noise with ||noise|| = noise * ||signal||."""
    U = torch.linalg.qr(torch.randn(m, r, generator=g(seed)))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=g(seed + 1)))[0]
    s = torch.exp(-torch.arange(r, dtype=torch.float32) / 3)
    S = (U * s) @ V.T
    N = torch.randn(m, n, generator=g(seed + 2))
    return S + N * (noise * S.norm() / N.norm())


def delta_tensor(t):
    """ΔW of a target in the base tensor's shape, float32 torch, computed here from its numpy factors
    (adapter.py's layouts: M[rows, cols] += scale B A on the matrix view)."""
    if t.kind == "full":
        return torch.from_numpy(as_f32(t.delta)) * t.delta_scale
    M = torch.zeros(t.matrix_shape)
    for b in t.blocks:
        M[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] += \
            (torch.from_numpy(as_f32(b.B)) @ torch.from_numpy(as_f32(b.A))) * b.scale  # (rows, r) @ (r, cols)
    if t.layout in ("fan_in_fan_out", "embedding"):
        return M.T
    return M.reshape(t.shape)


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def merged(base, result):
    """base + ΔW of every target: the merge."""
    out = {k: v.clone() for k, v in base.items()}
    for t in result.adapter:
        out[t.key] = (out[t.key].float() + delta_tensor(t)).to(out[t.key].dtype)
    return out


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def pair(**deltas):
    base = {k: torch.randn(*d.shape, generator=g(100 + i)) for i, (k, d) in enumerate(deltas.items())}
    ft = {k: base[k] + d for k, d in deltas.items()}
    return ft, base


# ---- recovery -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [4, 5, 8])
@pytest.mark.parametrize("shape", [(160, 96), (96, 160), (12, 10)])  # tall and wide randomized; tiny exact
def test_exact_rank4_delta_recovered(rank, shape):
    D = low_rank(*shape, 4, seed=1)
    ft, base = pair(**{"layer.weight": D})
    r = extract(ft, base, ExtractOptions(rank=rank))
    t = r.adapter.targets["layer.weight"]
    assert t.rank == min(rank, *shape)
    assert rel(delta_tensor(t), D) < F32_REL
    assert t.info["rel_error"] < F32_REL
    assert t.info["energy"] > 1 - F32_REL
    assert r.rows[0]["method"] == ("exact" if shape == (12, 10) else "randomized")
    assert rel(merged(base, r)["layer.weight"], ft["layer.weight"]) < F32_REL


def signal_plus_noise(m, n, seed, r=32, decay=8.0, noise_energy=0.2):
    """A finetune-like delta, as the benchmark's: a rank-r signal with singular values exp(-i/decay) plus
    Gaussian noise holding `noise_energy` of the total energy."""
    U = torch.linalg.qr(torch.randn(m, r, generator=g(seed)))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=g(seed + 1)))[0]
    S = (U * torch.exp(-torch.arange(r, dtype=torch.float32) / decay)) @ V.T
    N = torch.randn(m, n, generator=g(seed + 2))
    return S + N * (math.sqrt(noise_energy / (1 - noise_energy)) * S.norm() / N.norm())


def eckart_young_ratio(M, t, k):
    S = torch.linalg.svdvals(M.double())
    optimum = math.sqrt(float((S[k:] ** 2).sum()) / float((S ** 2).sum()))
    return rel(delta_tensor(t), M) / optimum  # the stored factors' true error, computed here in float64


@pytest.mark.parametrize("k", [4, 8, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_delta_within_one_percent_of_eckart_young(k, seed):
    """Default settings (one power iteration) on a low-rank signal plus noise."""
    M = signal_plus_noise(300, 200, seed=3)
    ft, base = pair(w=M)
    r = extract(ft, base, ExtractOptions(rank=k, seed=seed))
    t = r.adapter.targets["w"]
    assert eckart_young_ratio(M, t, k) <= EY_FACTOR
    assert abs(t.info["rel_error"] - rel(delta_tensor(t), M)) <= 1e-5  # reported error equals the true error
    assert r.rows[0]["method"] == "randomized"


@pytest.mark.parametrize("k", [8, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slowly_decaying_spectrum_within_one_percent_with_two_power_iterations(k, seed):
    """A spectrum that decays fast into noise (exp(-i/3) over 24, then 30% noise): one power iteration can end
    1-1.6% above the optimum here (README, "extract"); two stay within 1%."""
    M = noisy(300, 200, seed=3, r=24)
    ft, base = pair(w=M)
    t = extract(ft, base, ExtractOptions(rank=k, seed=seed, power_iterations=2)).adapter.targets["w"]
    assert eckart_young_ratio(M, t, k) <= EY_FACTOR


def test_reported_error_after_cast_and_clamp_is_the_stored_factors_error():
    M = noisy(120, 90, seed=5)
    ft, base = pair(w=M)
    for opts in (ExtractOptions(rank=6, dtype="bfloat16"), ExtractOptions(rank=6, clamp_quantile=0.9)):
        t = extract(ft, base, opts).adapter.targets["w"]
        assert abs(t.info["rel_error"] - rel(delta_tensor(t), M)) < 1e-5


# ---- layouts: conv, fan_in_fan_out, fused, embeddings ------------------------------------------------------

def test_conv_kernel_flattened_and_recovered():
    D = low_rank(8, 4 * 3 * 3, 2, seed=7).reshape(8, 4, 3, 3)
    ft, base = pair(**{"unet.conv.weight": D})
    t = extract(ft, base, ExtractOptions(rank=2)).adapter.targets["unet.conv.weight"]
    assert t.layout == "conv" and t.shape == (8, 4, 3, 3) and t.blocks[0].A.shape == (2, 36)
    assert rel(delta_tensor(t), D) < F32_REL


def test_fan_in_fan_out_hint_transposes_the_matrix_view():
    D = low_rank(40, 24, 3, seed=9)  # stored (in=40, out=24), like GPT-2 Conv1D
    ft, base = pair(**{"h.0.attn.c_attn.weight": D})
    r = extract(ft, base, ExtractOptions(rank=3, fan_in_fan_out=ex.GPT2_CONV1D))
    t = r.adapter.targets["h.0.attn.c_attn.weight"]
    assert t.layout == "fan_in_fan_out" and t.blocks[0].B.shape == (24, 3) and t.blocks[0].A.shape == (3, 40)
    assert rel(delta_tensor(t), D) < F32_REL


def test_fused_qkv_with_two_adapted_blocks_is_recovered_at_their_total_rank():
    # loralib MergedLinear enable_lora=[True, False, True]: q and v rows get rank-2 deltas, k rows none.
    d = 32
    D = torch.zeros(3 * d, d)
    D[:d] = low_rank(d, d, 2, seed=11)
    D[2 * d:] = low_rank(d, d, 2, seed=13)
    ft, base = pair(**{"gpt_neox.layers.0.attention.query_key_value.weight": D})
    t = extract(ft, base, ExtractOptions(rank=4)).adapter.targets[
        "gpt_neox.layers.0.attention.query_key_value.weight"]
    assert rel(delta_tensor(t), D) < F32_REL
    assert float(delta_tensor(t)[d:2 * d].abs().max()) < 1e-5 * float(D.abs().max())  # k rows stay unchanged


def test_tiny_llama_and_gpt2_merge_of_extract_is_the_finetune():
    from models import base_state_dict, tiny_gpt2, tiny_llama

    for model, fif in ((tiny_llama(), ()), (tiny_gpt2(), ex.GPT2_CONV1D)):
        base = base_state_dict(model)
        ft = dict(base)
        changed = []
        for i, (k, v) in enumerate(sorted(base.items())):
            if v.ndim == 2 and not ex._is_embedding(k) and "lm_head" not in k:
                ft[k] = v + low_rank(*v.shape, 2, seed=200 + i, scale=0.1)
                changed.append(k)
        r = extract(ft, base, ExtractOptions(rank=2, fan_in_fan_out=fif))
        assert sorted(r.adapter.targets) == sorted(changed)
        m = merged(base, r)
        for k in changed:
            assert rel(m[k] - base[k], ft[k] - base[k]) < F32_REL, k
        if fif:
            assert {t.layout for t in r.adapter} == {"fan_in_fan_out"}


def test_embeddings_listed_by_default_factorised_when_asked():
    D = low_rank(50, 16, 2, seed=15)
    ft, base = pair(**{"model.embed_tokens.weight": D, "lin.weight": low_rank(20, 16, 2, seed=17)})
    r = extract(ft, base, ExtractOptions(rank=2))
    assert list(r.adapter.targets) == ["lin.weight"]
    assert r.not_extracted[0]["key"] == "model.embed_tokens.weight"
    assert "pass --embeddings" in r.not_extracted[0]["reason"]
    t = extract(ft, base, ExtractOptions(rank=2, embeddings=True)).adapter.targets["model.embed_tokens.weight"]
    assert t.layout == "embedding" and t.blocks[0].A.shape == (2, 50)  # M = W^T: A (r, num_embeddings)
    assert rel(delta_tensor(t), D) < F32_REL


# ---- streaming: unchanged, vectors, full targets ----------------------------------------------------------------

def test_unchanged_skipped_vectors_listed_or_stored_whole():
    base = {"a.weight": torch.randn(30, 20, generator=g(1)), "a.bias": torch.randn(30, generator=g(2)),
            "same.weight": torch.randn(10, 10, generator=g(3)), "pos_ids": torch.arange(7)}
    ft = dict(base)
    ft["a.weight"] = base["a.weight"] + low_rank(30, 20, 1, seed=4)
    ft["a.bias"] = base["a.bias"] + 0.5
    ft["pos_ids"] = base["pos_ids"] + 1
    r = extract(ft, base, ExtractOptions(rank=1))
    assert r.unchanged == 1 and list(r.adapter.targets) == ["a.weight"]
    assert [(x["key"], x["reason"]) for x in r.not_extracted] == [
        ("a.bias", "not a matrix (pass --keep-full to store it whole)"),
        ("pos_ids", "not floating point (I64); cannot be stored as a delta")]
    r = extract(ft, base, ExtractOptions(rank=1, keep_full=True))
    bias = r.adapter.targets["a.bias"]
    assert bias.kind == "full" and bias.layout == "full" and bias.delta_scale == 1.0
    assert rel(merged(base, r)["a.bias"], ft["a.bias"]) < 1e-7  # base + (ft - base): one float32 rounding
    assert r.summary["not_extracted"] == [{"key": "pos_ids", "shape": [7],
                                           "reason": "not floating point (I64); cannot be stored as a delta"}]


def test_compare_only_tensors_are_compared_in_pieces(monkeypatch):
    # Pairs are read in pieces; a change in the embedding's last piece is seen, and deltas are assembled
    # from pieces exactly.
    monkeypatch.setattr(lanes, "CHUNK_ELEMENTS", 48)
    base = {"lin.weight": torch.randn(20, 16, generator=g(1)), "model.embed_tokens.weight": torch.randn(64, 16)}
    ft = dict(base)
    ft["lin.weight"] = base["lin.weight"] + low_rank(20, 16, 2, seed=3)
    emb = base["model.embed_tokens.weight"].clone()
    emb[-1, -1] += 1
    ft["model.embed_tokens.weight"] = emb
    r = extract(ft, base, ExtractOptions(rank=2))
    assert [x["key"] for x in r.not_extracted] == ["model.embed_tokens.weight"]
    assert rel(delta_tensor(r.adapter.targets["lin.weight"]), ft["lin.weight"] - base["lin.weight"]) < F32_REL
    ft["model.embed_tokens.weight"] = base["model.embed_tokens.weight"]
    assert extract(ft, base, ExtractOptions(rank=2)).unchanged == 1


def test_slots_are_reused_across_pairs_of_every_size_and_every_delta_is_intact(monkeypatch):
    """Three lanes share slots that hold only the biggest delta: pairs of other sizes wait for a slot and
    reuse it; no delta is written into a slot another lane still reads."""
    monkeypatch.setattr(lanes, "LANE_SLOT_BYTES", 0)
    monkeypatch.setattr(lanes, "lane_plan", lambda: (3, 1))
    sizes = [(30, 20), (12, 8), (40, 24), (7, 5), (30, 20), (40, 24), (9, 9)]
    deltas = {f"l{i}.weight": low_rank(m, n, 2, seed=300 + i) for i, (m, n) in enumerate(sizes)}
    ft, base = pair(**deltas)
    r = extract(ft, base, ExtractOptions(rank=2))
    for k, D in deltas.items():
        assert rel(delta_tensor(r.adapter.targets[k]), D) < F32_REL, k


def test_a_read_error_in_another_lane_reaches_the_caller(monkeypatch):
    from loratool.errors import FileError

    monkeypatch.setattr(lanes, "lane_plan", lambda: (3, 1))

    class Failing(ex._MappingSource):
        def mapped(self, key, start=0, stop=None):
            if key == "l3.weight":
                raise FileError("ft: file ended 12 bytes early while reading \"l3.weight\"")
            return super().mapped(key, start, stop)

    deltas = {f"l{i}.weight": low_rank(20, 10, 1, seed=400 + i) for i in range(6)}
    ft, base = pair(**deltas)
    with pytest.raises(FileError, match=re.escape('ft: file ended 12 bytes early while reading "l3.weight"')):
        extract(Failing(ft), base, ExtractOptions(rank=1))


def test_bf16_models_computed_in_float32():
    D = low_rank(64, 48, 2, seed=21, scale=0.05)
    base = {"w": torch.randn(64, 48, generator=g(3)).bfloat16()}
    ft = {"w": (base["w"].float() + D).bfloat16()}
    true = ft["w"].float() - base["w"].float()  # the delta the files actually hold
    t = extract(ft, base, ExtractOptions(rank=48)).adapter.targets["w"]
    assert t.dtype == "BF16" and t.blocks[0].A.dtype == np.float32
    assert rel(delta_tensor(t), true) < F32_REL


# ---- rank rules ---------------------------------------------------------------------------------------------

def test_energy_rule_is_the_smallest_rank_reaching_the_fraction():
    M = noisy(60, 40, seed=23, r=10, noise=0.2)  # small: exact SVD, so the rank is exactly the optimum's
    ft, base = pair(w=M)
    S2 = torch.linalg.svdvals(M.double()) ** 2
    cum = torch.cumsum(S2, 0) / S2.sum()
    for F in (0.5, 0.9, 0.99):
        t = extract(ft, base, ExtractOptions(energy=F)).adapter.targets["w"]
        assert t.rank == int((cum < F).sum()) + 1
        assert t.info["energy"] >= F


def test_energy_rule_on_randomized_path_grows_the_sketch_until_reached():
    M = noisy(400, 300, seed=25, r=40, noise=0.5)
    ft, base = pair(w=M)
    r = extract(ft, base, ExtractOptions(energy=0.8))
    t = r.adapter.targets["w"]
    assert t.info["energy"] >= 0.8 and rel(delta_tensor(t), M) <= math.sqrt(1 - 0.8) + 1e-6
    S2 = torch.linalg.svdvals(M.double()) ** 2
    optimal = int((torch.cumsum(S2, 0) / S2.sum() < 0.8).sum()) + 1
    assert optimal <= t.rank <= optimal + 2  # sketch singular values are slight underestimates


def test_threshold_rule_keeps_singular_values_above_it():
    M = noisy(60, 40, seed=27, r=10)
    ft, base = pair(w=M)
    S = torch.linalg.svdvals(M)
    T = float(S[5] + S[6]) / 2
    t = extract(ft, base, ExtractOptions(threshold=T)).adapter.targets["w"]
    assert t.rank == 6
    r = extract(ft, base, ExtractOptions(threshold=float(S[0]) * 2))
    assert not r.adapter.targets and "no singular value >= --threshold" in r.not_extracted[0]["reason"]


def test_max_params_budget_is_global_greedy_and_respected():
    big = low_rank(80, 60, 3, seed=29, scale=3.0)  # strong delta: should get most of the budget
    small = low_rank(80, 60, 3, seed=31, scale=0.01)
    ft, base = pair(big=big, small=small)
    cost = 80 + 60
    r = extract(ft, base, ExtractOptions(max_params=3 * cost + cost // 2, rank=8))
    assert r.adapter.targets["big"].rank == 3 and "small" not in r.adapter.targets
    assert r.summary["parameters"] <= 3 * cost + cost // 2
    assert r.not_extracted == [{"key": "small", "shape": [80, 60], "reason": "rank 0 under --max-params 490"}]
    r = extract(ft, base, ExtractOptions(max_params=10 ** 9, rank=3))  # generous: everyone gets the cap
    assert {t.key: t.rank for t in r.adapter} == {"big": 3, "small": 3}


def test_budget_with_a_cast_measures_the_stored_factors_in_a_second_pass():
    M = noisy(90, 70, seed=33)
    ft, base = pair(w=M, v=low_rank(90, 70, 2, seed=35))
    r = extract(ft, base, ExtractOptions(max_params=6 * 160, rank=8, dtype="bfloat16"))
    assert r.summary["parameters"] <= 6 * 160
    for k, t in r.adapter.targets.items():
        assert t.blocks[0].A.dtype == ml_dtypes.bfloat16 and t.blocks[0].B.dtype == ml_dtypes.bfloat16
        assert abs(t.info["rel_error"] - rel(delta_tensor(t), ft[k] - base[k])) < 1e-5


def test_budget_ranks_greedy_takes_prefixes_by_energy_per_parameter():
    e1 = ex.Entry("a", (10, 10), "F32", "F32", "matrix", "linear")  # cost 20 per triplet
    e2 = ex.Entry("b", (30, 10), "F32", "F32", "matrix", "linear")  # cost 40 per triplet
    f1 = ex._Factors(e1, None, np.array([3.0, 2.0, 0.1], np.float32), None, 0.0, "exact")
    f2 = ex._Factors(e2, None, np.array([4.0, 3.0, 1.0], np.float32), None, 0.0, "exact")
    # densities: a: 9/20=.45, 4/20=.2, .0005; b: 16/40=.4, 9/40=.225, 1/40=.025
    assert ex._budget_ranks([f1, f2], 20 + 40 + 40) == {"a": 1, "b": 2}
    assert ex._budget_ranks([f1, f2], 19) == {"a": 0, "b": 0}


# ---- determinism, devices -----------------------------------------------------------------------------------

def torch_on_cpu(monkeypatch):
    """Make `device.session` hand out the device layer's torch namespace on the CPU: the code CUDA runs
    (torch arrays, the sketch formed on the device), checked on a machine without a GPU."""
    import contextlib

    import array_api_compat.torch as xp

    dev = devices.Device("cpu:0", xp)  # not "cpu": the torch side of every Device method
    assert not dev.is_cpu
    monkeypatch.setattr(devices, "session", lambda name: contextlib.nullcontext(dev))


def test_seeded_results_repeat_and_the_torch_device_layer_agrees_with_numpy(monkeypatch):
    ms = {f"l{i}.weight": noisy(96, 64, seed=40 + i) for i in range(3)}
    ms["conv.weight"] = low_rank(16, 8 * 9, 3, seed=60).reshape(16, 8, 3, 3)
    ft, base = pair(**ms)
    for opts in (dict(rank=5), dict(energy=0.9)):
        one = extract(ft, base, ExtractOptions(seed=7, **opts))
        again = extract(ft, base, ExtractOptions(seed=7, **opts))
        with monkeypatch.context() as mp:
            torch_on_cpu(mp)
            other = extract(ft, base, ExtractOptions(seed=7, **opts))
        for k in ms:
            a, b, c = (x.adapter.targets[k] for x in (one, again, other))
            assert same_bits(a.blocks[0].A, b.blocks[0].A) and same_bits(a.blocks[0].B, b.blocks[0].B)
            assert c.blocks[0].A.dtype == np.float32 and isinstance(c.blocks[0].A, np.ndarray)
            # the same sketch (drawn on the host) and the same algorithm: the same factors to float32 rounding
            assert a.rank == c.rank if "rank" in opts else abs(a.rank - c.rank) <= 1  # an energy boundary may tie
            assert rel(delta_tensor(c), delta_tensor(a)) < 1e-5
            assert abs(a.info["rel_error"] - c.info["rel_error"]) < 1e-5


def test_torch_device_layer_budget_cast_and_clamp_measure_the_stored_factors(monkeypatch):
    M = noisy(90, 70, seed=33)
    ft, base = pair(w=M, v=low_rank(90, 70, 2, seed=35))
    torch_on_cpu(monkeypatch)
    for opts in (ExtractOptions(max_params=6 * 160, rank=8, dtype="bfloat16"),
                 ExtractOptions(rank=6, clamp_quantile=0.9)):
        r = extract(ft, base, opts)
        for k, t in r.adapter.targets.items():
            assert abs(t.info["rel_error"] - rel(delta_tensor(t), ft[k] - base[k])) < 1e-5


@pytest.mark.gpu
def test_cuda_agrees_with_cpu():
    ms = {f"l{i}.weight": noisy(512, 384, seed=50 + i) for i in range(4)}
    ms["conv.weight"] = low_rank(16, 8 * 9, 3, seed=60).reshape(16, 8, 3, 3)
    ft, base = pair(**ms)
    for opts in (dict(rank=8), dict(energy=0.9)):
        cpu = extract(ft, base, ExtractOptions(**opts))
        gpu = extract(ft, base, ExtractOptions(device="cuda", **opts))
        for k in ms:
            a, b = cpu.adapter.targets[k], gpu.adapter.targets[k]
            assert a.rank == b.rank if "rank" in opts else abs(a.rank - b.rank) <= 1  # an energy boundary may tie
            assert rel(delta_tensor(b), delta_tensor(a)) < 1e-4
            assert abs(a.info["rel_error"] - b.info["rel_error"]) < 1e-4


# ---- lanes: the CPU route's pairs on one thread per core ---------------------------------------------------------

def lanes_pair():
    """Pairs of every kind a lane handles: matrices of several shapes (sketched as they are read, or exact),
    a conv kernel, a fan_in_fan_out weight, an unchanged one, a listed vector and embedding."""
    deltas = {"a.weight": noisy(96, 64, seed=70), "b.weight": noisy(40, 130, seed=71),
              "c.weight": low_rank(12, 10, 2, seed=72), "conv.weight": low_rank(16, 36, 3, seed=73).reshape(16, 4, 3, 3),
              "h.c_attn.weight": noisy(64, 48, seed=74), "d.weight": noisy(200, 24, seed=75)}
    ft, base = pair(**deltas)
    base["same.weight"] = ft["same.weight"] = torch.randn(30, 20, generator=g(76))
    base["n.bias"], ft["n.bias"] = torch.zeros(8), torch.ones(8)
    base["model.embed_tokens.weight"] = torch.randn(50, 8, generator=g(77))
    ft["model.embed_tokens.weight"] = base["model.embed_tokens.weight"] + 1
    return ft, base


@pytest.mark.parametrize("opts", [ExtractOptions(rank=4, fan_in_fan_out=("*.c_attn.weight",)),
                                  ExtractOptions(energy=0.9), ExtractOptions(max_params=900, rank=6, dtype="bfloat16"),
                                  ExtractOptions(rank=3, keep_full=True, clamp_quantile=0.99)])
def test_lanes_give_the_same_result_as_one_lane(monkeypatch, opts):
    monkeypatch.setattr(lanes, "CHUNK_ELEMENTS", 256)  # several pieces per pair, rows shorter than a piece
    ft, base = lanes_pair()
    runs = []
    for n in (1, 3):
        monkeypatch.setattr(lanes, "lane_plan", lambda n=n: (n, 1))
        runs.append(extract(ft, base, opts))
    one, three = runs
    assert one.rows == three.rows and one.not_extracted == three.not_extracted and one.unchanged == three.unchanged
    assert one.unchanged == 1  # the unchanged pair; the changed vector and embedding listed or stored whole:
    whole = {k for k, t in one.adapter.targets.items() if t.kind == "full"}
    assert whole == ({"n.bias", "model.embed_tokens.weight"} if opts.keep_full else set())
    listed = {x["key"] for x in one.not_extracted if not x["reason"].startswith("rank 0")}
    assert listed == (set() if opts.keep_full else {"n.bias", "model.embed_tokens.weight"})
    assert one.adapter.targets.keys() == three.adapter.targets.keys()
    for k, t in one.adapter.targets.items():
        u = three.adapter.targets[k]
        if t.kind == "full":
            assert same_bits(t.delta, u.delta)
            continue
        assert same_bits(t.blocks[0].A, u.blocks[0].A)
        assert same_bits(t.blocks[0].B, u.blocks[0].B)


def test_sketch_formed_while_reading_is_the_product_with_the_same_test_matrix(monkeypatch):
    """The first sketch M @ Omega and its W = Y^T M, formed on row pieces as they are read, are the products
    that randomized_svd would form, and the factors they lead to are those of the plain route (float32
    rounding apart)."""
    monkeypatch.setattr(lanes, "CHUNK_ELEMENTS", 200)  # 3 rows of 64 per piece, and a short last piece
    D = noisy(100, 64, seed=80)
    ft, base = pair(w=D)
    src_ft, src_base = ex._source(ft), ex._source(base)
    opts = ExtractOptions(rank=5)
    e = plan(ft, base, opts)[0]
    omega = ex.sketch_while_reading(CPU, e, opts)
    l = ex.first_sketch(e, opts)
    assert omega.shape == (64, l) and np.array_equal(omega, gaussian_sketch(64, l, seed_for(0, "w")))
    delta = np.empty(e.numel, np.float32)
    E, Y, W = lanes.subtract(src_ft, src_base, e, delta, lanes.Scratch(), omega)
    M = delta.reshape(100, 64)
    assert np.array_equal(M, (ft["w"] - base["w"]).numpy())
    assert E == pytest.approx(float(D.double().square().sum()), rel=1e-6)
    assert Y.shape == (100, l)
    np.testing.assert_allclose(Y, M @ omega, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(W, (M @ omega).T @ M, rtol=1e-4, atol=1e-4)  # summed over 34 pieces
    fused, plain = ex.factorize(CPU, M, e, E, opts, Y, W), ex.factorize(CPU, M, e, E, opts)
    np.testing.assert_allclose(fused.S, plain.S, rtol=1e-5)
    # a transposed view (fan_in_fan_out), an exact SVD, or a row longer than a piece: no sketch while reading
    assert ex.sketch_while_reading(CPU, ex.Entry("w", (100, 64), "F32", "F32", "matrix", "fan_in_fan_out"),
                                   opts) is None
    assert ex.sketch_while_reading(CPU, e, ExtractOptions(rank=20)) is None  # sketch 40 >= 64 / 2: exact
    assert lanes.subtract(src_ft, src_base, e, delta, lanes.Scratch())[1] is None
    monkeypatch.setattr(lanes, "CHUNK_ELEMENTS", 32)
    assert ex.sketch_while_reading(CPU, e, opts) is None


# ---- matrices over the delta budget: streamed, never held ------------------------------------------------------

STREAMED_REL = 1e-5  # streamed vs held: float32 rounding of block-summed products, relative Frobenius/abs error
TINY_BUDGET = 4000  # bytes: 1000-element row blocks; every matrix below but the exact (12, 10) one streams


def streamed_pair():
    """Randomized matrices of every layout whose row counts are not multiples of their blocks (103 rows of 48:
    blocks of 20; stored (70, 37): 27; embedding (101, 40): 25; conv (40, 72): 13; (300, 140): 7), and a small
    exact one."""
    deltas = {"a.weight": noisy(103, 48, seed=90), "h.c_attn.weight": noisy(70, 37, seed=91),
              "model.embed_tokens.weight": noisy(101, 40, seed=92),
              "conv.weight": noisy(40, 72, seed=93).reshape(40, 8, 3, 3), "c.weight": low_rank(12, 10, 2, seed=94),
              "big.weight": noisy(300, 140, seed=95)}  # randomized at the energy rule's first sketch (64)
    return pair(**deltas)


@pytest.mark.parametrize("opts", [
    ExtractOptions(rank=4, fan_in_fan_out=("*.c_attn.weight",), embeddings=True),
    ExtractOptions(rank=4, embeddings=True, power_iterations=2, seed=3, clamp_quantile=0.95),
    ExtractOptions(energy=0.995, embeddings=True, dtype="bfloat16"),  # grows to a complete sketch of big
    ExtractOptions(max_params=1500, rank=6, embeddings=True, dtype="float16")])
def test_streamed_matrices_give_the_held_route_s_factors_and_errors(monkeypatch, opts):
    """A budget smaller than every randomized matrix streams them all (row blocks re-read for each product),
    and the result is the held route's: same ranks, reports and reconstructions to float32 rounding."""
    from dataclasses import replace

    monkeypatch.setattr(lanes, "CHUNK_ELEMENTS", 256)  # blocks read in several pieces
    made, slots = [], []
    real_op, real_sizes = lanes.StreamedDelta, lanes.slot_sizes
    monkeypatch.setattr(lanes, "StreamedDelta", lambda *a: made.append(a[3].key) or real_op(*a))
    monkeypatch.setattr(lanes, "slot_sizes", lambda *a: slots.append(real_sizes(*a)) or slots[-1])
    ft, base = streamed_pair()
    held = extract(ft, base, opts)
    assert not made
    slots.clear()
    small = replace(opts, delta_budget=TINY_BUDGET)
    streamed = extract(ft, base, small)
    want = {"big.weight"} if opts.energy else {"a.weight", "h.c_attn.weight", "model.embed_tokens.weight",
                                               "conv.weight", "big.weight"}
    assert set(made) >= want and set(made) == {e.key for e in plan(ft, base, small) if ex.streams(e, small)}
    # slots only for the pairs the budget keeps: the exact ones ((12, 10); with the energy rule all but big)
    assert max(max(sizes, default=0) for sizes in slots) == (103 * 48 if opts.energy else 12 * 10)
    if opts.energy:  # the sketch grew past half of big's small side: the held route's exact SVD, a complete one
        assert [r["method"] for r in held.rows if r["key"] == "big.weight"] == ["exact"]
        assert [r["rank"] for r in streamed.rows if r["key"] == "big.weight"][0] > 64
    assert held.not_extracted == streamed.not_extracted
    assert held.adapter.targets.keys() == streamed.adapter.targets.keys()
    for h, s in zip(held.rows, streamed.rows):
        assert h["key"] == s["key"] and h["rank"] == s["rank"] and h["layout"] == s["layout"]
        for name in ("rel_error", "norm", "energy"):
            assert s[name] == pytest.approx(h[name], rel=STREAMED_REL, abs=STREAMED_REL), (h["key"], name)
    for k, t in held.adapter.targets.items():
        u = streamed.adapter.targets[k]
        assert t.blocks[0].A.dtype == u.blocks[0].A.dtype
        assert rel(delta_tensor(u), delta_tensor(t)) < (STREAMED_REL if opts.dtype == "float32" else 1e-2)


def test_streamed_products_are_the_matrix_products_for_every_layout(monkeypatch):
    """The operator's M @ X, Qt @ M and ||M - B A||^2 equal the held matrix's, transposed layouts included."""
    monkeypatch.setattr(lanes, "CHUNK_ELEMENTS", 100)
    rng = np.random.default_rng(0)
    for key, shape, layout in (("a", (103, 48), "linear"), ("b", (70, 37), "fan_in_fan_out"),
                               ("c", (40, 8, 3, 3), "conv")):
        base = {key: rng.standard_normal(shape, dtype=np.float32)}
        ft = {key: (base[key] + rng.standard_normal(shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)}
        e = ex.Entry(key, shape, "BF16", "F32", "matrix", layout)
        op = lanes.StreamedDelta(CPU, ex._source(ft), ex._source(base), e, lanes.Scratch(), 1000)
        W = ft[key].astype(np.float32) - base[key]
        M = W.T if layout == "fan_in_fan_out" else W.reshape(e.matrix_shape)
        m, n = M.shape
        assert op.shape == (m, n) and op.block_rows < shape[0] and shape[0] % op.block_rows
        X, Qt = rng.standard_normal((n, 5), dtype=np.float32), rng.standard_normal((5, m), dtype=np.float32)
        np.testing.assert_allclose(op.matmul(X), M @ X, rtol=STREAMED_REL, atol=STREAMED_REL * 100)
        assert op.energy == pytest.approx(float(np.square(M.astype(np.float64)).sum()), rel=1e-9)
        np.testing.assert_allclose(op.rmatmul(Qt), Qt @ M, rtol=STREAMED_REL, atol=STREAMED_REL * 100)
        B, A = rng.standard_normal((m, 3), dtype=np.float32), rng.standard_normal((3, n), dtype=np.float32)
        want = float(np.square((M - B @ A).astype(np.float64)).sum())
        assert op.residual_squares(B, A) == pytest.approx(want, rel=STREAMED_REL)


def test_run_lanes_keeps_order_and_never_holds_more_than_its_slots():
    import threading
    import time

    sizes = [5, 50, 7, 20, 3, 50, 8, 9, 1, 40]
    entries = [ex.Entry(f"e{i}", (n,), "F32", "F32", "full") for i, n in enumerate(sizes)]
    entries.insert(3, ex.Entry("listed", (4,), "F32", "F32", "vector"))  # compared only: no slot
    assert lanes.slot_sizes(entries, 3) == [50, 50, 50]  # AHEAD_BYTES: the further slots hold the largest here
    slots = [50, 20, 20]  # a tight set: the 40s and 50s must wait for the big slot
    live, peak, lock, ticks = [0], [0], threading.Lock(), []

    def handle(s, e, delta):
        if not e.whole:
            assert delta is None
            return e.key
        assert delta.size == e.numel
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        delta[:] = len(e.key)
        time.sleep(0.01)
        try:
            assert (delta == len(e.key)).all()  # no other lane wrote into this slot meanwhile
        finally:
            with lock:
                live[0] -= 1
        return e.key

    out = lanes.run_lanes(entries, handle, 3, slots, tick=lambda **kw: ticks.append(kw))
    assert out == [e.key for e in entries]
    assert len(ticks) == len(entries) and 2 <= peak[0] <= 3


def test_run_lanes_reports_the_first_failing_pair_in_order():
    import time

    entries = [ex.Entry(f"e{i}", (4,), "F32", "F32", "full") for i in range(12)]
    started = []

    def handle(s, e, delta):
        started.append(e.key)
        if e.key == "e2":
            time.sleep(0.05)  # fails last in time, first in order
            raise ValueError("e2 failed")
        if e.key in ("e3", "e4"):
            raise ValueError(f"{e.key} failed")
        return e.key

    with pytest.raises(ValueError, match="^e2 failed$"):
        lanes.run_lanes(entries, handle, 3, [4, 4, 4])
    assert "e11" not in started  # no pair is begun after a failure


def test_blas_threads_are_limited_per_lane_during_the_run_and_restored(monkeypatch):
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before = blas_threads()
    assert before, "threadpoolctl sees no BLAS in numpy (the run would keep one lane)"
    seen = []
    real = lanes.run_lanes

    def spy(*args, **kw):
        seen.append(blas_threads())
        return real(*args, **kw)

    monkeypatch.setattr(lanes, "lane_plan", lambda: (2, 1))
    monkeypatch.setattr(lanes, "run_lanes", spy)
    ft, base = pair(w=low_rank(30, 20, 2, seed=90))
    extract(ft, base, ExtractOptions(rank=2))
    assert seen and all(n == 1 for n in seen[0])
    assert blas_threads() == before


def test_the_cpu_route_never_imports_torch(tmp_path):
    """Files in, adapter out, on the CPU: numpy, ml_dtypes and threadpoolctl only."""
    import subprocess
    import sys

    from loratool.container import write_file

    rng = np.random.default_rng(0)
    base = {"a.weight": rng.standard_normal((64, 48), dtype=np.float32).astype(ml_dtypes.bfloat16),
            "a.bias": np.zeros(64, np.float32)}
    ft = {"a.weight": (base["a.weight"].astype(np.float32)
                       + rng.standard_normal((64, 2), dtype=np.float32) @ rng.standard_normal((2, 48), dtype=np.float32)
                       ).astype(ml_dtypes.bfloat16), "a.bias": np.ones(64, np.float32)}
    write_file(tmp_path / "base.safetensors", base, {})
    write_file(tmp_path / "ft.safetensors", ft, {})
    code = ("import sys; from loratool import extract as extract_files; "
            f"r = extract_files({str(tmp_path / 'ft.safetensors')!r}, {str(tmp_path / 'base.safetensors')!r}, "
            f"output={str(tmp_path / 'a.safetensors')!r}, rank=2, keep_full=True, dtype='bfloat16'); "
            "assert r.bytes > 0 and r.summary['targets'] == 1, r.summary; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(Path(__file__).parents[1]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- refusals -----------------------------------------------------------------------------------------------

def test_shape_mismatch_between_models():
    ft = {"w": torch.zeros(4, 5)}
    base = {"w": torch.zeros(5, 4)}
    with pytest.raises(MismatchError, match=re.escape(
            'ft.safetensors: tensor "w" has shape [4, 5] but [5, 4] in base/; the models have different '
            'architectures')):
        extract(ft, base, ExtractOptions(rank=1), names=("ft.safetensors", "base/"))


def test_missing_tensors_in_either_model():
    with pytest.raises(MismatchError, match=re.escape(
            'base/: tensor "extra" of ft.pt is missing; both models need the same tensors (restrict with --targets)')):
        plan({"w": torch.zeros(2, 2), "extra": torch.zeros(2)}, {"w": torch.zeros(2, 2)},
             ExtractOptions(rank=1), names=("ft.pt", "base/"))
    with pytest.raises(MismatchError, match=re.escape('ft.pt: tensor "extra" of base/ is missing')):
        plan({"w": torch.zeros(2, 2)}, {"w": torch.zeros(2, 2), "extra": torch.zeros(2)},
             ExtractOptions(rank=1), names=("ft.pt", "base/"))
    # --targets narrows the pairing: the extra tensor is then out of scope.
    assert [e.key for e in plan({"w": torch.zeros(2, 2), "extra": torch.zeros(2)}, {"w": torch.zeros(2, 2)},
                                ExtractOptions(rank=1, targets=("w",)))] == ["w"]
    with pytest.raises(MismatchError, match=re.escape('ft: no tensor matches --targets "*.q_proj.*"')):
        plan({"w": torch.zeros(2, 2)}, {"w": torch.zeros(2, 2)}, ExtractOptions(rank=1, targets=("*.q_proj.*",)),
             names=("ft", "base"))


def test_non_finite_difference_names_the_tensor():
    ft = {"w": torch.ones(6, 4)}
    ft["w"][2, 1] = float("inf")
    with pytest.raises(NumericError, match=re.escape(
            'ft: tensor "w": the difference with base is not finite (NaN or Inf in a model); nothing was written')):
        extract(ft, {"w": torch.zeros(6, 4)}, ExtractOptions(rank=1), names=("ft", "base"))


def test_float16_overflow_of_factors_is_refused():
    ft, base = pair(w=low_rank(20, 10, 1, seed=3, scale=1e4))
    with pytest.raises(NumericError, match=re.escape('target "w": factors overflow float16; use --dtype bfloat16')):
        extract(ft, base, ExtractOptions(rank=1, dtype="float16"))


# ---- numerics helpers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("q", [0.0, 0.01, 0.5, 0.9, 0.99, 1.0])
def test_quantile_matches_torch_quantile(q):
    x = torch.randn(10_001, generator=g(5))
    assert quantile(x.numpy(), q) == pytest.approx(float(torch.quantile(x, q)), rel=1e-6, abs=1e-7)


def test_quantile_works_above_torch_quantile_limit():
    n = (1 << 24) + 3  # torch.quantile raises above 2^24 elements
    x = np.arange(n, dtype=np.float32)[::-1]  # sorted input: a plain quickselect goes quadratic here
    assert quantile(x, 0.5) == pytest.approx((n - 1) / 2, rel=1e-7)
    assert quantile(x, 0.99) == pytest.approx(0.99 * (n - 1), rel=1e-7)
    assert quantile(x, 1e-5) == pytest.approx(1e-5 * (n - 1), rel=1e-6)


def test_sum_squares_is_accurate_where_float32_norms_are_not():
    x = torch.randn(1 << 22, generator=g(1)) * 0.01 + 0.003
    exact = float(x.double().square().sum())
    assert abs(sum_squares(CPU, x.numpy()) - exact) / exact < 1e-8
    assert abs(sum_squares(CPU, x[:1000].numpy()) - float(x[:1000].double().square().sum())) < 1e-9


def test_randomized_svd_shapes_orthonormality_and_wide_exact_svd():
    M = noisy(200, 120, seed=61).numpy()
    U, S, Vh = randomized_svd(CPU, M, 20, seed_for(0, "m"))
    assert U.shape == (200, 20) and S.shape == (20,) and Vh.shape == (20, 120)
    assert np.abs(U.T @ U - np.eye(20)).max() < 1e-5 and np.abs(Vh @ Vh.T - np.eye(20)).max() < 1e-5
    assert bool((S[:-1] >= S[1:]).all())
    U2, S2, Vh2 = exact_svd(CPU, M.T)  # wide: decomposed as its transpose
    assert U2.shape == (120, 120) and Vh2.shape == (120, 200)
    assert rel(torch.from_numpy((U2 * S2) @ Vh2), torch.from_numpy(M.T.copy())) < F32_REL


def test_orthonormal_basis_of_an_exactly_low_rank_sketch_falls_back_to_householder(monkeypatch):
    """A sketch of a rank-3 matrix by 12 columns is rank-deficient: Cholesky QR fails or is not orthonormal,
    and the Householder QR still gives an orthonormal basis, so the factors are exact."""
    from loratool.ops import svd

    calls = []
    householder = svd._householder
    monkeypatch.setattr(svd, "_householder", lambda dev, Y: calls.append(Y.shape) or householder(dev, Y))
    M = low_rank(80, 60, 3, seed=62).numpy()
    Q = svd.orthonormal_basis(CPU, M @ gaussian_sketch(60, 12, 1))
    assert calls == [(80, 12)]
    assert np.abs(Q.T @ Q - np.eye(12)).max() <= svd.ORTHO_TOL
    U, S, Vh = randomized_svd(CPU, M, 12, seed_for(0, "low"))
    assert rel(torch.from_numpy((U[:, :3] * S[:3]) @ Vh[:3]), torch.from_numpy(M)) < F32_REL


def test_windows_of_the_mapping_give_the_same_extraction(monkeypatch):
    """A pair is mapped a window at a time (bounded resident set); windows are whole pieces, so the result does
    not depend on their size, bit for bit."""
    ms = {f"l{i}.weight": noisy(300 + 17 * i, 200, seed=70 + i) for i in range(3)}
    ms["conv.weight"] = low_rank(16, 8 * 9, 3, seed=61).reshape(16, 8, 3, 3)
    ft, base = pair(**ms)
    monkeypatch.setattr(lanes, "CHUNK_ELEMENTS", 1000)  # pieces of the same size in both runs
    want = extract(ft, base, ExtractOptions(rank=4))  # one window per pair
    monkeypatch.setattr(lanes, "WINDOW_ELEMENTS", 3000)  # several windows of several pieces per pair
    got = extract(ft, base, ExtractOptions(rank=4))
    for k in ms:
        a, b = want.adapter.targets[k].blocks[0], got.adapter.targets[k].blocks[0]
        assert np.array_equal(a.A, b.A) and np.array_equal(a.B, b.B), k


def test_base_reader_maps_any_window_of_a_tensor(tmp_path):
    from loratool.container import write_file
    from loratool.io.base import open_base

    W = np.arange(6 * 7, dtype=np.float32).reshape(6, 7).astype(ml_dtypes.bfloat16)
    write_file(tmp_path / "m.safetensors", {"a": np.ones(3, np.float32), "w": W}, {})
    with open_base(tmp_path / "m.safetensors") as b:
        for start, stop in ((0, 42), (5, 19), (41, 42), (7, 7)):
            with b.mapped("w", start, stop) as F:
                assert F.dtype == W.dtype and np.array_equal(F, W.reshape(-1)[start:stop])
        with pytest.raises(ValueError, match=re.escape("elements [40, 43) outside tensor of 42")):
            with b.mapped("w", 40, 43):
                pass


def test_fused_passes_match_the_plain_products_and_the_projection_by_one_more_product(monkeypatch):
    """`project` on row blocks (forced by shrinking the size limit) gives M X and (M X)^T M; the projection
    T^T (Y^T M) gives the factors that Q^T M by one more product gives (float32 rounding apart)."""
    from loratool.ops import svd

    M = noisy(300, 200, seed=90).numpy()
    X = gaussian_sketch(200, 12, 3)
    monkeypatch.setattr(svd, "PROJECT_MIN_BYTES", 0)
    monkeypatch.setattr(svd, "PROJECT_BLOCK_ELEMENTS", 200 * 7)  # blocks of 7 rows and a short last one
    Y, W = svd.DenseOperator(CPU, M).project(X)
    np.testing.assert_allclose(Y, M @ X, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(W, (M @ X).T @ M, rtol=1e-4, atol=1e-3)
    U, S, Vh = randomized_svd(CPU, M, 20, seed_for(0, "m"))
    monkeypatch.setattr(svd, "PROJECT_MAX_GROWTH", 0.0)  # every projection by Q^T M
    calls = []
    op = svd.DenseOperator(CPU, M)
    monkeypatch.setattr(op, "rmatmul", lambda Qt: calls.append(Qt.shape) or Qt @ M)
    U2, S2, Vh2 = randomized_svd(CPU, op, 20, seed_for(0, "m"))
    assert calls == [(20, 300)]
    np.testing.assert_allclose(S, S2, rtol=1e-5)
    assert np.abs(U.T @ U - np.eye(20)).max() < 1e-5 and np.abs(Vh @ Vh.T - np.eye(20)).max() < 1e-5
