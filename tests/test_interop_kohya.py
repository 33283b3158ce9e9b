"""kohya/sd-scripts conformance: linear, conv 1x1 and k x k against sd-scripts' merge formula, alpha rules,
split_dims, name mapping through a base, exact write-back, and refusals."""

import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from arrays import dense_delta
from builders import fused_target, linear_target
from loratool.adapter import Adapter
from loratool.errors import MismatchError, SpecError, UnsupportedError
from loratool.io import kohya as K, native, peft as P

ATOL = 1e-6  # float32 products of unit-scale factors computed by two code paths


def sd_scripts_delta(down, up, alpha, weight_shape):
    """ΔW exactly as sd-scripts merges it (networks/lora.py, LoRAInfModule.merge_to; multiplier 1).

    alpha None or 0 means alpha = rank (LoRAModule.__init__).
    """
    r = down.shape[0]
    alpha = r if alpha is None or alpha == 0 else alpha
    scale = alpha / r
    down, up = down.float(), up.float()
    if len(weight_shape) == 2:
        if down.ndim == 4:  # 1x1 factors applied to a Linear weight
            return (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)) * scale
        return (up @ down) * scale
    if down.shape[2:4] == (1, 1):
        return (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scale
    return torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale


def r(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


BASE = {
    "down_blocks.0.resnets.0.conv1.weight": r(8, 4, 3, 3, seed=1),
    "down_blocks.0.attentions.0.proj_in.weight": r(8, 8, 1, 1, seed=2),
    "text_model.encoder.layers.0.self_attn.q_proj.weight": r(6, 5, seed=3),
    "mid_block.attn.to_q.weight": r(10, 5, seed=4),
    "up_blocks.0.proj_out.weight": r(7, 3, seed=5),  # a Linear that receives 1x1 conv factors
}
N = {k: "lora_unet_" + k.removesuffix(".weight").replace(".", "_") for k in BASE}
N["text_model.encoder.layers.0.self_attn.q_proj.weight"] = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def kohya_sd():
    c, p, q, m, o = (N[k] for k in BASE)
    return {
        f"{c}.lora_down.weight": r(2, 4, 3, 3, seed=10), f"{c}.lora_up.weight": r(8, 2, 1, 1, seed=11),
        f"{c}.alpha": torch.tensor(1.0, dtype=torch.float16),
        f"{p}.lora_down.weight": r(3, 8, 1, 1, seed=12), f"{p}.lora_up.weight": r(8, 3, 1, 1, seed=13),  # no alpha
        f"{q}.lora_down.weight": r(2, 5, seed=14), f"{q}.lora_up.weight": r(6, 2, seed=15),
        f"{q}.alpha": torch.tensor(0.5),
        f"{m}.lora_down.0.weight": r(2, 5, seed=16), f"{m}.lora_up.0.weight": r(4, 2, seed=17),
        f"{m}.lora_down.1.weight": r(2, 5, seed=18), f"{m}.lora_up.1.weight": r(6, 2, seed=19),
        f"{m}.alpha": torch.tensor(3.0),
        f"{o}.lora_down.weight": r(2, 3, 1, 1, seed=20), f"{o}.lora_up.weight": r(7, 2, 1, 1, seed=21),
        f"{o}.alpha": torch.tensor(0.0),  # 0 means alpha = rank in sd-scripts
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("kohya")
    save_file(BASE, str(d / "base.safetensors"))
    sd = kohya_sd()
    save_file(sd, str(d / "lora.safetensors"), metadata={"ss_network_dim": "2", "ss_network_alpha": "1"})
    return d, sd


def test_delta_matches_sd_scripts_formula(files):
    d, sd = files
    a = K.load(d / "lora.safetensors", base=d / "base.safetensors")
    assert sorted(a.targets) == sorted(BASE)
    for key, name in N.items():
        t = a.targets[key]
        if name.endswith("to_q"):
            continue  # split_dims: checked below
        alpha = sd.get(f"{name}.alpha")
        ref = sd_scripts_delta(sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"],
                               None if alpha is None else float(alpha), BASE[key].shape)
        torch.testing.assert_close(dense_delta(t), ref, atol=ATOL, rtol=0)
    assert a.targets["down_blocks.0.resnets.0.conv1.weight"].layout == "conv"
    assert a.targets["up_blocks.0.proj_out.weight"].layout == "linear"
    assert a.metadata["ss_network_dim"] == "2"


def test_split_dims_rows_concatenate(files):
    d, sd = files
    a = K.load(d / "lora.safetensors", base=d / "base.safetensors")
    t = a.targets["mid_block.attn.to_q.weight"]
    m = N["mid_block.attn.to_q.weight"]
    # lora_flux.py forward: cat([up_i @ down_i x], dim=-1) * scale, so row slice i is up_i @ down_i.
    ref = torch.cat([sd[f"{m}.lora_up.{i}.weight"] @ sd[f"{m}.lora_down.{i}.weight"] for i in (0, 1)]) * (3.0 / 2)
    torch.testing.assert_close(dense_delta(t), ref, atol=ATOL, rtol=0)
    assert [b.rows for b in t.blocks] == [(0, 4), (4, 10)] and t.info["split_dims"] == [4, 6]


def test_missing_and_zero_alpha_are_recorded(files):
    d, _ = files
    a = K.load(d / "lora.safetensors", base=d / "base.safetensors")
    p = a.targets["down_blocks.0.attentions.0.proj_in.weight"]
    assert p.blocks[0].alpha == 3 and p.info["alpha"] == "missing; alpha = rank (scale 1), as sd-scripts does"
    o = a.targets["up_blocks.0.proj_out.weight"]
    assert o.blocks[0].alpha == 2 and o.info["alpha"] == "0; alpha = rank (scale 1), as sd-scripts does"
    assert a.info["alpha_defaulted"] == "2 module(s) without a usable alpha: alpha = rank, as sd-scripts does"


def test_without_base_keys_are_kohya_names(files):
    d, _ = files
    a = K.load(d / "lora.safetensors")
    assert a.info["kohya_unmapped"] is True
    assert "lora_unet_down_blocks_0_resnets_0_conv1.weight" in a.targets


def test_round_trip_kohya_loratool_kohya_is_exact(files, tmp_path):
    d, sd = files
    a = K.load(d / "lora.safetensors", base=d / "base.safetensors")
    native.save(a, tmp_path / "n.safetensors")
    K.save(native.load(tmp_path / "n.safetensors"), tmp_path / "k.safetensors")
    out = load_file(str(tmp_path / "k.safetensors"))
    for k, v in sd.items():
        if k.endswith(".alpha"):
            want = float(v) if float(v) != 0 else None
            if want is not None:
                assert float(out[k]) == want, k
        elif k.startswith(N["up_blocks.0.proj_out.weight"]):
            # 1x1 conv factors on a Linear weight are read as linear and written 2-D, as sd-scripts merges them.
            assert out[k].shape == v.shape[:2] and torch.equal(out[k], v.reshape(v.shape[:2])), k
        else:
            assert out[k].shape == v.shape and torch.equal(out[k], v), k
    # Modules without a usable alpha get alpha = rank written out, which is the same strength.
    assert float(out[N["down_blocks.0.attentions.0.proj_in.weight"] + ".alpha"]) == 3.0
    assert float(out[N["up_blocks.0.proj_out.weight"] + ".alpha"]) == 2.0
    # The written file reads back to the same deltas.
    b = K.load(tmp_path / "k.safetensors", base=d / "base.safetensors")
    for key in BASE:
        torch.testing.assert_close(dense_delta(b.targets[key]), dense_delta(a.targets[key]), atol=0, rtol=0)


def test_rslora_to_kohya_keeps_strength(tmp_path):
    t = linear_target("model.layers.0.self_attn.q_proj.weight", rank=4, alpha=6.0, rule="rslora")
    K.save(Adapter(targets={t.key: t}), tmp_path / "k.safetensors", prefix="lora_")
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["lora_model_layers_0_self_attn_q_proj.alpha",
                                    "lora_model_layers_0_self_attn_q_proj.lora_down.weight",
                                    "lora_model_layers_0_self_attn_q_proj.lora_up.weight"]
        alpha = float(f.get_tensor("lora_model_layers_0_self_attn_q_proj.alpha"))
    assert alpha / 4 == pytest.approx(6.0 / math.sqrt(4), rel=1e-7)  # kohya alpha / r = rsLoRA alpha / sqrt(r)


def test_peft_to_kohya_to_loratool_same_delta(tmp_path):
    import warnings

    from models import base_state_dict, peft_model, tiny_llama

    warnings.filterwarnings("ignore", category=UserWarning)
    model = tiny_llama(layers=1)
    save_file(base_state_dict(model), str(tmp_path / "base.safetensors"))
    pm = peft_model(model, target_modules=["q_proj", "down_proj"], use_rslora=True, rank_pattern={"down_proj": 2})
    pm.save_pretrained(str(tmp_path / "peft"))
    a = P.load(tmp_path / "peft", base=tmp_path / "base.safetensors")
    K.save(a, tmp_path / "k.safetensors", prefix="lora_")
    b = K.load(tmp_path / "k.safetensors", base=tmp_path / "base.safetensors")
    assert sorted(a.targets) == sorted(b.targets)
    for key, t in a.targets.items():
        torch.testing.assert_close(dense_delta(b.targets[key]), dense_delta(t), atol=ATOL, rtol=1e-6)


def test_writer_refusals(tmp_path):
    fio = linear_target("h.0.mlp.c_fc.weight")
    from dataclasses import replace

    fio = replace(fio, layout="fan_in_fan_out", shape=(fio.shape[1], fio.shape[0]))
    with pytest.raises(UnsupportedError, match=re.escape("target \"h.0.mlp.c_fc.weight\" is a transposed "
                                                         "(fan_in_fan_out, GPT-2 Conv1D) weight; kohya tools apply up @ "
                                                         "down to weights stored (out, in), so the conversion cannot "
                                                         "be exact")):
        K.save(Adapter(targets={fio.key: fio}), tmp_path / "k.safetensors")
    ft = fused_target()
    with pytest.raises(UnsupportedError, match=re.escape("target \"h.0.attn.c_attn.weight\" is a transposed")):
        K.save(Adapter(targets={ft.key: ft}), tmp_path / "k.safetensors")
    assert not (tmp_path / "k.safetensors").exists()


@pytest.mark.parametrize("extra, error, message", [
    ({"lora_unet_x.hada_w1_a": torch.ones(2, 2)}, SpecError,
     "module \"lora_unet_x\": loha factors do not fit together (w1a [2, 2]); see lycoris-lora's modules/loha.py"),
    ({"lora_unet_x.dora_scale": torch.ones(2)}, SpecError,
     "module \"lora_unet_x\": dora_scale [2] is neither (4, 1, …) nor (1, 3, …) for a weight [4, 3]"),
    ({"lora_unet_x.lora_mid.weight": torch.ones(2, 2, 3, 3)}, SpecError, "tucker factors do not fit together"),
    ({"lora_unet_x.oft_blocks": torch.ones(2, 2, 2)}, UnsupportedError, "is an OFT/BOFT block (multiplicative)"),
])
def test_malformed_lycoris_modules_are_refused(tmp_path, extra, error, message):
    # LyCORIS modules are read (tests/test_lycoris.py); a module whose tensors do not fit is refused (K008).
    sd = {"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.lora_up.weight": torch.ones(4, 2)} | extra
    save_file(sd, str(tmp_path / "l.safetensors"))
    with pytest.raises(error, match=re.escape(message)):
        K.load(tmp_path / "l.safetensors")


def test_unknown_keys_and_broken_pairs(tmp_path):
    sd = {"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.lora_up.weight": torch.ones(4, 2),
          "lora_unet_x.something": torch.ones(1)}
    save_file(sd, str(tmp_path / "u.safetensors"))
    with pytest.raises(SpecError, match=re.escape("1 key(s) that are not kohya LoRA factors: "
                                                  "\"lora_unet_x.something\"; pass --allow-unknown")):
        K.load(tmp_path / "u.safetensors")
    assert K.load(tmp_path / "u.safetensors", allow_unknown=True).info["unknown_keys"] == ["lora_unet_x.something"]
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 3)}, str(tmp_path / "h.safetensors"))
    with pytest.raises(SpecError, match=re.escape("module \"lora_unet_x\" has lora_down without its matching lora_up")):
        K.load(tmp_path / "h.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.lora_up.weight": torch.ones(4, 2),
               "lora_unet_x.alpha": torch.tensor(float("nan"))}, str(tmp_path / "n.safetensors"))
    with pytest.raises(SpecError, match=re.escape("\"lora_unet_x.alpha\" is nan; alpha must be finite")):
        K.load(tmp_path / "n.safetensors")


def test_name_mapping_errors(files, tmp_path):
    d, _ = files
    save_file({"other.weight": torch.ones(2, 2)}, str(tmp_path / "b.safetensors"))
    msg = "matches the kohya name \"text_model_encoder_layers_0_self_attn_q_proj\" (dots written as underscores)"
    with pytest.raises(MismatchError, match=re.escape(msg)):
        K.load(d / "lora.safetensors", base=tmp_path / "b.safetensors")
    # "a_b.c" and "a.b_c" both underscore to "a_b_c": ambiguous, so refused.
    save_file({"a_b.c.weight": torch.ones(4, 3), "a.b_c.weight": torch.ones(4, 3).clone()},
              str(tmp_path / "amb.safetensors"))
    save_file({"lora_unet_a_b_c.lora_down.weight": torch.ones(2, 3), "lora_unet_a_b_c.lora_up.weight": torch.ones(4, 2)},
              str(tmp_path / "amb_lora.safetensors"))
    with pytest.raises(MismatchError, match=re.escape("kohya name \"a_b_c\" fits several base keys")):
        K.load(tmp_path / "amb_lora.safetensors", base=tmp_path / "amb.safetensors")
