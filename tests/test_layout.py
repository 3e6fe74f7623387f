"""The package's layout is the pipeline (#14): imports go one way, and no module reaches into
another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ota_trainer"

# what each part of the package may import (besides itself, the package root and errors)
ALLOWED = {
    "io": set(),
    "moments": {"io"},
    "capture": {"moments", "io", "merger"},  # (lazily) the callback ships the FFG histogram: merger.ffg_shipped
    "backends": {"io", "moments"},
    "merger": {"backends", "io", "moments"},
    "hub": {"merger", "io", "moments"},
    "diagnostics": {"merger", "backends", "io", "moments"},
    "cli": {"merger", "hub", "backends", "io", "moments", "diagnostics", "capture"},  # train_sft: the callback
    "testing": {"io", "moments", "errors"},
}


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE).parts
    return rel[0].removesuffix(".py") if len(rel) > 1 or rel[0] != "__init__.py" else ""


def _imports(path: Path):
    """(imported module as a dotted path inside the package, names) of every intra-package import."""
    tree = ast.parse(path.read_text())
    pkg = path.relative_to(PACKAGE.parent).with_suffix("").parts
    pkg = pkg[:-1] if pkg[-1] != "__init__" else pkg[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = (
                pkg[: len(pkg) - (node.level - 1)] if path.name != "__init__.py" else pkg[: len(pkg) - (node.level - 1)]
            )
            target = ".".join(base + ((node.module,) if node.module else ()))
            yield target, [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ota_trainer"):
            yield node.module, [a.name for a in node.names]


def test_imports_go_one_way():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = _part(path)
        if not part or part == "errors":
            continue
        allowed = ALLOWED[part] | {part, "errors"}
        for target, names in _imports(path):
            parts = target.split(".")[1:]
            if not parts:  # from the package root: submodules or __version__
                used = [n for n in names if n != "__version__"]
                if any(n not in allowed for n in used):
                    problems.append(f"{path.relative_to(PACKAGE)} imports {used} from ota_trainer")
                continue
            if parts[0] not in allowed:
                problems.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not problems, "\n".join(problems)


def test_no_module_imports_another_modules_private_names():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for target, names in _imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                problems.append(f"{path.relative_to(PACKAGE)}: {private} from {target}")
    assert not problems, "\n".join(problems)
