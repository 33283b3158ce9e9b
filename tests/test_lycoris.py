"""LyCORIS kinds (LoCon, LoCon-Tucker, LoHa, LoKr, DoRA) against lycoris-lora's own modules: files written from
their state dicts in kohya naming, merged by loratool, compared with the module's forward; written back bit for
bit; converted to LoRA within 1% of the optimal truncation; operations that have no exact meaning refused.

The oracle is the module's forward with the adapter applied (`apply_to`), not its `merge_to`: lycoris-lora 4.1's
LohaModule/LokrModule.get_merged_weight multiply the scale alpha/r twice (get_weight already applies it, and
get_diff_weight multiplies by it again), so its merged weight differs from its own forward whenever alpha != r
(test_lycoris_merge_to_differs_from_its_forward shows it). loratool follows the forward, which is what the
module trained and what ComfyUI and sd-webui load.
"""

import dataclasses
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from clitools import run
from loratool.errors import UnsupportedError
from loratool.io import kohya as K
from loratool.ops.kinds import dense_matrix
from loratool.ops.to_lora import to_lora
from loratool.ops.merge import Term, merge_tensor

from lycoris.modules.locon import LoConModule  # noqa: E402
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402

RTOL = 2e-6  # max |y_lycoris - y_loratool| / max |y|: float32 rounding of two summation orders (measured ~4e-7)
NAME = "lora_unet_x"

CASES = [
    ("locon", LoConModule, {}, False),
    ("locon-tucker", LoConModule, {"use_tucker": True}, True),
    ("loha", LohaModule, {}, False),
    ("loha-conv", LohaModule, {}, True),
    ("loha-tucker", LohaModule, {"use_tucker": True}, True),
    ("lokr-w2-decomposed", LokrModule, {"factor": 4}, False),
    ("lokr-both-decomposed", LokrModule, {"decompose_both": True, "factor": 8, "lora_dim": 1}, False),
    ("lokr-whole", LokrModule, {"factor": 4, "lora_dim": 16}, False),
    ("lokr-tucker", LokrModule, {"use_tucker": True, "factor": 2}, True),
    ("dora-locon", LoConModule, {"weight_decompose": True}, False),
    ("dora-locon-in", LoConModule, {"weight_decompose": True, "wd_on_out": False}, False),
    ("dora-loha-conv", LohaModule, {"weight_decompose": True}, True),
    ("dora-lokr-in", LokrModule, {"weight_decompose": True, "wd_on_out": False, "factor": 4}, False),
]


def build(cls, kw, conv, seed=0):
    """(layer, its weight before, the wrapped module) with every adapter parameter random and nonzero."""
    torch.manual_seed(seed)
    layer = torch.nn.Conv2d(8, 16, 3, bias=False) if conv else torch.nn.Linear(16, 32, bias=False)
    W0 = layer.weight.detach().clone()
    kw = {"lora_dim": 2, **kw}
    m = cls(NAME, layer, 1.0, alpha=1.0, **kw)  # alpha 1 != r: the scale rule matters
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.mul_(1.1) if n == "dora_scale" else p.copy_(torch.randn_like(p) * 0.3)
    return layer, W0, m


def write(tmp_path, m) -> str:
    f = tmp_path / "lyco.safetensors"
    save_file({f"{NAME}.{k}": v.detach().clone().contiguous() for k, v in m.state_dict().items()}, str(f))
    return f


def with_shape(t, shape):
    # Read without a base, a LoHa/LoKr conv target has the flat shape its factors give; the base gives the kernel.
    return t if tuple(t.shape) == tuple(shape) else dataclasses.replace(t, shape=tuple(shape), layout="conv")


@pytest.mark.parametrize("label, cls, kw, conv", CASES, ids=[c[0] for c in CASES])
def test_merge_equals_lycoris_forward(tmp_path, label, cls, kw, conv):
    layer, W0, m = build(cls, kw, conv)
    t = with_shape(K.load(write(tmp_path, m)).targets[f"{NAME}.weight"], W0.shape)
    m.apply_to()
    x = torch.randn(2, 8, 6, 6) if conv else torch.randn(3, 16)
    with torch.no_grad():
        y = layer(x)
    merged, probe = merge_tensor(W0.numpy(), t.key, [Term(t, 1.0)], probe=True)
    W = torch.from_numpy(merged)
    y2 = torch.nn.functional.conv2d(x, W) if conv else x @ W.T
    assert float((y - y2).abs().max()) <= RTOL * float(y.abs().max()), label
    assert probe < 1e-6


def test_lycoris_merge_to_differs_from_its_forward():
    layer, W0, m = build(LohaModule, {}, False)
    m.apply_to()
    x = torch.eye(16)
    with torch.no_grad():
        forward_delta = (layer(x) - x @ W0.T).T  # (out, in)
        merged_delta = m.get_merged_weight(1.0)[0] - W0
    assert torch.allclose(merged_delta, forward_delta * m.scale, atol=1e-6)  # scale applied twice by merge_to
    assert not torch.allclose(merged_delta, forward_delta, atol=1e-3)


@pytest.mark.parametrize("label, cls, kw, conv", CASES, ids=[c[0] for c in CASES])
def test_kohya_round_trip_is_bit_for_bit(tmp_path, label, cls, kw, conv):
    from safetensors.torch import load_file

    _, _, m = build(cls, kw, conv)
    f = write(tmp_path, m)
    out = tmp_path / "back.safetensors"
    K.save(K.load(f), out)
    a, b = load_file(str(f)), load_file(str(out))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), (label, k)


def test_convert_to_lora_is_within_one_percent_of_the_optimum(tmp_path):
    _, _, m = build(LohaModule, {"lora_dim": 4}, False)
    t = K.load(write(tmp_path, m)).targets[f"{NAME}.weight"]
    new, rows = to_lora(K.load(write(tmp_path, m)), rank=6)
    (row,) = rows
    D = dense_matrix(t, np.float64)
    S = np.linalg.svd(D, compute_uv=False)
    optimum = np.sqrt(np.sum(S[6:] ** 2) / np.sum(S ** 2))  # Eckart–Young: the best rank-6 error
    assert row["rank_after"] == 6 and abs(row["optimal_error"] - optimum) <= 1e-9
    assert row["optimal_error"] <= row["relative_error"] <= 1.01 * row["optimal_error"]
    b = new.targets[f"{NAME}.weight"].blocks[0]
    err = np.linalg.norm(D - b.B.astype(np.float64) @ b.A.astype(np.float64)) / np.linalg.norm(D)
    assert abs(err - row["relative_error"]) < 1e-12


def test_convert_cli_writes_peft_with_rank_and_refuses_without(tmp_path):
    layer, W0, m = build(LokrModule, {"factor": 4}, False)
    f = write(tmp_path, m)
    save_file({"x.weight": W0.contiguous()}, str(tmp_path / "base.safetensors"))
    code, _, err = run("convert", f, "-o", tmp_path / "p", "--to", "peft", "--base", tmp_path / "base.safetensors")
    assert code == 7 and "is lokr, which peft cannot hold; pass --rank or --energy" in err
    code, out, _ = run("convert", f, "-o", tmp_path / "p", "--to", "peft", "--base", tmp_path / "base.safetensors",
                       "--rank", "32", "--json")
    import json

    doc = json.loads(out)
    (row,) = doc["converted"]
    assert code == 0 and row["kind"] == "lokr" and row["relative_error"] < 1e-6  # full rank: exact up to float32


def test_rescale_scales_lycoris_and_refuses_dora(tmp_path):
    from loratool.ops.rescale import scale_adapter

    _, _, m = build(LohaModule, {}, False)
    a = K.load(write(tmp_path, m))
    t = a.targets[f"{NAME}.weight"]
    t2 = scale_adapter(a, 0.5).targets[t.key]
    assert np.array_equal(dense_matrix(t2), dense_matrix(dataclasses.replace(t, delta_scale=t.delta_scale * 0.5)))
    _, _, m = build(LoConModule, {"weight_decompose": True}, False)
    d = K.load(write(tmp_path, m))
    with pytest.raises(UnsupportedError, match=re.escape("is DoRA, whose merge W' = m/‖W + ΔW‖·(W + ΔW) is not "
                                                         "linear in ΔW")):
        scale_adapter(d, 0.5)


def test_dora_unmerge_and_combine_are_refused(tmp_path):
    from loratool.ops.combine import aligned_targets
    from loratool.ops.merge import plan_merge

    _, W0, m = build(LoConModule, {"weight_decompose": True}, False)
    d = K.load(write(tmp_path, m))
    info = lambda key: (tuple(W0.shape), "F32")  # noqa: E731
    with pytest.raises(UnsupportedError, match=re.escape("W cannot be recovered from W' (the norm of W is lost)")):
        plan_merge([("d", d)], info, unmerge=True)
    with pytest.raises(UnsupportedError, match="is dora: DoRA's merge"):
        aligned_targets([d, d], ["a", "b"])
    _, _, m = build(LohaModule, {}, False)
    h = K.load(write(tmp_path, m))
    with pytest.raises(UnsupportedError, match="is loha: a loha delta is not a sum of low-rank pairs"):
        aligned_targets([h, h], ["a", "b"])


def test_loha_unmerge_returns_the_base(tmp_path):
    _, W0, m = build(LohaModule, {}, False)
    t = K.load(write(tmp_path, m)).targets[f"{NAME}.weight"]
    W = W0.numpy().astype(np.float64)
    merged, _ = merge_tensor(W, t.key, [Term(t, 1.0)])
    back, _ = merge_tensor(merged, t.key, [Term(t, -1.0)])
    assert np.abs(back - W).max() < 1e-12  # float64 base: exact up to float64 rounding


@pytest.mark.parametrize("label", ["dora-lokr-in", "loha-tucker"])
def test_cli_merge_reads_each_target_lazily_and_equals_lycoris(tmp_path, label):
    from safetensors.torch import load_file

    _, cls, kw, conv = next(c for c in CASES if c[0] == label)
    layer, W0, m = build(cls, kw, conv)
    f = write(tmp_path, m)
    save_file({"x.weight": W0.contiguous()}, str(tmp_path / "base.safetensors"))
    code, _, err = run("merge", tmp_path / "base.safetensors", f, "-o", tmp_path / "m.safetensors", "--verify")
    assert code == 0, err
    m.apply_to()
    x = torch.randn(2, 8, 6, 6) if conv else torch.randn(3, 16)
    with torch.no_grad():
        y = layer(x)
    W = load_file(str(tmp_path / "m.safetensors"))["x.weight"]
    y2 = torch.nn.functional.conv2d(x, W) if conv else x @ W.T
    assert float((y - y2).abs().max()) <= RTOL * float(y.abs().max())
    code, out, _ = run("inspect", f, "--json")
    assert code == 0 and '"parameters"' in out
