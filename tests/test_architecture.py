"""Keep the documented architecture true: import direction, no import cycles, click/rich only in the CLI and no
numerics there, no reaching into native libraries, one implementation per operation, documented commands."""

import ast
import re
from collections import deque
from pathlib import Path

from click.testing import CliRunner

from loratool import spec
from loratool.cli import COMMANDS, cli
from loratool.errors import EXIT_CODES

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "loratool"

# Layers in import order (STYLE.md section 2): a module may import only from its own layer or lower ones.
LAYERS = [
    {"spec", "errors"},
    {"fsutil", "container", "dtypes", "device"},
    {"adapter", "guess", "kind_shapes"},
    {"validation"},
    {"io", "ops"},
    {"tasks"},
    {"cli", "__init__", "__main__"},
]


def _layer(name: str) -> int:
    for i, names in enumerate(LAYERS):
        if name in names:
            return i
    raise AssertionError(f"module {name} is in no layer; add it to LAYERS")


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            parts = path.relative_to(PKG).with_suffix("").parts
            base = list(parts[: len(parts) - node.level])
            mod = (node.module or "").split(".") if node.module else []
            target = base + mod
            if not target:  # "from .. import x": a submodule, or a name defined in loratool/__init__.py
                for n in node.names:
                    is_module = (PKG / f"{n.name}.py").exists() or (PKG / n.name).is_dir()
                    yield n.name if is_module else "__init__"
                continue
            yield target[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("loratool"):
            yield node.module.split(".")[1] if "." in node.module else "__init__"


def test_import_direction():
    for path in PKG.rglob("*.py"):
        top = path.relative_to(PKG).parts[0].removesuffix(".py")
        me = _layer(top)
        for target in _imports(path):
            if not target or target == top:
                continue
            assert _layer(target) <= me, f"{path.relative_to(ROOT)} imports {target} from a higher layer"
            assert {top, target} != {"io", "ops"}, f"{path.relative_to(ROOT)}: io and ops must not import each other"


def test_light_modules_do_not_import_torch_at_top_level():
    for name in ["spec.py", "errors.py", "container.py", "adapter.py", "guess.py", "kind_shapes.py", "validation.py",
                 "fsutil.py",
                 "tasks/__init__.py", "tasks/inspect.py", "tasks/model_info.py", "tasks/validate.py", "tasks/convert.py",
                 "tasks/_inputs.py", "tasks/fit.py", "tasks/dialect_rules.py",
                 "__init__.py", "cli/__init__.py", "cli/render.py", "io/detect.py", "io/native.py", "io/registry.py",
                 "io/_common.py", "io/peft.py", "io/kohya.py", "io/loralib.py", "cli/convert_cmd.py",
                 "cli/inspect_cmd.py"]:
        tree = ast.parse((PKG / name).read_text())
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m.split(".")[0] in ("torch", "numpy", "safetensors") for m in mods), name


# --- every import, at any depth ------------------------------------------------------------------------
# Imports inside functions count: they run as soon as the function does, and a cycle through one is still a
# cycle between the modules (it only moves the failure from import time to call time).


def _dotted(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_dotted(p): p for p in PKG.rglob("*.py")}


def _literal_import(node: ast.Call) -> str | None:
    """The module of `__import__("x")` or `importlib.import_module("x")` with a literal name, else None."""
    f = node.func
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
    if name in ("__import__", "import_module") and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str) and not node.args[0].value.startswith("."):
        return node.args[0].value
    return None


def _all_imports(path: Path, text: str | None = None):
    """(absolute dotted module, line) for every import in the file (or in `text`, as if it were that file):
    module level, in functions, in `if TYPE_CHECKING:` blocks, and literal-name dynamic imports.
    `from pkg import sub` names pkg.sub when sub is a module of the package."""
    tree = ast.parse(path.read_text() if text is None else text)
    me = _dotted(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for a in node.names:
                yield (f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod), node.lineno
        elif isinstance(node, ast.Call) and (mod := _literal_import(node)):
            yield mod, node.lineno


def _own(module: str) -> str | None:
    """The loratool module an import names (its longest prefix that is a module of the package), else None."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i])
    return None


def _graph() -> dict[str, dict[str, str]]:
    """module -> {imported loratool module: "file:line" of the first such import}."""
    g: dict[str, dict[str, str]] = {m: {} for m in MODULES}
    for me, path in MODULES.items():
        for mod, line in _all_imports(path):
            target = _own(mod)
            if target and target != me:
                g[me].setdefault(target, f"{path.relative_to(ROOT)}:{line}")
    return g


def _strongly_connected(g: dict[str, dict[str, str]]) -> list[list[str]]:
    """Tarjan's components of more than one module (iterative: no recursion limit to worry about)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(g):
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def _cycle_through(g: dict[str, dict[str, str]], comp: list[str]) -> list[str]:
    """A shortest cycle from comp's first module back to itself, inside the component (breadth first)."""
    start, inside = comp[0], set(comp)
    prev: dict[str, str] = {}
    q = deque([start])
    while q:
        v = q.popleft()
        for w in sorted(g[v]):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
            if w in inside and w not in prev:
                prev[w] = v
                q.append(w)
    raise AssertionError(f"no cycle through {start} in {comp}")


def test_import_finder_sees_every_kind_of_import():
    src = """
from ..io import base
from . import linalg, not_a_module
from .. import __version__
import importlib
def f():
    import numpy as np
    from ..errors import EXIT_CODES
    return importlib.import_module("rich.console"), __import__("torch")
"""
    got = list(_all_imports(PKG / "ops" / "example.py", src))
    assert got == [("loratool.io.base", 2), ("loratool.ops.linalg", 3), ("loratool.ops", 3), ("loratool", 4),
                   ("importlib", 5), ("numpy", 7), ("loratool.errors", 8), ("rich.console", 9), ("torch", 9)], got


def test_cycle_finder_reports_a_cycle_and_only_cycles():
    g = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:2"}, "c": {"a": "c.py:3", "d": "c.py:4"}, "d": {}, "e": {"d": "e:1"}}
    assert _strongly_connected(g) == [["a", "b", "c"]]
    assert _cycle_through(g, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert _strongly_connected({"a": {"b": ""}, "b": {}}) == []


def test_no_import_cycles_between_modules():
    g = _graph()
    problems = []
    for comp in _strongly_connected(g):
        cyc = _cycle_through(g, comp)
        where = "; ".join(f"{g[a][b]} imports {b}" for a, b in zip(cyc, cyc[1:]))
        edges = "; ".join(f"{g[a][b]} imports {b}" for a in comp for b in sorted(g[a]) if b in comp)
        problems.append(f"import cycle {' -> '.join(cyc)} ({where}); every import inside the cycle's modules "
                        f"({', '.join(comp)}): {edges}")
    assert not problems, "\n".join(problems)


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def test_click_and_rich_only_in_cli():
    bad = [f"{_where(p, line)} imports {mod}" for m, p in MODULES.items() if not m.startswith("loratool.cli")
           for mod, line in _all_imports(p) if mod.split(".")[0] in ("click", "rich")]
    assert not bad, "click and rich belong to loratool/cli/ only:\n" + "\n".join(bad)


def test_cli_never_imports_numpy_or_torch():
    # The CLI parses options, makes one library call and renders; the arrays live in the library.
    bad = [f"{_where(p, line)} imports {mod}" for m, p in MODULES.items() if m.startswith("loratool.cli")
           for mod, line in _all_imports(p) if mod.split(".")[0] in ("numpy", "torch")]
    assert not bad, "loratool/cli/ must not import numpy or torch:\n" + "\n".join(bad)


def _docstring_ids(tree: ast.AST) -> set[int]:
    """ids of string constants that are bare statements (docstrings): text, never executed."""
    return {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}


def _native_reach(path: Path, text: str | None = None) -> list[str]:
    """Imports of ctypes (or cffi, numpy.ctypeslib), "/proc/" in any string that runs, and any `_exit`."""
    bad = []
    for mod, line in _all_imports(path, text):
        if mod.split(".")[0] in ("ctypes", "_ctypes", "cffi") or mod == "numpy.ctypeslib":
            bad.append(f"{_where(path, line)} imports {mod}")
    tree = ast.parse(path.read_text() if text is None else text)
    docs = _docstring_ids(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "/proc/" in node.value \
                and id(node) not in docs:
            bad.append(f"{_where(path, node.lineno)} has the string {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr == "_exit":
            bad.append(f"{_where(path, node.lineno)} calls {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and any(a.name == "_exit" for a in node.names):
            bad.append(f"{_where(path, node.lineno)} imports _exit from {node.module}")
    return bad


def test_native_reach_finder():
    src = """\"\"\"Reads nothing from /proc/ (a docstring is text).\"\"\"
import os, importlib
from os import _exit
def f(pid):
    lib = importlib.import_module("ctypes.util")
    open(f"/proc/{pid}/maps")
    os._exit(0)
"""
    assert _native_reach(PKG / "ops" / "example.py", src) == [
        "loratool/ops/example.py:5 imports ctypes.util", "loratool/ops/example.py:3 imports _exit from os",
        "loratool/ops/example.py:7 calls os._exit", "loratool/ops/example.py:6 has the string '/proc/'"]


def test_no_ctypes_no_proc_no_os_exit():
    # STYLE 8: no ctypes into other packages' libraries, no /proc parsing, no exit that skips cleanup.
    bad = [b for path in sorted(MODULES.values()) for b in _native_reach(path)]
    assert not bad, "\n".join(bad)


def test_no_host_or_torch_twin_modules():
    # One algorithm, one implementation (STYLE 8): the array library is the device layer's business, not a
    # second module's. In ops/ no module may carry the suffix; elsewhere no X.py may sit beside X_host.py or
    # X_torch.py, nor X_host.py beside X_torch.py.
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        stem = path.stem
        for suffix in ("_host", "_torch"):
            if not stem.endswith(suffix):
                continue
            twin = stem.removesuffix(suffix)
            siblings = [s for s in (f"{twin}.py", f"{twin}_host.py", f"{twin}_torch.py")
                        if s != path.name and (path.parent / s).exists()]
            if path.parent == PKG / "ops" or siblings:
                bad.append(f"{path.relative_to(ROOT)}" + (f" (twin of {', '.join(siblings)})" if siblings else ""))
    assert not bad, "one implementation per operation; merge these into one module each:\n" + "\n".join(bad)


def test_every_command_has_help_with_example_and_is_in_readme():
    readme = (ROOT / "README.md").read_text()
    for name in COMMANDS:
        r = CliRunner().invoke(cli, [name, "--help"])
        assert r.exit_code == 0, name
        assert "Example:" in r.output, f"{name} --help has no Example: block"
        assert f"loratool {name}" in readme, f"README never shows `loratool {name}`"


def test_readme_lists_exit_codes_and_rules_exist_in_spec():
    readme = (ROOT / "README.md").read_text()
    for code in EXIT_CODES:
        assert re.search(rf"^\|\s*{code}\s*\|", readme, re.M), f"exit code {code} missing from README"
    fmt = (ROOT / "spec" / "FORMAT.md").read_text()
    for rule in spec.RULES:
        assert f"**{rule}**" in fmt
    # validate's rules beyond the format (other dialects, the fit to a base) are listed in the README.
    for rule in spec.VALIDATE_RULES:
        assert f"**{rule}**" in readme, f"rule {rule} is not in README.md"
    assert not set(spec.RULES) & set(spec.VALIDATE_RULES)
    # Every rule id used anywhere in the code (a finding, or a reader's refusal) is a defined rule.
    used = set()
    for path in PKG.rglob("*.py"):
        used |= set(re.findall(r'(?:Finding\(|refusal\(\w+, )"([A-Z]\d{3})"', path.read_text()))
    assert used <= set(spec.RULES) | set(spec.VALIDATE_RULES), used - set(spec.RULES) - set(spec.VALIDATE_RULES)


def _quick_start():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    cmds = _quick_start()
    assert len(cmds) == 2 and all("\n" not in c for c in cmds)
    assert "examples/" in cmds[0] and "pytest" in cmds[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert cmds[1] in ci


def test_quick_start_examples_exist():
    for path in re.findall(r"examples/[\w.]+", _quick_start()[0]):
        assert (ROOT / path).is_file(), path
