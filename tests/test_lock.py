"""requirements/lock.txt is the environment the README's test command and CI install (`pip install -c`):
every dependency pyproject.toml declares for the `test` extra (recursively through its self-references) and
every pin of requirements/pins.in must be in it at a version the requirement admits, or the lock is stale
(refresh: `bash requirements/lock.sh`)."""
from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.split(";")[0].strip()
    return pins


def _declared(extra: str) -> list[Requirement]:
    """pyproject's requirements of pmkernels[extra], expanded through pmkernels[...] self-references."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out, todo, seen = [Requirement(r) for r in project["dependencies"]], [extra], set()
    while todo:
        e = todo.pop()
        if e in seen:
            continue
        seen.add(e)
        for r in map(Requirement, project["optional-dependencies"][e]):
            if canonicalize_name(r.name) == "pmkernels":
                todo.extend(r.extras)
            else:
                out.append(r)
    return out


def test_lock_holds_every_declared_dependency():
    lock = _lock()
    env = {**default_environment(), "platform_system": "Linux", "sys_platform": "linux",
           "platform_machine": "x86_64", "python_version": "3.11", "extra": ""}
    pins_in = [Requirement(ln) for ln in (ROOT / "requirements" / "pins.in").read_text().splitlines()
               if ln.strip() and not ln.lstrip().startswith("#")]
    problems = []
    for r in _declared("test") + pins_in:
        if r.marker is not None and not r.marker.evaluate(env):
            continue
        v = lock.get(canonicalize_name(r.name))
        if v is None:
            problems.append(f"{r} is not in the lock")
        elif not r.specifier.contains(v, prereleases=True):
            problems.append(f"{r} does not admit the locked {r.name}=={v}")
    assert not problems, "requirements/lock.txt is stale (run: bash requirements/lock.sh): " + "; ".join(problems)
