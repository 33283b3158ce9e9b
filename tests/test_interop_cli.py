"""`loratool convert` and `inspect` on foreign dialects: exit codes, one-line errors, nothing written on failure,
output-is-input refused, JSON on stdout."""

import json
import re
import warnings

import pytest
import torch
from safetensors.torch import save_file

from arrays import dense_delta
from builders import fused_target
from clitools import one_error_line, run
from loratool.adapter import Adapter
from loratool.io import detect, native, peft as P
from models import base_state_dict, peft_model, sample_input, tiny_gpt2

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    model = tiny_gpt2(layers=1)
    save_file(base_state_dict(model), str(d / "base.safetensors"))
    pm = peft_model(model, target_modules=["c_attn", "c_proj"], use_rslora=True)
    pm.save_pretrained(str(d / "peft"))
    return d, pm


def test_peft_to_loratool_to_peft_via_cli_same_logits(gpt2, tmp_path):
    from peft import PeftModel

    d, pm = gpt2
    code, out, err = run("convert", d / "peft", "-o", tmp_path / "a.safetensors", "--to", "loratool", "--json")
    assert code == 0 and err == ""
    doc = json.loads(out)
    assert doc["dialect"] == "peft" and doc["targets"] == 3 and doc["to"] == "loratool"
    code, out, err = run("convert", tmp_path / "a.safetensors", "-o", tmp_path / "p", "--to", "peft")
    assert code == 0 and out == "" and err.startswith(f"{tmp_path / 'a.safetensors'} (loratool) -> ")
    assert detect.detect(tmp_path / "p") == "peft"
    pm2 = PeftModel.from_pretrained(tiny_gpt2(layers=1), str(tmp_path / "p")).eval()
    x = sample_input()
    with torch.no_grad():
        torch.testing.assert_close(pm2(x).logits, pm(x).logits, atol=1e-5, rtol=0)  # float32 forward passes


def test_gpt2_to_kohya_is_refused_and_nothing_written(gpt2, tmp_path):
    d, _ = gpt2
    code, out, err = run("convert", d / "peft", "-o", tmp_path / "k.safetensors", "--to", "kohya")
    assert code == 7 and out == ""
    assert one_error_line(err) == ("error: target \"transformer.h.0.attn.c_attn.weight\" is a transposed "
                                   "(fan_in_fan_out, GPT-2 Conv1D) weight; kohya tools apply up @ down to weights "
                                   "stored (out, in), so the conversion cannot be exact")
    assert list(tmp_path.iterdir()) == []


def test_output_inside_input_and_overwrite_refused(gpt2, tmp_path):
    d, _ = gpt2
    code, _, err = run("convert", d / "peft", "-o", d / "peft" / "x.safetensors", "--to", "loratool")
    assert code == 6 and "output would overwrite or sit inside input" in one_error_line(err)
    (tmp_path / "a.safetensors").write_bytes(b"keep")
    code, _, err = run("convert", d / "peft", "-o", tmp_path / "a.safetensors", "--to", "loratool")
    assert code == 6 and one_error_line(err).endswith("already exists; pass --overwrite to replace it")
    assert (tmp_path / "a.safetensors").read_bytes() == b"keep"
    code, _, _ = run("convert", d / "peft", "-o", tmp_path / "a.safetensors", "--to", "loratool", "--overwrite")
    assert code == 0 and native.load(tmp_path / "a.safetensors").info["dialect"] == "peft"


def test_peft_folder_output_overwrite(gpt2, tmp_path):
    d, _ = gpt2
    assert run("convert", d / "peft", "-o", tmp_path / "p", "--to", "peft")[0] == 0
    code, _, err = run("convert", d / "peft", "-o", tmp_path / "p", "--to", "peft")
    assert code == 6 and one_error_line(err).endswith("already exists; pass --overwrite to replace it")
    assert run("convert", d / "peft", "-o", tmp_path / "p", "--to", "peft", "--overwrite")[0] == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no temporary folders left behind


def test_row_blocks_to_peft_are_folded(tmp_path):
    t = fused_target()
    native.save(Adapter(targets={t.key: t}), tmp_path / "f.safetensors")
    code, out, err = run("convert", tmp_path / "f.safetensors", "-o", tmp_path / "p", "--to", "peft", "--json")
    assert code == 0 and err == "" and json.loads(out)["folded"] == [t.key]
    back = P.load(tmp_path / "p").targets[t.key]
    assert back.is_whole and back.rank == t.rank  # two rank-2 row blocks -> one rank-4 pair, B block-diagonal
    torch.testing.assert_close(dense_delta(back), dense_delta(t), atol=1e-6, rtol=0)  # float32 products


def test_kohya_without_base_cannot_become_dotted(tmp_path):
    save_file({"lora_unet_a_b.lora_down.weight": torch.ones(2, 3), "lora_unet_a_b.lora_up.weight": torch.ones(4, 2),
               "lora_unet_a_b.alpha": torch.tensor(2.0)}, str(tmp_path / "k.safetensors"))
    code, _, err = run("convert", tmp_path / "k.safetensors", "-o", tmp_path / "n.safetensors", "--to", "loratool")
    assert code == 4 and one_error_line(err).endswith("cannot be turned back into dotted module paths without the "
                                                      "model; pass --base")
    save_file({"a.b.weight": torch.zeros(4, 3)}, str(tmp_path / "base.safetensors"))
    code, _, _ = run("convert", tmp_path / "k.safetensors", "-o", tmp_path / "n.safetensors", "--to", "loratool",
                     "--base", tmp_path / "base.safetensors")
    assert code == 0
    t = native.load(tmp_path / "n.safetensors").targets["a.b.weight"]
    assert torch.equal(dense_delta(t), torch.full((4, 3), 2.0 * 2 / 2))  # ones(4,2) @ ones(2,3) * alpha/r


def test_inspect_lists_unknown_keys_and_errors_without_flag(tmp_path):
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.lora_up.weight": torch.ones(4, 2),
               "lora_unet_x.extra": torch.ones(1)}, str(tmp_path / "k.safetensors"))
    code, out, err = run("inspect", tmp_path / "k.safetensors")
    assert code == 3 and out == ""
    assert re.search(r"1 key\(s\) that are not kohya LoRA factors: \"lora_unet_x.extra\"; pass --allow-unknown",
                     one_error_line(err))
    code, out, err = run("inspect", tmp_path / "k.safetensors", "--allow-unknown", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["dialect"] == "kohya" and doc["unknown_keys"] == ["lora_unet_x.extra"]
    assert doc["info"]["alpha_defaulted"].startswith("1 module(s) without a usable alpha")
    code, out, err = run("inspect", tmp_path / "k.safetensors", "--allow-unknown")
    assert code == 0 and "unknown keys:     1 ignored (--allow-unknown): lora_unet_x.extra" in out
    assert "alpha defaulted:" in out


def test_loralib_options_via_cli(tmp_path):
    import loralib

    torch.manual_seed(0)
    m = loralib.MergedLinear(4, 6, r=1, lora_alpha=2, enable_lora=[True, False, True])
    with torch.no_grad():
        m.lora_B.copy_(torch.randn(m.lora_B.shape))
    torch.save({"qkv." + k: v for k, v in m.state_dict().items()}, tmp_path / "l.pt")
    code, _, err = run("convert", tmp_path / "l.pt", "-o", tmp_path / "n.safetensors", "--to", "loratool")
    assert code == 3 and one_error_line(err).endswith("loralib keeps lora_alpha in code, not in the file; pass it "
                                                      "(--alpha)")
    code, _, err = run("convert", tmp_path / "l.pt", "-o", tmp_path / "n.safetensors", "--to", "loratool",
                       "--alpha", 2, "--enable-lora", "1,0,1")
    assert code == 0, err
    t = native.load(tmp_path / "n.safetensors").targets["qkv.weight"]
    assert [b.rows for b in t.blocks] == [(0, 2), (4, 6)]
    code, _, err = run("inspect", tmp_path / "n.safetensors", "--alpha", 2)
    assert code == 2 and one_error_line(err).endswith("is a loratool adapter, which does not take --alpha; drop the "
                                                      "option")
    code, _, err = run("convert", tmp_path / "n.safetensors", "-o", tmp_path / "x.safetensors", "--to", "kohya",
                       "--alpha", 2)
    assert code == 2 and one_error_line(err).endswith("is a loratool adapter, which does not take --alpha; drop the "
                                                      "option")


def test_round_trip_through_native_keeps_reader_info(gpt2, tmp_path):
    d, _ = gpt2
    a = P.load(d / "peft")
    native.save(a, tmp_path / "n.safetensors")
    assert native.load(tmp_path / "n.safetensors").info["dialect"] == "peft"


@pytest.mark.parametrize("to, out, message", [
    ("peft", "x.safetensors", "--to peft writes a folder (adapter_config.json + adapter_model.safetensors); give -o a "
                              "folder name, not x.safetensors"),
    ("kohya", "x", "--to kohya writes one .safetensors file; give -o a name ending in .safetensors"),
])
def test_output_kind_is_checked(gpt2, tmp_path, to, out, message):
    d, _ = gpt2
    code, _, err = run("convert", d / "peft", "-o", tmp_path / out, "--to", to)
    assert code == 2 and message in err and list(tmp_path.iterdir()) == []
