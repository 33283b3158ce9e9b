"""`loratool.validate`: every rule of an adapter's dialect as findings, and with a base, the fit report.

A native file is checked against every rule of spec/FORMAT.md (C, M, T, W; B with a base). A PEFT folder, a
kohya file or a loralib state dict is read by its own reader, which tags each refusal with a rule of
spec.VALIDATE_RULES (P, K, L) and, asked to, refuses single modules without stopping; `validate` reports each
refusal as a finding and adds the rules the readers do not check (tasks/dialect_rules.py). With a base it reads
the adapter again against it and builds the fit report (tasks/fit.py).
"""

from __future__ import annotations

import os

from ..container import Finding
from ..fsutil import maps_os_errors
from ..validation import Report, check_values, validate_header

# The rule a refusal without one is reported under, by dialect (for a refusal no reader tags: a file the
# dialect's loader cannot open at all).
_FILE_RULES = {"peft": "P001", "kohya": "K001", "loralib": "L002"}


@maps_os_errors("path", writes=False)
def validate(path, base=None, *, read_data: bool = True, revision: str | None = None, **reader_options) -> Report:
    """Every rule of the adapter's dialect, as findings with rule ids; with `base`, the fit report too.

    Args:
        path: the adapter: a native or kohya .safetensors file, a PEFT folder, a loralib .pt/.pth/.bin, or a PEFT
            adapter's Hugging Face Hub id (`org/name[@REV]`).
        base: a base model path (file or folder), Hugging Face Hub id (`org/name[@REV]`) or an opened
            io.base.BaseModel, or None.
        revision: the Hub revision of a Hub id given without its own `@REV`.
        read_data: also read the factors: non-finite values (T006), all-zero factors (W003), and with a base
            an adapter whose every delta is zero (F001). Numpy, one tensor at a time for native files.
        reader_options: the dialect's reader options (`allow_unknown`, loralib's `alpha`, `r`, `enable_lora`,
            `fan_in_fan_out`); unset ones (None, False) are ignored.
    Returns:
        A Report: `findings`, `errors`, `warnings`, `dialect`, `adapter` (structure, keys as the dialect names
        them), and with a base `fit` (see tasks.fit.report). `report.errors` is empty when the adapter is valid.
    Raises:
        UsageError: an option the dialect does not take.
        FileError: the adapter or the base cannot be read; SpecError: the base is not a model loratool reads.
    """
    from ..errors import SpecError
    from ..io import native, registry
    from ._inputs import hub_inputs

    base, (path,) = hub_inputs(base, [path], revision)  # refused before a file is read when it names no Hub id
    try:
        dialect = registry.detect(path)
    except SpecError:
        dialect = native.DIALECT  # a header too broken to sniff: the native rules say exactly what is wrong
    dialect, opts = registry.taken_options(path, dialect, **reader_options)
    with _opened(base) as b:
        if b is not None:  # experts under both forms: an adapter in either fits (io.experts)
            from ..io.experts import experts_view

            b = experts_view(b)
        if dialect is native.DIALECT:
            return _native(path, b, read_data)
        return _foreign(path, dialect, b, read_data, opts)


class _opened:
    """The base as an open BaseModel for the block (opened here from a path, and closed), or None."""

    def __init__(self, base):
        self.base, self.own = base, None

    def __enter__(self):
        if self.base is None:
            return None
        from ..io.base import is_reader, open_base
        from ._inputs import quant_view

        from ..io.ties import with_heads
        from .fit import ties_of

        if not is_reader(self.base):
            self.own = open_base(self.base)
        reader = self.own if self.own is not None else self.base
        # A quantized base is fitted as the float model it stands for (ops.quant), as merge reads it, and a head it
        # ties to its embedding without storing it is a tensor adapters may target (io.ties).
        view = quant_view(reader, getattr(reader, "path", None))
        return with_heads(view, ties_of(view))

    def __exit__(self, *exc):
        if self.own is not None:
            self.own.close()


def _native(path, base, read_data: bool) -> Report:
    rep = validate_header(path)
    if rep.adapter is None or rep.errors:
        return rep
    changed = set() if read_data and base is not None else None
    if read_data:
        from ..container import read_array

        class _OnDemand:
            """name -> tensor read when asked: validation holds one tensor at a time, whatever the file size."""

            def __init__(self, fd, header):
                self.fd, self.header = fd, header

            def get(self, name):
                info = self.header.tensors.get(name)
                return None if info is None else read_array(self.fd, self.header.data_start, info)

        fd = os.open(os.fspath(path), os.O_RDONLY)
        try:
            rep.findings += check_values(_OnDemand(fd, rep.header), rep.adapter, changed)
        finally:
            os.close(fd)
    if base is not None:
        from . import fit

        fitted, changed = fit.experts_fitted(rep.adapter, base, changed)
        rep.fit, more = fit.report(fitted, base, changed=changed)
        rep.findings += more
    return rep


class _Findings(list):
    """Findings without repeats: the passes of a foreign reader (without and with the base, with the data)
    meet some problems more than once."""

    def add(self, findings, new_targets_only: bool = False):
        seen = {(f.rule, f.target) if new_targets_only else (f.rule, f.target, f.message) for f in self}
        for f in findings:
            key = (f.rule, f.target) if new_targets_only else (f.rule, f.target, f.message)
            if key not in seen:
                seen.add(key)
                self.append(f)


def _of(e, dialect: str) -> list[Finding]:
    """The findings of a reader's refusal: its tagged rules, or the dialect's file rule (B001 for a base)."""
    from ..errors import MismatchError, NumericError

    if e.findings:
        return list(e.findings)
    rule = "B001" if isinstance(e, MismatchError) else "T006" if isinstance(e, NumericError) else _FILE_RULES[dialect]
    return [Finding(rule, str(e))]


def _foreign(path, dialect, base, read_data: bool, opts: dict) -> Report:
    from ..io import registry
    from ..io._common import REFUSALS, UNKNOWN_RULES
    from . import dialect_rules, fit

    name = dialect.name
    rep = Report(path=str(path), dialect=name)
    found = _Findings()
    user_allows_unknown = bool(opts.pop("allow_unknown", False))
    opts.pop("base", None)
    scale_known = True

    def read(reader, with_base, problems):
        return reader(path, dialect=dialect, allow_unknown=True, problems=problems, **opts,
                      **({"base": base} if with_base else {}))

    problems: list = []
    try:
        own = read(registry.structure, False, problems)
    except REFUSALS as e:
        found.add(_of(e, name))
        own = None
        # loralib keeps alpha in code: without it every other rule can still be checked, with the scales unknown.
        if name == "loralib" and opts.get("alpha") is None and {f.rule for f in _of(e, name)} == {"L001"}:
            opts["alpha"], scale_known = 1.0, False
            try:
                own = read(registry.structure, False, problems)
            except REFUSALS as e2:
                found.add(_of(e2, name))
    found.add(f for e in problems for f in _of(e, name))
    if own is not None:
        unknown = own.info.get("unknown_keys") or []
        if unknown and not user_allows_unknown:
            from ..io._common import listing

            found.add([Finding(UNKNOWN_RULES[name], f"{path}: {len(unknown)} key(s) that are not {name} LoRA "
                                                    f"factors: {listing(unknown, len(unknown))}; pass --allow-unknown "
                                                    "to ignore them")])
        found.add(dialect_rules.check(name, path, own, base is not None))
    rep.adapter = own

    resolved = None
    if base is not None and own is not None:
        against: list = []
        try:
            resolved = read(registry.structure, True, against)
        except REFUSALS as e:
            found.add(_of(e, name))
        refused = [f for e in against for f in _of(e, name)]
        found.add(refused)
    changed = None
    if read_data and own is not None:
        changed = set() if base is not None else None
        found.add(_values(read, dialect, base, changed), new_targets_only=True)
    if base is not None and own is not None:
        names = fit.own_names(resolved, own) if resolved is not None else {}
        fitted, changed = fit.experts_fitted(resolved, base, changed)
        rep.fit, more = fit.report(fitted, base, names=names, refused=refused, changed=changed,
                                   scale_known=scale_known)
        found.add(more)
    rep.findings = list(found)
    return rep


def _values(read, dialect, base, changed) -> list[Finding]:
    """T006 and W003 on the factors as the reader loads them (against the base when given); modules it refuses
    were reported by the structure passes, and a refusal that only says the data need a base is no finding."""
    from ..io import native, registry
    from ..io._common import REFUSALS

    try:
        adapter = read(registry.load, base is not None, [])
    except REFUSALS as e:
        return list(e.findings)
    return check_values(native.tensors_of(adapter), adapter, changed)


__all__ = ["validate"]
