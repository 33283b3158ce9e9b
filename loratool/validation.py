"""Every rule of spec/FORMAT.md, as findings. Never raises on the first problem: it reports them all.

`parse_adapter_header` turns a checked container header into a header-only Adapter (factors None) and
findings; `check_values` and `check_base` add the rules that need tensor data or a base model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace

from . import kind_shapes, spec
from .adapter import EXPERT_LAYOUTS, LORA_KINDS, Adapter, Block, Target, matrix_shape
from .container import Finding, Header, escape, read_header, strict_json, _Duplicate

_COMMON_FIELDS = {"kind", "layout", "shape", "dtype", "sha256", "info"}
_DORA_FIELDS = {"dora_axis", "dora_eps"}
_TARGET_FIELDS = {"lora": _COMMON_FIELDS | {"blocks"}, "dora": _COMMON_FIELDS | {"blocks"} | _DORA_FIELDS,
                  "full": _COMMON_FIELDS | {"scale"}, **{k: _COMMON_FIELDS | {"scale"} | _DORA_FIELDS
                                                         for k in spec.FACTORED_KINDS}}
_BLOCK_FIELDS = {"rank", "alpha", "scale_rule", "rows", "cols"}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _is_int(v) -> bool:
    return type(v) is int


def _is_num(v) -> bool:
    return type(v) in (int, float)


@dataclass
class Report:
    """What validation found; `adapter` is header-only (factors None) when the metadata could be parsed.

    `dialect` is the registry name of what was validated ("loratool" for this format); `fit`, with a base, the
    fit report (tasks/fit.py: per target the base key, shapes, base dtype, scale, layout, blocks, ties).
    """

    path: str
    findings: list[Finding] = field(default_factory=list)
    adapter: Adapter | None = None
    header: Header | None = None
    dialect: str = "loratool"
    fit: dict | None = None

    def failed(self, strict: bool = False) -> bool:
        """True when there is an error, or (strict) a warning."""
        return bool(self.errors) or (strict and bool(self.warnings))

    def as_dict(self, strict: bool = False) -> dict:
        """The report as `validate --json` prints it."""
        doc = {"path": self.path, "dialect": self.dialect, "valid": not self.failed(strict),
               "errors": len(self.errors), "warnings": len(self.warnings),
               "targets": len(self.adapter) if self.adapter is not None else 0,
               "findings": [f.as_dict() for f in self.findings]}
        if self.fit is not None:
            doc["fit"] = self.fit
        return doc

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]


def _range(v, size: int, what: str, key: str, add) -> tuple[int, int] | None:
    if not (isinstance(v, list) and len(v) == 2 and all(_is_int(x) for x in v)):
        add(Finding("M004", f"target \"{key}\": {what} must be [start, stop] integers", key))
        return None
    a, b = v
    if not 0 <= a < b <= size:
        add(Finding("M008", f"target \"{key}\": {what} [{a}, {b}) is not inside [0, {size})", key))
        return None
    return a, b


def _parse_block(key: str, i: int, raw, out: int, inp: int, add) -> Block | None:
    if not isinstance(raw, dict):
        add(Finding("M004", f"target \"{key}\": block {i} is not an object", key))
        return None
    for extra in sorted(set(raw) - _BLOCK_FIELDS):
        add(Finding("W001", f"target \"{key}\": block {i} has unknown field \"{escape(extra)}\"", key))
    ok = True
    rank = raw.get("rank")
    if not _is_int(rank) or rank <= 0:
        add(Finding("M007", f"target \"{key}\": block {i} rank {rank!r} is not a positive integer", key))
        ok = False
    alpha = raw.get("alpha")
    if not _is_num(alpha) or not math.isfinite(alpha):
        shown = "missing" if alpha is None else repr(alpha)
        add(Finding("M006", f"target \"{key}\": block {i} alpha is {shown}; alpha must be a finite number", key))
        ok = False
    rule = raw.get("scale_rule")
    if rule not in spec.SCALE_RULES:
        add(Finding("M005", f"target \"{key}\": block {i} scale_rule {rule!r} is not one of "
                            f"{', '.join(spec.SCALE_RULES)}", key))
        ok = False
    if "rows" not in raw:
        add(Finding("M004", f"target \"{key}\": block {i} has no rows", key))
        return None
    rows = _range(raw["rows"], out, f"block {i} rows", key, add)
    cols = _range(raw["cols"], inp, f"block {i} cols", key, add) if "cols" in raw else (0, inp)
    if not ok or rows is None or cols is None:
        return None
    return Block(rank=rank, alpha=float(alpha), scale_rule=rule, rows=rows, cols=cols)


def _parse_dora(key: str, kind: str, raw: dict, layout: str, add) -> tuple[bool, str, float] | None:
    """(has DoRA, axis, eps) of a dora or LyCORIS target's entry (rules D001, D003); None when they are broken."""
    given = _DORA_FIELDS & set(raw)
    if kind == "lora" or (not given and kind != "dora"):
        return False, "out", 0.0
    axis, eps = raw.get("dora_axis"), raw.get("dora_eps")
    if axis not in spec.DORA_AXES or not _is_num(eps) or not math.isfinite(eps) or eps < 0:
        add(Finding("D001", f"target \"{key}\": dora_axis {axis!r} and dora_eps {eps!r} must be one of "
                            f"{', '.join(spec.DORA_AXES)} and a finite number >= 0", key))
        return None
    if layout not in kind_shapes.DORA_LAYOUTS[axis]:
        add(Finding("D003", f"target \"{key}\": DoRA axis {axis} is not defined on layout {layout} (only on "
                            f"{', '.join(kind_shapes.DORA_LAYOUTS[axis])})", key))
        return None
    return True, axis, float(eps)


def _parse_target(key: str, raw, add) -> Target | None:
    if not isinstance(raw, dict):
        add(Finding("M004", f"target \"{key}\" is not an object", key))
        return None
    kind = raw.get("kind")
    if kind not in spec.KINDS:
        add(Finding("M005", f"target \"{key}\": kind {kind!r} is not one of {', '.join(spec.KINDS)}", key))
        return None
    factored = kind in spec.FACTORED_KINDS
    # A field of another kind (blocks on a full target, scale on a lora one) breaks M010 or Y001, not W001.
    known = _TARGET_FIELDS[kind] | ({"blocks", "layout"} if kind == "full" else {"scale"} if kind in LORA_KINDS else
                                   {"blocks"})
    for extra in sorted(set(raw) - known):
        add(Finding("W001", f"target \"{key}\" has unknown field \"{escape(extra)}\"", key))
    shape = raw.get("shape")
    if not (isinstance(shape, list) and shape and all(_is_int(d) and d > 0 for d in shape)):
        add(Finding("M004", f"target \"{key}\": shape {shape!r} must be a non-empty list of positive integers", key))
        return None
    shape = tuple(shape)
    dtype, sha = raw.get("dtype"), raw.get("sha256")
    if dtype is not None and dtype not in spec.DTYPE_SIZES:
        add(Finding("M011", f"target \"{key}\": fingerprint dtype {dtype!r} is not a safetensors dtype", key))
        dtype = None
    if sha is not None and not (isinstance(sha, str) and _HEX64.match(sha)):
        add(Finding("M011", f"target \"{key}\": sha256 must be 64 lowercase hex digits", key))
        sha = None
    info = raw.get("info", {})
    if not isinstance(info, dict):
        add(Finding("M004", f"target \"{key}\": info must be an object", key))
        info = {}
    common = dict(key=key, shape=shape, dtype=dtype, sha256=sha, info=info)

    if kind == "full":
        if "blocks" in raw or "layout" in raw:
            add(Finding("M010", f"target \"{key}\": a full target has neither blocks nor layout", key))
            return None
        scale = raw.get("scale")
        if not _is_num(scale) or not math.isfinite(scale):
            add(Finding("M010", f"target \"{key}\": full target scale {scale!r} must be a finite number", key))
            return None
        return Target(kind="full", layout="full", delta_scale=float(scale), **common)

    layout = raw.get("layout")
    if layout not in spec.LAYOUTS:
        add(Finding("M005", f"target \"{key}\": layout {layout!r} is not one of {', '.join(spec.LAYOUTS)}", key))
        return None
    dims_ok = len(shape) >= 3 if layout == "conv" else len(shape) == (3 if layout in EXPERT_LAYOUTS else 2)
    if not dims_ok:
        add(Finding("M009", f"target \"{key}\": shape {list(shape)} does not fit layout {layout}", key))
        return None
    if factored:
        scale = raw.get("scale")
        if layout not in ("linear", "conv") or "blocks" in raw or not _is_num(scale) or not math.isfinite(scale):
            add(Finding("Y001", f"target \"{key}\": a {kind} target has layout linear or conv (not {layout}), a "
                                f"finite scale (not {scale!r}) and no blocks", key))
            return None
    dora = _parse_dora(key, kind, raw, layout, add)
    if dora is None:
        return None
    has_dora, axis, eps = dora
    if factored:
        return Target(kind=kind, layout=layout, delta_scale=float(scale), dora=has_dora, dora_axis=axis,
                      dora_eps=eps, **common)
    if "scale" in raw:
        add(Finding("M010", f"target \"{key}\": scale belongs to full targets; a {kind} block's scale comes from "
                            "alpha and rank", key))
    blocks_raw = raw.get("blocks")
    if not isinstance(blocks_raw, list) or not blocks_raw:
        add(Finding("M010", f"target \"{key}\": a {kind} target needs a non-empty list of blocks", key))
        return None
    out, inp = matrix_shape(layout, shape)
    blocks = [_parse_block(key, i, b, out, inp, add) for i, b in enumerate(blocks_raw)]
    if any(b is None for b in blocks):
        return None
    return Target(kind=kind, layout=layout, blocks=tuple(blocks), dora_axis=axis, dora_eps=eps, **common)


def parse_adapter_header(hdr: Header) -> tuple[Adapter | None, list[Finding]]:
    """Check metadata rules M*, and tensor naming and shape rules T001-T005, against a parsed header."""
    findings: list[Finding] = []
    add = findings.append
    meta = hdr.metadata
    if meta.get(spec.KEY_FORMAT) != spec.FORMAT_MARKER:
        got = meta.get(spec.KEY_FORMAT)
        shown = "missing" if got is None else f"\"{escape(got)}\""
        add(Finding("M001", f"{spec.KEY_FORMAT} is {shown}, not \"{spec.FORMAT_MARKER}\": this is not a loratool "
                            "adapter (convert it with `loratool convert`)"))
        return None, findings
    version = meta.get(spec.KEY_VERSION, "")
    m = re.fullmatch(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)", version)
    if not m or int(m.group(1)) != spec.SPEC_VERSION[0]:
        add(Finding("M002", f"{spec.KEY_VERSION} \"{escape(version)}\" is not a {spec.SPEC_VERSION[0]}.x version "
                            "this reader knows"))
        return None, findings
    if int(m.group(2)) > spec.SPEC_VERSION[1]:
        add(Finding("W002", f"spec version {version} is newer than this reader's {spec.SPEC_VERSION_STR}; "
                            "unknown fields are ignored"))
    for k in sorted(meta):
        if k.startswith(spec.RESERVED_PREFIX) and k not in spec.KNOWN_KEYS:
            add(Finding("W001", f"unknown metadata key \"{escape(k)}\" is ignored"))
    info = {}
    if spec.KEY_INFO in meta:
        try:
            info = strict_json(meta[spec.KEY_INFO])
        except (ValueError, _Duplicate):
            info = None
        if not isinstance(info, dict):
            add(Finding("M003", f"{spec.KEY_INFO} is not a JSON object"))
            info = {}
    try:
        raw_targets = strict_json(meta.get(spec.KEY_TARGETS, ""))
    except _Duplicate as e:
        add(Finding("M003", f"{spec.KEY_TARGETS} repeats the key \"{escape(str(e.args[0]))}\""))
        return None, findings
    except ValueError as e:
        add(Finding("M003", f"{spec.KEY_TARGETS} is missing or not strict JSON ({escape(str(e))})"))
        return None, findings
    if not isinstance(raw_targets, dict):
        add(Finding("M003", f"{spec.KEY_TARGETS} is not a JSON object"))
        return None, findings

    targets = {}
    for key, raw in raw_targets.items():
        if not key or not key.isprintable() or key != key.strip():
            add(Finding("C012", f"target name \"{escape(key)}\" is empty, has control characters or surrounding "
                                "whitespace", escape(key)))
            continue
        t = _parse_target(key, raw, add)
        if t is not None:
            targets[key] = t

    findings += _check_tensor_names(hdr, raw_targets, targets)
    have = (int(m.group(1)), int(m.group(2)))
    need = spec.version_needed({x for t in targets.values() for x in (t.kind, t.layout)})
    if need > have:
        add(Finding("W006", f"the file declares spec {version} but uses kinds or layouts of spec "
                            f"{need[0]}.{need[1]}; readers of {version} refuse it (write it again with loratool to "
                            "mark it)"))
    user_meta = {k: v for k, v in meta.items() if not k.startswith(spec.RESERVED_PREFIX)}
    return Adapter(targets=targets, metadata=user_meta, info=info), findings


def tensor_names(t: Target) -> list[str]:
    """The names of every tensor a target has (spec section 3): its delta, its blocks' A and B, its LyCORIS factors
    (those of `t.factors`), and its DoRA magnitude."""
    if t.kind == "full":
        names = [spec.delta_name(t.key)]
    elif t.kind in spec.FACTORED_KINDS:
        names = [spec.kind_factor_name(t.key, t.kind, k) for k in t.factors]
    else:
        names = [spec.factor_name(t.key, i, f) for i in range(len(t.blocks)) for f in "AB"]
    if t.is_dora:
        names.append(spec.magnitude_name(t.key))
    return names


def _split_name(name: str):
    """(target, what, detail) of a tensor name by the grammar of section 3, or None: what is "delta",
    "magnitude", ("lora", block, "A"|"B") or (kind, factor). The suffixes are disjoint, so at most one matches."""
    for rx, what in ((spec.DELTA_NAME, "delta"), (spec.MAGNITUDE_NAME, "magnitude")):
        m = rx.match(name)
        if m:
            return m.group("target"), what
    m = spec.FACTOR_NAME.match(name)
    if m:
        return m.group("target"), ("lora", int(m.group("block")), m.group("factor"))
    kf = spec.parse_kind_factor(name)
    return None if kf is None else (kf[0], kf[1:])


def _check_tensor_names(hdr: Header, raw_targets: dict, targets: dict[str, Target]) -> list[Finding]:
    findings = []
    add = findings.append
    shapes: dict[str, dict] = {}  # LyCORIS target -> factor -> shape
    for name, info in hdr.tensors.items():
        shown = escape(name)
        split = _split_name(name)
        if split is None:
            add(Finding("T001", f"tensor \"{shown}\" does not follow the naming grammar <target>.lora.<block>.A|B, "
                                "<target>.delta, <target>.<loha|lokr|tucker>.<factor> or <target>.magnitude", shown))
            continue
        key, what = split
        if key not in raw_targets:
            add(Finding("T002", f"tensor \"{shown}\" belongs to target \"{escape(key)}\", which "
                                f"{spec.KEY_TARGETS} does not declare", escape(key)))
            continue
        t = targets.get(key)
        if t is None:  # the target's own metadata is broken; already reported
            continue
        k = escape(key)
        if info.dtype not in spec.FACTOR_DTYPES:
            add(Finding("C007", f"tensor \"{shown}\" is {info.dtype}; factors and deltas must be "
                                f"{', '.join(spec.FACTOR_DTYPES)}", k))
        if info.numel == 0:
            add(Finding("C010", f"tensor \"{shown}\" has zero elements", k))
        if what == "delta":
            if t.kind != "full":
                add(Finding("T002", f"tensor \"{shown}\" is a delta but target \"{k}\" is a {t.kind} target", k))
            elif info.shape != t.shape:
                add(Finding("T005", f"delta \"{shown}\" has shape {list(info.shape)}, target shape is "
                                    f"{list(t.shape)}", k))
        elif what == "magnitude":
            if not t.is_dora:
                add(Finding("T002", f"tensor \"{shown}\" is a DoRA magnitude but target \"{k}\" has no DoRA "
                                    "(kind dora, or dora_axis and dora_eps)", k))
                continue
            n = kind_shapes.magnitude_length(t.layout, t.shape, t.dora_axis, t.matrix_shape[0])
            if info.shape != (n,):
                add(Finding("D002", f"target \"{k}\": magnitude has shape {list(info.shape)}, expected [{n}] (one "
                                    f"value per {'row of the matrix view' if t.dora_axis == 'out' else 'input channel'})",
                            k))
        elif what[0] == "lora":
            _, i, factor = what
            if t.kind not in LORA_KINDS or i >= len(t.blocks):
                add(Finding("T002", f"tensor \"{shown}\" names block {i}, which target \"{k}\" does not "
                                    "declare", k))
                continue
            b = t.blocks[i]
            want = (b.rank, b.n_cols) if factor == "A" else (b.n_rows, b.rank)
            if info.shape != want:
                add(Finding("T004", f"target \"{k}\": {factor} of block {i} has shape {list(info.shape)}, "
                                    f"expected {list(want)} (rank {b.rank})", k))
        elif what[0] != t.kind:
            add(Finding("T002", f"tensor \"{shown}\" is a {what[0]} factor but target \"{k}\" is a {t.kind} target",
                        k))
        else:
            shapes.setdefault(key, {})[what[1]] = info.shape
    for key, t in list(targets.items()):
        if t.kind in spec.FACTORED_KINDS:
            t = targets[key] = _check_factors(t, shapes.get(key, {}), add)
            mag = hdr.tensors.get(spec.magnitude_name(key)) if t.is_dora else None
            if mag is not None:  # counted by Adapter.n_params, as the kohya reader keeps it
                t.info["factor_shapes"]["magnitude"] = list(mag.shape)
        for n in tensor_names(t):
            if n not in hdr.tensors:
                rule = "D002" if n == spec.magnitude_name(t.key) else "T003"
                add(Finding(rule, f"target \"{escape(t.key)}\" declares tensor \"{escape(n)}\" but the file lacks "
                                  "it", escape(t.key)))
        if t.kind in LORA_KINDS:
            for i in range(len(t.blocks)):
                a, b = (hdr.tensors.get(spec.factor_name(t.key, i, f)) for f in "AB")
                if a and b and a.dtype != b.dtype:
                    add(Finding("W004", f"target \"{escape(t.key)}\": block {i} A is {a.dtype}, B is {b.dtype}",
                                escape(t.key)))
    return findings


def _check_factors(t: Target, S: dict, add) -> Target:
    """Rules Y002 and Y003 on a LyCORIS target's factor shapes (factor -> shape, from the header). Returns the target
    with its factors named (values None) and their shapes in info["factor_shapes"], as a structure has them."""
    k = escape(t.key)
    listing = ", ".join(f"{n} {list(v)}" for n, v in sorted(S.items())) or "none"
    if frozenset(S) not in kind_shapes.FORMS[t.kind]:
        forms = "; ".join(", ".join(sorted(f)) for f in kind_shapes.FORMS[t.kind])
        add(Finding("Y002", f"target \"{k}\": {t.kind} factors are {listing}, not one of the sets {forms}", k))
    else:
        try:
            implied, _ = kind_shapes.implied_shape(t.kind, S)
        except (KeyError, ValueError, IndexError):
            implied = None
            add(Finding("Y003", f"target \"{k}\": {t.kind} factors do not fit together ({listing})", k))
        if implied is not None and not kind_shapes.fits(implied, t.shape):
            add(Finding("Y003", f"target \"{k}\": {t.kind} factors ({listing}) give a weight {list(implied)}, the "
                                f"target is {list(t.shape)}", k))
    return replace(t, factors={n: None for n in sorted(S)},
                   info={**t.info, "factor_shapes": {n: list(v) for n, v in sorted(S.items())}})


def check_values(tensors, adapter: Adapter, changed: set | None = None) -> list[Finding]:
    """Rules T006 and W003 on loaded tensors (name -> numpy array or torch.Tensor, read one at a time).

    `changed`, when given, gains the key of every target whose delta is not all zero (a block with both
    factors non-zero, or a non-zero full delta): what rule F001 asks of an adapter and its base.
    """
    findings = []
    for t in adapter:
        factored = t.kind in spec.FACTORED_KINDS
        names = tensor_names(t)
        read, zero = set(), set()
        for n in names:
            x = tensors.get(n)
            if x is None:
                continue
            read.add(n)
            bad = _count_nonfinite(x)
            if bad:
                findings.append(Finding("T006", f"tensor \"{escape(n)}\" has {bad} non-finite values",
                                        escape(t.key)))
            elif not _any_nonzero(x):
                zero.add(n)
                if t.kind in LORA_KINDS and n != spec.magnitude_name(t.key):
                    findings.append(Finding("W003", f"tensor \"{escape(n)}\" is all zeros, so its block adds "
                                                    "nothing", escape(t.key)))
        live = read - zero
        if factored:  # a product of factors: zero when one is (Hadamard, Kronecker, Tucker chain)
            nonzero = not zero and len(read - {spec.magnitude_name(t.key)}) == len(t.factors)
        # A DoRA magnitude rescales W even where ΔW is zero.
        changed_here = (live if t.kind == "full" else nonzero if factored else any(
            {spec.factor_name(t.key, i, "A"), spec.factor_name(t.key, i, "B")} <= live for i in range(len(t.blocks))))
        if changed is not None and (changed_here or (t.is_dora and spec.magnitude_name(t.key) in read)):
            changed.add(t.key)
    return findings


def _count_nonfinite(x) -> int:
    import numpy as np

    from .dtypes import as_numpy, dtype_of

    a = as_numpy(x)
    return int(a.size - np.count_nonzero(np.isfinite(a))) if dtype_of(a).startswith(("F", "BF")) else 0


def _any_nonzero(x) -> bool:
    from .dtypes import as_numpy

    return bool(as_numpy(x).any())


def check_base(adapter: Adapter, base) -> list[Finding]:
    """Rules B001-B004 and W005 against a base (any object with `.info(key)` -> (shape, dtype) or None,
    and `.sha256(key)` -> hex digest)."""
    findings = []
    for t in adapter:
        k = escape(t.key)
        got = base.info(t.key)
        if got is None:
            findings.append(Finding("B001", f"target \"{k}\" is not a tensor of the base", k))
            continue
        shape, dtype = got
        scheme = getattr(base, "scheme", lambda key: None)(t.key)  # a quantized weight, read dequantized
        if dtype not in spec.FLOAT_DTYPES and scheme is None:  # before the shape: a packed tensor's is not its own
            findings.append(Finding("B003", f"target \"{k}\": base tensor is {dtype}, "
                                    f"{spec.quantized_refusal(dtype, shape)}", k))
            continue
        if tuple(shape) != t.shape:
            findings.append(Finding("B002", f"target \"{k}\" has shape {list(t.shape)}, base tensor is "
                                            f"{list(shape)}", k))
            continue
        if t.dtype is not None and t.dtype != dtype and scheme is None:
            findings.append(Finding("W005", f"target \"{k}\": base tensor is {dtype}, adapter was made for "
                                            f"{t.dtype}", k))
        if t.sha256 is not None and base.sha256(t.key) != t.sha256:
            findings.append(Finding("B004", f"target \"{k}\": base tensor content differs from the adapter's "
                                            "sha256 fingerprint (wrong base?)", k))
    return findings


def validate_header(path, header: Header | None = None) -> Report:
    """Container and metadata rules only: reads the header, never tensor data, never imports torch.

    Args:
        path: the adapter file.
        header: its header when the caller has parsed it already (read_header), so it is not parsed twice.
    """
    from .errors import SpecError

    rep = Report(path=str(path))
    try:
        hdr = read_header(path) if header is None else header
    except SpecError as e:
        rep.findings = e.findings
        return rep
    rep.header = hdr
    rep.findings = list(hdr.findings)
    adapter, more = parse_adapter_header(hdr)
    rep.findings += more
    rep.adapter = adapter
    return rep


def findings_json(findings: list[Finding]) -> str:
    return json.dumps([f.as_dict() for f in findings])
