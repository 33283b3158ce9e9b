"""--allow-partial for every dialect that maps names to a base (kohya, PEFT), and --targets / --exclude on
merge and convert: what is left out is always reported, and a selection that leaves nothing is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from clitools import one_error_line, run
from loratool.errors import MismatchError
from loratool.io.detect import load_adapter

UNET = "lora_unet_mid_block_attn_to_q"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
KEY = "mid_block.attn.to_q.weight"
ATOL = 1e-6  # float32 W + s·up@down of unit-scale values, against the same sum in numpy


def g(seed):
    return np.random.default_rng(seed)


@pytest.fixture
def kohya_unet_te(tmp_path):
    """A kohya file with a UNet module and a text-encoder module, and a UNet-only base."""
    f = {f"{UNET}.lora_down.weight": g(1).standard_normal((2, 5), dtype=np.float32),
         f"{UNET}.lora_up.weight": g(2).standard_normal((10, 2), dtype=np.float32),
         f"{UNET}.alpha": np.array(1.0, dtype=np.float32),
         f"{TE}.lora_down.weight": g(3).standard_normal((2, 5), dtype=np.float32),
         f"{TE}.lora_up.weight": g(4).standard_normal((6, 2), dtype=np.float32)}
    save_file(f, str(tmp_path / "lora.safetensors"))
    base = {KEY: g(5).standard_normal((10, 5), dtype=np.float32),
            "mid_block.attn.to_k.weight": g(6).standard_normal((10, 5), dtype=np.float32)}
    save_file(base, str(tmp_path / "unet.safetensors"))
    want = base[KEY] + 0.5 * (f[f"{UNET}.lora_up.weight"] @ f[f"{UNET}.lora_down.weight"])  # alpha 1 / rank 2
    return tmp_path / "unet.safetensors", tmp_path / "lora.safetensors", want


def test_kohya_unet_part_merges_into_a_unet_with_allow_partial(kohya_unet_te, tmp_path):
    base, lora, want = kohya_unet_te
    code, _, err = run("merge", base, lora, "-o", tmp_path / "o.safetensors")
    assert code == 4
    assert f'module "{TE}": no base key of {base} matches the kohya name' in one_error_line(err)
    code, out, err = run("merge", base, lora, "-o", tmp_path / "o.safetensors", "--allow-partial", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["targets"] == 1 and len(doc["skipped"]) == 1 and TE in doc["skipped"][0]
    got = load_file(str(tmp_path / "o.safetensors"))
    np.testing.assert_allclose(got[KEY], want, atol=ATOL, rtol=0)
    code, _, err = run("merge", base, lora, "-o", tmp_path / "p.safetensors", "--allow-partial", "-q")
    assert code == 0 and f'skipped: {lora}: module "{TE}": no base key' in err  # people see it too


def test_convert_with_allow_partial_keeps_what_maps(kohya_unet_te, tmp_path):
    base, lora, _ = kohya_unet_te
    code, out, err = run("convert", lora, "-o", tmp_path / "a.safetensors", "--base", base, "--allow-partial",
                         "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["targets"] == 1 and TE in doc["skipped"][0]
    assert list(load_adapter(tmp_path / "a.safetensors").targets) == [KEY]


def test_allow_partial_without_base_mapping_dialect_is_refused(tmp_path):
    from loratool.adapter import Adapter
    from loratool.io.native import save

    from builders import linear_target

    save(Adapter({"x.weight": linear_target("x.weight")}), tmp_path / "a.safetensors")
    code, _, err = run("convert", tmp_path / "a.safetensors", "-o", tmp_path / "b.safetensors", "--allow-partial")
    assert code == 2  # a usage mistake, the same code in every command
    assert one_error_line(err).endswith("is a loratool adapter, which does not take --allow-partial; drop the option")


def peft_folder(tmp_path, modules, target_modules):
    folder = tmp_path / "peft"
    folder.mkdir()
    t = {}
    for i, m in enumerate(modules):
        t[f"base_model.model.{m}.lora_A.weight"] = g(10 + i).standard_normal((2, 5), dtype=np.float32)
        t[f"base_model.model.{m}.lora_B.weight"] = g(20 + i).standard_normal((10, 2), dtype=np.float32)
    save_file(t, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": target_modules}))
    return folder


def test_peft_unmatched_target_modules_refused_unless_partial(kohya_unet_te, tmp_path):
    base, _, _ = kohya_unet_te
    ad = peft_folder(tmp_path, ["layers.0.q_proj"], ["q_proj"])
    with pytest.raises(MismatchError, match="match no module of the base"):
        load_adapter(ad, base=base)
    a = load_adapter(ad, base=base, allow_partial=True)
    assert len(a) == 0
    skipped = a.info["skipped"]
    assert len(skipped) == 2 and "target_modules [\"q_proj\"] match no module" in skipped[0]
    assert 'module "layers.0.q_proj"' in skipped[1]


def test_peft_module_missing_from_the_base_is_skipped(kohya_unet_te, tmp_path):
    base, _, _ = kohya_unet_te
    ad = peft_folder(tmp_path, ["mid_block.attn.to_q", "mid_block.attn.to_v"], ["to_q", "to_v"])
    code, _, err = run("merge", base, ad, "-o", tmp_path / "o.safetensors")
    assert code == 4 and "to_v" in one_error_line(err)
    code, out, err = run("merge", base, ad, "-o", tmp_path / "o.safetensors", "--allow-partial", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["targets"] == 1 and len(doc["skipped"]) == 1 and "mid_block.attn.to_v" in doc["skipped"][0]


# ---- --targets / --exclude --------------------------------------------------------------------------------

@pytest.fixture
def two_targets(tmp_path):
    from loratool.adapter import Adapter
    from loratool.io.native import save

    from builders import linear_target

    base = {"a.q.weight": g(1).standard_normal((12, 10), dtype=np.float32),
            "a.k.weight": g(2).standard_normal((12, 10), dtype=np.float32)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save(Adapter({k: linear_target(k, seed=i) for i, k in enumerate(base)}), tmp_path / "ad.safetensors")
    return tmp_path / "base.safetensors", tmp_path / "ad.safetensors", base


@pytest.mark.parametrize("flags", [("--targets", "*.q"), ("--exclude", "a.k.weight"), ("--targets", "a.*",
                                                                                       "--exclude", "*k*")])
def test_merge_selection(two_targets, tmp_path, flags):
    base, ad, tensors = two_targets
    code, out, err = run("merge", base, ad, "-o", tmp_path / "o.safetensors", "--json", *flags)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["targets"] == 1 and doc["excluded"] == [f"{ad}: a.k.weight"]
    got = load_file(str(tmp_path / "o.safetensors"))
    assert np.array_equal(got["a.k.weight"], tensors["a.k.weight"])  # left out: copied as it is
    assert not np.array_equal(got["a.q.weight"], tensors["a.q.weight"])


def test_selection_that_matches_or_leaves_nothing_is_refused(two_targets, tmp_path):
    base, ad, _ = two_targets
    code, _, err = run("merge", base, ad, "-o", tmp_path / "o.safetensors", "--targets", "*v_proj*")
    assert code == 2
    assert one_error_line(err) == ('error: --targets "*v_proj*" matches no target of the adapters (by base key, '
                                   "module path or kohya name); run `loratool inspect` to see their names")
    code, _, err = run("convert", ad, "-o", tmp_path / "c.safetensors", "--exclude", "*")
    assert code == 2
    assert one_error_line(err) == "error: --targets/--exclude leave no target of the 2 there are; nothing to do"
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "c.safetensors").exists()


def test_convert_selects_by_kohya_name(kohya_unet_te, tmp_path):
    _, lora, _ = kohya_unet_te
    code, _, err = run("convert", lora, "-o", tmp_path / "k.safetensors", "--to", "kohya", "--exclude", "lora_te_*")
    assert code == 0, err
    assert f"left out 1 target(s) by --targets/--exclude: {lora}: {TE}.weight" in err
    names = set(load_file(str(tmp_path / "k.safetensors")))
    assert names == {f"{UNET}.lora_down.weight", f"{UNET}.lora_up.weight", f"{UNET}.alpha"}
