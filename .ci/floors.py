"""Print pyproject.toml's floors as pins: `name==version` for every dependency (and the `dev` extra) it bounds
below with `>=`, for `make lock-oldest` to install the oldest versions the project claims to work with.

Usage: `python .ci/floors.py [pyproject.toml]` (Python >= 3.11: tomllib). A dependency without a `>=` floor is an
error: a range with no tested lower end is not a promise anyone checked.
"""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def floors(pyproject: Path) -> dict[str, str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    pins = {}
    for line in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(line)
        lower = [spec.version for spec in req.specifier if spec.operator == ">="]
        if len(lower) != 1:
            sys.exit(f"{pyproject}: dependency {line!r} has no single '>=' floor")
        pins[canonicalize_name(req.name)] = lower[0]
    return pins


if __name__ == "__main__":
    for name, version in floors(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")).items():
        print(f"{name}=={version}")
