"""The package layout: one folder per concept, imports only downward, and docs that name only
modules, files and attributes that exist."""
from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import minift

ROOT = Path(__file__).resolve().parent.parent
# Floors from the ground up (docs/index.md lists them in this order). A module may import its own
# folder and any lower floor; a higher floor never. Folders on one floor do not import each other.
FLOORS = {
    "names": 0, "checks": 0, "sizes": 0, "files": 0, "cli": 0, "placement": 0, "quantmaps": 0,
    "tracing": 0, "kernels": 0,
    "nf4": 1, "optim": 1, "gguf": 1,
    "models": 2,
    "lora": 3, "data": 3,
    "checkpoints": 4,
    "distributed": 5, "deploy": 5,
    "objectives": 6,
    "evaluation": 7, "memory": 7,
    "training": 8,
    "planning": 9,
    "bench": 10,  # measures everything, the planner's trace included; only __main__ imports it
    "__init__": 11, "__main__": 11,
}


def _modules():
    return [m.name for m in pkgutil.walk_packages(minift.__path__, "minift.")]


def _folder(dotted: str) -> str:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, package: str) -> set[str]:
    """minift modules (or packages) named by the file's imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("minift.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "minift":  # `from minift import x`: x is a module or a public name
                found |= {f"minift.{a.name}" for a in node.names}
            elif node.module.startswith("minift."):
                found.add(node.module)
    return found


def test_every_module_is_on_a_floor():
    assert {_folder(m) for m in _modules()} <= set(FLOORS)


def test_imports_run_downward_only():
    wrong = []
    for name in _modules():
        module = importlib.import_module(name)
        path = Path(module.__file__)
        here = _folder(name)
        if path.name == "__init__.py" and name != "minift":
            here = name.split(".")[1]
        for target in _imports(path, name):
            there = _folder(target)
            if there not in FLOORS:  # a public name: `from minift import train` (only __init__ ...)
                continue
            if there != here and FLOORS[there] >= FLOORS[here]:
                wrong.append(f"{name} ({here}, floor {FLOORS[here]}) imports {target} "
                             f"({there}, floor {FLOORS[there]})")
    assert not wrong, "\n".join(wrong)


def test_no_folder_is_named_like_a_public_name():
    # `import minift.evaluate as ev` gave the function, not the module, while a submodule and a
    # public function shared the name
    folders = {m.split(".")[1] for m in _modules()}
    assert not folders & set(minift.__all__)


def test_the_top_of_the_package_is_folders_and_the_ground_floor():
    loose = sorted(p.stem for p in (ROOT / "minift").glob("*.py"))
    assert all(FLOORS[name] in (0, FLOORS["__init__"]) for name in loose), loose


# ---- docs name only what exists ----------------------------------------------------------------
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
PATH = re.compile(r"\b((?:minift|kernels|examples|tests)/[\w/]*\w\.py)\b")
DOTTED = re.compile(r"\bminift(?:\.[A-Za-z_]\w*)+")


def _resolve(dotted: str):
    """The object a dotted name means: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_name_files_that_exist(doc):
    missing = sorted({p for p in PATH.findall(doc.read_text()) if not (ROOT / p).exists()})
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_name_modules_and_attributes_that_exist(doc):
    wrong = []
    for dotted in sorted(set(DOTTED.findall(doc.read_text()))):
        try:
            _resolve(dotted)
        except (ImportError, AttributeError) as err:
            wrong.append(f"{dotted} ({type(err).__name__}: {err})")
    assert not wrong, f"{doc.name}: " + "; ".join(wrong)
