"""The import graph is the architecture: layered, acyclic, the core free of the CLI's libraries."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Bottom-up layers of melt_core: a module imports only from its own layer or below, and within its
# own layer only from its own package.
LAYERS = {
    "errors": 0,
    "words": 0,
    "outputs": 1,  # files written whole or not at all (token caches, problem files, checkpoints, runs)
    "dtypes": 2,
    "runtime": 2,
    "data": 2,
    "tasks": 2,
    "cache": 3,  # layouts and row stores: no model code
    "models": 4,
    "checkpoints": 5,
    "inference": 6,
    "evaluation": 7,  # scores as the model decodes (inference.engine)
    "training": 8,
    "profiling": 9,  # the training planner measures a step with the trainer's own objectives
    "integrations": 8,
    "quickstart": 9,
}


def _module_name(file: Path) -> str:
    parts = list(file.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(file: Path) -> set[str]:
    """Every module ``file`` imports (at any depth of the file), as absolute names."""
    name = _module_name(file)
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            if node.module is not None:
                found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}  # `from . import builtin`: a submodule
    return found


def _graph(package: str) -> dict[str, set[str]]:
    files = sorted((ROOT / package).rglob("*.py"))
    modules = {_module_name(f): f for f in files}
    return {m: {t for t in _imports(f) if t in modules and t != m} for m, f in modules.items()}


def _layer(module: str) -> tuple[int, str]:
    top = module.split(".")[1] if "." in module else ""
    return LAYERS[top], top


def test_every_core_module_has_a_layer():
    assert {m.split(".")[1] for m in _graph("melt_core") if "." in m} <= LAYERS.keys()


def test_core_imports_point_down():
    bad = []
    for module, targets in _graph("melt_core").items():
        if module == "melt_core":
            continue
        rank, top = _layer(module)
        for target in targets:
            if target == "melt_core":
                bad.append(f"{module} -> {target}")
                continue
            t_rank, t_top = _layer(target)
            if t_rank > rank or (t_rank == rank and t_top != top):
                bad.append(f"{module} -> {target}")
    assert not bad, "imports that point up or sideways: " + ", ".join(bad)


@pytest.mark.parametrize("package", ["melt_core", "melt_cli"])
def test_no_import_cycles(package):
    graph = _graph(package)
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph[module]:
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target) :] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_core_never_imports_the_cli_libraries_and_the_cli_never_imports_torch():
    for file in (ROOT / "melt_core").rglob("*.py"):
        assert not {m for m in _imports(file) if m.split(".")[0] in ("rich", "typer", "click", "melt_cli")}, file
    for file in (ROOT / "melt_cli").rglob("*.py"):
        assert not {m for m in _imports(file) if m.split(".")[0] == "torch"}, file


# What users of the package get does not point to the project's internal notes or its data folder
# beside the checkout (they are not shipped): the method and the format are in docs/. The names are
# built from pieces, so that this file does not name them itself.
INTERNAL_NAMES = tuple(stem + ".md" for stem in ("OURO", "MELT", "STYLE")) + (".." + "/" + "shared",)
TEXT_SUFFIXES = {".py", ".md", ".txt", ".json", ".jsonl", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".sh"}


def test_nothing_shipped_names_the_internal_notes_or_the_shared_folder():
    files = [ROOT / "README.md"]
    for folder in ("melt_core", "melt_cli", "tests", "benchmarks", "docs"):
        files += [f for f in (ROOT / folder).rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES]
    found = [
        f"{file.relative_to(ROOT)}:{number}: {name}"
        for file in files
        for number, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        for name in INTERNAL_NAMES
        if name in line
    ]
    assert not found, "internal names users do not have:\n" + "\n".join(found)


def test_one_decode_loop():
    """Every forward through a KV cache outside the model code is the inference engine's: no other
    module feeds a model ``cache=`` (the prefill + decode loops of generation, problem accuracy,
    profiling and the transformers integration all call ``inference.engine.Engine``)."""
    allowed = {"melt_core/inference/engine.py"}
    found = []
    for file in sorted((ROOT / "melt_core").rglob("*.py")):
        name = str(file.relative_to(ROOT))
        if name.startswith("melt_core/models/") or name in allowed:
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and any(k.arg == "cache" for k in node.keywords):
                found.append(f"{name}:{node.lineno}")
    assert not found, "forwards through a cache outside the engine: " + ", ".join(found)
