"""Make the conformance corpus of spec/FORMAT.md: valid files with their expected ΔW (and, for DoRA, whose
merge depends on the base, the expected merged weight on base.safetensors), invalid files with the rule ids a
reader must report, and a small base for the base-compatibility rules.

The expected ΔW of the LyCORIS kinds and the expected DoRA merges are computed here from the formulas of spec
section 5.1-5.2 in float64 torch, independently of loratool's numpy code (ops/kinds.py), which the corpus test
compares with them.

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

from dataclasses import replace  # noqa: E402

from loratool.adapter import FACTORED_KINDS, Adapter, Block, Target, whole_target  # noqa: E402
from loratool.io.native import save  # noqa: E402
from loratool.ops.linalg import delta_tensor  # noqa: E402

F32 = "F32"


def g(seed):
    return torch.Generator().manual_seed(seed)


def rnd(*shape, seed):
    # Rounded to multiples of 1/8 so every product and sum in the expected ΔW is exact in float32.
    return (torch.randn(*shape, generator=g(seed)) * 8).round() / 8


def half(*shape, seed):
    # Multiples of 1/2 in [-1, 1]: a Tucker rebuild multiplies three factors and a Hadamard product two of those,
    # which stays exact in float32 only with few bits per factor.
    return torch.randint(-2, 3, shape, generator=g(seed)).float() / 2


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
    cases.update(hostile_1_1())
    return cases


# ---- spec 1.1: the LyCORIS kinds and DoRA, byte by byte ----------------------------------------------------

def tensor(name, *shape, value=0.5):
    n = math.prod(shape)
    return (name, F32, list(shape), f32_bytes([value + i / 8 for i in range(n)]))


def loha_entries(key="h.weight", drop=()):
    """A loha target (4, 6) of rank 2: w1a, w2a (4, 2), w1b, w2b (2, 6)."""
    shapes = {"w1a": (4, 2), "w1b": (2, 6), "w2a": (4, 2), "w2b": (2, 6)}
    return [tensor(f"{key}.loha.{f}", *sh) for f, sh in sorted(shapes.items()) if f not in drop]


def loha_target(**over):
    t = {"kind": "loha", "layout": "linear", "shape": [4, 6], "scale": 0.5}
    t.update(over)
    return t


def dora_target(**over):
    t = minimal_target(kind="dora", dora_axis="out", dora_eps=0)
    t.update(over)
    return t


def hostile_1_1() -> dict[str, tuple[bytes, list[str]]]:
    """Files that break the rules spec 1.1 adds (and a 1.1 kind a reader must refuse rather than misread)."""
    e, mag = minimal_entries(), tensor("layer.weight.magnitude", 3)
    lok = {"kind": "lokr", "layout": "linear", "shape": [4, 8], "scale": 1}
    return {
        "unknown_kind": (raw_file(e, meta_for({"layer.weight": minimal_target(kind="oft")}, "1.1")), ["M005"]),
        "loha_without_scale": (raw_file(loha_entries(), meta_for(
            {"h.weight": {k: v for k, v in loha_target().items() if k != "scale"}}, "1.1")), ["Y001"]),
        "loha_missing_factor": (raw_file(loha_entries(drop=("w2b",)), meta_for({"h.weight": loha_target()}, "1.1")),
                                ["Y002"]),
        "lokr_shapes_do_not_fit": (raw_file([tensor("k.weight.lokr.w1", 2, 2), tensor("k.weight.lokr.w2", 2, 3)],
                                            meta_for({"k.weight": lok}, "1.1")), ["Y003"]),
        "factor_of_another_kind": (raw_file(loha_entries() + [tensor("h.weight.lokr.w1", 2, 2)],
                                            meta_for({"h.weight": loha_target()}, "1.1")), ["T002"]),
        "dora_without_axis": (raw_file(e + [mag], meta_for({"layer.weight": {
            k: v for k, v in dora_target().items() if k != "dora_axis"}}, "1.1")), ["D001"]),
        "dora_magnitude_length": (raw_file(e + [tensor("layer.weight.magnitude", 2)],
                                           meta_for({"layer.weight": dora_target()}, "1.1")), ["D002"]),
        "dora_without_magnitude": (raw_file(e, meta_for({"layer.weight": dora_target()}, "1.1")), ["D002"]),
        "dora_in_on_fan_in_fan_out": (raw_file(e + [tensor("layer.weight.magnitude", 2)], meta_for({
            "layer.weight": dora_target(layout="fan_in_fan_out", shape=[2, 3], dora_axis="in")}, "1.1")),
            ["D003"]),
        "magnitude_without_dora": (raw_file(e + [mag], meta_for({"layer.weight": minimal_target()}, "1.1")),
                                   ["T002"]),
        "nan_magnitude": (raw_file(e + [("layer.weight.magnitude", F32, [3], f32_bytes([1, math.inf, 1]))],
                                   meta_for({"layer.weight": dora_target()}, "1.1")), ["T006"]),
    }


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
        "experts": [Target(key="mlp.experts.gate_up_proj", layout="experts", shape=(2, 3, 4), blocks=(
            Block(1, 2, "standard", (0, 3), (0, 4), rnd(1, 4, seed=21), rnd(3, 1, seed=22)),
            Block(2, 2, "standard", (3, 6), (0, 4), rnd(2, 4, seed=23), rnd(3, 2, seed=24))))],
        "experts_t": [Target(key="mlp.experts.down_proj", layout="experts_t", shape=(2, 4, 3), blocks=(
            Block(1, 1, "standard", (0, 3), (4, 8), rnd(1, 4, seed=25), rnd(3, 1, seed=26)),))],
    }
    files.update(lycoris_files())
    out = {name: (Adapter(targets={t.key: t for t in ts}), []) for name, ts in files.items()}
    return out


def lycoris(key, kind, shape, scale, **factors):
    return Target(key=key, layout="conv" if len(shape) > 2 else "linear", shape=shape, kind=kind, factors=factors,
                  delta_scale=scale)


def lycoris_files() -> dict[str, list[Target]]:
    """The spec 1.1 kinds (section 5.1-5.2): each LyCORIS factor set once, and DoRA on both axes."""
    conv = (4, 2, 3, 3)
    loha_in = lycoris("conv.weight", "loha", conv, 0.5, w1a=rnd(4, 2, seed=40), w1b=rnd(2, 18, seed=41),
                      w2a=rnd(4, 2, seed=42), w2b=rnd(2, 18, seed=43))
    eps = 2.0 ** -23  # float32 eps, as LyCORIS adds
    return {
        "loha_linear": [lycoris("h.weight", "loha", (4, 6), 0.5, w1a=rnd(4, 2, seed=30), w1b=rnd(2, 6, seed=31),
                                w2a=rnd(4, 2, seed=32), w2b=rnd(2, 6, seed=33))],
        "loha_tucker_conv": [lycoris("conv.weight", "loha", conv, 2.0, t1=half(2, 2, 3, 3, seed=34),
                                     w1a=half(2, 4, seed=35), w1b=half(2, 2, seed=36), t2=half(2, 2, 3, 3, seed=37),
                                     w2a=half(2, 4, seed=38), w2b=half(2, 2, seed=39))],
        "lokr_whole": [lycoris("k.weight", "lokr", (6, 8), 1.0, w1=rnd(2, 2, seed=44), w2=rnd(3, 4, seed=45))],
        "lokr_w2_decomposed": [lycoris("k.weight", "lokr", (6, 8), 0.25, w1=rnd(2, 2, seed=46),
                                       w2a=rnd(3, 2, seed=47), w2b=rnd(2, 4, seed=48))],
        "lokr_both_decomposed": [lycoris("k.weight", "lokr", (6, 8), 4.0, w1a=rnd(2, 1, seed=49),
                                         w1b=rnd(1, 2, seed=50), w2a=rnd(3, 1, seed=51), w2b=rnd(1, 4, seed=52))],
        "lokr_conv_whole_w2": [lycoris("conv.weight", "lokr", conv, 1.0, w1=rnd(2, 1, seed=53),
                                       w2=rnd(2, 2, 3, 3, seed=54))],
        "lokr_tucker_conv": [lycoris("conv.weight", "lokr", conv, 0.5, w1=half(2, 1, seed=55),
                                     t2=half(1, 1, 3, 3, seed=56), w2a=half(1, 2, seed=57), w2b=half(1, 2, seed=58))],
        "tucker_conv": [lycoris("conv.weight", "tucker", conv, 0.5, up=rnd(4, 2, seed=59),
                                mid=rnd(2, 2, 3, 3, seed=60), down=rnd(2, 2, seed=61))],
        "dora_linear": [Target(key="layer.weight", layout="linear", shape=(3, 2), kind="dora", blocks=(
            Block(1, 2, "standard", (0, 3), (0, 2), rnd(1, 2, seed=62), rnd(3, 1, seed=63)),),
            magnitude=rnd(3, seed=64).abs() + 1)],
        "dora_loha_in": [replace(loha_in, magnitude=rnd(2, seed=65).abs() + 1, dora=True, dora_axis="in",
                                 dora_eps=eps)],
    }


# ---- expected results, from the formulas of spec section 5 in float64 (independent of ops/) ---------------

def _tucker(t, wa, wb):
    return torch.einsum("ij...,ip,jq->pq...", t, wa, wb)  # H[p, q, …] = Σ_ij t[i, j, …] wa[i, p] wb[j, q]


def lycoris_delta(t: Target) -> torch.Tensor:
    """ΔW of a loha, lokr or tucker target in the base tensor's shape (spec section 5.1), float64."""
    f = {k: v.double() for k, v in t.factors.items()}
    out = t.shape[0]
    if t.kind == "loha":
        if "t1" in f:
            H1, H2 = (_tucker(f[f"t{i}"], f[f"w{i}a"], f[f"w{i}b"]).reshape(out, -1) for i in (1, 2))
        else:
            H1, H2 = (f[f"w{i}a"] @ f[f"w{i}b"] for i in (1, 2))
        D = H1 * H2
    elif t.kind == "lokr":
        W1 = f["w1"] if "w1" in f else f["w1a"] @ f["w1b"]
        W2 = f["w2"] if "w2" in f else _tucker(f["t2"], f["w2a"], f["w2b"]) if "t2" in f else \
            f["w2a"] @ f["w2b"].reshape(f["w2b"].shape[0], -1)
        D = torch.kron(W1, W2.reshape(W2.shape[0], -1))
    else:
        C = torch.einsum("ilk,lq->iqk", f["mid"].reshape(*f["mid"].shape[:2], -1), f["down"])
        D = f["up"] @ C.reshape(C.shape[0], -1)
    return (D * t.delta_scale).reshape(t.shape)


def dora_merged(t: Target, W: torch.Tensor) -> torch.Tensor:
    """W' = m / (‖W + ΔW‖ + eps) · (W + ΔW) (spec section 5.2), float64, for a linear or conv target."""
    if t.kind == "dora":
        D = torch.zeros(t.matrix_shape, dtype=torch.float64)
        for b in t.blocks:
            D[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] += (b.B.double() @ b.A.double()) * b.scale
        D = D.reshape(t.shape)
    else:
        D = lycoris_delta(t)
    V = W.double() + D
    m = t.magnitude.double()
    if t.dora_axis == "out":  # one norm per output row, over everything else
        norm = V.reshape(V.shape[0], -1).norm(dim=1) + t.dora_eps
        return (V * (m / norm).reshape(-1, *[1] * (V.dim() - 1))).float()
    norm = V.transpose(0, 1).reshape(V.shape[1], -1).norm(dim=1) + t.dora_eps  # one per input channel
    return (V * (m / norm).reshape(1, -1, *[1] * (V.dim() - 2))).float()


def base_tensors() -> dict:
    return {"layer.weight": torch.arange(6, dtype=torch.float32).reshape(3, 2) / 4,
            "layer.bias": torch.zeros(3), "int.weight": torch.zeros(3, 2, dtype=torch.int32),
            "conv.weight": rnd(4, 2, 3, 3, seed=70)}


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
        # 1.1 kinds and layouts in files that declare 1.0 (loratool wrote experts layouts so before 1.1).
        "loha_declared_1_0": (raw_file(loha_entries(), meta_for({"h.weight": loha_target()}, "1.0")), ["W006"]),
        "experts_declared_1_0": (raw_file([("e.lora.0.A", F32, [1, 2], f32_bytes([1, 2])),
                                           ("e.lora.0.B", F32, [6, 1], f32_bytes([1, 0, -1, 1, 0, -1]))],
                                          meta_for({"e": minimal_target(layout="experts", shape=[2, 3, 2], blocks=[
                                              {"rank": 1, "alpha": 1, "scale_rule": "standard", "rows": [0, 6]}])},
                                              "1.0")), ["W006"]),
    }


def main(root: Path = HERE) -> None:
    from safetensors.torch import save_file

    for sub in ("valid", "invalid", "base_checks", "expected_delta", "expected_merged"):
        shutil.rmtree(root / sub, ignore_errors=True)
        (root / sub).mkdir(parents=True)
    expected = {"valid": {}, "invalid": {}, "base_checks": {}}
    base = base_tensors()
    for name, (adapter, warns) in valid().items():
        save(adapter, root / "valid" / f"{name}.safetensors")
        if any(t.is_dora for t in adapter):  # W' depends on W: the merged weight on base.safetensors
            merged = {t.key: dora_merged(t, base[t.key]).contiguous() for t in adapter}
            save_file(merged, str(root / "expected_merged" / f"{name}.safetensors"))
        else:
            deltas = {t.key: lycoris_delta(t).float() if t.kind in FACTORED_KINDS else
                      torch.from_numpy(delta_tensor(t)) for t in adapter}
            save_file({k: v.contiguous() for k, v in deltas.items()},
                      str(root / "expected_delta" / f"{name}.safetensors"))
        expected["valid"][f"{name}.safetensors"] = {"errors": [], "warnings": warns}
    for name, (blob, warns) in warning_files().items():
        (root / "valid" / f"{name}.safetensors").write_bytes(blob)
        expected["valid"][f"{name}.safetensors"] = {"errors": [], "warnings": warns}
    for name, (blob, rules) in hostile().items():
        (root / "invalid" / f"{name}.safetensors").write_bytes(blob)
        expected["invalid"][f"{name}.safetensors"] = {"errors": rules}
    save_file(base, str(root / "base.safetensors"))
    for name, (adapter, errs, warns) in base_cases().items():
        save(adapter, root / "base_checks" / f"{name}.safetensors")
        expected["base_checks"][f"{name}.safetensors"] = {"errors": errs, "warnings": warns}
    (root / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
    print(f"wrote the corpus under {HERE if len(sys.argv) == 1 else sys.argv[1]}")
