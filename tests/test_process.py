"""`modules.process.exit_process`: how `train.py` and the benchmark scripts end."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

_EXIT = """
import atexit, sys, threading, time
from modules.process import exit_process

class Finalized:
    def __del__(self):
        print("finalized", flush=True)

kept = Finalized()                      # a module global: deleted when the interpreter is finalized
if sys.argv[2] == "gloo":
    import torch.distributed as dist
    atexit.register(lambda: print("atexit;", dist.is_initialized(), end=" "))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
else:
    atexit.register(lambda: print("atexit;", "torch" in sys.modules, end=" "))
threading.Thread(target=lambda: time.sleep(0.5) or print("joined;", end=" ")).start()   # not a daemon
print("unflushed;", end=" ")
left_open = open(sys.argv[1], "w")
left_open.write("written")
exit_process(3)
"""


@pytest.mark.parametrize("group", [pytest.param("gloo", marks=pytest.mark.slow), "none"])   # (gloo: torch's import)
def test_a_process_exits_as_it_would_without_finalizing_the_interpreter(tmp_path, group):
    """`exit_process(3)`, in a gloo process group or with none (and torch never imported: it imports none):
    exit code 3; the non-daemon thread joined first, then the atexit handlers (the group still up for them);
    unflushed output written (stdout, and a file left open); nothing finalized (where gloo's worker threads can
    abort the process, and which costs seconds after torch); no warning printed."""
    proc = _run([sys.executable, "-c", _EXIT, str(tmp_path / "left_open.txt"), group])
    assert (proc.returncode, proc.stdout) == (3, f"unflushed; joined; atexit; {group == 'gloo'} "), proc.stderr
    assert (tmp_path / "left_open.txt").read_text() == "written"
    assert "Warning" not in proc.stderr, proc.stderr   # (torch.distributed's deprecated `reduce_op`, read by the file scan)


def test_under_a_profiler_the_process_exits_normally_so_the_profile_is_written(tmp_path):
    """`python -m cProfile -o FILE script.py`: the script's `exit_process` is a plain `sys.exit`, so the
    interpreter is finalized and cProfile writes its profile after the script."""
    script = tmp_path / "script.py"
    script.write_text(_EXIT)
    proc = _run([sys.executable, "-m", "cProfile", "-o", str(tmp_path / "profile"), str(script),
                 str(tmp_path / "left_open.txt"), "none"])
    # (cProfile catches the script's SystemExit: it exits 0 whatever the script's code)
    assert proc.stdout == "unflushed; joined; atexit; False finalized\n", proc.stderr
    assert (tmp_path / "profile").stat().st_size > 0 and (tmp_path / "left_open.txt").read_text() == "written"


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
