"""The tree shows the architecture: each folder one layer, importing only the layers below it.

Read from the code's own imports with `ast`, imports inside functions included (a lazy import is
still a dependency: it only moves the failure to run time).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("experiments", "parallel", "models", "data")

# Bottom first. A module may import its own layer and the layers before it, never one after it.
LAYERS = (
    "experiments",  # the package's docstring only
    "experiments.config",  # schema, ranges, compose errors: imports nothing of ours
    "data",
    "models",
    "parallel",
    "experiments.measure",
    "experiments.plan",  # the advisor: predicted memory and step time of any config
    "experiments.train",
    "experiments.run",
    "experiments.report",
    "train",  # the entry point
)
MAX_MODULES_PER_FOLDER = 20


def modules() -> dict[str, Path]:
    found = {"train": ROOT / "train.py"}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules that `name` imports, anywhere in its body."""

    def owner(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "lazy" and node.args:
            # parallel/registry.py's lazy("module:function"): an import deferred to the first call.
            arg = node.args[0]
            targets = [arg.value.partition(":")[0]] if isinstance(arg, ast.Constant) else []
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # `from pkg import mod` names a module; `from mod import name` names the module itself.
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            found = owner(target)
            if found is not None and found != name:
                out.add(found)
                break
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def layer(module: str) -> int:
    matches = [i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} belongs to no layer in tests/test_layers.py: add it to LAYERS"
    return max(matches, key=lambda i: len(LAYERS[i]))


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_belongs_to_a_layer():
    for name in modules():
        layer(name)


def test_no_import_goes_up_a_layer():
    upward = [
        f"{a} ({LAYERS[layer(a)]}) imports {b} ({LAYERS[layer(b)]})"
        for a, deps in sorted(graph().items())
        for b in sorted(deps)
        if layer(b) > layer(a)
    ]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_folder_is_a_crowd():
    for package in PACKAGES:
        for folder in [ROOT / package, *(p for p in (ROOT / package).rglob("*") if p.is_dir())]:
            count = len([p for p in folder.glob("*.py") if p.name != "__init__.py"])
            assert count <= MAX_MODULES_PER_FOLDER, f"{folder.relative_to(ROOT)} holds {count} modules"


def test_the_checks_find_what_they_look_for():
    """The detector itself: a cycle and an upward import it must see."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer("experiments.config.schema") < layer("parallel.registry") < layer("experiments.run.job")
    known = {"parallel.registry", "parallel.costs", "parallel.strategies.fsdp", "experiments.run.job"}
    source = ROOT / "parallel" / "registry.py"
    assert {"parallel.costs", "parallel.strategies.fsdp"} <= imports("parallel.registry", source, known)
