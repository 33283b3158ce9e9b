"""Keep the documented architecture true: import direction, torch-free light modules, documented commands."""

import ast
import re
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
    {"fsutil", "container", "hostarray", "dtypes", "device"},
    {"adapter"},
    {"validation"},
    {"io", "ops"},
    {"api"},
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
    for name in ["spec.py", "errors.py", "container.py", "adapter.py", "validation.py", "fsutil.py", "api.py",
                 "__init__.py", "cli/__init__.py", "cli/render.py", "io/detect.py", "io/native.py", "io/registry.py",
                 "io/_common.py", "io/peft.py", "io/kohya.py", "io/loralib.py", "cli/convert_cmd.py",
                 "cli/inspect_cmd.py"]:
        tree = ast.parse((PKG / name).read_text())
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m.split(".")[0] in ("torch", "numpy", "safetensors") for m in mods), name


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
    # Every rule id used anywhere in the code is a defined rule.
    used = set()
    for path in PKG.rglob("*.py"):
        used |= set(re.findall(r'Finding\("([A-Z]\d{3})"', path.read_text()))
    assert used <= set(spec.RULES), used - set(spec.RULES)


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
