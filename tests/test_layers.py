"""The library never imports the lab: every import in src/tether names tether (or a third party), never tether_lab."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
            if isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append(node.args[0].value)
    return found


def test_the_library_imports_nothing_from_the_lab():
    offenders = [
        f"{path.relative_to(SRC)} imports {name}"
        for path in sorted((SRC / "tether").rglob("*.py"))
        for name in _imported_modules(path)
        if name == "tether_lab" or name.startswith("tether_lab.")
    ]
    assert not offenders, offenders


def test_relative_imports_stay_inside_their_package():
    """A relative import in the lab cannot reach the library by dots (the two are separate packages)."""
    for package in ("tether", "tether_lab"):
        for path in sorted((SRC / package).rglob("*.py")):
            depth = len(path.relative_to(SRC / package).parts)  # 1 for a module at the package's top
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level:
                    assert node.level <= depth, f"{path.relative_to(SRC)}: relative import leaves {package}"


def test_the_lab_registers_with_the_library():
    from tether.registry import names

    assert {"world", "world-sft", "smollm2-135m-instruct"} <= set(names("models"))
    assert "world" in names("oracles")
    assert {"world", "knowledge"} <= set(names("eval_suites"))
    assert {"world", "study"} <= set(names("commands"))
