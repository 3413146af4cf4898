"""Where a checkpointed update's peak RSS goes on CPU: the tensors alive at once against what the allocator keeps
mapped, under glibc's settings and under jemalloc and tcmalloc.

    python benchmarks/allocator.py                  # 7 allocator settings x 2 micro-batch sizes (~30 min on 2 cores)
    python benchmarks/allocator.py --settings reuse tcmalloc   # some of them
    python benchmarks/allocator.py --quick          # a 2-layer model, tiny micro-batches (CI-sized)

One micro-batch of an RL update, as `RLModule` runs it with its defaults: a random-init Llama of SmolLM2-135M's
shape with activation checkpointing, `response_logprobs` over G groups of one 42-token prompt and 2 responses of
128 tokens (the packed layout, LM head in chunks), then the backward into existing gradients; 4 times, in a fresh
process per setting and size. Settings:
  reuse    what `train.py` does on CPU (`modules.cpu.reuse_freed_memory`): glibc never unmaps or trims freed memory
  glibc    glibc's defaults (`P3O_REUSE_FREED_MEMORY=0`): blocks above a threshold that rises to 32 MB are mapped
  mmap1m   `P3O_REUSE_FREED_MEMORY=0 MALLOC_MMAP_THRESHOLD_=1048576`: every block of 1 MB or more is mapped and
           unmapped on free, so RSS follows the tensors alive, at the price of page faults
  mmap4m   the same from 4 MB
  jemalloc jemalloc in place of glibc's malloc (`LD_PRELOAD=libjemalloc.so.2`, its defaults: freed pages go back
           to the OS after ~10 s); Debian/Ubuntu: `apt install libjemalloc2`
  jemalloc-tuned  jemalloc with the MALLOC_CONF of PyTorch's CPU tuning guide (freed pages kept for reuse)
  tcmalloc gperftools' tcmalloc (`LD_PRELOAD=libtcmalloc_minimal.so.4`); Debian/Ubuntu: `apt install
           libtcmalloc-minimal4`
A preloaded allocator that is not installed skips its rows with a line saying so.
Printed: the peak RSS over the model and its gradients, seconds per micro-batch (median of the last 3), and the
peak of the tensors alive at once (torch.profiler's memory timeline of one more micro-batch) over the same base.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import QUICK, SMOLLM2, child, machine, peak_rss_gb  # noqa: E402

SETTINGS = {"reuse": {}, "glibc": {"P3O_REUSE_FREED_MEMORY": "0"},
            "mmap1m": {"P3O_REUSE_FREED_MEMORY": "0", "MALLOC_MMAP_THRESHOLD_": str(2**20)},
            "mmap4m": {"P3O_REUSE_FREED_MEMORY": "0", "MALLOC_MMAP_THRESHOLD_": str(4 * 2**20)},
            "jemalloc": {"LD_PRELOAD": "libjemalloc.so.2"},               # reuse_freed_memory stands aside
            "jemalloc-tuned": {"LD_PRELOAD": "libjemalloc.so.2",
                               "MALLOC_CONF": "oversize_threshold:1,background_thread:true,metadata_thp:auto,"
                                              "dirty_decay_ms:9000000000,muzzy_decay_ms:9000000000"},
            "tcmalloc": {"LD_PRELOAD": "libtcmalloc_minimal.so.4"}}
P, K = 42, 2


def one(args) -> dict:
    import torch

    from benchmarks.memory import VocabularyOnly
    from modules.backbone import BackboneSpec, build_causal_lm
    from modules.cpu import reuse_freed_memory
    from modules.forward import response_logprobs

    reuse_freed_memory()        # as in train.py: a no-op under P3O_REUSE_FREED_MEMORY=0 or a preloaded allocator
    torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else SMOLLM2
    model = build_causal_lm(BackboneSpec(config=dict(shape), activation_checkpointing=True), VocabularyOnly(49152)).train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    L = args.response_tokens
    gen = torch.Generator().manual_seed(0)

    def step():
        ids = torch.randint(5, 49152, (args.groups, 1, P + L), generator=gen).expand(-1, K, -1).clone()
        ids[:, :, P:] = torch.randint(5, 49152, (args.groups, K, L), generator=gen)
        ids = ids.flatten(0, 1)
        response_logprobs(model, ids, torch.ones_like(ids), P, 1.0, K).sum().backward()

    base = peak_rss_gb()
    seconds = []
    for _ in range(4):
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
    rss = peak_rss_gb() - base
    live = live_peak_gb(step)
    return {"rss_gb": rss, "seconds": statistics.median(seconds[1:]), "live_gb": live}


def live_peak_gb(step) -> float | None:
    """The peak of the tensors alive at once during `step()`, above the parameters and gradients, from
    torch.profiler's memory timeline (None where it cannot be read)."""
    import tempfile
    import warnings

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prof.export_memory_timeline(f"{tmp}/timeline.json", device="cpu")
            _, sizes = json.loads(Path(f"{tmp}/timeline.json").read_text())
    except Exception:
        return None
    total = [sum(s) for s in sizes]                    # bytes alive at each event; the first: parameters, gradients
    return (max(total) - total[0]) / 2**30 if total else None


def preloadable(library: str) -> bool:
    """Whether the dynamic linker preloads `library` (a soname): where it cannot, ld.so says so on stderr and runs
    the program without it."""
    proc = subprocess.run([sys.executable, "-c", ""], env={**os.environ, "LD_PRELOAD": library}, capture_output=True,
                          text=True)
    return proc.returncode == 0 and "preloaded" not in proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2-layer model, 2 and 4 groups of 8-token responses")
    parser.add_argument("--groups", type=int, nargs="*", default=None,
                        help="micro-batch sizes in groups of 2 responses (default 4 8: 1024 and 2048 response tokens)")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--response-tokens", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)          # the child: this many groups
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.response_tokens is None:
        args.response_tokens = 8 if args.quick else 128
    if args.one:
        args.groups = args.one
        Path(args.json).write_text(json.dumps(one(args)))
        return
    groups = args.groups or ([2, 4] if args.quick else [4, 8])
    print(f"One checkpointed micro-batch (forward + backward), {'2-layer quick model' if args.quick else 'SmolLM2-135M shape'}, "
          f"{machine(args.threads)}; GB above the model and its gradients")
    print("| setting | response tokens | peak RSS GB | tensors alive, peak GB | s / micro-batch |\n|---|---|---|---|---|")
    for setting in args.settings:
        preload = SETTINGS[setting].get("LD_PRELOAD")
        if preload and not preloadable(preload):
            print(f"| {setting} | not installed: {preload} | | | |", flush=True)
            continue
        for g in groups:
            r = child([__file__, "--one", g, "--threads", args.threads, "--response-tokens",
                       args.response_tokens, *["--quick"] * args.quick], f"allocator {setting} G={g}",
                      env={"OMP_NUM_THREADS": str(args.threads), **SETTINGS[setting]})
            live = "n/a" if r["live_gb"] is None else f"{r['live_gb']:.2f}"
            print(f"| {setting} | {g * K * args.response_tokens} | {r['rss_gb']:.2f} | {live} | {r['seconds']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
    from modules.process import exit_process

    exit_process(0)        # no finalization: seconds saved, and gloo can abort there (see there)
