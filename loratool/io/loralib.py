"""loralib (microsoft/LoRA, `loralib/layers.py`) state dicts: a torch file loaded with weights_only=True.

loralib keeps r, lora_alpha, enable_lora and fan_in_fan_out in code, not in the file, so they are options
here; alpha is required (loralib's default of 1 is never assumed). Per module `<m>`:

  Linear        <m>.lora_A (r, in), <m>.lora_B (out, r); W += s T(B A), T a transpose when fan_in_fan_out
  Embedding     <m>.lora_A (r, num_embeddings), <m>.lora_B (dim, r); W += s (B A)^T  -> layout "embedding"
  MergedLinear  <m>.lora_A (r * sum(enable), in), <m>.lora_B (out / len(enable) * sum(enable), r);
                merge_AB: conv1d(A, B, groups=sum(enable)) gives one (out/len, in) delta per enabled group,
                zero-padded into the rows of the enabled groups -> one row block per enabled group
  Conv (2d)     <m>.lora_A (r k, in k), <m>.lora_B (out k, r k) beside <m>.conv.weight (out, in, k, k);
                W += s (B A).view(W.shape). In the matrix view M = W.reshape(out, -1) that view puts row
                o*k + j of B A at columns [j in k, (j+1) in k) of row o, so it is k column blocks
                B[j::k] @ A of rank r k, each with alpha k r / r = k alpha to keep the scale s = alpha / r.

s = lora_alpha / r. An Embedding and a fan_in_fan_out Linear have the same algebra (M = W^T); with
fan_in_fan_out set, an Embedding is labelled "fan_in_fan_out" (the delta is the same, only a PEFT writer would
name its factors lora_A/lora_B rather than lora_embedding_A/B). Layouts need W's shape: from `<m>.weight` (or `<m>.conv.weight`) when the file holds
the whole model, else from a base (`base=`). Without either, a 2-D module is read as Linear (or
fan_in_fan_out with that option) and a conv module is refused.

The file is a torch file, so `structure` and `load` both load it (torch, weights_only=True); the factors are
planned once from the tensors' shapes (Lazy: which tensor, which slice) and `load` converts them to numpy.
"""

from __future__ import annotations

import math
from dataclasses import replace

from ..adapter import Adapter, Block, Target
from ..container import escape
from ..errors import MismatchError, SpecError, UnsupportedError
from ._common import (Dialect, Source, as_source, attempt, base_keys, check_unknown, deferred, finite_number, fits,
                      header_only, lazy_whole_target, materialize, metas_of_state_dict, positive_int, read_torch, ref,
                      refusal, settle, torch_reader)
from .base import TORCH_SUFFIXES


def parse_enable_lora(value) -> list[bool] | None:
    """`1,0,1` or [True, False, True] -> [True, False, True]; None stays None.

    Raises:
        SpecError: not a list of 0/1 (or booleans) with at least one enabled.
    """
    if value is None:
        return None
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    out = []
    for v in items:
        if v in (True, 1, "1", "true", "True"):
            out.append(True)
        elif v in (False, 0, "0", "false", "False"):
            out.append(False)
        else:
            raise refusal(SpecError, "L004", f"enable_lora {value!r}: each entry must be 1 or 0 (for example 1,0,1)")
    if not any(out):
        raise refusal(SpecError, "L004", f"enable_lora {value!r}: at least one group must be enabled")
    return out


def structure(path, *, alpha=None, r=None, enable_lora=None, fan_in_fan_out: bool = False, base=None,
              allow_unknown: bool = False, allow_partial: bool = False, partial: bool = False,
              problems: list | None = None) -> Adapter:
    """The adapter of a loralib state dict (every factor None). A torch file has no header to read alone, so
    the file is loaded (weights_only=True).

    Args:
        partial: without `alpha`, describe the file anyway: every block's alpha is NaN and
            info["alpha_unknown"] says to pass --alpha (ranks and shapes come from the factors).
        Others: as `load`.
    Raises:
        As `load` (less the missing alpha with `partial`).
    """
    return header_only(_plan(path, alpha, r, enable_lora, fan_in_fan_out, base, allow_unknown, allow_partial,
                             then=lambda adapter, read: adapter, partial=partial, problems=problems))


def load(path, *, alpha=None, r=None, enable_lora=None, fan_in_fan_out: bool = False, base=None,
         allow_unknown: bool = False, allow_partial: bool = False, problems: list | None = None,
         lazy: bool = False) -> Adapter:
    """Read a loralib state dict, its factors as numpy arrays.

    Args:
        path: a .pt/.pth/.bin torch file (loaded with weights_only=True), or a Source of it.
        alpha: loralib's lora_alpha (required: it is not in the file).
        r: loralib's r; when given, every module's rank is checked against it.
        enable_lora: MergedLinear's enable_lora ("1,0,1" or a list of booleans).
        fan_in_fan_out: the layers were built with fan_in_fan_out=True (weights stored (in, out)).
        base: base model for W's shape when the file holds only the LoRA factors.
        allow_unknown: record keys that are neither LoRA factors nor their modules' own weights.
        allow_partial: skip the modules whose weight is not in the base (or does not fit the factors), listing
            each in info["skipped"], instead of failing.
        problems: a list to collect the refusals of single modules in (they are left out, the rest is read);
            without it they are raised together, every module named.
        lazy: return the structure with each target's factors converted to numpy on demand (`Target.loaded`);
            the torch file itself is read whole either way.
    Raises:
        SpecError, UnsupportedError, MismatchError, FileError: with the file, module and fix in the message.
    """
    return _plan(path, alpha, r, enable_lora, fan_in_fan_out, base, allow_unknown, allow_partial,
                 then=deferred if lazy else materialize, problems=problems)


def _plan(path, alpha, r, enable_lora, fan_in_fan_out, base, allow_unknown, allow_partial, then,
          partial: bool = False, problems=None):
    path = as_source(path).path
    if alpha is None and not partial:
        raise refusal(SpecError, "L001", f"{path}: loralib keeps lora_alpha in code, not in the file; pass it "
                      "(--alpha)")
    if alpha is not None and not finite_number(alpha):
        raise refusal(SpecError, "L001", f"{path}: alpha {alpha!r} is not a finite number")
    if r is not None and not positive_int(r):
        raise refusal(SpecError, "L006", f"{path}: r {r!r} is not a positive integer")
    enable = parse_enable_lora(enable_lora)
    sd = read_torch(path)
    with base_keys(base) as bk:
        # partial without alpha: NaN, never a made-up number, and the info says what is missing
        adapter = _build(path, metas_of_state_dict(sd), math.nan if alpha is None else float(alpha), r, enable,
                         bool(fan_in_fan_out), bk, allow_unknown, allow_partial, problems)
        if alpha is None:
            adapter = replace(adapter, info={**adapter.info, "alpha": None, "alpha_unknown":
                                             "loralib keeps lora_alpha in code, not in the file; pass --alpha"})
        return then(adapter, torch_reader(sd))


def _weight_shape(sd, m, bk, where):
    """(key, shape) of the module's own weight: from the file, else the base, else (None, None)."""
    for key in (m + ".weight", m + ".conv.weight"):
        if key in sd:
            return key, tuple(sd[key].shape)
    if bk is not None:
        for key in (m + ".weight", m + ".conv.weight"):
            try:
                k = bk.resolve_dotted(key, where)
            except MismatchError:
                continue
            return k, bk.shape(k)
        raise refusal(MismatchError, "B001", f"{where}: neither \"{escape(m)}.weight\" nor "
                      f"\"{escape(m)}.conv.weight\" is in the base; check that --base is the model this adapter was "
                      "trained on", m)
    return None, None


def _build(path, sd, alpha, r_opt, enable, fio, bk, allow_unknown, allow_partial=False, problems=None) -> Adapter:
    modules = sorted({k[: -len(".lora_A")] for k in sd if k.endswith(".lora_A")} |
                     {k[: -len(".lora_B")] for k in sd if k.endswith(".lora_B")})
    if not modules:
        raise refusal(SpecError, "L002", f"{path}: no \"<module>.lora_A\" / \"<module>.lora_B\" tensors; not a "
                      "loralib state dict")
    targets: dict[str, Target] = {}
    known: set = set()
    refused: list = []  # every module refused, reported together (settle)
    skipped: list[str] = []  # modules that do not fit the base, under allow_partial
    for m in modules:
        t = attempt(refused, fits, lambda m=m: _module(path, sd, m, alpha, r_opt, enable, fio, bk, known),
                    allow_partial, skipped)
        if t is not None:
            targets[t.key] = t
    settle(path, refused, problems)
    info: dict = {"dialect": "loralib", "alpha": alpha, "note": "lora_alpha, r, enable_lora and fan_in_fan_out come "
                  "from the command line: loralib does not store them"}
    if skipped:
        info["skipped"] = skipped
    check_unknown(path, "loralib", [k for k in sd if k not in known], allow_unknown, info)
    ignored = sorted(k for k in known if not k.endswith((".lora_A", ".lora_B")) and k in sd)
    if ignored:
        info["base_weights_in_file"] = len(ignored)
    guessed = sorted(t.key for t in targets.values() if t.info.get("shape_from") == "factors")
    if guessed:
        info["shape_guessed"] = (f"{len(guessed)} module(s) had no weight in the file and no --base, so they were read "
                                 "as Linear from the factor shapes; pass --base if any is a conv or embedding layer")
    return Adapter(targets=targets, metadata={}, info=info)


def _module(path, sd, m, alpha, r_opt, enable, fio, bk, known) -> Target:
    """The target of one loralib module (`known` gains the keys it accounts for)."""
    where = f"{path}: module \"{escape(m)}\""
    # Its keys are accounted for even when the module is refused: they are not unknown keys besides.
    known |= {m + s for s in (".lora_A", ".lora_B", ".weight", ".bias", ".conv.weight", ".conv.bias")} & set(sd)
    if m + ".lora_A" not in sd or m + ".lora_B" not in sd:
        raise refusal(SpecError, "L003", f"{where} has only one of lora_A / lora_B; every loralib module needs "
                      "both", m)
    A, B = sd[m + ".lora_A"], sd[m + ".lora_B"]
    if not (A.is_float and B.is_float) or A.ndim != 2 or B.ndim != 2:
        raise refusal(SpecError, "L003", f"{where}: lora_A {list(A.shape)} {A.dtype} and lora_B {list(B.shape)} "
                      f"{B.dtype} must be 2-D floating-point matrices", m)
    wkey, wshape = _weight_shape(sd, m, bk, where)
    if wshape is not None and len(wshape) > 2:
        t = _conv(where, wkey, wshape, A, B, alpha)
    elif int(A.shape[0]) != int(B.shape[1]) or (enable is not None and wshape is not None and
                                                _out_of(wshape, fio) == B.shape[0] // sum(enable) * len(enable)
                                                and _out_of(wshape, fio) != B.shape[0]):
        t = _merged(where, m, wkey, wshape, A, B, alpha, enable, fio)
    else:
        t = _plain(where, m, wkey, wshape, A, B, alpha, fio)
    for b in t.blocks:
        if r_opt is not None and _lib_rank(t, b) != r_opt:
            raise refusal(SpecError, "L006", f"{where}: factors have rank {_lib_rank(t, b)} but r = {r_opt} was "
                          "given", m)
    return t


def _lib_rank(t: Target, b: Block) -> int:
    return b.rank // t.info["kernel"] if "kernel" in t.info else b.rank


def _out_of(wshape, fio) -> int:
    return wshape[1] if fio else wshape[0]


def _plain(where, m, wkey, wshape, A, B, alpha, fio) -> Target:
    # A and B are Meta: shapes decide the layout, the factors are the tensors themselves.
    inp, out = int(A.shape[1]), int(B.shape[0])
    layout, shape = ("fan_in_fan_out", (inp, out)) if fio else ("linear", (out, inp))
    if wshape is not None and wshape != shape:
        if not fio and wshape == (inp, out):
            layout, shape = "embedding", (inp, out)  # loralib Embedding: W (num_embeddings, dim) += s (B A)^T
        else:
            raise refusal(MismatchError, "L005", f"{where}: lora_A {list(A.shape)} and lora_B {list(B.shape)} do not "
                          f"fit weight {list(wshape)}{' (with fan_in_fan_out)' if fio else ''}", m)
    return lazy_whole_target(wkey or m + ".weight", layout, shape, int(A.shape[0]), ref(A.name), ref(B.name), alpha,
                             info={} if wshape is not None else {"shape_from": "factors"})


def _merged(where, m, wkey, wshape, A, B, alpha, enable, fio) -> Target:
    if enable is None:
        raise refusal(SpecError, "L004", f"{where}: lora_A {list(A.shape)} and lora_B {list(B.shape)} have different "
                      "ranks, as in a loralib MergedLinear; pass its enable_lora (for example --enable-lora 1,0,1)", m)
    g = sum(enable)
    if A.shape[0] % g or B.shape[0] % g:
        raise refusal(SpecError, "L004", f"{where}: lora_A rows {A.shape[0]} and lora_B rows {B.shape[0]} are not "
                      f"divisible by the {g} enabled groups of enable_lora", m)
    r, inp = int(A.shape[0]) // g, int(A.shape[1])
    part = int(B.shape[0]) // g  # rows of one group: out / len(enable)
    if int(B.shape[1]) != r:
        raise refusal(SpecError, "L004", f"{where}: lora_B has {B.shape[1]} columns but lora_A gives rank {r} per "
                      "enabled group", m)
    out = part * len(enable)
    layout, shape = ("fan_in_fan_out", (inp, out)) if fio else ("linear", (out, inp))
    if wshape is not None and wshape != shape:
        raise refusal(MismatchError, "L005", f"{where}: MergedLinear factors with enable_lora {enable} imply weight "
                      f"{list(shape)} but it is {list(wshape)}", m)
    blocks, j = [], 0
    for e, on in enumerate(enable):
        if not on:
            continue
        # conv1d(groups=g): output rows [j part, (j+1) part) use input channels [j r, (j+1) r) -> B_j @ A_j,
        # and zero_pad places them at group e's rows.
        blocks.append(Block(rank=r, alpha=alpha, scale_rule="standard", rows=(e * part, (e + 1) * part),
                            cols=(0, inp), A=ref(A.name, lambda a, j=j: a[j * r:(j + 1) * r]),
                            B=ref(B.name, lambda b, j=j: b[j * part:(j + 1) * part])))
        j += 1
    return Target(key=wkey or m + ".weight", layout=layout, shape=shape, blocks=tuple(blocks),
                  info={"enable_lora": [int(e) for e in enable]})


def _conv(where, wkey, wshape, A, B, alpha) -> Target:
    out, cols = int(wshape[0]), math.prod(wshape[1:])
    P, Q = int(B.shape[0]), int(A.shape[1])
    R = int(A.shape[0])
    if int(B.shape[1]) != R or P % out or P * Q != out * cols:
        raise refusal(UnsupportedError, "L005", f"{where}: lora_A {list(A.shape)} and lora_B {list(B.shape)} cannot "
                      f"be viewed as the conv weight {list(wshape)} (loralib's view needs groups = 1 and a 2-D "
                      "kernel)", wkey)
    k = P // out  # B A (out k, in k) viewed row-major as (out, in k k): k column blocks per output row
    if R % k:
        raise refusal(UnsupportedError, "L005", f"{where}: rank {R} is not a multiple of the kernel size {k}", wkey)
    blocks = tuple(Block(rank=R, alpha=alpha * k, scale_rule="standard", rows=(0, out), cols=(j * Q, (j + 1) * Q),
                         A=ref(A.name), B=ref(B.name, lambda b, j=j: b[j::k])) for j in range(k))
    return Target(key=wkey, layout="conv", shape=tuple(int(s) for s in wshape), blocks=blocks,
                  info={"kernel": k, "loralib": "ConvLoRA: one block per kernel row, alpha x kernel keeps the scale"})


def _detect(src: Source) -> int:
    # Any torch file may be a loralib state dict; PEFT claims adapter_model.bin beside its config first.
    return 10 if src.path.suffix in TORCH_SUFFIXES and src.path.is_file() else 0


DIALECT = Dialect(
    name="loralib", description="a loralib (microsoft/LoRA) state dict: a .pt/.pth/.bin torch file",
    detect=_detect, structure=structure, load=load,
    options=frozenset({"alpha", "r", "enable_lora", "fan_in_fan_out", "base", "allow_unknown", "allow_partial",
                       "problems"}),
    reads=TORCH_SUFFIXES, structure_options=frozenset({"partial"}))

__all__ = ["load", "structure", "parse_enable_lora", "DIALECT"]
