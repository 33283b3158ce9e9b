"""`loratool extract` from the command line: inputs in every format, output naming, report, refusals."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from builders import torch_delta
from loratool.cli import cli
from loratool.io.native import load

F32_REL = 1e-5  # float32 recovery of an exactly low-rank delta


def run(*args, cwd=None):
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)
    return r.exit_code, r.stdout, r.stderr


def g(seed):
    return torch.Generator().manual_seed(seed)


def models():
    base = {"model.layers.0.q_proj.weight": torch.randn(48, 32, generator=g(1)),
            "model.layers.0.mlp.down_proj.weight": torch.randn(32, 64, generator=g(2)),
            "model.layers.0.norm.weight": torch.ones(32),
            "model.embed_tokens.weight": torch.randn(20, 32, generator=g(3))}
    ft = dict(base)
    ft["model.layers.0.q_proj.weight"] = base["model.layers.0.q_proj.weight"] + \
        torch.randn(48, 3, generator=g(4)) @ torch.randn(3, 32, generator=g(5))
    ft["model.layers.0.mlp.down_proj.weight"] = base["model.layers.0.mlp.down_proj.weight"] + \
        torch.randn(32, 2, generator=g(6)) @ torch.randn(2, 64, generator=g(7))
    ft["model.layers.0.norm.weight"] = base["model.layers.0.norm.weight"] + 0.25
    return ft, base


def save_sharded(tensors, folder: Path):
    folder.mkdir()
    keys = sorted(tensors)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    wm = {}
    for name, ks in shards.items():
        save_file({k: tensors[k].contiguous() for k in ks}, str(folder / name))
        wm.update({k: name for k in ks})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


@pytest.fixture
def files(tmp_path):
    ft, base = models()
    save_file(ft, str(tmp_path / "ft.safetensors"))
    save_file(base, str(tmp_path / "base.safetensors"))
    return tmp_path, ft, base


def listing(p: Path):
    return sorted(x.name for x in p.iterdir())


def test_default_output_name_report_and_metadata(files):
    d, ft, base = files
    code, out, err = run("extract", "ft.safetensors", "base.safetensors", "--rank", "4", cwd=d)
    assert code == 0, err
    assert "wrote ft-minus-base-r4.safetensors" in err
    assert "model.layers.0.q_proj.weight" in out and "model.layers.0.norm.weight" in out
    a = load(d / "ft-minus-base-r4.safetensors")
    assert sorted(a.targets) == ["model.layers.0.mlp.down_proj.weight", "model.layers.0.q_proj.weight"]
    for k, t in a.targets.items():
        assert rel(torch_delta(t), ft[k] - base[k]) < F32_REL
        assert t.info["rank"] == 4 and t.info["rel_error"] < F32_REL and t.blocks[0].alpha == 4
    info = a.info["extract"]
    assert info["selection"] == {"rank": 4} and info["unchanged"] == 1
    assert info["not_extracted"] == [{"key": "model.layers.0.norm.weight", "shape": [32],
                                      "reason": "not a matrix (pass --keep-full to store it whole)"}]
    # Never over an existing file: the same command again refuses, names the file, writes nothing.
    before = listing(d)
    code, out, err = run("extract", "ft.safetensors", "base.safetensors", "--rank", "4", cwd=d)
    assert code == 6 and err == "error: ft-minus-base-r4.safetensors: already exists; pass --overwrite to replace it\n"
    assert listing(d) == before


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_sharded_folder_against_torch_file_with_json_and_keep_full(tmp_path):
    ft, base = models()
    save_sharded(ft, tmp_path / "ft")
    torch.save(base, tmp_path / "base.pt")
    out = tmp_path / "a.safetensors"
    code, stdout, err = run("extract", tmp_path / "ft", tmp_path / "base.pt", "--energy", "0.99", "--keep-full",
                            "-o", out, "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["output"] == str(out) and doc["selection"] == {"energy": 0.99}
    ranks = {r["key"]: r["rank"] for r in doc["per_target"]}
    assert ranks == {"model.layers.0.mlp.down_proj.weight": 2, "model.layers.0.norm.weight": 0,
                     "model.layers.0.q_proj.weight": 3}
    a = load(out)
    assert a.targets["model.layers.0.norm.weight"].kind == "full"
    for k, t in a.targets.items():
        assert rel(torch_delta(t), ft[k] - base[k]) < F32_REL


def test_exactly_one_rank_rule(files):
    d, _, _ = files
    code, _, err = run("extract", "ft.safetensors", "base.safetensors", cwd=d)
    assert code == 2 and "choose exactly one of --rank, --energy, --threshold or --max-params" in err
    code, _, err = run("extract", "ft.safetensors", "base.safetensors", "--rank", "2", "--energy", "0.9", cwd=d)
    assert code == 2 and "got --energy, --rank" in err


def test_max_params_with_rank_cap(files):
    d, _, _ = files
    code, out, err = run("extract", "ft.safetensors", "base.safetensors", "--max-params", "300", "--rank", "8",
                         "--json", cwd=d)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["parameters"] <= 300 and doc["selection"] == {"max_params": 300, "cap": 8}
    assert (d / "ft-minus-base-p300.safetensors").is_file()


def test_shape_mismatch_is_one_error_line_and_nothing_written(tmp_path):
    ft, base = models()
    base["model.layers.0.q_proj.weight"] = torch.zeros(32, 48)
    save_file(ft, str(tmp_path / "ft.safetensors"))
    save_file(base, str(tmp_path / "base.safetensors"))
    before = listing(tmp_path)
    code, out, err = run("extract", "ft.safetensors", "base.safetensors", "--rank", "2", cwd=tmp_path)
    assert code == 4 and out == ""
    assert err == ('error: ft.safetensors: tensor "model.layers.0.q_proj.weight" has shape [48, 32] but [32, 48] '
                   'in base.safetensors; the models have different architectures\n')
    assert listing(tmp_path) == before


def test_missing_tensor_is_one_error_line_and_nothing_written(tmp_path):
    ft, base = models()
    del base["model.layers.0.norm.weight"]
    save_file(ft, str(tmp_path / "ft.safetensors"))
    save_file(base, str(tmp_path / "base.safetensors"))
    before = listing(tmp_path)
    code, _, err = run("extract", "ft.safetensors", "base.safetensors", "--rank", "2", cwd=tmp_path)
    assert code == 4 and err.count("\n") == 1
    assert err.startswith('error: base.safetensors: tensor "model.layers.0.norm.weight" of ft.safetensors is missing')
    assert listing(tmp_path) == before


def test_output_that_is_an_input_is_refused(files):
    d, _, _ = files
    before = (d / "base.safetensors").read_bytes()
    code, _, err = run("extract", "ft.safetensors", "base.safetensors", "--rank", "2", "-o", "base.safetensors",
                       "--overwrite", cwd=d)
    assert code == 6 and re.match(r"error: base\.safetensors: output would overwrite or sit inside input", err)
    assert (d / "base.safetensors").read_bytes() == before


def test_truncated_input_is_one_error_line(files):
    d, _, _ = files
    raw = (d / "ft.safetensors").read_bytes()
    (d / "ft.safetensors").write_bytes(raw[:-10])
    before = listing(d)
    code, _, err = run("extract", "ft.safetensors", "base.safetensors", "--rank", "2", cwd=d)
    assert code == 3 and err.startswith("error: ft.safetensors: ") and err.count("\n") == 1
    assert listing(d) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_without_a_gpu_is_one_error_line(files):
    d, _, _ = files
    code, _, err = run("extract", "ft.safetensors", "base.safetensors", "--rank", "2", "--device", "cuda", cwd=d)
    assert code == 7
    assert err == "error: --device cuda: no CUDA device is available here; use --device cpu\n"  # loratool.device


def test_gpt2_folder_config_makes_conv1d_fan_in_fan_out(tmp_path):
    from models import base_state_dict, tiny_gpt2

    model = tiny_gpt2()
    base = base_state_dict(model)
    ft = dict(base)
    key = "transformer.h.0.attn.c_attn.weight"  # Conv1D: stored (in=16, out=48)
    ft[key] = base[key] + torch.randn(16, 2, generator=g(1)) @ torch.randn(2, 48, generator=g(2))
    for name, sd in (("ft", ft), ("base", base)):
        (tmp_path / name).mkdir()
        save_file({k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight"},
                  str(tmp_path / name / "model.safetensors"))
        model.config.to_json_file(str(tmp_path / name / "config.json"))
    code, _, err = run("extract", "ft", "base", "--rank", "2", "-o", "a.safetensors", cwd=tmp_path)
    assert code == 0, err
    t = load(tmp_path / "a.safetensors").targets[key]
    assert t.layout == "fan_in_fan_out" and t.blocks[0].B.shape == (48, 2)
    assert rel(torch_delta(t), ft[key] - base[key]) < F32_REL


def test_to_peft_writes_a_folder_peft_reads_back(files):
    d, ft, base = files
    code, _, err = run("extract", "ft.safetensors", "base.safetensors", "--rank", "3", "--to", "peft",
                       "--targets", "*q_proj*", cwd=d)
    if code == 7:
        pytest.fail(f"PEFT writer missing: {err}")
    assert code == 0, err
    out = d / "ft-minus-base-r3"
    assert (out / "adapter_config.json").is_file()
    from loratool.io.detect import load_adapter

    a = load_adapter(out, base=d / "base.safetensors")
    t = a.targets["model.layers.0.q_proj.weight"]
    k = "model.layers.0.q_proj.weight"
    assert rel(torch_delta(t), ft[k] - base[k]) < F32_REL


def test_help_has_an_example():
    code, out, _ = run("extract", "--help")
    assert code == 0 and "Example:" in out and "--max-params" in out


def test_extract_files_is_the_library_call_behind_the_command(files):
    from loratool import extract as extract_files

    d, ft, base = files
    ticks = []
    r = extract_files(d / "ft.safetensors", d / "base.safetensors", output=d / "lib.safetensors", rank=4,
                      progress=lambda **kw: ticks.append(kw))
    assert r.output == d / "lib.safetensors" and r.bytes == (d / "lib.safetensors").stat().st_size
    assert ticks[0] == {"advance": 0, "total": 4} and ticks[1:] == [{"advance": 1}] * 4
    a = load(r.output)
    assert sorted(a.targets) == sorted(r.adapter.targets) == ["model.layers.0.mlp.down_proj.weight",
                                                              "model.layers.0.q_proj.weight"]
    for k, t in a.targets.items():
        assert rel(torch_delta(t), ft[k] - base[k]) < F32_REL
    with pytest.raises(ValueError, match="choose exactly one of rank, energy, threshold or max_params"):
        extract_files(d / "ft.safetensors", d / "base.safetensors", output=d / "x.safetensors")
    assert not (d / "x.safetensors").exists()


def test_peft_output_loads_with_auto_peft_model_and_gives_the_finetune(tmp_path):
    """extract --to peft names the base and the task (from the base's config.json architectures), so
    AutoPeftModelForCausalLM loads the folder as it is; at full rank its logits are the finetune's."""
    from peft import AutoPeftModelForCausalLM

    from models import sample_input, tiny_llama

    base_model = tiny_llama(seed=1)
    base_model.save_pretrained(tmp_path / "base")
    ft_model = tiny_llama(seed=1)
    with torch.no_grad():
        for name, p in ft_model.named_parameters():
            if name.endswith("proj.weight"):
                p += 0.05 * torch.randn(p.shape[0], 2) @ torch.randn(2, p.shape[1])
    ft_model.save_pretrained(tmp_path / "ft")
    code, out, err = run("extract", tmp_path / "ft", tmp_path / "base", "--rank", "16", "--to", "peft",
                         "-o", tmp_path / "adapter", "-q")
    assert code == 0, err
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"] == str(tmp_path / "base")
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    x = sample_input()
    with torch.no_grad():
        got, want = model(x).logits, ft_model(x).logits
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())  # float32 SVD of rank-2 deltas
