"""The rules `validate` checks on a foreign dialect beyond what its reader refuses (spec.VALIDATE_RULES).

The readers (io/peft.py, io/kohya.py, io/loralib.py) refuse what they cannot read and tag each refusal with its
rule id; these are the checks of a file the readers accept as it is but that is probably not what its author
meant (a pattern key that matches no module, a defaulted alpha, a guessed shape), or that only `validate` asks
for (target_modules present, use_dora flagged).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..adapter import Adapter
from ..container import Finding, escape


def check(dialect: str, path, adapter: Adapter, has_base: bool) -> list[Finding]:
    """The findings of `dialect`'s extra rules on an adapter its reader accepted (read without a base).

    Args:
        dialect: the registry name ("peft", "kohya", "loralib").
        path: the adapter's path.
        adapter: its structure, read without a base (keys are the dialect's own module names).
        has_base: a base was given (then loralib shapes come from it, not from a guess).
    """
    if dialect == "peft":
        return _peft(path, adapter)
    if dialect == "kohya":
        from ..io.kohya import ALPHA_MISSING, ALPHA_ZERO

        return [Finding("K004", f"module \"{escape(t.info['kohya_name'])}\": alpha is {t.info['alpha']}",
                        t.info["kohya_name"]) for t in adapter if t.info.get("alpha") in (ALPHA_MISSING, ALPHA_ZERO)]
    if dialect == "loralib" and not has_base:
        guessed = [t.key for t in adapter if t.info.get("shape_from") == "factors"]
        return [Finding("L007", f"module \"{escape(k.removesuffix('.weight'))}\": no weight in the file and no base, "
                                "so it was read as Linear from the factor shapes; pass --base if it is a conv or "
                                "embedding layer", escape(k)) for k in guessed]
    return []


def _peft(path, adapter: Adapter) -> list[Finding]:
    from ..container import read_json_file
    from ..io.peft import CONFIG_NAME, get_pattern_key

    p = Path(path)
    cfg_path = (p if p.is_dir() else p.parent) / CONFIG_NAME
    cfg = read_json_file(cfg_path, "PEFT adapter_config.json")  # the reader has just read it: a dict
    out = []
    tm = cfg.get("target_modules")
    tp = cfg.get("target_parameters")  # parameters only (MoE experts): target_modules may be empty
    params_only = isinstance(tp, list) and tp and tm in (None, [])
    if not params_only and not (isinstance(tm, str) or (isinstance(tm, list) and tm
                                                         and all(isinstance(x, str) for x in tm))):
        shown = "missing" if "target_modules" not in cfg else json.dumps(tm)
        out.append(Finding("P005", f"{cfg_path}: \"target_modules\" is {shown}; PEFT needs the list of module names "
                                   "(or a regular expression) the adapter was trained on to load it"))
    use_dora = cfg.get("use_dora", False)
    if not isinstance(use_dora, bool):
        out.append(Finding("P008", f"{cfg_path}: \"use_dora\" is {json.dumps(use_dora)}; it must be true or false"))
    elif use_dora:
        out.append(Finding("P009", f"{cfg_path}: use_dora is set: W' = m / ||W + s B A|| * (W + s B A) is not W plus "
                                   "a low-rank delta; loratool merges each DoRA module exactly, but cannot unmerge "
                                   "(W is not recoverable from W'), rescale or combine it, and writes it back to PEFT "
                                   "only (kohya's dora_scale adds an eps to the norm); runtimes that do not implement "
                                   "DoRA (vLLM, llama.cpp) refuse it: merge it there"))
    # PEFT matches each pattern key against the module paths, first key wins (io.peft.get_pattern_key); a key
    # that matches no module of the adapter changes nothing, so the rank or alpha meant for some module is not
    # the one it gets.
    modules = [t.key.removesuffix(".weight") for t in adapter if t.key.endswith(".weight")]
    for name in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(name) or {}
        for k in pat:
            if not any(get_pattern_key([k], m) == k for m in modules):
                out.append(Finding("P007", f"{cfg_path}: {name} key \"{escape(k)}\" matches no module of the adapter "
                                           "(PEFT matches the regular expression (.*\\.)?(KEY)$ against each module "
                                           "path), so it changes nothing; fix or remove the key"))
    return out


__all__ = ["check"]
