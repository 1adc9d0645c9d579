"""No import name of ours shadows, or is shadowed by, a module of the installed environment.

Python resolves a top-level name to the first match on `sys.path`, and this project's root is first there under
`python -m`, pytest and `ray job submit --working-dir .`: a folder of ours named like a dependency's module hides
that module from every library that imports it (our `kernels/` hid Hugging Face's `kernels`, which transformers
>= 5.25 imports at load). The check covers the top-level modules of every installed distribution and the names
of every distribution they declare, installed or not (an optional extra today can be required tomorrow)."""

import importlib.metadata as metadata
import re
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
OWN_DISTRIBUTION = "modrwkv"
SCRIPT_FOLDERS = ("benchmarks",)  # run as scripts, their folder comes first on sys.path


def normalized(name: str) -> str:
    """A distribution's name as the module it most likely installs (`scikit-learn` -> `scikit_learn`)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def our_import_names(root: Path) -> set[str]:
    """Every top-level name that importing from the repository root can reach: regular packages and modules at
    the root and in the folders whose scripts run with the folder first on sys.path. Folders without an
    `__init__.py` are namespace portions, which any regular module of the same name wins over."""
    names = {p.parent.name for p in root.glob("*/__init__.py")} | {p.stem for p in root.glob("*.py")}
    for folder in SCRIPT_FOLDERS:
        names |= {p.stem for p in (root / folder).glob("*.py")}
    return {n for n in names if not n.startswith(".")}


def environment_names() -> dict[str, set[str]]:
    """Top-level module name -> the distributions that install or declare it, for the running interpreter."""
    owners: dict[str, set[str]] = {}
    for module, dists in metadata.packages_distributions().items():
        for dist in dists:
            if normalized(dist) != OWN_DISTRIBUTION:
                owners.setdefault(module.lower(), set()).add(f"{dist} (installs it)")
    for dist in metadata.distributions():
        owner = dist.metadata["Name"]
        if normalized(owner) == OWN_DISTRIBUTION:
            continue
        for line in dist.requires or []:
            declared = Requirement(line).name
            owners.setdefault(normalized(declared), set()).add(f"{declared} (declared by {owner})")
    return owners


def clashes(ours: set[str], owners: dict[str, set[str]]) -> list[str]:
    return [f"{name}: also {', '.join(sorted(owners[name.lower()]))}" for name in sorted(ours)
            if name.lower() in owners]


def test_no_import_name_of_ours_clashes_with_the_environment():
    found = clashes(our_import_names(ROOT), environment_names())
    assert not found, "rename these (a dependency's module or a declared distribution has the name):\n" + \
        "\n".join(found)


def test_the_check_finds_a_module_named_like_an_installed_distribution(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")  # our old folder; HF's `kernels` is declared by transformers
    (tmp_path / "yaml.py").write_text("")  # PyYAML's module
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "numpy.py").write_text("")  # a script folder's module
    (tmp_path / "notes").mkdir()  # no __init__.py: a namespace portion, which shadows nothing
    (tmp_path / "notes" / "scipy.py").write_text("")
    (tmp_path / "mymodel").mkdir()
    (tmp_path / "mymodel" / "__init__.py").write_text("")

    found = clashes(our_import_names(tmp_path), environment_names())

    assert [line.split(":")[0] for line in found] == ["kernels", "numpy", "yaml"]
    assert "transformers" in found[0]
