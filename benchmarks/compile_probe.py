"""Does torch.compile shorten the two phases of a rollout that run furthest above their floor? (CPU probe)

    python benchmarks/compile_probe.py        # ~5 min on 2 cores, most of it compiling

The throughput benchmark's shapes (a Llama of SmolLM2-135M's shape, random weights, fp32, 2 threads):
  * update: forward + backward of one minibatch, 8 sequences x 74 tokens, LM head on the last 33 positions
    (`logits_to_keep`), a log-softmax/gather loss; eager against `torch.compile(model)`;
  * generation: 16 rows, 42-token prompts, 32 sampled tokens (EOS never ends a row early); HF `generate` with
    its dynamic KV cache (what `modules/sampling.py` runs) against a static cache with `torch.compile` of the
    forward.
Prints the median over repeats after the first (which includes compilation for the compiled variants) and the
compile time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import SMOLLM2, machine, random_llama, seconds  # noqa: E402


def timed(fn, repeats: int) -> list[float]:
    """Seconds of `repeats` + 1 calls, the first included (it compiles)."""
    return [seconds(fn) for _ in range(repeats + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    from transformers import GenerationConfig

    torch.set_num_threads(args.threads)
    model = random_llama(SMOLLM2)
    vocab = model.config.vocab_size
    ids = torch.randint(2, vocab, (8, 74))

    def update(m):
        model.zero_grad(set_to_none=True)
        logits = m(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=33).logits
        torch.log_softmax(logits.float(), -1).gather(-1, ids[:, -33:, None]).mean().backward()

    prompts = torch.randint(2, vocab, (16, 42))

    def generate(cache: str | None):
        config = GenerationConfig(do_sample=True, max_new_tokens=32, min_new_tokens=32, top_k=0, top_p=1.0,
                                  pad_token_id=0, eos_token_id=1, cache_implementation=cache)
        with torch.no_grad():
            model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=config)

    rows = [("update (fwd + bwd, 8 x 74)", "eager", timed(lambda: update(model), args.repeats))]
    compiled = torch.compile(model)
    rows.append(("update (fwd + bwd, 8 x 74)", "torch.compile(model)", timed(lambda: update(compiled), args.repeats)))
    model.eval()
    rows.append(("generate (16 x 32 tokens)", "eager, dynamic cache", timed(lambda: generate(None), args.repeats)))
    eager_forward = model.forward
    model.forward = torch.compile(eager_forward, dynamic=False)
    rows.append(("generate (16 x 32 tokens)", "static cache + compiled forward",
                 timed(lambda: generate("static"), args.repeats)))
    model.forward = eager_forward
    print(f"{machine(args.threads)}, SmolLM2-135M shape, fp32, median of {args.repeats} after the first call\n")
    print("| phase | variant | s (median) | first call (s) |\n|---|---|---|---|")
    for phase, variant, times in rows:
        print(f"| {phase} | {variant} | {statistics.median(times[1:]):.2f} | {times[0]:.1f} |")


if __name__ == "__main__":
    main()
    from modules.process import exit_process

    exit_process(0)        # no finalization: seconds saved, and gloo can abort there (see there)
