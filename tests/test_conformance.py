"""The conformance corpus of spec/: every file gives exactly the rule ids expected.json lists for it."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loratool
from arrays import dense_delta
from loratool import spec
from loratool.ops.linalg import delta_tensor
from loratool.ops.merge import Term, merge_tensor
from loratool.tasks.validate import validate as validate_file

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "spec" / "conformance"
EXPECTED = json.loads((CORPUS / "expected.json").read_text())


def _ids(findings, severity):
    return sorted({f.rule for f in findings if f.severity == severity})


@pytest.mark.parametrize("name", sorted(EXPECTED["invalid"]))
def test_invalid_file_reports_exactly_its_rules(name):
    rep = validate_file(CORPUS / "invalid" / name)
    assert _ids(rep.findings, "error") == sorted(EXPECTED["invalid"][name]["errors"])


@pytest.mark.parametrize("name", sorted(EXPECTED["invalid"]))
def test_invalid_file_refused_by_load(name):
    with pytest.raises(loratool.LoraToolError, match=r"\(rule [CMTDY]\d{3}\)"):
        loratool.load(CORPUS / "invalid" / name)


@pytest.mark.parametrize("name", sorted(EXPECTED["valid"]))
def test_valid_file(name):
    rep = validate_file(CORPUS / "valid" / name)
    assert _ids(rep.findings, "error") == []
    assert _ids(rep.findings, "warning") == sorted(set(EXPECTED["valid"][name]["warnings"]))


@pytest.mark.parametrize("name", sorted(p.name for p in (CORPUS / "expected_delta").iterdir()))
def test_valid_file_delta_matches_expected(name):
    adapter = loratool.load(CORPUS / "valid" / name)
    want = load_file(str(CORPUS / "expected_delta" / name))
    assert sorted(want) == sorted(adapter.targets)
    for key, t in adapter.targets.items():
        # The corpus factors are multiples of 1/8 (1/2 under a Tucker core), so the float32 deltas are exact:
        # compare bit for bit. LyCORIS kinds: loratool's ops/kinds.py against make_corpus's float64 formulas.
        got = torch.from_numpy(delta_tensor(t)) if t.dense else dense_delta(t)
        assert torch.equal(got, want[key]), key


DORA_RTOL = 2e-7  # |W' - expected| / |expected|: float32 norm and rescale against float64, rounded (measured 4.5e-8 and 6.7e-8)


@pytest.mark.parametrize("name", sorted(p.name for p in (CORPUS / "expected_merged").iterdir()))
def test_dora_file_merges_to_expected(name):
    adapter = loratool.load(CORPUS / "valid" / name)
    base = load_file(str(CORPUS / "base.safetensors"))
    want = load_file(str(CORPUS / "expected_merged" / name))
    assert sorted(want) == sorted(adapter.targets)
    for key, t in adapter.targets.items():
        got, _ = merge_tensor(base[key].numpy(), key, [Term(t, 1.0)])
        err = float((torch.from_numpy(got) - want[key]).abs().max() / want[key].abs().max())
        assert err <= DORA_RTOL, (key, err)
        assert not torch.equal(torch.from_numpy(got), base[key] + torch.from_numpy(delta_tensor(t)))  # not W + ΔW


def test_worked_example_delta():
    t = loratool.load(CORPUS / "valid" / "minimal.safetensors").targets["layer.weight"]
    assert dense_delta(t).tolist() == [[2.0, 4.0], [0.0, 0.0], [-2.0, -4.0]]


@pytest.mark.parametrize("name", sorted(EXPECTED["base_checks"]))
def test_base_checks(name):
    rep = validate_file(CORPUS / "base_checks" / name, base=CORPUS / "base.safetensors")
    exp = EXPECTED["base_checks"][name]
    assert _ids(rep.findings, "error") == sorted(exp["errors"])
    assert _ids(rep.findings, "warning") == sorted(exp["warnings"])


def test_corpus_covers_every_rule():
    covered = set()
    for group in EXPECTED.values():
        for exp in group.values():
            covered |= set(exp.get("errors", [])) | set(exp.get("warnings", []))
    assert covered == set(spec.RULES), sorted(set(spec.RULES) ^ covered)


def test_corpus_is_reproducible(tmp_path):
    import importlib.util

    s = importlib.util.spec_from_file_location("make_corpus", CORPUS / "make_corpus.py")
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    mod.main(tmp_path)
    for p in sorted(tmp_path.rglob("*")):
        if p.is_file():
            rel = p.relative_to(tmp_path)
            assert (CORPUS / rel).read_bytes() == p.read_bytes(), f"{rel} differs: rerun make_corpus.py"
    committed = {p.relative_to(CORPUS) for p in CORPUS.rglob("*") if p.is_file() and p.suffix != ".py"}
    made = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    assert committed == made


def test_spec_document_lists_every_rule_and_only_those():
    text = (ROOT / "spec" / "FORMAT.md").read_text()
    in_doc = set(re.findall(r"\*\*([CMTBWDY]\d{3})\*\*", text))
    assert in_doc == set(spec.RULES), sorted(in_doc ^ set(spec.RULES))


def test_json_schema_accepts_every_valid_file_and_refuses_schema_breaks():
    import jsonschema
    from loratool.container import read_header

    schema = json.loads((ROOT / "spec" / "schema" / "targets.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    v = jsonschema.Draft202012Validator(schema)
    for name in EXPECTED["valid"]:
        targets = json.loads(read_header(CORPUS / "valid" / name).metadata["loratool.targets"])
        assert not list(v.iter_errors(targets)), name
    for name in ["missing_shape", "unknown_layout", "unknown_scale_rule", "missing_alpha", "string_alpha",
                 "rank_zero", "full_with_blocks", "bad_sha256", "unknown_kind", "loha_without_scale",
                 "dora_without_axis", "dora_in_on_fan_in_fan_out"]:
        targets = json.loads(read_header(CORPUS / "invalid" / f"{name}.safetensors").metadata["loratool.targets"])
        assert list(v.iter_errors(targets)), name
