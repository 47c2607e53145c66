"""Imports point one way, and no module reaches into another's private names.

    jobs -> cluster -> actors -> infra

`actors/` never imports `cluster/` or `jobs/`; `cluster/` never imports `jobs/`; `infra/`
imports none of them. `actors.protocol` (the vocabulary both sides speak) imports no other
framefarm module but `infra/`. Read from the source with `ast`, function-level imports
included, so a lazy import cannot hide a wrong-way one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Each package's rank: a module may import its own package and those of lower rank.
RANKS = {"infra": 0, "actors": 1, "cluster": 2, "jobs": 3}
PACKAGES = (*RANKS, "benchmarks", "tests")
# `actors.protocol` imports of framefarm only infra/ and these: pure modules (the standard
# library only), so that the vocabulary stays light on both sides.
PROTOCOL = "actors.protocol"
PROTOCOL_MAY_IMPORT = {"actors.startup", "actors.segments"}
# Names a module re-exports from another as its own vocabulary (the stitcher's torch-free part
# of actors.protocol lives in actors.segments); importing them from the re-exporter is fine.
REEXPORTS = {"actors.protocol": "actors.segments"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(p for p in parts if p != "__init__") or package] = path
    return found


MODULES = _modules()


def _ours(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _imports(tree: ast.Module) -> list[tuple[int, str, list[str]]]:
    """(line, module, names imported from it) for every import, wherever it sits."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


def _defined(module: str) -> set[str]:
    """Names `module` defines at its top level (not those it merely imports)."""
    names = _defined(REEXPORTS[module]) if module in REEXPORTS else set()
    for node in ast.parse(MODULES[module].read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def layering_errors(module: str, source: str) -> list[str]:
    """What is wrong with `module`'s imports, one line each (empty when nothing is)."""
    tree = ast.parse(source)
    package = module.split(".")[0]
    errors = []
    module_names: dict[str, str] = {}  # local name -> framefarm module it is bound to
    for line, target, names in _imports(tree):
        if not _ours(target):
            continue
        where = f"{module}:{line}"
        top = target.split(".")[0]
        if target not in MODULES:
            errors.append(f"{where}: imports {target}, which is not a module of framefarm (moved or removed?)")
        if package in RANKS and top in RANKS and RANKS[top] > RANKS[package]:
            errors.append(f"{where}: {package}/ imports {target} (imports point jobs -> cluster -> actors -> infra)")
        if module == PROTOCOL and top != "infra" and target not in PROTOCOL_MAY_IMPORT:
            errors.append(f"{where}: {PROTOCOL} imports {target}; it may import only infra/ and "
                          f"{', '.join(sorted(PROTOCOL_MAY_IMPORT))} of framefarm")
        package_init = MODULES.get(target, Path()).name == "__init__.py"
        for name in names:
            if (target in MODULES and not package_init and f"{target}.{name}" not in MODULES
                    and name not in _defined(target)):
                errors.append(f"{where}: imports {name} from {target}, which does not define it "
                              "(import it from where it is defined)")
            if _private(name) and target != module:
                errors.append(f"{where}: imports {target}.{name}, a private name of another module")
            if f"{target}.{name}" in MODULES:
                module_names[name] = f"{target}.{name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _ours(alias.name):
                    module_names[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = ast.unparse(node.value)
            target = module_names.get(base)
            if target is not None and target != module:
                errors.append(f"{module}:{node.lineno}: uses {target}.{node.attr}, a private name of another module")
    return errors


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module):
    errors = layering_errors(module, MODULES[module].read_text())
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("source, expected", [
    ("from cluster.plan import plan_shards", "actors/ imports cluster.plan"),
    ("def f():\n    import jobs.render", "actors/ imports jobs.render"),
    ("from actors.sinks import _check_fmt", "private name of another module"),
    ("from actors import wan\nwan._variant_name({})", "uses actors.wan._variant_name"),
    ("import actors.wan as w\nw._decoder_ops", "uses actors.wan._decoder_ops"),
])
def test_the_check_finds_wrong_imports(source, expected):
    errors = layering_errors("actors.example", source)
    assert any(expected in e for e in errors), errors


def test_what_protocol_may_import_is_pure():
    for module in PROTOCOL_MAY_IMPORT:
        imported = {target for _, target, _ in _imports(ast.parse(MODULES[module].read_text()))}
        assert not {t for t in imported if _ours(t)}, f"{module} must import nothing of framefarm"


def test_the_check_allows_right_imports():
    source = "from actors.protocol import Shard\nfrom infra.storage import open_store\nimport torch\ntorch._C"
    assert layering_errors("cluster.example", source) == []
    assert layering_errors("actors.protocol", "from infra.storage import open_store") == []
    assert layering_errors("actors.protocol", "from actors.sinks import open_sink") != []
