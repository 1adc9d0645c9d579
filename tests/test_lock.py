"""requirements.lock, which `make` installs with --no-deps, pins exactly and covers what pyproject.toml asks for.

`make lock` writes it; a dependency added to (or narrowed in) pyproject.toml without re-locking fails here, before
a fresh machine's install does. The transitive packages are checked by `pip check` in the Makefile's install."""

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("demo", "dev", "weights")  # what the Makefile installs: .[demo,dev,weights]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(text: str) -> dict[str, Version]:
    """Package -> pinned version; any line that is not a comment or an exact `name==version` pin fails."""
    pins: dict[str, Version] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"requirements.lock line {number} is not an exact pin: {line!r}"
        name = canonical(match[1])
        assert name not in pins, f"requirements.lock pins {name} twice"
        pins[name] = Version(match[2])
    return pins


def declared(pyproject: dict) -> list[Requirement]:
    """The requirements of the project and the extras the Makefile installs, for this interpreter and platform."""
    project = pyproject["project"]
    lines = project["dependencies"] + [line for extra in EXTRAS for line in project["optional-dependencies"][extra]]
    requirements = [Requirement(line) for line in lines]
    return [r for r in requirements if canonical(r.name) != "modrwkv" and (r.marker is None or r.marker.evaluate())]


def unmet(requirements: list[Requirement], pins: dict[str, Version]) -> list[str]:
    problems = []
    for r in requirements:
        pinned = pins.get(canonical(r.name))
        if pinned is None:
            problems.append(f"{r}: not in the lock")
        elif not r.specifier.contains(pinned, prereleases=True):
            problems.append(f"{r}: the lock has {pinned}")
    return problems


def test_the_lock_pins_every_declared_requirement_in_range():
    pins = read_lock((ROOT / "requirements.lock").read_text())
    problems = unmet(declared(tomllib.loads((ROOT / "pyproject.toml").read_text())), pins)
    assert not problems, "run `make lock` (then `make test`):\n" + "\n".join(problems)


def test_the_check_finds_a_missing_or_out_of_range_package():
    pins = read_lock("# header\ntorch==2.13.0+cpu\nNumPy==1.25.0\n")
    requirements = [Requirement(line) for line in ("torch==2.13.0", "numpy>=1.26", "pyyaml>=6")]
    assert unmet(requirements, pins) == ["numpy>=1.26: the lock has 1.25.0", "pyyaml>=6: not in the lock"]
    with pytest.raises(AssertionError, match="not an exact pin"):
        read_lock("numpy>=1.26\n")
