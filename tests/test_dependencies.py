"""The install is what the suite was tested on: every declared dependency is bounded above, and the
installed release of each lies inside its range (pip can give a newcomer any release a range admits)."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _requirements() -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return reqs


@pytest.mark.parametrize("req", _requirements(), ids=str)
def test_every_dependency_has_an_upper_bound(req):
    assert any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), (
        f"{req}: bound it above by the newest release the suite has passed on")


@pytest.mark.parametrize("req", _requirements(), ids=str)
def test_installed_release_is_in_range(req):
    try:
        version = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{req.name} is not installed (an extra this environment left out)")
    assert req.specifier.contains(version, prereleases=True), f"{req.name} {version} is outside {req.specifier}"
