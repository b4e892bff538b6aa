"""The folders are the architecture: data flows cli → api → retrain/search → train → models → data, never back.

Every import of a galaxy_tune module, the lazy ones inside functions included, is read from the source and
checked against the wing it comes from.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "galaxy_tune"
# Each wing and what it may import of galaxy_tune; the bottom modules (errors, layout, provenance, signals, storage,
# tracking) serve all.
BOTTOM = {"errors", "layout", "provenance", "signals", "storage", "tracking"}
LAYERS = {
    "data": BOTTOM | {"data"},
    "models": BOTTOM | {"models", "data"},  # data for constants only: see test_models_take_only_constants_of_data
    "train_config": BOTTOM | {"models"},  # the choices only: see test_the_search_driver_needs_no_torch
    "train": BOTTOM | {"train", "train_config", "models", "data"},
    "search": BOTTOM | {"search", "train", "train_config", "models", "data"},
    "retrain": BOTTOM | {"retrain", "train", "train_config", "models", "data"},
    "predict": BOTTOM | {"predict", "train", "train_config", "models", "data"},
    "report": BOTTOM | {"report", "models", "data"},
}


def wing(module: str) -> str:
    """`galaxy_tune.data.tasks` -> `data`; `galaxy_tune.cli` -> `cli`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def galaxy_imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(module, names, type-checking only) for each galaxy_tune import in a file, relative ones resolved."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.split(".")[:-1]  # galaxy_tune.data.__init__ lies in galaxy_tune.data too
    tree = ast.parse(path.read_text())
    type_checking = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                     and ast.unparse(node.test).endswith("TYPE_CHECKING") for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("galaxy_tune"):
                continue
            names = [a.name for a in node.names]
            if not node.module or target.count(".") == 0:  # from . import layout: the names are modules
                found += [(f"{target}.{n}", [], id(node) in type_checking) for n in names]
            else:
                found.append((target, names, id(node) in type_checking))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], id(node) in type_checking) for a in node.names if a.name.startswith("galaxy_tune")]
    return found


def sources(wing_name: str) -> list[Path]:
    folder = PACKAGE / wing_name
    return sorted(folder.glob("*.py")) if folder.is_dir() else [PACKAGE / f"{wing_name}.py"]


@pytest.mark.parametrize("wing_name", sorted(LAYERS))
def test_each_wing_imports_only_what_lies_below_it(wing_name):
    wrong = [f"{path.name} imports {module}" for path in sources(wing_name)
             for module, _, _ in galaxy_imports(path) if wing(module) not in LAYERS[wing_name]]
    assert not wrong, wrong


def test_models_take_only_constants_of_data():
    # Normalisation, image size and task names: a model never reads the data itself.
    wrong = [f"{path.name}: {module}.{name}" for path in sources("models")
             for module, names, typing_only in galaxy_imports(path) if wing(module) == "data" and not typing_only
             for name in names if not name.isupper()]
    assert not wrong, wrong


def test_the_training_loop_knows_nothing_of_ray():
    tree = ast.parse((PACKAGE / "train.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m.split(".")[0] in ("ray", "optuna")}


def test_the_rules_see_a_wrong_import(tmp_path, monkeypatch):
    # The checker itself: an upward import in a data module is caught.
    fake = tmp_path / "galaxy_tune"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "bad.py").write_text("def f():\n    from ..search.run import run_search\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert [m for m, _, _ in galaxy_imports(fake / "data" / "bad.py")] == ["galaxy_tune.search.run"]
    with pytest.raises(AssertionError):
        test_each_wing_imports_only_what_lies_below_it("data")


def test_the_search_driver_needs_no_torch():
    # It checks, proposes and records configs (train_config, models.choices), and hands Ray the trainable, whose
    # function imports torch in the trial; only a pretrained backbone, checked before the trials, needs more.
    probe = ("import sys, galaxy_tune.search.run, galaxy_tune.train_config; "
             "print(sorted(m for m in ('torch', 'transformers', 'loralib', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["[]"], done.stderr[-2000:]
