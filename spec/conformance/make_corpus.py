"""Make the conformance corpus of spec/FORMAT.md: valid files with their expected ΔW, invalid files with the
rule ids a reader must report, and a small base for the base-compatibility rules.

Run from anywhere:  python spec/conformance/make_corpus.py
Output is deterministic: running it twice gives the same bytes (a test checks this against the committed files).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import torch  # noqa: E402

from loratool.adapter import Adapter, Block, Target, whole_target  # noqa: E402
from loratool.io.native import save  # noqa: E402
from loratool.ops.linalg import delta_tensor  # noqa: E402

F32 = "F32"


def g(seed):
    return torch.Generator().manual_seed(seed)


def rnd(*shape, seed):
    # Rounded to multiples of 1/8 so every product and sum in the expected ΔW is exact in float32.
    return (torch.randn(*shape, generator=g(seed)) * 8).round() / 8


# ---- byte-level builder for hostile files ----------------------------------------------------------------

def f32_bytes(values) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def raw_file(entries, metadata=None, *, header_text=None, data=None, pad=True, prefix=b"") -> bytes:
    """entries: list of (name, dtype, shape, bytes). Builds header and data; `header_text` overrides the JSON."""
    obj = {}
    if metadata is not None:
        obj["__metadata__"] = metadata
    pos = 0
    blob = b""
    for name, dtype, shape, b in entries:
        obj[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(b)]}
        pos += len(b)
        blob += b
    text = header_text if header_text is not None else json.dumps(obj, separators=(",", ":"))
    raw = prefix + text.encode("utf-8")
    if pad:
        raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + (blob if data is None else data)


def meta_for(targets: dict, version="1.0", extra=None) -> dict:
    m = {"loratool.format": "loratool.adapter", "loratool.spec_version": version,
         "loratool.targets": json.dumps(targets, sort_keys=True, separators=(",", ":"))}
    m.update(extra or {})
    return m


def minimal_entries():
    """The worked example: layer.weight (3, 2), rank 1, alpha 2, A = [[1, 2]], B = [[1], [0], [-1]]."""
    return [("layer.weight.lora.0.A", F32, [1, 2], f32_bytes([1, 2])),
            ("layer.weight.lora.0.B", F32, [3, 1], f32_bytes([1, 0, -1]))]


def minimal_target(**over):
    t = {"kind": "lora", "layout": "linear", "shape": [3, 2],
         "blocks": [{"rank": 1, "alpha": 2, "scale_rule": "standard", "rows": [0, 3], "cols": [0, 2]}]}
    t.update(over)
    return t


def with_block(**over):
    b = {"rank": 1, "alpha": 2, "scale_rule": "standard", "rows": [0, 3], "cols": [0, 2]}
    b.update(over)
    return minimal_target(blocks=[b])


def hostile() -> dict[str, tuple[bytes, list[str]]]:
    """name -> (file bytes, rule ids a reader must report as errors)."""
    ok = raw_file(minimal_entries(), meta_for({"layer.weight": minimal_target()}))
    m = meta_for({"layer.weight": minimal_target()})
    e = minimal_entries()
    good_header = json.dumps({"__metadata__": m, **{n: {"dtype": d, "shape": s, "data_offsets": o} for n, d, s, o in
                              [(e[0][0], F32, [1, 2], [0, 8]), (e[1][0], F32, [3, 1], [8, 20])]}},
                             separators=(",", ":"))
    data = e[0][3] + e[1][3]
    cases = {
        "truncated_length": (ok[:5], ["C001"]),
        "header_past_eof": (struct.pack("<Q", 10_000) + b"{}", ["C001"]),
        "header_2_pow_60": (struct.pack("<Q", 2**60) + b"{}" + b" " * 6, ["C002"]),
        "truncated_data": (ok[:-4], ["C009", "T003"]),
        "not_utf8": (struct.pack("<Q", 8) + b'{"\xff":1}'[:7] + b"}", ["C003"]),
        "not_json": (raw_file([], header_text="{\"a\":", data=b""), ["C003"]),
        "top_level_array": (raw_file([], header_text="[1,2]", data=b""), ["C004"]),
        "leading_whitespace": (raw_file(e, m, prefix=b" "), ["C004"]),
        "newline_padding": (struct.pack("<Q", len(good_header) + 1) + good_header.encode() + b"\n" + data, ["C004"]),
        "duplicate_tensor_key": (raw_file([], header_text=good_header[:-1] + "," + good_header[
            good_header.index("\"layer.weight.lora.0.A\""):good_header.index(",\"layer.weight.lora.0.B\"")] + "}",
            data=data), ["C005"]),
        "duplicate_metadata_key": (raw_file([], header_text=good_header.replace(
            "{\"loratool.format\":\"loratool.adapter\"",
            "{\"loratool.format\":\"loratool.adapter\",\"loratool.format\":\"x\""), data=data), ["C005"]),
        "entry_extra_field": (raw_file([], header_text=good_header.replace(
            "\"dtype\":\"F32\",\"shape\":[1,2]", "\"dtype\":\"F32\",\"extra\":1,\"shape\":[1,2]"), data=data),
            ["C006", "T003"]),
        "unknown_dtype": (raw_file([], header_text=good_header.replace(
            "\"dtype\":\"F32\",\"shape\":[1,2]", "\"dtype\":\"F33\",\"shape\":[1,2]"), data=data),
            ["C006", "T003"]),
        "int_factor": (raw_file([(e[0][0], "I32", [1, 2], struct.pack("<2i", 1, 2)), e[1]], m), ["C007"]),
        "offsets_size_mismatch": (raw_file([], header_text=good_header.replace("[8,20]", "[8,16]"), data=data),
                                  ["C008", "T003"]),
        "overlapping_offsets": (raw_file([], header_text=good_header.replace("[0,8]", "[4,12]"),
                                         data=data), ["C009"]),
        "gap_between_tensors": (raw_file([], header_text=good_header.replace("[8,20]", "[12,24]"),
                                         data=data[:8] + b"\0" * 4 + data[8:]), ["C009"]),
        "trailing_bytes": (ok + b"\0" * 8, ["C009"]),
        "zero_size_tensor": (raw_file(e + [("layer.weight.delta", F32, [0], b"")],
                                      meta_for({"layer.weight": minimal_target()})), ["C010", "T002"]),
        "metadata_not_strings": (raw_file(e, {**m, "loratool.extra": 5}), ["C011", "M001"]),
        "escape_sequence_name": (raw_file(e + [("\x1b[31mred\x1b[0m", F32, [1], f32_bytes([0]))], m),
                                 ["C012", "T001"]),
        "no_format_marker": (raw_file(e, {k: v for k, v in m.items() if k != "loratool.format"}), ["M001"]),
        "major_version_2": (raw_file(e, meta_for({"layer.weight": minimal_target()}, version="2.0")), ["M002"]),
        "targets_not_json": (raw_file(e, {**m, "loratool.targets": "{"}), ["M003"]),
        "nan_alpha_literal": (raw_file(e, {**m, "loratool.targets": m["loratool.targets"].replace(
            "\"alpha\":2", "\"alpha\":NaN")}), ["M003"]),
        "duplicate_target_key": (raw_file(e, {**m, "loratool.targets": "{\"layer.weight\":{},\"layer.weight\":{}}"}),
                                 ["M003"]),
        "missing_shape": (raw_file(e, meta_for({"layer.weight": {k: v for k, v in minimal_target().items()
                                                                 if k != "shape"}})), ["M004"]),
        "unknown_layout": (raw_file(e, meta_for({"layer.weight": minimal_target(layout="diagonal")})), ["M005"]),
        "unknown_scale_rule": (raw_file(e, meta_for({"layer.weight": with_block(scale_rule="sqrt")})), ["M005"]),
        "missing_alpha": (raw_file(e, meta_for({"layer.weight": minimal_target(blocks=[
            {"rank": 1, "scale_rule": "standard", "rows": [0, 3]}])})), ["M006"]),
        "string_alpha": (raw_file(e, meta_for({"layer.weight": with_block(alpha="NaN")})), ["M006"]),
        "rank_zero": (raw_file(e, meta_for({"layer.weight": with_block(rank=0)})), ["M007"]),
        "rows_out_of_range": (raw_file(e, meta_for({"layer.weight": with_block(rows=[0, 4])})), ["M008"]),
        "conv_with_2d_shape": (raw_file(e, meta_for({"layer.weight": minimal_target(layout="conv")})), ["M009"]),
        "full_with_blocks": (raw_file(e, meta_for({"layer.weight": minimal_target(kind="full", scale=1)})),
                             ["M010"]),
        "bad_sha256": (raw_file(e, meta_for({"layer.weight": minimal_target(sha256="xyz")})), ["M011"]),
        "unnamed_tensor": (raw_file(e + [("stray", F32, [1], f32_bytes([0]))], m), ["T001"]),
        "undeclared_target": (raw_file(e + [("other.weight.lora.0.A", F32, [1], f32_bytes([0]))], m), ["T002"]),
        "missing_factor_b": (raw_file(e[:1], m), ["T003"]),
        "rank_mismatch": (raw_file([(e[0][0], F32, [2, 2], f32_bytes([1, 2, 3, 4])), e[1]], m), ["T004"]),
        "delta_shape": (raw_file([("layer.bias.delta", F32, [2], f32_bytes([1, 2]))],
                                 meta_for({"layer.bias": {"kind": "full", "shape": [3], "scale": 1}})), ["T005"]),
        "nan_factor": (raw_file([(e[0][0], F32, [1, 2], f32_bytes([1, math.nan])), e[1]], m), ["T006"]),
    }
    return cases


# ---- valid files -----------------------------------------------------------------------------------------

def valid() -> dict[str, tuple[Adapter, list[str]]]:
    """name -> (adapter, warning rule ids a reader must report)."""
    A = torch.tensor([[1.0, 2.0]])
    B = torch.tensor([[1.0], [0.0], [-1.0]])
    d = 4
    files = {
        "minimal": [whole_target("layer.weight", "linear", (3, 2), A, B, 2)],
        "rslora_whole": [whole_target("model.layers.0.self_attn.q_proj.weight", "linear", (6, 5),
                                      rnd(4, 5, seed=1), rnd(6, 4, seed=2), 8, "rslora")],
        "enable_lora_fused_qkv": [Target(key="h.0.attn.c_attn.weight", layout="fan_in_fan_out", shape=(d, 3 * d),
                                         blocks=(Block(2, 4, "standard", (0, d), (0, d), rnd(2, d, seed=3),
                                                       rnd(d, 2, seed=4)),
                                                 Block(2, 4, "standard", (2 * d, 3 * d), (0, d), rnd(2, d, seed=5),
                                                       rnd(d, 2, seed=6))))],
        "qkv_onto_fused": [Target(key="gpt_neox.layers.0.attention.query_key_value.weight", layout="linear",
                                  shape=(3 * d, d), blocks=(
                                      Block(1, 2, "standard", (0, d), (0, d), rnd(1, d, seed=7), rnd(d, 1, seed=8)),
                                      Block(2, 2, "rslora", (d, 2 * d), (0, d), rnd(2, d, seed=9),
                                            rnd(d, 2, seed=10)),
                                      Block(4, 16, "standard", (2 * d, 3 * d), (0, d), rnd(4, d, seed=11),
                                            rnd(d, 4, seed=12))))],
        "conv_3x3": [whole_target("unet.conv_in.weight", "conv", (3, 2, 3, 3), rnd(2, 18, seed=13),
                                  rnd(3, 2, seed=14), 1)],
        "embedding": [whole_target("model.embed_tokens.weight", "embedding", (10, 4), rnd(2, 10, seed=15),
                                   rnd(4, 2, seed=16), 4)],
        "full_bias": [Target(key="layer.bias", kind="full", layout="full", shape=(3,),
                             delta=torch.tensor([0.5, -1.0, 2.0]), delta_scale=2.0),
                      whole_target("layer.weight", "linear", (3, 2), A, B, 2)],
        "half_precision": [whole_target("a.weight", "linear", (3, 2), rnd(1, 2, seed=17).half(),
                                        rnd(3, 1, seed=18).half(), 1),
                           whole_target("b.weight", "linear", (3, 2), rnd(1, 2, seed=19).bfloat16(),
                                        rnd(3, 1, seed=20).bfloat16(), 1)],
        "overlapping_blocks": [Target(key="layer.weight", layout="linear", shape=(3, 2), blocks=(
            Block(1, 1, "standard", (0, 3), (0, 2), A, B),
            Block(1, -0.5, "standard", (1, 3), (0, 1), torch.tensor([[2.0]]), torch.tensor([[1.0], [3.0]]))))],
        "fingerprint": [whole_target("layer.weight", "linear", (3, 2), A, B, 2, dtype="F32",
                                     sha256=hashlib.sha256(base_tensors()["layer.weight"].numpy().tobytes())
                                     .hexdigest())],
        "name_with_lora_inside": [whole_target("a.lora.0.A", "linear", (3, 2), A, B, 2)],
    }
    out = {name: (Adapter(targets={t.key: t for t in ts}), []) for name, ts in files.items()}
    return out


def base_tensors() -> dict:
    return {"layer.weight": torch.arange(6, dtype=torch.float32).reshape(3, 2) / 4,
            "layer.bias": torch.zeros(3), "int.weight": torch.zeros(3, 2, dtype=torch.int32)}


def base_cases() -> dict[str, tuple[Adapter, list[str], list[str]]]:
    """Adapters checked against base.safetensors: name -> (adapter, error rule ids, warning rule ids)."""
    A = torch.tensor([[1.0, 2.0]])
    B = torch.tensor([[1.0], [0.0], [-1.0]])
    fits = whole_target("layer.weight", "linear", (3, 2), A, B, 2)
    return {
        "fits_base": (Adapter(targets={"layer.weight": fits}), [], []),
        "target_not_in_base": (Adapter(targets={"missing.weight": whole_target("missing.weight", "linear", (3, 2),
                                                                                 A, B, 2)}), ["B001"], []),
        "shape_differs": (Adapter(targets={"layer.weight": whole_target("layer.weight", "linear", (2, 3),
                                                                         torch.ones(1, 3), torch.ones(2, 1), 1)}),
                          ["B002"], []),
        "integer_base_tensor": (Adapter(targets={"int.weight": whole_target("int.weight", "linear", (3, 2),
                                                                             A, B, 2)}), ["B003"], []),
        "sha256_differs": (Adapter(targets={"layer.weight": whole_target("layer.weight", "linear", (3, 2), A, B,
                                                                          2, sha256="0" * 64)}), ["B004"], []),
        "dtype_differs": (Adapter(targets={"layer.weight": whole_target("layer.weight", "linear", (3, 2), A, B, 2,
                                                                         dtype="BF16")}), [], ["W005"]),
    }


def warning_files() -> dict[str, tuple[bytes, list[str]]]:
    """Valid files that must raise warnings: name -> (bytes, warning ids)."""
    e = minimal_entries()
    zero_b = [e[0], ("layer.weight.lora.0.B", F32, [3, 1], f32_bytes([0, 0, 0]))]
    mixed = [e[0], ("layer.weight.lora.0.B", "F16", [3, 1], struct.pack("<3e", 1, 0, -1))]
    return {
        "newer_minor_version": (raw_file(e, meta_for({"layer.weight": minimal_target()}, version="1.9")),
                                ["W002"]),
        "unknown_field_and_key": (raw_file(e, meta_for({"layer.weight": minimal_target(color="red")},
                                                       extra={"loratool.future": "x"})), ["W001", "W001"]),
        "zero_factor": (raw_file(zero_b, meta_for({"layer.weight": minimal_target()})), ["W003"]),
        "mixed_factor_dtypes": (raw_file(mixed, meta_for({"layer.weight": minimal_target()})), ["W004"]),
    }


def main(root: Path = HERE) -> None:
    from safetensors.torch import save_file

    for sub in ("valid", "invalid", "base_checks", "expected_delta"):
        shutil.rmtree(root / sub, ignore_errors=True)
        (root / sub).mkdir(parents=True)
    expected = {"valid": {}, "invalid": {}, "base_checks": {}}
    for name, (adapter, warns) in valid().items():
        save(adapter, root / "valid" / f"{name}.safetensors")
        deltas = {t.key: torch.from_numpy(delta_tensor(t)).contiguous() for t in adapter}
        save_file(deltas, str(root / "expected_delta" / f"{name}.safetensors"))
        expected["valid"][f"{name}.safetensors"] = {"errors": [], "warnings": warns}
    for name, (blob, warns) in warning_files().items():
        (root / "valid" / f"{name}.safetensors").write_bytes(blob)
        expected["valid"][f"{name}.safetensors"] = {"errors": [], "warnings": warns}
    for name, (blob, rules) in hostile().items():
        (root / "invalid" / f"{name}.safetensors").write_bytes(blob)
        expected["invalid"][f"{name}.safetensors"] = {"errors": rules}
    save_file(base_tensors(), str(root / "base.safetensors"))
    for name, (adapter, errs, warns) in base_cases().items():
        save(adapter, root / "base_checks" / f"{name}.safetensors")
        expected["base_checks"][f"{name}.safetensors"] = {"errors": errs, "warnings": warns}
    (root / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
    print(f"wrote the corpus under {HERE if len(sys.argv) == 1 else sys.argv[1]}")
