"""The package's shape: no import circle, no import that runs upward, no
import hidden inside a function, small modules, a short top level.

The rules, read from the source with `ast` (nothing is imported):

- `keras_kd/_checks.py`, `_keras_compat.py` and `api.py` are the floor:
  they import nothing of keras-kd.
- `ops` imports only the floor and `ops`.
- `losses` imports only the floor, `ops` and `losses`.
- `layers` imports only the floor and `layers`.
- `distillers` never imports `lm`; `lm` may use `distillers`' public
  modules, never their private (`_name`) ones.
- Outside `ops` and `losses`, `ops` is used through its face,
  `keras_kd.ops`: no private module or name of `ops`.
- No keras-kd import inside a function (the way to hide a circle), but in
  the demo, which picks the backend before importing Keras.
- At most 10 top-level modules besides `__init__.py`; none over 400 lines.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "keras_kd"

FLOOR = {"_checks", "_keras_compat", "api"}
# What each package (or top-level module) may import, by the first name
# under `keras_kd` (a module of the top level is its own name).
ALLOWED = {
    "ops": FLOOR | {"ops"},
    "losses": FLOOR | {"ops", "losses"},
    "layers": FLOOR | {"layers"},
}
FORBIDDEN = {"distillers": {"lm"}}
# Packages whose private modules and names others must not reach, and who
# may reach them anyway.
PRIVATE_TO = {
    "ops": {"ops", "losses"},
    "distillers": {"distillers"},
    "lm": {"lm"},
}
# The demo reads `--backend` from its command line before anything imports
# Keras, so its keras-kd imports wait until then.
LATE_IMPORTS_ALLOWED = {"keras_kd.demo"}
MAX_TOP_LEVEL = 10
MAX_LINES = 400


def modules(root):
    """`{dotted name: path}` of every module under the package `root`."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name, path, known):
    """`[(imported module, imported names, line, inside a function)]` of
    the package's own modules imported by module `name`."""
    tree = ast.parse(path.read_text("utf-8"))
    is_package = path.name == "__init__.py"
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(sub) for sub in ast.walk(node))
    found = []
    root = name.split(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            names = tuple(alias.name for alias in node.names)
            targets = [(module, names)]
        else:
            continue
        for module, names in targets:
            if module.split(".")[0] != root:
                continue
            # `from keras_kd.ops import _core` imports a module by name.
            submodules = [
                f"{module}.{n}" for n in names if f"{module}.{n}" in known
            ]
            for target in submodules or [module]:
                rest = () if submodules else names
                found.append(
                    (target, rest, node.lineno, id(node) in in_function)
                )
    return found


def layer_of(name):
    """The first name under the package: `ops`, `losses`, `rdrop`, ..."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def is_private(name, within):
    """Whether the dotted `name` has a private part below `within`."""
    rest = name.split(".")[len(within.split(".")) :]
    return any(part.startswith("_") for part in rest)


def violations(root):
    """Every broken rule, as readable strings (empty when the shape holds)."""
    known = modules(root)
    found = []
    graph = {}
    for name, path in known.items():
        edges = set()
        here = layer_of(name)
        for target, names, line, late in imports(name, path, known):
            where = f"{name}:{line} imports {target}"
            if late and name not in LATE_IMPORTS_ALLOWED:
                found.append(f"{where} inside a function")
            there = layer_of(target)
            if here in ALLOWED and there and there not in ALLOWED[here]:
                found.append(f"{where}: upward ({here} -> {there})")
            if there in FORBIDDEN.get(here, ()):
                found.append(f"{where}: {here} never imports {there}")
            if there in PRIVATE_TO and here not in PRIVATE_TO[there]:
                package = f"{root.name}.{there}"
                private_names = [n for n in names if n.startswith("_")]
                if is_private(target, package) or private_names:
                    found.append(f"{where}: a private part of {package}")
            # A package's __init__ importing its own children is not a
            # circle: the children never need the __init__ to be done.
            if not (
                known[name].name == "__init__.py"
                and target.startswith(name + ".")
            ):
                if target in known and known[target].name != "__init__.py":
                    edges.add(target)
        graph[name] = edges
    found += [f"import circle: {' -> '.join(c)}" for c in circles(graph)]
    top = [p for p in root.glob("*.py") if p.name != "__init__.py"]
    if len(top) > MAX_TOP_LEVEL:
        found.append(f"{len(top)} top-level modules (at most {MAX_TOP_LEVEL})")
    for name, path in known.items():
        lines = len(path.read_text("utf-8").splitlines())
        if lines > MAX_LINES:
            found.append(f"{name}: {lines} lines (at most {MAX_LINES})")
    return found


def circles(graph):
    """Each import circle once, as the path around it."""
    found, seen = [], set()
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt) :] + [nxt]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    found.append(cycle)
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_keras_kd_keeps_its_shape():
    assert violations(PACKAGE) == []


def test_the_public_packages_are_where_users_look():
    names = set(modules(PACKAGE))
    for package in ("ops", "losses", "layers", "distillers", "lm"):
        assert f"keras_kd.{package}" in names


# The checker itself, on small fake packages: each rule can fail.


def _package(tmp_path, files):
    root = tmp_path / "keras_kd"
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    for folder in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()
    return root


CLEAN = {
    "_checks.py": "",
    "ops/_core.py": "from keras_kd import _checks\n",
    "ops/__init__.py": "from keras_kd.ops._core import *\n",
    "losses/kl.py": "from keras_kd.ops import _core\n",
    "distillers/distiller.py": "from keras_kd import ops\n",
    "distillers/_helpers.py": "",
    "lm/causal_lm.py": "from keras_kd.distillers import distiller\n",
}


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"ops/_up.py": "from keras_kd.losses import kl\n"}, "upward"),
        ({"losses/up.py": "import keras_kd.distillers.distiller\n"}, "upward"),
        (
            {
                "lm/a.py": "from keras_kd.lm import b\n",
                "lm/b.py": "from keras_kd.lm.a import x\n",
            },
            "import circle: keras_kd.lm.a -> keras_kd.lm.b -> keras_kd.lm.a",
        ),
        (
            {"lm/a.py": "def f():\n    from keras_kd.lm import causal_lm\n"},
            "inside a function",
        ),
        (
            {"lm/a.py": "from keras_kd.distillers._helpers import f\n"},
            "a private part of keras_kd.distillers",
        ),
        (
            {"lm/a.py": "from keras_kd.distillers.distiller import _f\n"},
            "a private part of keras_kd.distillers",
        ),
        (
            {"lm/a.py": "from keras_kd.ops import _core\n"},
            "a private part of keras_kd.ops",
        ),
        (
            {"distillers/a.py": "from keras_kd.lm import causal_lm\n"},
            "distillers never imports lm",
        ),
        ({"ops/big.py": "x = 1\n" * 401}, "401 lines"),
        (
            {f"m{i}.py": "" for i in range(11)},
            "12 top-level modules",
        ),
    ],
)
def test_the_checker_catches_each_broken_rule(tmp_path, extra, message):
    assert violations(_package(tmp_path, CLEAN)) == []
    found = violations(_package(tmp_path, {**CLEAN, **extra}))
    assert any(message in v for v in found), found
