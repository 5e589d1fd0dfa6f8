"""The package's rooms import one way (README, "How it is built"), read from the source itself: a
room imports only the rooms below it, Ray stays in ``tuning`` and the commands, TensorFlow stays in
``training`` (and what runs it), and no module imports itself back through others."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pbt_lab"
COMMANDS = {"compare", "grid", "pbt", "scaling", "trace", "train"}  # python -m pbt_lab.<command>

# Which rooms each room may import (the package root, pbt_lab/__init__.py, is everybody's).
ALLOWED = {
    "names": set(),
    "config": {"names"},
    "storage": set(),
    "digest": set(),
    "plots": {"names", "config"},
    "training": {"names", "config", "digest"},
    "results": {"names", "config", "storage", "plots"},
    "cli": {"names", "config", "storage", "training", "results"},
    "tuning": {"names", "config", "storage", "digest", "training"},
    "experiments": {"names", "config", "storage", "cli", "training", "tuning", "results"},
    "commands": {"names", "config", "cli", "training", "experiments"},
    "report": {"names", "storage", "cli", "results", "plots"},
    "bench": {"names", "config", "storage", "cli", "training", "results", "tuning", "experiments"},
    "api": {"names", "config", "cli", "results", "tuning", "experiments"},  # LabPBT for any Ray trainable
    "root": {"api"},  # lazily, on first use of pbt_lab.run_pbt
}
# What each room must never import from outside the package.
NEVER = {
    "names": {"ray", "tensorflow", "keras", "pandas", "numpy"},
    "config": {"ray", "tensorflow", "keras"},
    "storage": {"ray", "tensorflow", "keras"},
    "digest": {"ray", "tensorflow", "keras", "pandas"},
    "plots": {"ray", "tensorflow", "keras"},
    "training": {"ray"},
    "results": {"ray", "tensorflow", "keras"},
    "cli": {"ray", "tensorflow", "keras"},
    "report": {"ray", "tensorflow", "keras"},
}


def room(module: str) -> str:
    """``pbt_lab.results.tables`` → results; ``pbt_lab.grid`` → commands; ``pbt_lab`` → root."""
    parts = module.split(".")[1:]
    if not parts:
        return "root"
    return "commands" if parts[0] in COMMANDS else parts[0]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """Everything ``path`` imports, anywhere in it (imports inside functions count): modules of the
    package by full name, others by their top-level name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from pbt_lab import results` imports the module pbt_lab.results
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
    return {name if name.startswith("pbt_lab") else name.split(".")[0] for name in found}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, set(known)) for name, path in known.items()}


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Imports that climb against ALLOWED, and outside packages a room must never import."""
    found = []
    for module, targets in edges.items():
        source = room(module)
        for target in targets:
            if target.startswith("pbt_lab"):
                other = room(target)
                if other not in ("root", source) and other not in ALLOWED[source]:
                    found.append(f"{module} imports {target} ({source} → {other})")
            elif target in NEVER.get(source, ()):
                found.append(f"{module} imports {target}")
    return found


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A chain of imports that comes back to where it started, if there is one."""
    done, path = set(), []

    def visit(node):
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if target in edges and (cycle := visit(target)):
                return cycle
        path.pop()
        done.add(node)
        return None

    return next((c for node in sorted(edges) if (c := visit(node))), None)


def package_edges() -> dict[str, set[str]]:
    """Module → package modules it imports, leaving out the package root (UserError) and a package's
    own ``__init__`` re-exports (``pbt_lab.results`` lists what its modules define)."""
    edges = graph()
    return {
        m: {t for t in ts if t in edges and t != "pbt_lab" and not m.startswith(t + ".")}
        for m, ts in edges.items()
        if m != "pbt_lab"
    }


def test_every_room_imports_only_the_rooms_below_it():
    assert violations(graph()) == []


def test_no_module_imports_itself_back():
    edges = package_edges()
    assert len(edges) > 20 and find_cycle(edges) is None


def test_the_rooms_themselves_form_no_circle():
    assert find_cycle({r: allowed for r, allowed in ALLOWED.items()}) is None


def test_the_checks_fail_on_a_made_up_package():
    # results reaching into tuning, training importing Ray, and a circle through three modules
    made_up = {
        "pbt_lab.results.tables": {"pbt_lab.tuning.launch"},
        "pbt_lab.training.trainer": {"ray"},
        "pbt_lab.tuning.launch": set(),
    }
    assert violations(made_up) == [
        "pbt_lab.results.tables imports pbt_lab.tuning.launch (results → tuning)",
        "pbt_lab.training.trainer imports ray",
    ]
    circle = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(circle) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400


def own_attributes(cls: ast.ClassDef) -> set[str]:
    """The instance attributes a class's own methods assign (``self.x = …``), dataclass fields included."""
    found = {t.target.id for t in cls.body if isinstance(t, ast.AnnAssign) and isinstance(t.target, ast.Name)}
    for node in ast.walk(cls):
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        for target in targets:
            for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    found.add(t.attr)
    return found


def test_no_class_carries_more_than_about_a_dozen_attributes():
    # (the configs are settings, one field each, not state: they are left out)
    heavy = {
        f"{path.relative_to(PACKAGE)}:{cls.name}": len(own_attributes(cls))
        for path in PACKAGE.rglob("*.py")
        if path.parent.name != "config"
        for cls in ast.walk(ast.parse(path.read_text()))
        if isinstance(cls, ast.ClassDef)
    }
    assert heavy["training/trainer.py:Trainer"] <= 11
    assert {name: n for name, n in heavy.items() if n > 13} == {}


def test_attributes_are_counted_from_every_assignment_to_self():
    made_up = ast.parse(
        "class A:\n    x: int = 0\n    def f(self):\n        self.a = 1\n        self.b, self.c = 2, 3\n"
    )
    assert own_attributes(made_up.body[0]) == {"x", "a", "b", "c"}


def defined_names(tree: ast.Module) -> set[str]:
    """What a module defines or imports at its top level (what ``from it import name`` can take)."""
    found = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                found |= {t.id for t in ast.walk(target) if isinstance(t, ast.Name)}
    return found


def missing_names(sources: dict[str, ast.Module]) -> list[str]:
    """``from pbt_lab.x import name`` where pbt_lab.x neither defines name nor has a submodule of it."""
    found = []
    for module, tree in sources.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in sources:
                target = sources[node.module]
                for alias in node.names:
                    if (
                        alias.name not in defined_names(target)
                        and f"{node.module}.{alias.name}" not in sources
                    ):
                        found.append(f"{module} imports {alias.name} from {node.module}, which lacks it")
    return found


def test_every_name_imported_from_the_package_exists():
    """Imports inside functions run late: a name moved away fails only when that code runs."""
    sources = {name: ast.parse(path.read_text()) for name, path in modules().items()}
    assert missing_names(sources) == []
    made_up = {
        "pbt_lab.a": ast.parse("def f():\n    from pbt_lab.b import gone\n"),
        "pbt_lab.b": ast.parse("x = 1"),
    }
    assert missing_names(made_up) == ["pbt_lab.a imports gone from pbt_lab.b, which lacks it"]
