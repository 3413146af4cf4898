"""Write the lock (`constraints.txt`) from the environment the suite just passed in; print what moved.

Usage: `python .ci/lock.py <python of the tested venv> [constraints.txt]` (run by `make lock` after the suite; by
`make lock-oldest` with constraints-oldest.txt, the oldest versions pyproject.toml allows).
The project itself (editable) is left out; torch is pinned by its public version (`2.13.0`, not `2.13.0+cpu` or
a local wheel path) so the same lock serves the CPU wheel here and the CUDA build on a GPU machine.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HEADER = """# The versions `make test` last passed with: `make install` and CI install with `pip -c constraints.txt`.
# Refresh deliberately with `make lock` (upgrades everything in a fresh venv, runs the suite, rewrites this
# file and prints what moved). Library users get the ranges in pyproject.toml instead.
"""
HEADERS = {"constraints-oldest.txt": """# The oldest versions pyproject.toml allows, as `make test-oldest` last passed with them:
# every dependency at its floor (`.ci/floors.py`), the rest as they resolved then.
# Refresh with `make lock-oldest` after a floor moves.
"""}


def frozen(python: str) -> dict[str, str]:
    out = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"], check=True, capture_output=True,
                         text=True).stdout
    pins = {}
    for line in out.splitlines():
        if not line or line.startswith("#"):
            continue
        name = re.split(r"[ =@<>]", line, maxsplit=1)[0]
        if " @ " in line:                 # a local wheel (torch here): pin the version it installed
            version = subprocess.run([python, "-c", f"import importlib.metadata as m; print(m.version({name!r}))"],
                                     check=True, capture_output=True, text=True).stdout.strip()
        else:
            version = line.split("==", 1)[1]
        pins[name.lower()] = version.split("+", 1)[0]
    return pins


def read(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    pairs = (line.split("==", 1) for line in path.read_text().splitlines() if "==" in line and not line.startswith("#"))
    return {name.lower(): version for name, version in pairs}


def main() -> None:
    python, path = sys.argv[1], Path(sys.argv[2] if len(sys.argv) > 2 else "constraints.txt")
    old, new = read(path), frozen(python)
    pinned = "".join(f"{name}=={version}\n" for name, version in sorted(new.items()))
    path.write_text(HEADERS.get(path.name, HEADER) + pinned)
    moved = [f"  {n}: {old.get(n, '-')} -> {new.get(n, '-')}" for n in sorted(old.keys() | new.keys())
             if old.get(n) != new.get(n)]
    print(f"{path}: {len(new)} pins; " + ("moved:\n" + "\n".join(moved) if moved else "nothing moved"))


if __name__ == "__main__":
    main()
