"""The import rules of docs/architecture.md §4, checked on the source: a change that breaks one fails here."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (absolute names; lazy imports inside functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def offending(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files(folder)
        for name in sorted(imported_modules(path))
        if name.startswith(forbidden)
    ]


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        (
            "kernels",
            (
                "crosscoder.dictionary",
                "crosscoder.config",
                "crosscoder.training",
                "crosscoder.activations",
                "crosscoder.eval",
                "transformers",
                "datasets",
            ),
        ),
        ("crosscoder/training", ("crosscoder.eval", "crosscoder.demo", "crosscoder.organism", "crosscoder.cli")),
        ("eval", ("crosscoder.training", "crosscoder.config", "crosscoder.demo", "crosscoder.cli")),
        ("crosscoder/organism", ("crosscoder.training", "crosscoder.eval", "crosscoder.demo", "crosscoder.dictionary")),
        ("crosscoder/cache", ("crosscoder.training", "crosscoder.eval", "crosscoder.demo", "crosscoder.dictionary")),
    ],
    ids=["kernels", "training", "eval", "organism", "cache"],
)
def test_import_rules(folder, forbidden):
    assert offending(folder, forbidden) == []


@pytest.mark.parametrize(
    "module",
    ["crosscoder/dictionary.py", "crosscoder/dictionary_input.py", "crosscoder/hub.py", "crosscoder/provenance.py"],
)
def test_saved_dictionaries_do_not_depend_on_the_training_config(module):
    assert not {
        name
        for name in imported_modules(ROOT / module)
        if name.startswith(("crosscoder.config", "crosscoder.training"))
    }


def test_no_docstring_points_outside_the_repository():
    for folder in ("crosscoder", "eval", "kernels", "bench", "tests"):
        for path in files(folder):
            if path.name != "test_architecture.py":
                assert "DESIGN" not in path.read_text(encoding="utf-8"), path


def test_every_cited_section_exists():
    """Docstrings cite ``docs/methods.md §N`` / ``docs/architecture.md §N``: each section N must exist."""
    import re

    headings = {
        name: set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.?", (ROOT / "docs" / name).read_text(), re.M))
        for name in ("methods.md", "architecture.md")
    }
    missing = []
    for folder in ("crosscoder", "eval", "kernels", "bench", "tests"):
        for path in files(folder):
            for name, sections in re.findall(
                r"docs/(methods\.md|architecture\.md) ((?:§[\d.]+[,–\s]*)+)", path.read_text()
            ):
                for section in re.findall(r"§(\d+(?:\.\d+)?)", sections):
                    if section not in headings[name]:
                        missing.append(f"{path.relative_to(ROOT)}: docs/{name} §{section}")
    assert missing == []


def test_every_package_is_listed_for_the_wheel():
    """pyproject.toml lists the packages explicitly: a new subpackage left out would be missing from an installed
    wheel while working in the editable checkout."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    roots = {"crosscoder": "crosscoder", "kernels": "crosscoder.kernels", "eval": "crosscoder.eval"}
    found = set()
    for folder, name in roots.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join([name, *parts]))
    assert found <= listed, sorted(found - listed)


def test_a_top_level_kernels_import_from_the_checkout_root_gets_the_installed_package(tmp_path):
    """Run from the repository's root (as `python train.py` and `python -m pytest` are), the root's `kernels/`
    folder must not shadow an installed `kernels` package (transformers imports the Hugging Face one): the import is
    handed to the installed package, and `crosscoder.kernels` is still this project's."""
    import os
    import subprocess
    import sys

    installed = tmp_path / "site" / "kernels"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("WHICH = 'installed'\n", encoding="utf-8")
    script = "import kernels, crosscoder.kernels as ours; print(kernels.WHICH, ours.SparseCodes.__name__)"
    environment = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environment, capture_output=True, text=True)
    assert done.stdout.split() == ["installed", "SparseCodes"], done.stderr
    # and the defect itself: transformers' models import from the root whether or not `kernels` is installed
    done = subprocess.run(
        [sys.executable, "-c", "from transformers import LlamaConfig"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_without_an_installed_package_of_its_name_the_shadowing_folder_stays_an_empty_module():
    from crosscoder._shadowed import import_past_checkout

    assert not import_past_checkout("no_package_has_this_name", str(ROOT / "kernels" / "__init__.py"))
