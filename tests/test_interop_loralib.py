"""loralib conformance: the ΔW loratool reads equals what loralib's own eval() merge adds to each weight
(Linear, Embedding, MergedLinear with enable_lora and fan_in_fan_out, Conv2d), with and without the base
weights in the file."""

import re

import loralib
import pytest
import torch

from arrays import dense_delta
from loratool.errors import MismatchError, SpecError
from loratool.io import loralib as L, native, peft as P

ATOL = 1e-5  # float32: loralib merges into W (|W| ~ 1) and we compare W_after - W_before to our delta


class Net(torch.nn.Module):
    def __init__(self, fio=True):
        super().__init__()
        self.emb = loralib.Embedding(20, 6, r=2, lora_alpha=8)
        self.qkv = loralib.MergedLinear(6, 12, r=2, lora_alpha=8, enable_lora=[True, False, True, False],
                                        fan_in_fan_out=fio)
        self.fc = loralib.Linear(6, 5, r=2, lora_alpha=8, fan_in_fan_out=fio)
        self.conv = loralib.Conv2d(3, 4, 3, r=2, lora_alpha=8)


def make(fio=True, seed=0):
    torch.manual_seed(seed)
    net = Net(fio)
    with torch.no_grad():  # loralib zero-initialises lora_B; draw every factor so deltas are non-zero
        for name, p in net.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape))
    return net


def merged_deltas(net):
    """W_after_eval - W_before_eval for every weight: loralib's own merge (train(False) adds the delta)."""
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.eval()
    after = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()  # unmerge again, so the caller's module is unchanged
    return {k: after[k] - before[k] for k in before if not k.endswith(("lora_A", "lora_B"))}


@pytest.mark.parametrize("fio", [True, False])
def test_full_state_dict_matches_eval_merge(tmp_path, fio):
    net = make(fio)
    torch.save(net.state_dict(), tmp_path / "full.pt")
    a = L.load(tmp_path / "full.pt", alpha=8, r=2, enable_lora="1,0,1,0", fan_in_fan_out=fio)
    ref = merged_deltas(net)
    assert sorted(a.targets) == ["conv.conv.weight", "emb.weight", "fc.weight", "qkv.weight"]
    for t in a:
        torch.testing.assert_close(dense_delta(t), ref[t.key], atol=ATOL, rtol=0)
    qkv = a.targets["qkv.weight"]
    assert [b.rows for b in qkv.blocks] == [(0, 3), (6, 9)]  # enable_lora [1, 0, 1, 0] of 12 output rows
    assert qkv.layout == ("fan_in_fan_out" if fio else "linear")
    assert a.targets["conv.conv.weight"].layout == "conv" and len(a.targets["conv.conv.weight"].blocks) == 3
    assert a.info["base_weights_in_file"] == 7


def test_lora_only_state_dict_with_base(tmp_path):
    net = make()
    torch.save(loralib.lora_state_dict(net), tmp_path / "lora.pt")
    base = {k: v for k, v in net.state_dict().items() if not k.endswith(("lora_A", "lora_B"))}
    torch.save(base, tmp_path / "base.pt")
    a = L.load(tmp_path / "lora.pt", alpha=8, enable_lora=[True, False, True, False], fan_in_fan_out=True,
               base=tmp_path / "base.pt")
    ref = merged_deltas(net)
    for t in a:
        torch.testing.assert_close(dense_delta(t), ref[t.key], atol=ATOL, rtol=0)
    assert "shape_guessed" not in a.info


def test_lora_only_without_base_says_shapes_were_guessed(tmp_path):
    net = make()
    sd = {k: v for k, v in loralib.lora_state_dict(net).items() if k.startswith(("fc.", "qkv."))}
    torch.save(sd, tmp_path / "lora.pt")
    a = L.load(tmp_path / "lora.pt", alpha=8, enable_lora="1,0,1,0", fan_in_fan_out=True)
    assert a.info["shape_guessed"].startswith("1 module(s) had no weight in the file and no --base")
    ref = merged_deltas(net)
    for t in a:
        torch.testing.assert_close(dense_delta(t), ref[t.key], atol=ATOL, rtol=0)


def test_alpha_is_required_and_options_checked(tmp_path):
    torch.save(make().state_dict(), tmp_path / "full.pt")
    with pytest.raises(SpecError, match=re.escape("loralib keeps lora_alpha in code, not in the file; pass it "
                                                  "(--alpha)")):
        L.load(tmp_path / "full.pt")
    with pytest.raises(SpecError, match=re.escape("module \"conv\": factors have rank 2 but r = 4 was given")):
        L.load(tmp_path / "full.pt", alpha=8, r=4, enable_lora="1,0,1,0", fan_in_fan_out=True)
    with pytest.raises(SpecError, match=re.escape("have different ranks, as in a loralib MergedLinear; pass its "
                                                  "enable_lora (for example --enable-lora 1,0,1)")):
        L.load(tmp_path / "full.pt", alpha=8, fan_in_fan_out=True)
    with pytest.raises(SpecError, match=re.escape("enable_lora '1,2': each entry must be 1 or 0")):
        L.load(tmp_path / "full.pt", alpha=8, enable_lora="1,2")
    with pytest.raises(MismatchError, match=re.escape("MergedLinear factors with enable_lora [True, True] imply weight "
                                                      "[6, 6] but it is [6, 12]")):
        L.load(tmp_path / "full.pt", alpha=8, enable_lora="1,1", fan_in_fan_out=True)


def test_unknown_keys(tmp_path):
    sd = make().state_dict() | {"head.scale": torch.ones(3)}
    torch.save(sd, tmp_path / "x.pt")
    with pytest.raises(SpecError, match=re.escape("1 key(s) that are not loralib LoRA factors: \"head.scale\"")):
        L.load(tmp_path / "x.pt", alpha=8, enable_lora="1,0,1,0", fan_in_fan_out=True)
    a = L.load(tmp_path / "x.pt", alpha=8, enable_lora="1,0,1,0", fan_in_fan_out=True, allow_unknown=True)
    assert a.info["unknown_keys"] == ["head.scale"]


def test_not_a_state_dict(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "l.pt")
    with pytest.raises(SpecError, match=re.escape("holds a list, not a dict of tensors")):
        L.load(tmp_path / "l.pt", alpha=1)


def test_loralib_to_native_exact_and_merged_linear_refused_by_peft(tmp_path):
    from loratool.errors import UnsupportedError

    net = make()
    torch.save(net.state_dict(), tmp_path / "full.pt")
    a = L.load(tmp_path / "full.pt", alpha=8, enable_lora="1,0,1,0", fan_in_fan_out=True)
    native.save(a, tmp_path / "n.safetensors")
    b = native.load(tmp_path / "n.safetensors")
    for t in a:
        assert torch.equal(dense_delta(b.targets[t.key]), dense_delta(t))
    with pytest.raises(UnsupportedError, match=re.escape("target \"conv.conv.weight\" has 3 block(s)")):
        P.save(b, tmp_path / "peft")
