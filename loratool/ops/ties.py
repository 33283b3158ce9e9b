"""Tied weights in merge and extract: which tensors a merge writes when the head and the embedding are one
tensor, and what an extracted adapter misses of a tied head.

PEFT wraps a tied head and embedding as two modules over one tensor: unmerged, an adapter on `embed_tokens`
changes the input embedding only and one on `lm_head` the head only; its merge adds the delta to the one
tensor, so both sides move and the merged model is not the adapter model. By default loratool unties
instead: the side an adapter targets gets its delta, the other side keeps the original tensor (written as its
own tensor when the file did not store it), and config.json says `tie_word_embeddings: false`; the merged
model then computes what the adapter model computes unmerged. `keep_tied` gives PEFT's merge: every delta
on either side goes into the one tensor. Ties come from io.ties (duck-typed here: embed, head, head_stored,
how).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..container import escape


@dataclass
class TiePlan:
    """What a merge writes for the tied tensors.

    Attributes:
        terms: the merge's terms by output key (Plan.terms with the ties resolved).
        sources: output key -> base key it is read from, for each head the base does not store (written too).
        untie: config.json must say `tie_word_embeddings: false`.
        notes: one line per untied pair. warnings: one line per pair merged tied (keep_tied).
    """

    terms: dict
    sources: dict[str, str] = field(default_factory=dict)
    untie: bool = False
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def resolve_ties(terms: dict, ties, *, keep_tied: bool = False, unmerge: bool = False) -> TiePlan:
    """Resolve the terms that touch tied tensors (see the module docstring).

    Args:
        terms: Plan.terms (key -> [Term]); a head the base does not store may be a key (io.ties.with_heads).
        ties: io.ties.Tie objects.
        keep_tied: merge into the one tensor, moving both sides (PEFT's merge_and_unload).
        unmerge: the terms subtract; a tied base was merged tied, so both sides move back (as keep_tied).
    Returns:
        A TiePlan.
    """
    out = TiePlan(terms=dict(terms))
    for t in ties:
        on_embed, on_head = out.terms.get(t.embed, []), out.terms.get(t.head, [])
        if not (on_embed or on_head):
            continue
        e, h = escape(t.embed), escape(t.head)
        changed = " and ".join(n for n, on in ((e, on_embed), (h, on_head)) if on)
        if keep_tied or unmerge:
            both = [*on_embed, *on_head]  # one tensor: every delta on either side goes into it
            out.terms[t.embed] = both
            if t.head_stored:
                out.terms[t.head] = both
            else:
                out.terms.pop(t.head, None)
            if unmerge:
                out.notes.append(f"{h} is tied to {e} ({t.how}): the adapter on {changed} is taken out of both")
            else:
                out.warnings.append(f"--keep-tied: {h} is tied to {e} ({t.how}): the adapter on {changed} moves "
                                    "both, as PEFT's merge_and_unload does; the merged model differs from the "
                                    "adapter model run unmerged")
            continue
        out.untie = True
        if not t.head_stored:
            out.sources[t.head] = t.embed
        kept = " and ".join(n for n, on in ((e, not on_embed), (h, not on_head)) if on)
        out.notes.append(f"untied {h} from {e} ({t.how}): the adapter changes {changed}"
                         + (f", {kept} keeps the original tensor" if kept else "")
                         + (f" ({h} is written as a tensor of its own)" if not t.head_stored else ""))
    return out


def count_tied_heads(result, ties) -> list[str]:
    """Make an extraction's report honest for a finetune whose head is tied to its embedding and stored by
    neither model: the head moved with the embedding, but an adapter's target on the embedding changes the
    input embedding only as PEFT applies it (unmerged, or merged untied). The head is listed as changed and
    not in the adapter, and the embedding's row counts the head's delta as missed: with ΔE the embedding's
    delta and ε the target's relative error, the two uses hold ||ΔE||^2 twice and miss ε^2 ||ΔE||^2 + ||ΔE||^2,
    so the row's norm becomes sqrt(2) ||ΔE|| and its relative error sqrt((1 + ε^2) / 2) (at least 0.707).

    Args:
        result: an ops.extract.ExtractResult (rows, not_extracted and summary are updated in place).
        ties: the finetune's io.ties.Tie objects whose head neither model stores.
    Returns:
        One note per tied pair whose embedding changed.
    """
    import math

    notes = []
    for t in ties:
        row = next((r for r in result.rows if r["key"] == t.embed), None)
        listed = next((r for r in result.not_extracted if r["key"] == t.embed), None)
        if row is None and listed is None:
            continue  # the embedding did not change, so neither did the head
        e, h = escape(t.embed), escape(t.head)
        result.not_extracted.append({"key": t.head, "shape": (row or listed)["shape"],
                                     "reason": f"tied to {e} ({t.how}): it changed with the embedding; an adapter "
                                               "on the embedding changes the input side only"})
        if row is None:
            continue
        eps = row["rel_error"]
        row.update(norm=math.sqrt(2.0) * row["norm"], rel_error=math.sqrt((1.0 + eps * eps) / 2.0), tied=t.head)
        row["energy"] = 1.0 - row["rel_error"] ** 2
        notes.append(f"{h} is tied to {e} ({t.how}) in the finetune and moved with it; the adapter's {e} changes "
                     f"the input embedding only (as PEFT applies it), so its error counts the head's change as "
                     f"missed: {row['rel_error']:.4g} instead of {eps:.4g}; merged with --keep-tied (or PEFT's "
                     "merge_and_unload) it moves both, as the finetune did")
    if notes:
        s = result.summary
        norm2 = sum(r["norm"] ** 2 for r in result.rows)
        err2 = sum((r["rel_error"] * r["norm"]) ** 2 for r in result.rows)
        s["rel_error"] = math.sqrt(err2 / norm2) if norm2 > 0 else 0.0
        s["energy"] = 1.0 - err2 / norm2 if norm2 > 0 else 1.0
    result.not_extracted.sort(key=lambda r: r["key"])
    return notes


__all__ = ["TiePlan", "resolve_ties", "count_tied_heads"]
