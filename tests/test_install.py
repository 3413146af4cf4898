"""The install's promises: the lock (`constraints.txt`) lies inside pyproject.toml's ranges; every floor there is
the version `make test-oldest` ran (`constraints-oldest.txt`), so no floor moves without a run at it; and the
README names the versions both runs used."""
import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def ci_script(name: str):
    """`.ci/<name>.py` (the scripts `make lock` / `make lock-oldest` run) as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / ".ci" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pins(name: str) -> dict[str, str]:
    """A lock file's pins, read as `.ci/lock.py` reads them, by canonical name."""
    return {canonicalize_name(n): v for n, v in ci_script("lock").read(ROOT / name).items()}


def requirements() -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def readme_versions(sentence_start: str) -> dict[str, str]:
    """`name version` pairs of the README's words from `sentence_start` up to the first ', and', ';', ')' or '. '."""
    text = " ".join((ROOT / "README.md").read_text().split())
    part = re.search(re.escape(sentence_start) + r"(.*?)(?:, and |;|\)|\.\s)", text)
    assert part, f"README: no {sentence_start!r}"
    return {canonicalize_name(n): v for n, v in re.findall(r"([A-Za-z][\w-]*) (\d+(?:\.\d+)+)", part.group(1))}


def test_the_lock_lies_inside_pyprojects_ranges():
    lock = pins("constraints.txt")
    for req in requirements():
        name = canonicalize_name(req.name)
        assert name in lock, f"constraints.txt pins no {req.name}"
        assert req.specifier.contains(lock[name], prereleases=True), f"lock {req.name}=={lock[name]} outside {req}"


def test_every_floor_is_the_version_the_oldest_run_installed():
    oldest = pins("constraints-oldest.txt")
    floors = ci_script("floors").floors(PYPROJECT)
    assert floors, "pyproject.toml: no floors"
    for name, floor in floors.items():
        assert name in oldest, f"constraints-oldest.txt pins no {name}: run `make lock-oldest`"
        assert Version(oldest[name]) == Version(floor), (
            f"{name}: floor {floor} in pyproject.toml, {oldest[name]} in constraints-oldest.txt: run `make lock-oldest`")


def test_floors_need_one_lower_bound_each(tmp_path):
    """A dependency bounded by anything but one `>=` has no floor a run could test: `.ci/floors.py` refuses it."""
    bad = tmp_path / "pyproject.toml"
    bad.write_text('[project]\ndependencies = ["torch<3"]\n[project.optional-dependencies]\ndev = []\n')
    with pytest.raises(SystemExit, match="'torch<3' has no single '>=' floor"):
        ci_script("floors").floors(bad)


def test_the_readme_names_the_versions_both_runs_used():
    """The lock's run and the oldest run, each with the Python it used: the oldest at requires-python's floor."""
    (python_floor,) = SpecifierSet(tomllib.loads(PYPROJECT.read_text())["project"]["requires-python"])
    assert python_floor.operator == ">="
    for start, versions in [("Tested with ", pins("constraints.txt")),
                            ("at the oldest versions `pyproject.toml` allows (", pins("constraints-oldest.txt"))]:
        named = readme_versions(start)
        assert {"python", "torch", "lightning", "transformers", "peft"} <= named.keys(), (start, named)
        assert Version(named.pop("python")) >= Version(python_floor.version), f"README {start!r}: Python below the floor"
        for name, version in named.items():
            assert versions[name] == version, f"README {start!r} names {name} {version}, the pin is {versions[name]}"
    assert readme_versions("at the oldest versions `pyproject.toml` allows (")["python"] == python_floor.version


def test_make_help_describes_every_target():
    """`make help` prints each .PHONY target of the Makefile with the first line of the comment above it; a target
    added without a comment fails here."""
    import subprocess

    makefile = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY: (.*)$", makefile, flags=re.M)[1].split()
    printed = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    described = dict(line.strip().split(None, 1) for line in printed.splitlines())
    assert sorted(described) == sorted(phony)
    assert described["test"].startswith("The suite, then the vLLM engine's tests")
