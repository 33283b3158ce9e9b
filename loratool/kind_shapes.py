"""The shapes of the LyCORIS kinds' factors and of a DoRA magnitude (spec/FORMAT.md section 5.1, rules Y002, Y003,
D002, D003): one check shared by the native reader (validation.py) and the reader of LyCORIS files in kohya naming
(io/lycoris.py). Shapes only: imports neither numpy nor torch.

Factor shapes, as LyCORIS's modules hold them (k = the kernel dims of a conv weight, often none):

  loha    w1a (out, r)  w1b (r, in·k)  w2a (out, r)  w2b (r, in·k)
          Tucker: t1, t2 (r, r, *k), w1a, w2a (r, out), w1b, w2b (r, in)
  lokr    W1: w1 (a, c) | w1a (a, r), w1b (r, c)
          W2: w2 (b, d[, *k]) | w2a (b, r), w2b (r, d[·k] or d, *k) | Tucker t2 (r, r, *k), w2a (r, b), w2b (r, d)
          out = a·b, in·k = c·d·k
  tucker  up (out, r)  mid (r, r, *k)  down (r, in)     (LoCon with a Tucker core, lora_mid)
"""

from __future__ import annotations

import math
from itertools import product

# The factor sets a target of each kind may have (rule Y002), each exactly.
_LOKR_W1 = (("w1",), ("w1a", "w1b"))
_LOKR_W2 = (("w2",), ("w2a", "w2b"), ("t2", "w2a", "w2b"))
FORMS: dict[str, tuple[frozenset, ...]] = {
    "loha": (frozenset({"w1a", "w1b", "w2a", "w2b"}), frozenset({"t1", "t2", "w1a", "w1b", "w2a", "w2b"})),
    "lokr": tuple(frozenset(a + b) for a, b in product(_LOKR_W1, _LOKR_W2)),
    "tucker": (frozenset({"up", "mid", "down"}),),
}

# The layouts a DoRA norm axis is defined on (rule D003): "out" is one norm per row of the matrix view M (PEFT,
# LyCORIS wd_on_out=True); "in" one per input channel of a linear or conv weight (LyCORIS wd_on_out=False).
DORA_LAYOUTS = {"out": ("linear", "fan_in_fan_out", "embedding", "conv"), "in": ("linear", "conv")}


def loha_shape(S: dict) -> tuple[tuple[int, ...], int]:
    """(the weight shape the LoHa factors imply, rank r) from factor name -> shape.

    Raises:
        KeyError, ValueError, IndexError: the factors do not fit together.
    """
    if "t1" in S or "t2" in S:
        t1, t2 = S["t1"], S["t2"]
        r = t1[0]
        if len(t1) < 3 or t1[1] != r or t2 != t1 or any(len(S[k]) != 2 or S[k][0] != r for k in
                                                         ("w1a", "w1b", "w2a", "w2b")) or \
                S["w1a"] != S["w2a"] or S["w1b"] != S["w2b"]:
            raise ValueError
        return (S["w1a"][1], S["w1b"][1], *t1[2:]), r
    w1a, w1b, w2a, w2b = S["w1a"], S["w1b"], S["w2a"], S["w2b"]
    if len(w1a) != 2 or len(w2a) != 2 or len(w1b) != 2 or len(w2b) != 2 or w1a[1] != w1b[0] or w2a[1] != w2b[0] \
            or w1a[0] != w2a[0] or w1b[1] != w2b[1] or w1a[1] != w2a[1]:
        raise ValueError
    return (w1a[0], w1b[1]), w1a[1]


def lokr_shape(S: dict) -> tuple[tuple[int, ...], int, bool]:
    """(the weight shape the LoKr factors imply, rank r or 0, whether both factors are whole).

    Two decomposed factors must share one rank: LyCORIS has one alpha and one lora_dim per module.

    Raises:
        KeyError, ValueError, IndexError: the factors do not fit together.
    """
    if "w1" in S:
        if "w1a" in S or "w1b" in S or len(S["w1"]) != 2:
            raise ValueError
        (a, c), r1 = S["w1"], 0
    else:
        w1a, w1b = S["w1a"], S["w1b"]
        if len(w1a) != 2 or len(w1b) != 2 or w1a[1] != w1b[0]:
            raise ValueError
        a, c, r1 = w1a[0], w1b[1], w1a[1]
    if "w2" in S:
        if any(k in S for k in ("w2a", "w2b", "t2")) or len(S["w2"]) < 2:
            raise ValueError
        b, d, *k = S["w2"]
        r2 = 0
    elif "t2" in S:
        t2, w2a, w2b = S["t2"], S["w2a"], S["w2b"]
        r2 = t2[0]
        if len(t2) < 3 or t2[1] != r2 or w2a[0] != r2 or w2b[0] != r2 or len(w2a) != 2 or len(w2b) != 2:
            raise ValueError
        b, d, k = w2a[1], w2b[1], list(t2[2:])
    else:
        w2a, w2b = S["w2a"], S["w2b"]
        if len(w2a) != 2 or len(w2b) < 2 or w2a[1] != w2b[0]:
            raise ValueError
        b, d, k, r2 = w2a[0], w2b[1], list(w2b[2:]), w2a[1]
    if r1 and r2 and r1 != r2:
        raise ValueError  # one alpha, two ranks: LyCORIS and ComfyUI would disagree on the scale
    return (a * b, c * d, *k), r2 or r1, not (r1 or r2)


def tucker_shape(S: dict) -> tuple[tuple[int, ...], int]:
    """(the weight shape, rank r) of LoCon factors with a Tucker core: up (out, r), mid (r, r, *k), down (r, in).

    Raises:
        KeyError, ValueError, IndexError: the factors do not fit together.
    """
    up, mid, down = S["up"], S["mid"], S["down"]
    r = mid[0]
    if len(mid) < 3 or mid[1] != r or len(up) != 2 or len(down) != 2 or up[1] != r or down[0] != r:
        raise ValueError
    return (up[0], down[1], *mid[2:]), r


def implied_shape(kind: str, S: dict) -> tuple[tuple[int, ...], int]:
    """(the weight shape the factors of a `kind` target imply, their rank r, 0 for a LoKr of two whole factors).

    Raises:
        KeyError, ValueError, IndexError: the factors do not fit together.
    """
    if kind == "loha":
        return loha_shape(S)
    if kind == "lokr":
        return lokr_shape(S)[:2]
    return tucker_shape(S)


def fits(implied: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether factors implying `implied` give the delta of a weight of `shape` (rule Y003): the same shape, or
    the same matrix view (out, in·k) when the factors keep the kernel flat (LoHa w1b (r, in·k), LoKr w2b)."""
    if len(implied) > 2:
        return tuple(implied) == tuple(shape)
    return len(shape) >= 2 and implied[0] == shape[0] and implied[1] == math.prod(shape[1:])


def magnitude_length(layout: str, shape: tuple[int, ...], axis: str, out: int) -> int:
    """The length of the DoRA magnitude of a target (rule D002): `out`, the rows of the matrix view, for axis
    "out"; the input channels, W's dimension 1, for axis "in"."""
    return out if axis == "out" else shape[1]


__all__ = ["FORMS", "DORA_LAYOUTS", "loha_shape", "lokr_shape", "tucker_shape", "implied_shape", "fits",
           "magnitude_length"]
