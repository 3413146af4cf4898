"""Peak memory of one RL update under each memory setting, each in its own process, in one command.

    python benchmarks/memory.py            # SmolLM2-135M shape (random init), 16 prompts x 2 x 128 tokens (~10 min)
    python benchmarks/memory.py --quick    # a 2-layer model of that shape, 4 prompts x 2 x 16 tokens (CI-sized)

One P3O-V2 update of a full fine-tune: pi_old and pi_ref logprobs over the rollout (no graph), then the
minibatch's loss and its backward, for a minibatch of all the responses (random prompt and response tokens: the
memory does not depend on what they say). The reference is a frozen copy, as in a full fine-tune run. Not
included: sampling, the reward model, the optimizer's state (AdamW: 2 fp32 copies of the weights) and its step.
Settings, each in a fresh process (peak RSS is a high-water mark):
  whole       `logprob_chunk: 0`, no micro-batches: the (tokens, vocabulary) logits exist whole
  chunked     the default: the LM head in chunks
  micro       + `micro_batch_tokens` (default 1280: 8 of the 32 responses)
  micro+ckpt  + `activation_checkpointing: true`
Printed: peak RSS and seconds, with ratios against `whole`, and the loss and gradient norm of each setting (the
settings compute the same update: they agree to float rounding). The TRL side of issue 22's benchmark (its
GRPOTrainer at equal work, and sweeps over length, responses and vocabulary) is not written yet.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import QUICK, SMOLLM2  # noqa: E402

SETTINGS = {"whole": {"logprob_chunk": 0}, "chunked": {}, "micro": {"micro": True},
            "micro+ckpt": {"micro": True, "checkpointing": True}}


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
    import resource

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
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    with torch.no_grad():
        roll.old_logp = module.logprobs(module.policy, roll)
        roll.ref_logp = module.logprobs(module.reference, roll)
    extra = module.objective.prepare(module.objective_input(roll, roll.old_logp, {}))
    out = module.backward_minibatch(roll, extra, float(roll.response_mask.sum()), "benchmark")
    seconds = time.perf_counter() - t0
    grad = torch.cat([p.grad.flatten() for p in module.policy.parameters() if p.grad is not None])
    return {"peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "built_gb": built,
            "seconds": seconds, "loss": out.loss.item(), "grad_norm": grad.norm().item(),
            "micro_batches": len(module.micro_batches(roll)) if setting.get("micro") else 1}


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2-layer model, 4 prompts x 2 x 16 tokens")
    parser.add_argument("--micro_batch_tokens", type=int, default=None, help="budget of the micro settings")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size (SmolLM2: 49152; Qwen: 151936)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)   # the child process
    args = parser.parse_args()
    args.prompts, args.prompt_tokens, args.response_tokens = (4, 8, 16) if args.quick else (16, 32, 128)
    if args.micro_batch_tokens is None:
        args.micro_batch_tokens = 48 if args.quick else 1280
    if args.setting:
        print(json.dumps(one_update(args)))
        return
    rows = {}
    for name in SETTINGS:
        command = [sys.executable, __file__, "--setting", name, "--vocab", str(args.vocab), "--threads",
                   str(args.threads), "--micro_batch_tokens", str(args.micro_batch_tokens)] + ["--quick"] * args.quick
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"error: setting {name} failed:\n{proc.stderr[-2000:]}")
        rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = rows["whole"]
    print(f"One P3O update, {args.prompts} prompts x 2 x {args.response_tokens} response tokens, vocabulary "
          f"{args.vocab}, {'2-layer quick model' if args.quick else 'SmolLM2-135M shape'}, {args.threads} threads, "
          f"{cpu_model()}; micro-batches of {args.micro_batch_tokens} tokens")
    print(f"{'setting':<12}{'peak GB':>9}{'x whole':>9}{'seconds':>9}{'x whole':>9}{'parts':>7}{'loss':>14}{'grad norm':>14}")
    for name, r in rows.items():
        print(f"{name:<12}{r['peak_gb']:>9.2f}{r['peak_gb'] / base['peak_gb']:>9.2f}{r['seconds']:>9.1f}"
              f"{r['seconds'] / base['seconds']:>9.2f}{r['micro_batches']:>7}{r['loss']:>14.6f}{r['grad_norm']:>14.6f}")
    print(f"(peak after building the models: {base['built_gb']:.2f} GB)")


if __name__ == "__main__":
    main()
