"""Imports run one way: the stages (deployments/) and autoscaling/ never import the HTTP face.

Read from the source with `ast`, not by importing (``import ray.serve`` itself loads FastAPI):
every import of every module under deployments/ and autoscaling/, and of every module of ours
those import in turn, however deep and wherever in the file the import stands.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OUR_PACKAGES = {path.parent.name for path in ROOT.glob("*/__init__.py")}
LOWER_LAYERS = ("deployments", "autoscaling")
FORBIDDEN = {"serve_app", "fastapi", "starlette"}


def module_path(module: str) -> Path | None:
    """The source file of one of our modules (None: not ours, or not a module of ours)."""
    if module.split(".")[0] not in OUR_PACKAGES:
        return None
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> Iterator[str]:
    """Every module ``path`` imports, anywhere in the file (``from a import b`` yields a and a.b)."""
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def forbidden_import_chains(start: Path, forbidden: set[str] = FORBIDDEN) -> list[list[str]]:
    """Each chain of imports from ``start`` through our own modules that ends in a forbidden one."""
    found: list[list[str]] = []
    seen: set[Path] = set()
    pending: list[tuple[Path, list[str]]] = [(start, [module_name(start)])]
    while pending:
        path, chain = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in imported_modules(path):
            if module.split(".")[0] in forbidden:
                found.append([*chain, module])
            elif (target := module_path(module)) is not None and target not in seen:
                pending.append((target, [*chain, module_name(target)]))
    return found


LOWER_MODULES = sorted(path for layer in LOWER_LAYERS for path in (ROOT / layer).rglob("*.py"))


def test_the_walk_sees_every_lower_module_and_follows_our_imports() -> None:
    names = {module_name(path) for path in LOWER_MODULES}
    assert {"deployments.preprocess", "deployments.models.registry", "autoscaling.policy"} <= names
    followed = set(imported_modules(ROOT / "deployments" / "preprocess.py"))
    assert "deployments.config" in followed and "deployments.errors" in followed


def test_a_forbidden_import_is_found_through_our_own_modules() -> None:
    # serve_app.app imports no FastAPI itself, only through serve_app.ingress and others.
    chains = forbidden_import_chains(ROOT / "serve_app" / "app.py", forbidden={"fastapi"})
    through_ours = [chain for chain in chains if chain[-1].startswith("fastapi") and len(chain) > 2]
    assert through_ours, chains


@pytest.mark.parametrize("path", LOWER_MODULES, ids=lambda path: module_name(path))
def test_lower_layers_never_import_the_http_face(path: Path) -> None:
    chains = forbidden_import_chains(path)
    assert not chains, "imports run one way; found " + "; ".join(" -> ".join(chain) for chain in chains)
