"""The in-memory adapter model: frozen dataclasses for a target and its A/B blocks (spec sections 4-5).

Tensors are held as torch tensors but this module never imports torch: a header-only adapter (factors
left as None) serves `inspect` without paying for the import.

Every delta is defined on the target's *matrix view* M (out, in):
  linear          M = W                       W is (out, in)
  fan_in_fan_out  M = W^T                     W is (in, out), GPT-2 Conv1D
  embedding       M = W^T                     W is (num_embeddings, dim), PEFT lora_embedding_A/B
  conv            M = W.reshape(out, -1)      W is (out, in/groups, *kernel)
  experts         M = W.reshape(E*out, -1)    W is (E, out, in): fused MoE experts (transformers 5 Mixtral,
                                              Qwen-MoE, DeepSeek); expert e is M rows [e*out, (e+1)*out)
  experts_t       M = W.reshape(E*in, out)^T  W is (E, in, out): fused experts stored input-major (gpt-oss);
                                              expert e is M columns [e*in, (e+1)*in)
and a block adds  M[rows, cols] += scale * B @ A  with A (rank, cols) and B (rows, rank).

LyCORIS kinds (spec 1.1) hold their factors by name in `factors`, in LyCORIS's own shapes, and their scale s
in `delta_scale`; ops/kinds.py computes their exact dense delta on M (layout linear or conv):
  loha    ΔM = s·(w1a @ w1b) ⊙ (w2a @ w2b), or with Tucker cores t1/t2 each half rebuilt from (t, wa, wb)
  lokr    ΔM = s·kron(W1, W2), W1 = w1 or w1a @ w1b, W2 = w2 or w2a @ w2b (or Tucker t2, w2a, w2b)
  tucker  ΔM = s·up @ (mid ×₂ down): a LoCon pair with a Tucker core (lora_mid)
DoRA (kind "dora", a LoRA pair; or a LyCORIS kind with a magnitude) holds `magnitude` (1-D) and rescales
W + ΔW to it: W' = m / ‖W + ΔW‖ · (W + ΔW), the norm per row of M (`dora_axis` "out") or per input channel
(`dora_axis` "in", LyCORIS wd_on_out=False), with `dora_eps` added to the norm (LyCORIS adds float32 eps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

from . import spec


def scale_of(alpha: float, rank: int, scale_rule: str) -> float:
    """The one place the scale rule lives: alpha / r, or alpha / sqrt(r) for rsLoRA (spec rule M005)."""
    if scale_rule == "rslora":
        return alpha / math.sqrt(rank)
    return alpha / rank


def alpha_for_scale(scale: float, rank: int, scale_rule: str) -> float:
    """Inverse of scale_of: the alpha that gives `scale` at `rank` under `scale_rule`."""
    if scale_rule == "rslora":
        return scale * math.sqrt(rank)
    return scale * rank


def matrix_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(out, in) of the matrix view of a base tensor of `shape` under `layout`."""
    if layout == "linear":
        return shape[0], shape[1]
    if layout in ("fan_in_fan_out", "embedding"):
        return shape[1], shape[0]
    if layout == "conv":
        return shape[0], math.prod(shape[1:])
    if layout == "experts":  # each expert's (out, in) matrix stacked along the rows
        return shape[0] * shape[1], shape[2]
    if layout == "experts_t":  # each expert's (out, in) = W[e]^T side by side along the columns
        return shape[2], shape[0] * shape[1]
    raise ValueError(f"unknown layout {layout!r}")


# A BLAS picks its kernel by the size of the product, and the kernels for thin products may sum the r terms
# of an element in another order (torch's MKL on AVX2: 3 rows or fewer, or 11 columns or fewer). Row blocks of
# at least 64 rows keep a block's product close to the whole product's rounding, and a thin tail would cost
# more in per-call overhead than it saves in cache.
GEMM_MIN_ROWS = 64


def block_rows_for(rows: int, cols: int, block_bytes: int, esize: int = 4) -> int:
    """Rows per block: about `block_bytes` of `esize`-byte elements, but at least GEMM_MIN_ROWS (or all rows)."""
    return max(1, min(rows, max(GEMM_MIN_ROWS, block_bytes // max(1, cols * esize))))


def row_spans(rows: int, step: int) -> list[tuple[int, int]]:
    """Blocks [r0, r1) of `step` rows (at least GEMM_MIN_ROWS) covering `rows`; a tail shorter than
    GEMM_MIN_ROWS joins the block before it (so a block has fewer than step + GEMM_MIN_ROWS rows)."""
    step = max(step, GEMM_MIN_ROWS)
    spans = [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < GEMM_MIN_ROWS:
        spans[-2:] = [(spans[-2][0], rows)]
    return spans


@dataclass(frozen=True)
class Block:
    """One low-rank pair on a rectangle of the matrix view: M[rows, cols] += scale * B @ A."""

    rank: int
    alpha: float
    scale_rule: str
    rows: tuple[int, int]  # [start, stop) in the matrix view's out dimension
    cols: tuple[int, int]  # [start, stop) in the matrix view's in dimension
    A: Any = None  # torch.Tensor (rank, cols[1] - cols[0]), or None when header-only
    B: Any = None  # torch.Tensor (rows[1] - rows[0], rank), or None when header-only

    @property
    def scale(self) -> float:
        return scale_of(self.alpha, self.rank, self.scale_rule)

    @property
    def n_rows(self) -> int:
        return self.rows[1] - self.rows[0]

    @property
    def n_cols(self) -> int:
        return self.cols[1] - self.cols[0]


FACTORED_KINDS = ("loha", "lokr", "tucker")  # a dense delta from named factors, scaled by delta_scale
LORA_KINDS = ("lora", "dora")  # a delta from blocks


@dataclass(frozen=True)
class Target:
    """Everything an adapter changes in one base tensor, named by the base tensor's full key."""

    key: str
    layout: str
    shape: tuple[int, ...]
    kind: str = "lora"  # "lora": sum of blocks; "full": delta_scale * delta (whole tensor, layout "full");
    #                     "dora": blocks + magnitude; "loha", "lokr", "tucker": delta_scale * f(factors)
    blocks: tuple[Block, ...] = ()
    delta: Any = None  # torch.Tensor of `shape` for kind "full"
    delta_scale: float = 1.0
    factors: Mapping[str, Any] = field(default_factory=dict)  # name -> array, kinds loha / lokr / tucker
    magnitude: Any = None  # DoRA magnitude (1-D): kind "dora", or a LyCORIS kind with DoRA (dora_scale)
    dora_axis: str = "out"  # "out": one norm per row of M; "in": one per input channel (W's dimension 1)
    dora_eps: float = 0.0  # added to each norm (LyCORIS: float32 eps; PEFT: 0)
    dora: bool = False  # a LyCORIS kind with DoRA: true even in a structure, whose magnitude is None
    dtype: str | None = None  # base fingerprint: the base tensor's safetensors dtype name
    sha256: str | None = None  # base fingerprint: sha256 of the base tensor's little-endian bytes
    info: Mapping[str, Any] = field(default_factory=dict)  # free-form, never changes the delta
    # Reads this target's factors on demand (a reader's deferred load): target -> the target with its factors.
    # None when the factors are in memory (or when this is a structure, which has none to read).
    load: Callable[["Target"], "Target"] | None = field(default=None, compare=False, repr=False)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return matrix_shape(self.layout, self.shape)

    def loaded(self) -> "Target":
        """This target with its factors in memory: itself, or (a deferred load) the target read now from its
        file. The copy is not kept here, so a caller that drops it frees its factors.

        Raises:
            SpecError, FileError, NumericError: as the reader that planned the target says.
        """
        return self if self.load is None else self.load(self)

    def map_arrays(self, fn) -> "Target":
        """The target with `fn` applied to every factor (A, B, LyCORIS factors, magnitude) or to its full delta,
        None included."""
        t = self if self.magnitude is None else replace(self, magnitude=fn(self.magnitude))
        if self.kind == "full":
            return replace(t, delta=fn(self.delta))
        if self.kind in FACTORED_KINDS:
            return replace(t, factors={k: fn(v) for k, v in self.factors.items()})
        return t.with_blocks(replace(b, A=fn(b.A), B=fn(b.B)) for b in self.blocks)

    def arrays(self):
        """Every array of the target (None where not loaded)."""
        if self.kind == "full":
            yield self.delta
        yield from self.factors.values()
        for b in self.blocks:
            yield b.A
            yield b.B
        if self.magnitude is not None:
            yield self.magnitude

    @property
    def dense(self) -> bool:
        """True for the kinds whose delta is delta_scale x a dense tensor (full, loha, lokr, tucker)."""
        return self.kind == "full" or self.kind in FACTORED_KINDS

    @property
    def is_dora(self) -> bool:
        """True when the merge rescales W + ΔW to a magnitude (kind "dora", or a LyCORIS kind with DoRA)."""
        return self.kind == "dora" or self.dora or self.magnitude is not None

    @property
    def rank(self) -> int:
        """Total rank of the target (sum over blocks); the factor rank of a LyCORIS kind; 0 for a full target."""
        if self.kind in FACTORED_KINDS:
            return _factor_rank(self)
        return sum(b.rank for b in self.blocks)

    @property
    def is_whole(self) -> bool:
        """True when the target is one block over the whole matrix view (PEFT's usual case)."""
        out, inp = self.matrix_shape
        return len(self.blocks) == 1 and self.blocks[0].rows == (0, out) and self.blocks[0].cols == (0, inp)

    def with_blocks(self, blocks) -> "Target":
        return replace(self, blocks=tuple(blocks))


@dataclass(frozen=True)
class Adapter:
    """A set of targets keyed by base tensor key, plus opaque user metadata (str -> str)."""

    targets: Mapping[str, Target]
    metadata: Mapping[str, str] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)  # stored as loratool.info (JSON)

    def __post_init__(self):
        # Keep a deterministic order (by key) so writers and reports are reproducible.
        object.__setattr__(self, "targets", dict(sorted(dict(self.targets).items())))

    def __len__(self) -> int:
        return len(self.targets)

    def __iter__(self):
        return iter(self.targets.values())

    def replace_targets(self, targets) -> "Adapter":
        return replace(self, targets={t.key: t for t in targets})

    def map_arrays(self, fn) -> "Adapter":
        """The adapter with `fn` applied to every factor (A, B) and full delta, None included."""
        return self.replace_targets(t.map_arrays(fn) for t in self)

    def arrays(self):
        """Every factor (A, B, LyCORIS factors, magnitudes) and full delta, in target order (None where not
        loaded)."""
        for t in self:
            yield from t.arrays()

    def as_numpy(self) -> "Adapter":
        """The adapter with every factor and full delta a numpy array (torch tensors converted; None kept);
        the adapter itself when they all are already."""
        from .dtypes import as_numpy

        if all(x is None or type(x).__module__ == "numpy" for x in self.arrays()):
            return self
        return self.map_arrays(lambda x: None if x is None else as_numpy(x))

    @property
    def n_params(self) -> int:
        n = 0
        for t in self.targets.values():
            if t.kind == "full":
                n += math.prod(t.shape)
            shapes = t.info.get("factor_shapes", {})  # a structure's factors are None: the reader kept shapes
            n += sum(math.prod(_shape(x) if x is not None else shapes.get(k, ())) for k, x in t.factors.items())
            if t.magnitude is not None or (t.is_dora and "magnitude" in shapes):
                n += math.prod(_shape(t.magnitude) if t.magnitude is not None else shapes["magnitude"])
            for b in t.blocks:
                n += b.rank * (b.n_rows + b.n_cols)
        return n


def _shape(x) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(x)


def _factor_rank(t: Target) -> int:
    """The rank r of a LyCORIS kind's decomposed factor (the r of its alpha / r); 0 when no factor is."""
    f, shapes = t.factors, t.info.get("factor_shapes", {})  # a structure's factors are None: the reader kept shapes
    for name in ("w1b", "w2b", "down"):  # (r, ...) in every LyCORIS shape
        if f.get(name) is not None:
            return int(_shape(f[name])[0])
        if name in f and shapes.get(name):
            return int(shapes[name][0])
    return 0


def whole_target(key: str, layout: str, shape, A, B, alpha: float, scale_rule: str = "standard",
                 **kw) -> Target:
    """A target with one block over the whole matrix view: the PEFT/kohya case."""
    shape = tuple(int(s) for s in shape)
    out, inp = matrix_shape(layout, shape)
    rank = int(A.shape[0])
    block = Block(rank=rank, alpha=float(alpha), scale_rule=scale_rule, rows=(0, out), cols=(0, inp), A=A, B=B)
    return Target(key=key, layout=layout, shape=shape, blocks=(block,), **kw)


EXPERT_LAYOUTS = ("experts", "experts_t")


def expert_span(layout: str, shape: tuple[int, ...], e: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(rows, cols) of expert e's own (out, in) matrix inside the matrix view of a fused expert tensor."""
    n_out, n_in = (shape[1], shape[2]) if layout == "experts" else (shape[2], shape[1])
    if layout == "experts":
        return (e * n_out, (e + 1) * n_out), (0, n_in)
    return (0, n_out), (e * n_in, (e + 1) * n_in)


def expert_of(layout: str, shape: tuple[int, ...], block: Block) -> int | None:
    """The expert whose (out, in) matrix holds `block` in a fused expert tensor's matrix view, or None when the
    block spans two experts."""
    if layout == "experts":
        lo, hi, d = block.rows[0], block.rows[1], shape[1]
    else:
        lo, hi, d = block.cols[0], block.cols[1], shape[1]
    e = lo // d
    return e if hi <= (e + 1) * d else None


def is_per_expert(t: Target) -> bool:
    """Whether a fused expert target is in the form PEFT's ParamWrapper holds: one block per expert over that
    expert's whole matrix (expert_span), every block of the same rank, alpha and scale rule."""
    if t.layout not in EXPERT_LAYOUTS or len(t.blocks) != t.shape[0]:
        return False
    first = t.blocks[0]
    return all((b.rows, b.cols) == expert_span(t.layout, t.shape, e) and
               (b.rank, b.alpha, b.scale_rule) == (first.rank, first.alpha, first.scale_rule)
               for e, b in enumerate(t.blocks))


__all__ = ["Adapter", "Block", "Target", "expert_of", "is_per_expert", "FACTORED_KINDS", "LORA_KINDS", "scale_of", "alpha_for_scale",
           "matrix_shape", "whole_target", "spec", "EXPERT_LAYOUTS", "expert_span",
           "GEMM_MIN_ROWS", "block_rows_for", "row_spans"]
