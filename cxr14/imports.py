"""Which project files a module runs: the transitive closure of its imports, read from the source.

The test of dvc.yaml compares each stage's code deps with this closure, and the train stage's resume
fingerprint hashes the same files, so a code change never lets a checkpoint of older code resume.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "stages", "cxr14", "experiments")


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """stages.train -> stages/train.py, cxr14 -> cxr14/__init__.py; None outside the project."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_names(path: Path, package: str) -> set[str]:
    """Every module named by an import statement of the file, anywhere in it (function-local ones too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .a import b
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


@cache
def _closure(module: str, root: Path) -> frozenset[Path]:
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
        for depth in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:depth]), root)
            if path is None or path in seen:
                continue
            seen.add(path)
            package = ".".join(parts[:depth]) if path.name == "__init__.py" else ".".join(parts[:depth - 1])
            todo.extend(_imported_names(path, package))
    return frozenset(seen)


def project_files(module: str, root: Path = ROOT) -> list[str]:
    """The project's .py files that running `module` imports, as sorted paths relative to `root`."""
    return sorted(str(p.relative_to(root)) for p in _closure(module, Path(root).resolve()))
