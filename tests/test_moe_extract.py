"""extract on transformers 5's fused expert tensors: each expert factorised as its own matrix, written as one
target with one block per expert in the base's layout ("experts" (E, out, in), gpt-oss "experts_t" (E, in, out)),
which merge maps back exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import loratool
from loratool.container import write_file
from loratool.tasks.merge import merge as run_merge

FUSED = ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj")
# The SVDs here are exact (LAPACK: the sketch would cover half a tiny matrix's small side), so the factors
# match numpy's SVD of each expert to float32 rounding of the singular vectors.
SVD_RTOL = 1e-4


def expert_matrices(W, layout):
    """Each expert's (out, in) matrix of a fused tensor."""
    return [W[e] if layout == "experts" else W[e].T for e in range(W.shape[0])]


def finetuned_pair(tmp_path, build, ranks=(1, 2, 3), noise=1e-3, seed=5):
    """(base file, finetuned file, base state dict, finetuned state dict): the fused expert tensors of the
    finetune differ from the base by a per-expert delta of rank ranks[e % len(ranks)] plus small noise."""
    from models import base_state_dict

    base = base_state_dict(build())
    g = torch.Generator().manual_seed(seed)
    ft = {k: v.clone() for k, v in base.items()}
    for key in FUSED:
        W = ft[key]
        for e in range(W.shape[0]):
            r = ranks[e % len(ranks)]
            d1, d2 = W.shape[1:]
            W[e] += torch.randn(d1, r, generator=g) @ torch.randn(r, d2, generator=g) * 0.1
            W[e] += torch.randn(d1, d2, generator=g) * noise
    write_file(tmp_path / "base.safetensors", base, {"format": "pt"})
    write_file(tmp_path / "ft.safetensors", ft, {"format": "pt"})
    return tmp_path / "base.safetensors", tmp_path / "ft.safetensors", base, ft


@pytest.mark.parametrize("name,layout", [("tiny_mixtral", "experts"), ("tiny_gpt_oss", "experts_t")])
def test_extract_factorises_each_expert_and_merges_back(tmp_path, name, layout):
    import models

    base, ft, bsd, fsd = finetuned_pair(tmp_path, getattr(models, name))
    out = tmp_path / "a.safetensors"
    res = loratool.extract(ft, base, rank=2, output=out)
    assert res.summary["targets"] == 2 and res.summary["unchanged"] == len(bsd) - 2
    a = loratool.load(out).as_numpy()
    for key in FUSED:
        t = a.targets[key]
        E = bsd[key].shape[0]
        assert t.layout == layout and len(t.blocks) == E and t.info["expert_ranks"] == [2] * E
        D = expert_matrices((fsd[key] - bsd[key]).numpy(), layout)
        err2 = norm2 = 0.0
        for e, b in enumerate(t.blocks):
            U, S, Vh = np.linalg.svd(D[e].astype(np.float64))
            want = (U[:, :2] * S[:2]) @ Vh[:2]  # the optimal rank-2 approximation of expert e alone
            got = b.B.astype(np.float64) @ b.A.astype(np.float64) * b.scale
            assert np.linalg.norm(got - want) <= SVD_RTOL * np.linalg.norm(want), (key, e)
            np.testing.assert_allclose(np.linalg.norm(b.B, axis=0), S[:2], rtol=SVD_RTOL)  # B = U diag(S)
            err2 += (S[2:] ** 2).sum()
            norm2 += (S ** 2).sum()
        row = next(r for r in res.rows if r["key"] == key)
        assert row["rel_error"] == pytest.approx(np.sqrt(err2 / norm2), rel=1e-3)
    merged = tmp_path / "merged.safetensors"
    run_merge(base, [out], merged, verify=True)
    from safetensors.torch import load_file

    m = load_file(str(merged))
    for key in FUSED:  # the merge puts each expert's B A back on that expert: the reported error, measured
        got = np.linalg.norm((m[key] - fsd[key]).double().numpy()) / np.linalg.norm((fsd[key] - bsd[key]).double())
        row = next(r for r in res.rows if r["key"] == key)
        assert got == pytest.approx(row["rel_error"], rel=1e-3)


def test_rank_rules_choose_per_expert(tmp_path):
    """--energy picks each expert's own rank; --max-params spends one budget across all experts (the greedy
    order takes the largest singular values first, whichever expert they belong to)."""
    from models import tiny_mixtral

    base, ft, bsd, _ = finetuned_pair(tmp_path, tiny_mixtral, ranks=(1, 2, 3), noise=1e-5)
    res = loratool.extract(ft, base, energy=0.999, output=tmp_path / "e.safetensors")
    assert next(r for r in res.rows if r["key"] == FUSED[1])["expert_ranks"] == [1, 2, 3]
    res = loratool.extract(ft, base, max_params=700, rank=4, output=tmp_path / "p.safetensors")
    assert res.summary["parameters"] <= 700
    ranks = {r["key"]: r["expert_ranks"] for r in res.rows}
    assert all(0 <= k <= 4 for rs in ranks.values() for k in rs) and sum(map(sum, ranks.values())) > 0


def test_randomized_svd_per_expert_matches_the_exact_one():
    """Experts large enough for the randomized SVD (ops.extract with expert_layouts, on plain arrays): each
    expert's factors equal its exact truncated SVD within the randomized SVD's error, which for a delta of
    exact rank k with power iterations is float32 rounding (RANDOMIZED_RTOL)."""
    from loratool.ops.extract import ExtractOptions, extract

    RANDOMIZED_RTOL = 1e-4
    rng = np.random.default_rng(0)
    E, out, inp = 2, 256, 192
    base = rng.standard_normal((E, inp, out)).astype(np.float32)  # "experts_t": (E, in, out)
    D = np.stack([(rng.standard_normal((inp, 4)) @ rng.standard_normal((4, out))).astype(np.float32)
                  for _ in range(E)])
    key = "m.experts.down_proj"
    res = extract({key: base + D}, {key: base}, ExtractOptions(rank=4, expert_layouts={key: "experts_t"}))
    t = res.adapter.targets[key]
    assert res.rows[0]["method"] == "randomized" and [b.cols for b in t.blocks] == [(0, inp), (inp, 2 * inp)]
    for e, b in enumerate(t.blocks):
        M = ((base[e] + D[e]).astype(np.float64) - base[e]).T  # expert e's (out, in) delta as float32 holds it
        U, S, Vh = np.linalg.svd(M)
        want = (U[:, :4] * S[:4]) @ Vh[:4]
        assert np.linalg.norm(b.B @ b.A - want) <= RANDOMIZED_RTOL * np.linalg.norm(want)


# PEFT's ParamWrapper forward adds the expert delta (an einsum of the factors) to the weight before the
# product, as loratool's merge writes W + s B A, both in float32: the logits can differ only where the einsum
# sums an element's r products in another order than the matmul, a few float32 epsilons of the logits' size
# (measured here: 0, identical logits).
LOGITS_RTOL = 1e-5


def logits(model):
    from models import sample_input

    with torch.no_grad():
        return model(sample_input()).logits.double()


@pytest.mark.parametrize("name", ["tiny_mixtral", "tiny_gpt_oss"])
def test_extract_to_peft_loads_in_peft(tmp_path, name):
    """extract --to peft writes fused experts as ParamWrapper factors (target_parameters; experts of different
    ranks zero-padded to the largest): PeftModel.from_pretrained loads the folder, and its logits equal those of
    loratool's merge of the same adapter."""
    import models
    from peft import PeftModel

    build = getattr(models, name)
    base, ft, bsd, _ = finetuned_pair(tmp_path, build, ranks=(1, 2, 3), noise=1e-5)
    res = loratool.extract(ft, base, energy=0.999, to="peft", output=tmp_path / "peft")
    assert {tuple(r["expert_ranks"]) for r in res.rows} == {(1, 2, 3)}
    merged = tmp_path / "merged.safetensors"
    run_merge(base, [tmp_path / "peft"], merged)
    from safetensors.torch import load_file

    m = build()
    m.load_state_dict(load_file(str(merged)))
    want = logits(m)
    pm = PeftModel.from_pretrained(build(), str(tmp_path / "peft")).eval()
    got = logits(pm)
    assert (got - want).abs().max() <= LOGITS_RTOL * want.abs().max()
    assert (got - logits(build())).abs().max() > 100 * LOGITS_RTOL * want.abs().max()  # the adapter is applied
