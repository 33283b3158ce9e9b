"""Every command that reads adapters takes the same reader options (--base, --allow-unknown, loralib's)."""

import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import loratool
from arrays import dense_delta
from loratool.cli import cli

KEY = "model.layers.0.self_attn.q_proj.weight"


def _kohya(tmp_path):
    g = torch.Generator().manual_seed(0)
    save_file({KEY: torch.randn(8, 6, generator=g)}, str(tmp_path / "base.safetensors"))
    down, up = torch.randn(2, 6, generator=g), torch.randn(8, 2, generator=g)
    save_file({"lora_model_layers_0_self_attn_q_proj.lora_down.weight": down,
               "lora_model_layers_0_self_attn_q_proj.lora_up.weight": up,
               "lora_model_layers_0_self_attn_q_proj.alpha": torch.tensor(4.0)}, str(tmp_path / "k.safetensors"))
    return up @ down * (4.0 / 2)  # sd-scripts: up @ down * alpha / rank


def run(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def test_rescale_and_combine_map_kohya_names_through_base(tmp_path):
    want = _kohya(tmp_path)
    code, _, err = run("rescale", tmp_path / "k.safetensors", "-o", tmp_path / "r.safetensors", "--scale", "0.5",
                       "--base", tmp_path / "base.safetensors", "-q")
    assert code == 0, err
    r = loratool.load(tmp_path / "r.safetensors")
    assert list(r.targets) == [KEY]
    assert torch.allclose(dense_delta(r.targets[KEY]), 0.5 * want, atol=1e-6)  # float32 rounding
    code, _, err = run("combine", tmp_path / "k.safetensors", tmp_path / "r.safetensors", "-o",
                       tmp_path / "c.safetensors", "--base", tmp_path / "base.safetensors", "-q")
    assert code == 0, err
    c = loratool.load(tmp_path / "c.safetensors")
    assert torch.allclose(dense_delta(c.targets[KEY]), 1.5 * want, atol=1e-6)


def test_option_no_input_takes_is_a_usage_error(tmp_path):
    _kohya(tmp_path)
    code, _, err = run("combine", tmp_path / "k.safetensors", "-o", tmp_path / "c.safetensors", "--alpha", "3")
    assert code == 2 and "no input is of a dialect that takes --alpha; drop the option" in err
    assert not (tmp_path / "c.safetensors").exists()


def test_rescale_loralib_alpha_flag_is_renamed(tmp_path):
    _kohya(tmp_path)
    code, _, err = run("rescale", tmp_path / "k.safetensors", "-o", tmp_path / "x.safetensors", "--scale", "2",
                       "--lora-alpha", "3", "--base", tmp_path / "base.safetensors")
    assert code == 2 and "does not take --lora-alpha; drop the option" in err and err.count("\n") == 1


def test_merge_hands_its_base_to_the_kohya_reader(tmp_path):
    from safetensors.torch import load_file

    want = _kohya(tmp_path)
    code, _, err = run("merge", tmp_path / "base.safetensors", tmp_path / "k.safetensors", "-o",
                       tmp_path / "m.safetensors", "-q")
    assert code == 0, err
    base = load_file(str(tmp_path / "base.safetensors"))[KEY]
    got = load_file(str(tmp_path / "m.safetensors"))[KEY]
    assert torch.allclose(got, base + want, atol=1e-6)  # float32 rounding of one add
    code, _, err = run("merge", tmp_path / "base.safetensors", tmp_path / "k.safetensors", "-o",
                       tmp_path / "m2.safetensors", "--enable-lora", "1,0")
    assert code == 2 and "no input is of a dialect that takes --enable-lora" in err
    assert not (tmp_path / "m2.safetensors").exists()
