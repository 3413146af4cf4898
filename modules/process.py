"""How a script ends: `exit_process`, the last call of `train.py` and of every benchmark script; `peer_failure`, the
line a process says when another process of its run failed first; and `names_on_every_process`."""
from __future__ import annotations

import atexit
import contextlib
import gc
import io
import os
import sys
import threading
from typing import NoReturn


def exit_process(code: int) -> NoReturn:
    """Ends the process with exit code `code` as a normal exit would, but without finalizing the interpreter: the
    non-daemon threads are joined, the atexit handlers run (the loggers', Lightning's, multiprocessing's and
    `weakref.finalize`'s among them), a process group is destroyed, every open file is flushed (stdout, stderr and
    any a callback left open), then `os._exit`. Only for the end of a script: nothing runs after it.

    Why not finalize:
      * Time. Tearing down an interpreter that imported torch, lightning and transformers takes about 2.4 s of CPU
        on a 2-core AMD EPYC: `python -c "import lightning"` 11.3 s against 8.9 s when it ends with `os._exit`
        (medians of 5, in turn). That is every `train.py` run, every rank of it, and every benchmark process.
      * gloo. Its worker threads live as long as the device mesh and the sharded modules that hold the group, that
        is until finalization, and a worker that releases the last reference to a tensor there takes the GIL of an
        interpreter being torn down: the process aborts (SIGABRT, "terminate called without an active exception";
        pytorch/pytorch#190489), so a finished run would report failure. Seen once in CI, at the end of a resumed
        FSDP2 run, and at the end of a 2-process test.

    Finalization's other work (module teardown, `__del__` of what is still alive) writes nothing: Python does not
    promise it anyway. Where something goes on after the script (`_host_goes_on`: a profiler, a debugger, an
    interactive session) it is a plain `sys.exit` instead, except in a gloo group. Tested in tests/test_process.py."""
    gc.unfreeze()       # what train.py froze after its imports: not in `gc.get_objects`, and not finalized on exit
    dist = sys.modules.get("torch.distributed")     # (never imported here: a script that has none exits as fast)
    group = dist is not None and dist.is_available() and dist.is_initialized()
    if _host_goes_on() and not (group and "gloo" in str(dist.get_backend())):
        sys.exit(code)
    for thread in threading.enumerate():            # what finalization waits for first
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()         # what a normal exit runs before finalization, while the interpreter is whole
    if group and dist.is_initialized():     # (an atexit handler may have: seen on a GPU, NCCL, under FSDP2)
        dist.destroy_process_group()
    for file in [o for o in gc.get_objects() if issubclass(type(o), io.IOBase)] + [sys.stdout, sys.stderr]:
        # what finalization would write: files a callback left open (`type`, not `isinstance`: that reads each
        # object's `__class__`, and torch.distributed's deprecated `reduce_op` warns when read)
        with contextlib.suppress(Exception):
            if not file.closed and file.writable():
                file.flush()
    os._exit(code)


def names_on_every_process(names) -> list[str]:
    """The sorted union of `names` over the processes of the run (one `all_gather_object`; every process calls it),
    or `names` sorted in one process: keys that every process then reduces in one order, where each process's own
    may differ (what a reward logs)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return sorted(names)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(names))
    return sorted({name for part in gathered for name in part})


# what gloo raises in a collective whose other side has exited (pair.cc: "Connection closed by peer [addr]:port")
PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


def peer_failure(err: BaseException) -> str | None:
    """The one line for `err` if it is a collective that failed because another process of the run exited first
    (having printed its own error: a user error is one line there too), else None. Under DDP a reward that fails on
    one process's batch stops that process; without this, the others each added a 70-line gloo traceback after its
    line, ending in "Connection closed by peer"."""
    gone = next((text for text in PEER_GONE if isinstance(err, RuntimeError) and text in str(err)), None)
    if gone is None:
        return None
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
    else:
        rank, size = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
    return (f"process {rank} of {size} stopped: another process of the run exited first, its error above (here a "
            f"collective lost its peer: {gone.lower()})")


def _host_goes_on() -> bool:
    """The script runs inside something that goes on after it: a profiler or tracer that then writes its results
    (`python -m cProfile` / `trace`, coverage), a debugger, `python -i`, IPython or Jupyter's `%run`."""
    import builtins

    return bool(sys.getprofile() or sys.gettrace() or sys.flags.interactive or hasattr(builtins, "get_ipython"))
