"""The packages import one way: base tools < models, losses, data < evaluation < training < photos
< command-line tools (README "Layout"). A lower layer importing a higher one fails here, as does
a module of the bottom layer importing a sibling package of that layer (data, models and losses
stay independent of each other). Imports inside functions count: lazy imports are still imports.
"""
import ast
import os

import pytest

from tests.helpers import REPO

# lowest first; a module may import its own package and anything in a lower layer
LAYERS = (
    ("exit_codes", "cli_checks", "quiet_tf", "choices", "flags"),  # TF-free helpers of every tool
    ("models", "losses", "data"),
    ("evaluation",),
    ("training",),
    ("photos",),
    ("train", "evaluate", "export", "faces", "bench"),
)
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
INDEPENDENT = {"models", "losses", "data"}  # may not import each other
SKIP_DIRS = {"tests", ".venv", ".git", ".ci", "runs", "__pycache__"}


def _modules():
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(root, name), REPO)


def _top_name(rel_path):
    first = rel_path.split(os.sep)[0]
    return first[:-3] if first.endswith(".py") else first


def _imported_tops(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def _violations():
    found = []
    for rel in _modules():
        own = _top_name(rel)
        if own not in LAYER:
            found.append(f"{rel}: {own!r} is in no layer; add it to LAYERS")
            continue
        for lineno, top in _imported_tops(os.path.join(REPO, rel)):
            if top == own or top not in LAYER:
                continue  # itself, the standard library or a third-party package
            if LAYER[top] > LAYER[own]:
                found.append(f"{rel}:{lineno} imports {top} (a higher layer)")
            elif own in INDEPENDENT and top in INDEPENDENT:
                found.append(f"{rel}:{lineno} imports {top} (a sibling of the bottom layer)")
    return found


def test_packages_import_downwards_only():
    assert _violations() == []


def test_checker_sees_lazy_upward_imports(tmp_path):
    """The check itself: an import inside a function of a lower package is found."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from training import trainer\n    import os\n")
    assert list(_imported_tops(str(path))) == [(2, "training"), (3, "os")]


@pytest.mark.parametrize("package", ["models", "losses", "data", "evaluation", "training",
                                     "photos"])
def test_every_package_has_a_layer(package):
    assert package in LAYER and os.path.isdir(os.path.join(REPO, package))
