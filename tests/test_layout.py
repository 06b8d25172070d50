"""The codebase's layout rules: entry scripts never import one another, and no file grows past 700 lines."""
import ast

import pytest
from conftest import ROOT

ENTRY_SCRIPTS = ("cft", "context_tuning", "evaluate", "synthetic")
MAX_LINES = 700


def imported_modules(path) -> set[str]:
    """Top-level names of every module a file imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names.add(str(node.args[0].value).split(".")[0])
    return names


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_entry_scripts_never_import_each_other(script):
    others = set(ENTRY_SCRIPTS) - {script}
    assert not imported_modules(ROOT / f"{script}.py") & others


def test_modules_below_the_entry_scripts_never_import_them():
    for path in ROOT.glob("*.py"):
        if path.stem not in ENTRY_SCRIPTS and path.stem != "bench":
            assert not imported_modules(path) & set(ENTRY_SCRIPTS), path.name


def test_the_import_rule_check_sees_function_level_imports(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("def f():\n    from cft import lr_at\n    import evaluate as ev\n")
    assert imported_modules(sample) == {"cft", "evaluate"}


def test_no_python_file_exceeds_the_line_limit():
    too_long = {p.relative_to(ROOT).as_posix(): n for p in [*ROOT.glob("*.py"), *ROOT.glob("tests/*.py")]
                if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not too_long
