"""Merging into tied weights: which tensors a merge writes when the head and the embedding are one tensor.

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


__all__ = ["TiePlan", "resolve_ties"]
