"""Generation alone: seconds per `sample` call, our sampler against HF's, alternating in one process.

    python benchmarks/decode.py              # SmolLM2-135M shape, 8 prompts x 2 responses x 32 new tokens, 2 threads
    python benchmarks/decode.py --quick      # 2-layer model, 4 new tokens, 2 repeats (CI-sized)

The rollout of `benchmarks/throughput.py` (random weights, fp32, T = 1, no top-k / top-p, each prompt prefilled
once for its 2 responses), three ways:
  hf         `model.generate(do_sample=True)`: HF's softmax + `torch.multinomial`, `F.linear` (what TRL runs)
  draw       `modules.sampling.sample(prepack_weights=False)`: the inverse-CDF draw (`F.inverse_cdf_sample`)
  prepacked  `modules.sampling.sample()`, the default: the draw + `prepacked_linears` (oneDNN, weights reordered
             once per call)
and the token draw alone on (16, 49152) probabilities: `torch.multinomial` against `F.inverse_cdf_sample`; and
what the sampler records at each step, the drawn token's logprob alone against it with the entropy
(`F.token_logprobs_and_entropy`, what `_Draw` runs), beside the time of a whole step.
Printed: medians and ratios against `hf`, all measured in the same command.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import QUICK, SMOLLM2, TOKENIZER, alternate, machine, random_llama, seconds  # noqa: E402
from benchmarks.throughput import PROMPTS, K, prompts  # noqa: E402


def setup(shape: dict):
    from modules.backbone import load_tokenizer

    tok = load_tokenizer(TOKENIZER)
    model = random_llama(shape, tok).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts(PROMPTS)]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return model, tok, enc.input_ids, enc.attention_mask, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5, help="measured calls per way (after one warm-up)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.new_tokens = 2, 4
    import torch
    from transformers import GenerationConfig

    from modules import functional as F
    from modules.sampling import SamplingConfig, _prompt_cache, cache_kwarg, sample

    torch.set_num_threads(args.threads)
    model, tok, ids, mask, texts = setup(QUICK if args.quick else SMOLLM2)
    hf_config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    def hf():
        with torch.no_grad():
            cache = _prompt_cache(model, ids, mask, K)
            model.generate(input_ids=ids.repeat_interleave(K, 0), attention_mask=mask.repeat_interleave(K, 0),
                           generation_config=hf_config, **{cache_kwarg(): cache})

    def ours(prepack: bool):
        return lambda: sample(model, tok, ids, mask, texts, SamplingConfig(max_new_tokens=args.new_tokens,
                                                                           prepack_weights=prepack),
                              num_samples=K, record_logprobs=True)

    ways = {"hf": hf, "draw": ours(False), "prepacked": ours(True)}
    runs = alternate(list(ways), args.repeats + 1, lambda name: seconds(ways[name]))
    seconds_per_call = {name: values[1:] for name, values in runs.items()}      # the first round is a warm-up

    probs = torch.softmax(torch.randn(PROMPTS * K, 49152) * 3, -1)
    draws = {"torch.multinomial": lambda: torch.multinomial(probs, 1),
             "F.inverse_cdf_sample": lambda: F.inverse_cdf_sample(probs, torch.rand(len(probs)))}
    draw_ms = alternate(list(draws), 21, lambda name: seconds(draws[name]) * 1e3)
    logits, tokens = torch.randn(PROMPTS * K, 49152) * 3, torch.randint(0, 49152, (PROMPTS * K,))
    records = {"token_logprobs": lambda: F.token_logprobs(logits, tokens),
               "token_logprobs_and_entropy": lambda: F.token_logprobs_and_entropy(logits, tokens)}
    record_ms = alternate(list(records), 21, lambda name: seconds(records[name]) * 1e3)

    base = statistics.median(seconds_per_call["hf"])
    shape = "2-layer width-128 quick model" if args.quick else "SmolLM2-135M shape"
    print(f"{shape}, fp32, {PROMPTS} prompts x {K} responses x {args.new_tokens} new tokens, {machine(args.threads)}, "
          f"{args.repeats} calls per way\n")
    print("| way | s / call (median) | ratio to hf |\n|---|---|---|")
    for name, values in seconds_per_call.items():
        print(f"| {name} | {statistics.median(values):.2f} | {statistics.median(values) / base:.2f} |")
    ms = {name: statistics.median(v[1:]) for name, v in draw_ms.items()}
    print(f"\ntoken draw on ({PROMPTS * K}, 49152): " + ", ".join(f"{n} {v:.2f} ms" for n, v in ms.items())
          + f" (ratio {ms['F.inverse_cdf_sample'] / ms['torch.multinomial']:.3f})")
    ms = {name: statistics.median(v[1:]) for name, v in record_ms.items()}
    step_ms = 1e3 * statistics.median(seconds_per_call["prepacked"]) / args.new_tokens
    print(f"what the sampler records each step on ({PROMPTS * K}, 49152): " + ", ".join(f"{n} {v:.2f} ms" for n, v in
          ms.items()) + f"; the entropy adds {ms['token_logprobs_and_entropy'] - ms['token_logprobs']:.2f} ms to a "
          f"prepacked step of {step_ms:.1f} ms")


if __name__ == "__main__":
    main()
    from modules.process import exit_process

    exit_process(0)        # no finalization: seconds saved, and gloo can abort there (see there)
