"""The layer order of docs/architecture.md, enforced on the package's import graph.

Every import of a `thack_jax` module is read from the sources (module level and inside
functions alike: a lazy import is still a dependency). A module may import its own package
and lower ones; an import that goes up the order fails, so does a cycle between modules, and
so does TensorFlow / seqio / TFDS imported outside `thack_jax/data/`.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "thack_jax"

# Bottom to top. docs/architecture.md's layer table lists the same packages in this order.
LAYERS = (
    "core",
    "parallel",
    "models",
    "decoding",
    "training",
    "data",
    "evaluation",
    "hacking",
    "reporting",
    "experiment",
    "cli",
)
TF_MODULES = ("tensorflow", "tensorflow_datasets", "seqio", "tfds")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_imports(root: Path) -> dict[str, set[str]]:
    """Module -> the absolute module names it imports (package-relative imports resolved;
    `from pkg import name` counts as importing `pkg.name` when that is a module)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    deps.add(full if full in files else base)
        graph[name] = deps
    return graph


def layer_of(module: str, top: str) -> str | None:
    """'thack_jax.training.trainer' -> 'training'; the root package itself -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == top and len(parts) > 1 else None


def violations(root: Path, layers=LAYERS) -> list[str]:
    """Upward imports, modules outside any layer, cycles, and TF imports outside data/."""
    top = root.name
    graph = read_imports(root)
    rank = {layer: i for i, layer in enumerate(layers)}
    found = []
    for module, deps in sorted(graph.items()):
        own = layer_of(module, top)
        if own is not None and own not in rank:
            found.append(f"{module}: package {own!r} is in no layer of {layers}")
            continue
        for dep in sorted(deps):
            if dep.split(".")[0] in TF_MODULES and own != "data":
                found.append(f"{module} imports {dep} (TensorFlow stack outside data/)")
            other = layer_of(dep, top)
            if own is None or other is None or other not in rank:
                continue
            if rank[other] > rank[own]:
                found.append(f"{module} ({own}) imports {dep} ({other}): up the layer order")
    inner = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    found += [f"import cycle: {' -> '.join(c)}" for c in _cycles(inner)]
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component) + [min(component)])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_follows_the_layer_order():
    assert violations(PACKAGE) == []


def test_every_package_is_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(LAYERS)


def test_architecture_doc_states_the_same_order():
    text = (REPO / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| (\d+) \| `thack_jax/(\w+)/`", text, flags=re.M)
    assert [name for _, name in rows] == list(LAYERS)
    assert [int(n) for n, _ in rows] == list(range(1, len(LAYERS) + 1))


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "thack_jax"
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(root).parents:
            init = root / parent / "__init__.py"
            if not init.exists():
                init.write_text("")
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    "files, expected",
    [
        # An upward import, at module level and lazily inside a function.
        ({"models/a.py": "from thack_jax.training import trainer\n"}, "up the layer order"),
        (
            {"decoding/a.py": "def f():\n    from thack_jax.hacking import guard\n"},
            "up the layer order",
        ),
        ({"decoding/a.py": "from ..training import step\n"}, "up the layer order"),
        # A cycle inside one layer.
        (
            {
                "data/a.py": "from thack_jax.data import b\n",
                "data/b.py": "import thack_jax.data.a\n",
            },
            "import cycle",
        ),
        ({"training/a.py": "import tensorflow as tf\n"}, "TensorFlow stack outside data/"),
        ({"extras/a.py": "x = 1\n"}, "in no layer"),
    ],
)
def test_the_checker_catches(tmp_path, files, expected):
    files = {**files, "training/step.py": "", "training/trainer.py": "", "hacking/guard.py": ""}
    found = violations(_fake_package(tmp_path, files))
    assert any(expected in line for line in found), found


def test_the_checker_accepts_downward_and_data_tf_imports(tmp_path):
    files = {
        "training/a.py": "from thack_jax.models import m\nfrom thack_jax.parallel import p\n",
        "data/t.py": "def load():\n    import tensorflow_datasets as tfds\n",
        "models/m.py": "",
        "parallel/p.py": "",
    }
    assert violations(_fake_package(tmp_path, files)) == []


def test_reads_relative_imports_of_packages(tmp_path):
    root = _fake_package(tmp_path, {"data/__init__.py": "from . import b\n", "data/b.py": ""})
    assert "thack_jax.data.b" in read_imports(root)["thack_jax.data"]
    assert os.path.basename(str(root)) == "thack_jax"
