"""Random bytes and mutated valid files give a clean result or a LoraToolError, never anything else."""

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratool.tasks.validate import validate as validate_file
from loratool.errors import LoraToolError
from loratool.io.native import load

CORPUS = Path(__file__).resolve().parents[1] / "spec" / "conformance"
SEEDS = sorted((CORPUS / "valid").glob("*.safetensors"))


def _exercise(path):
    try:
        rep = validate_file(path)
        assert all(f.rule for f in rep.findings)
    except LoraToolError:
        pass
    try:
        load(path)
    except LoraToolError as e:
        assert "\n" not in str(e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=300))
def test_random_bytes(tmp_path, blob):
    p = tmp_path / "r.safetensors"
    p.write_bytes(blob)
    _exercise(p)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(SEEDS), data=st.data())
def test_mutated_valid_files(tmp_path, seed, data):
    blob = bytearray(seed.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert", "digit"]))
        i = data.draw(st.integers(0, len(blob) - 1))
        if op == "flip":
            blob[i] ^= data.draw(st.integers(1, 255))
        elif op == "truncate":
            del blob[i:]
        elif op == "insert":
            blob[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        else:  # change a digit inside the JSON header: shapes, offsets, ranks, alphas
            digits = [j for j, c in enumerate(blob[8:400]) if 0x30 <= c <= 0x39]
            if digits:
                blob[8 + data.draw(st.sampled_from(digits))] = data.draw(st.integers(0x30, 0x39))
        if not blob:
            break
    p = tmp_path / "m.safetensors"
    p.write_bytes(bytes(blob))
    _exercise(p)
