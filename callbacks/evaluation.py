"""Evaluation on a fixed set of held-out prompts: one point of the KL-reward frontier per call.

Works for any stage module exposing `policy` and `tokenizer`. When the module also has a reference policy
(`reference_model()`) and a training reward (`score(rollout)`), it logs the full RL set:
  val/reward (proxy), val/gold_reward, val/kl (Monte-Carlo KL: mean sequence log-ratio policy/reference),
  val/win_rate (gold when available, else proxy, else a pairwise training reward asked in both orders; ties count
  half), val/judge_win_rate and val/judge_agreement (with a `judge`), val/length, val/eos_rate,
plus val/demo_gold_reward (the dataset's `chosen` responses) as the yardstick for SFT.
Each evaluation appends a row to `<log_dir>/frontier.csv`, redraws the reward-vs-KL frontier into TensorBoard
and logs a text table of samples. Runs when training ends and every `every_n_batches` training batches; under
`python train.py validate` (stages with a validation loop: SFT, offline DPO), once after that loop, its metrics in
the loop's table.

X-axis: every val/* point is logged at the number of training batches done (rollouts in RL, optimizer steps in
SFT and reward), the step Lightning gives `train/*`: train/* of rollout b and val/* at b both describe the
policy after b updates of the rollout loop, and the curves line up in TensorBoard.
"""
from __future__ import annotations

import csv
import functools
import logging
import os

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from callbacks.checkpoint import finish_checkpoints, interrupted
from callbacks.sharding import outside_forward
from datamodules.collate import PairCollator, encode_response, prompt_text
from modules import functional as F
from modules.backbone import autocast_dtype
from modules.checks import ConfigError, check_positions, import_object
from modules.judges import both_orders, win_rate
from modules.process import names_on_every_process
from modules.rewards import (
    DEFAULT_TIMEOUT,
    FrozenModel,
    as_numbers,
    awaited,
    call_text_reward,
    check_fields,
    is_pairwise,
    lightning_state,
    qualified_name,
    reward_extras,
    reward_metrics,
    reward_timeout,
    trainer_state,
)
from modules.sampling import SamplingConfig, sample
from modules.sharding import fsdp_mesh

log = logging.getLogger(__name__)
warn = rank_zero_only(log.warning)     # said once, by the first process


class Evaluation(L.Callback):
    """Evaluates the policy on fixed held-out prompts: gold and proxy reward, KL, win rate, length, samples.

    Args:
        reward: the gold reward, a callable `(prompts, responses) -> list[float]` (given the record fields it
            takes, as in training: `modules.rewards.field_kwargs`); None when the task has none.
        num_prompts: held-out prompts (the first ones of the val split; the same every time).
        every_n_batches: evaluate before training and every this many training batches (RL: rollouts; SFT and
            reward: optimizer steps); None or 0: only at the end.
        sampling: sampling settings; defaults to the module's own `sampling` (RL) or SamplingConfig().
        show: samples printed and logged as text.
        batch_size: prompts per generation call.
        seed: seeds the evaluation's sampling (the same draws at every evaluation of the same policy).
        judge: a pairwise judge `(prompts, responses_a, responses_b) -> logits of P(a better)` (`modules.judges`:
            `modules.rewards.PreferenceModel`, `modules.judges.LLMJudge`, or yours by class_path), asked in both
            orders about the policy's response against the reference policy's: `val/judge_win_rate` and
            `val/judge_agreement` (the fraction of pairs both orders agree on), beside the gold reward. A judge
            holding a model (`modules.rewards.FrozenModel`) has it built at setup, sharded under FSDP2 like the
            stage's own models.
        samples_per_prompt: n responses sampled per prompt (veRL's validation `n`): every value is a mean over all
            of them (`val/gold_reward` is then mean@n, the pass@1 estimate of a 0 / 1 reward from n draws), and with
            n > 1 `val/gold_best_of_n` is the mean over prompts of their best response's gold reward (pass@n of a
            0 / 1 reward). The reference policy's samples for the win rate and the KL are drawn alike.
    """

    def __init__(self, reward=None, num_prompts: int = 64, every_n_batches: int | None = None,
                 sampling: SamplingConfig | None = None, show: int = 4, batch_size: int = 64, seed: int = 1234,
                 judge=None, samples_per_prompt: int = 1):
        for name, value in (("num_prompts", num_prompts), ("batch_size", batch_size),
                            ("samples_per_prompt", samples_per_prompt)):
            if value < 1:        # (a negative num_prompts sliced off the last prompts)
                raise ValueError(f"Evaluation: {name}={value}; expected at least 1")
        if show < 0 or (every_n_batches or 0) < 0:
            raise ValueError(f"Evaluation: show={show}, every_n_batches={every_n_batches}; expected >= 0 (every_n_batches "
                             "0 or null: only at the end)")
        reward, judge = (_named(value, name) for name, value in (("reward", reward), ("judge", judge)))
        self.reward, self.num_prompts, self.every_n_batches, self.seed = reward, num_prompts, every_n_batches, seed
        self.judge = judge
        self.sampling, self.show, self.batch_size = sampling, show, batch_size
        self.samples_per_prompt = samples_per_prompt
        self.history: list[dict] = []
        self._last_step, self._warned = -1, False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not hasattr(pl_module, "policy"):            # (else an AttributeError once training has ended)
            raise ConfigError(f"callbacks.evaluation.Evaluation: {type(pl_module).__name__} has no policy to sample; "
                              "it evaluates the SFT, RL and offline DPO stages (a reward model reports with "
                              "callbacks.reward_report.RewardReport)")
        if isinstance(self.judge, FrozenModel):           # (Lightning has made the FSDP2 mesh by now)
            self.judge.configure(fsdp_mesh(pl_module), autocast_dtype(trainer))
        if self.reward is not None and trainer.datamodule is not None:     # a field the data does not keep
            check_fields(self.reward, getattr(trainer.datamodule, "reward_fields", ()))

    def _sampling(self, pl_module) -> SamplingConfig:
        return self.sampling or getattr(pl_module, "sampling", None) or SamplingConfig()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        done = batches_done(trainer)
        if self.every_n_batches and done % self.every_n_batches == 0:
            self.run(trainer, pl_module, done)

    def on_train_end(self, trainer, pl_module) -> None:  # before teardown: models still on device, sharded
        finish_checkpoints(trainer)     # the weights are saved before an evaluation that could fail
        if interrupted(trainer):        # stopped early (Ctrl-C, SIGTERM): exit promptly, no final evaluation
            return
        if batches_done(trainer) != self._last_step:
            self.run(trainer, pl_module, batches_done(trainer))
        if trainer.is_global_zero and len(self.history) > 1:
            name = type(getattr(pl_module, "objective", pl_module)).__name__
            print(summary_table(self.history[0], self.history[-1], name))

    def on_train_start(self, trainer, pl_module) -> None:
        # (after the module's own on_fit_start checks, which name the rollouts' sampling where it is shared)
        if hasattr(trainer.datamodule, "max_prompt_length"):
            prompt, new = trainer.datamodule.max_prompt_length, self._sampling(pl_module).max_new_tokens
            source = "evaluation" if self.sampling else "model" if getattr(pl_module, "sampling", None) else "default"
            check_positions("callbacks.evaluation.Evaluation", prompt + new, f"data max_prompt_length ({prompt}) + "
                            f"{source} sampling.max_new_tokens ({new})", {"policy": pl_module.policy})
        if self.every_n_batches:  # the step-0 point: where the frontier starts
            self.run(trainer, pl_module, batches_done(trainer))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        """`validate` (not fit's validation loops): one evaluation, logged with the loop's own metrics, so that it
        is in Lightning's table, the logger and what `trainer.validate` returns."""
        if trainer.state.fn != TrainerFn.VALIDATING or trainer.sanity_checking:
            return
        metrics = self.run(trainer, pl_module, batches_done(trainer), log=False)
        pl_module.log_dict(metrics, sync_dist=True)     # (every rank has the totals: their mean, Lightning's due)

    def prompts(self, trainer) -> list[dict]:
        dm = trainer.datamodule
        dm.setup("validate")
        examples = dm.splits["val"][: self.num_prompts]
        usable = len(examples) // trainer.world_size * trainer.world_size
        if usable < len(examples) and not self._warned:     # sharded models: every rank makes as many forwards
            self._warned = True
            warn("Evaluation: %d prompts over %d processes; the last %d are left out so that every rank "
                 "evaluates %d", len(examples), trainer.world_size, len(examples) - usable, usable // trainer.world_size)
        return examples[:usable][trainer.global_rank:: trainer.world_size]

    @torch.no_grad()
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, log: bool = True) -> dict:
        """Evaluate now; `step` is the x-axis value (training batches done); `log`: to the logger, at `step`."""
        self._last_step = step
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # same draws at every evaluation; training RNG untouched
            torch.manual_seed(self.seed + trainer.global_rank)
            with outside_forward(trainer):
                return self._run(trainer, pl_module, step, log)

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, log: bool) -> dict:
        sums, rows = {}, []
        examples = self.prompts(trainer)
        for start in range(0, len(examples), self.batch_size):
            part = examples[start: start + self.batch_size]
            progress = pl_module.progress() if hasattr(pl_module, "progress") else lightning_state(trainer)
            with (reward_timeout(pl_module.reward_timeout) if hasattr(pl_module, "reward_timeout")    # (the RL module's)
                  else reward_timeout(DEFAULT_TIMEOUT, knob=None)), trainer_state(progress), reward_metrics(keep=False), \
                    reward_extras(keep=False):
                metrics, shown = self.evaluate(pl_module, part)
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value * len(part)
            rows += shown
        rows = rows[: self.show]
        if trainer.world_size > 1:     # every process reduces the same keys (what a reward logs may differ)
            sums = {key: sums.get(key, 0.0) for key in names_on_every_process(sums)}
        n = torch.tensor(float(len(examples)), device=pl_module.device)
        n_all = trainer.strategy.reduce(n, reduce_op="sum")
        metrics = {k: float(trainer.strategy.reduce(torch.tensor(v, device=pl_module.device), reduce_op="sum") / n_all)
                   for k, v in sorted(sums.items())}
        for key in [k for k in metrics if k.endswith("/count")]:       # val/reward_<term>: total / count
            name, count = key.removesuffix("/count"), metrics.pop(key)
            total = metrics.pop(f"{name}/total")
            if count > 0:                                               # (else it applied to no held-out prompt)
                metrics[name] = total / count
        if trainer.is_global_zero:
            self.report(trainer, metrics, rows, step, log)
        return metrics

    def evaluate(self, pl_module, examples: list[dict]) -> tuple[dict, list[tuple]]:
        tok = pl_module.tokenizer
        collated = PairCollator(tok.pad_token_id)(examples)
        ids, mask = collated.prompt_ids.to(pl_module.device), collated.prompt_mask.to(pl_module.device)
        config = self._sampling(pl_module)
        n = self.samples_per_prompt
        roll = _generate(pl_module, collated.fields)(pl_module.policy, tok, ids, mask, collated.prompts, config, n)
        roll.with_fields(collated.fields)                        # (each prompt's fields for its n responses)
        out = {"val/length": roll.response_mask.sum(-1).float().mean().item(),
               "val/eos_rate": roll.has_eos.float().mean().item(),
               **({"val/entropy": F.masked_mean(roll.entropy, roll.response_mask).item()} if roll.entropy is not None
                  else {}),
               **({"val/tool_calls": roll.timings["tools/calls"] / len(roll)} if "tools/calls" in roll.timings else {}),
               **({"val/user_turns": roll.timings["tools/user_turns"] / len(roll)}
                  if "tools/user_turns" in roll.timings else {})}
        with reward_metrics() as logged, reward_extras() as extras:    # what the rewards log about the policy's
            gold = self._gold(roll.prompts, roll.responses, roll.fields, roll.completion_ids, roll.messages,  # (TRL's)
                              roll.environments)
        if gold is not None:
            out["val/gold_reward"] = gold.mean().item()
            if n > 1:
                out["val/gold_best_of_n"] = F.best_of_groups(gold, n).mean().item()
            demos = [e.get("chosen") for e in examples]
            in_environment = getattr(getattr(pl_module, "tools", None), "environment", None) is not None
            if all(isinstance(d, str) for d in demos) and not in_environment:   # (a demonstration ran in none)
                demo_ids = lambda: [encode_response(tok, d) for d in demos]  # noqa: E731  (as SFT trains them)
                out["val/demo_gold_reward"] = self._gold(collated.prompts, demos, collated.fields, demo_ids).mean().item()
        # a pairwise reward compares responses to one prompt: one sample per prompt has no proxy score
        pairwise = getattr(getattr(pl_module, "reward", None), "pairwise", False)
        with reward_metrics() as proxy_logged, reward_extras() as proxy_extras:
            proxy = pl_module.score(roll).float().cpu() if hasattr(pl_module, "score") and not pairwise else None
        for name, values in [*logged.items(), *proxy_logged.items()]:   # val/<name>: total / count, as terms
            out[f"val/{name}/total"] = out.get(f"val/{name}/total", 0.0) + sum(values) / len(examples)
            out[f"val/{name}/count"] = out.get(f"val/{name}/count", 0.0) + len(values) / len(examples)
        if proxy is not None:
            out["val/reward"] = proxy.mean().item()
            for name, term in roll.reward_terms.items():     # a term's mean over the responses it applies to: its
                applies = ~torch.isnan(term)                  # total and count, per prompt like every value here
                out[f"val/reward_{name}/total"] = float(term[applies].sum()) / len(roll)
                out[f"val/reward_{name}/count"] = float(applies.sum()) / len(roll)
        if hasattr(pl_module, "reference_model"):
            out.update(self._against_reference(pl_module, roll, ids, mask, collated, config, gold, proxy))
        scores = gold if gold is not None else proxy if proxy is not None else torch.full((len(roll),), float("nan"))
        columns = {name: values for name, values in {**proxy_extras, **extras}.items() if len(values) == len(roll)}
        first = list(zip(roll.prompts, roll.responses, scores.tolist()))[: self.show]
        shown = [(p, r, g, {name: values[i] for name, values in columns.items()})      # (log_extra's, per sample)
                 for i, (p, r, g) in enumerate(first)]
        return out, shown

    def _gold(self, prompts, responses, fields: dict[str, list], ids, messages=None, environments=None) -> torch.Tensor | None:
        if self.reward is None:
            return None
        values = awaited(call_text_reward(self.reward, prompts, responses, fields, ids, messages, environments),
                         f"evaluation reward {qualified_name(self.reward)}")
        return as_numbers(values, self.reward, len(responses))          # (one number per response, or one line)

    def _against_reference(self, pl_module, roll, ids, mask, collated, config, gold, proxy) -> dict:
        T = config.temperature        # the RL module's logprobs: its micro-batches and LM-head chunks
        logp = F.sequence_logprobs(pl_module.logprobs(pl_module.policy, roll, T), roll.response_mask)
        with pl_module.reference_model() as ref:
            ref_logp = F.sequence_logprobs(pl_module.logprobs(ref, roll, T), roll.response_mask)
            generate = _generate(pl_module, collated.fields)
            ref_roll = generate(ref, pl_module.tokenizer, ids, mask, collated.prompts, config,
                                self.samples_per_prompt).with_fields(collated.fields)
        prompts = roll.prompts                                   # (one per response, row-aligned with ref_roll's)
        out = {"val/kl": (logp - ref_logp).mean().item()}
        if self.judge is not None:
            _to_device(self.judge, pl_module.device)
            score, agree = both_orders(self.judge, prompts, roll.responses, ref_roll.responses, roll.fields)
            out.update({"val/judge_win_rate": win_rate(score).item(), "val/judge_agreement": agree.float().mean().item()})
        reward = getattr(pl_module, "reward", None)
        if gold is not None:
            ours, theirs = gold, self._gold(prompts, ref_roll.responses, roll.fields, ref_roll.completion_ids,
                                            ref_roll.messages, ref_roll.environments)
        elif proxy is not None:
            ours, theirs = proxy, pl_module.score(ref_roll).float().cpu()
        elif is_pairwise(reward):              # a pairwise training reward, no gold: it judges, in both orders
            ours, theirs = both_orders(reward, prompts, roll.responses, ref_roll.responses, roll.fields)[0], 0.0
        else:
            return out
        wins = (ours > theirs).float() + 0.5 * (ours == theirs).float()
        return {**out, "val/win_rate": wins.mean().item()}

    def report(self, trainer, metrics: dict, rows: list[tuple], step: int, log: bool = True) -> None:
        self.history.append({"step": step, **metrics})
        logger = trainer.logger
        if logger is not None and log:
            logger.log_metrics(metrics, step=step)
        log_dir = getattr(logger, "log_dir", None) if logger is not None else None
        if log_dir:
            write_frontier_csv(os.path.join(log_dir, "frontier.csv"), self.history)
            _log_text_and_figure(logger, rows, self.history, step)
        table = "  ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in metrics.items())
        when = f"after {step} batches" if trainer.state.fn == TrainerFn.FITTING else trainer.state.fn.value
        print(f"[eval {when}] {table}")
        for prompt, response, value, extra in rows:
            print(f"  {value:+.3f}  {prompt_text(prompt)} -> {response}" + (f"   [{extra_text(extra)}]" if extra else ""))


def extra_text(extra: dict) -> str:
    """The columns a reward logged for one sample (TRL's `log_extra`), as `name: value; ...`."""
    return "; ".join(f"{name}: {value}" for name, value in extra.items())


def batches_done(trainer: L.Trainer) -> int:
    """Training batches done (rollouts in RL): the step Lightning logs `self.log` metrics at.

    Lightning counts a batch in `_batches_that_stepped` only after its end hooks, and a run resumed from a
    checkpoint saved in those hooks adds that batch only when the epoch restarts, after `on_train_start`. Both
    show as a batch processed but not completed, so it is added here: the same count in `on_train_start` (also
    after a resume), `on_train_batch_end` and `on_train_end`."""
    loop = trainer.fit_loop.epoch_loop
    pending = loop.batch_progress.total.processed > loop.batch_progress.total.completed
    return loop._batches_that_stepped + int(pending)


def summary_table(start: dict, end: dict, name: str) -> str:
    """Start of training (the SFT policy) against the end, on the same held-out prompts."""
    keys = [k for k in ("val/gold_reward", "val/reward", "val/kl", "val/win_rate", "val/judge_win_rate", "val/length",
                        "val/eos_rate")
            if k in end]
    rows = [(f"start (batch {start['step']})", start), (f"{name} (batch {end['step']})", end)]
    width = max(22, *(len(label) + 1 for label, _ in rows))
    head = f"{'policy':<{width}}" + "".join(f"{k.split('/')[-1]:>13}" for k in keys)
    body = [f"{label:<{width}}" + "".join(f"{row.get(k, float('nan')):>13.3f}" for k in keys) for label, row in rows]
    return "\n".join([head, *body])


def write_frontier_csv(path: str, history: list[dict]) -> None:
    keys = sorted({k for row in history for k in row})
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


def _named(value, name: str):
    """A reward or judge given by its import path (`reward: myrewards.correct`, a function): the object it names, as
    the RL module's typed `reward` resolves one; a path that does not import, or names something that is not
    callable, is a `ConfigError` naming the field. Anything else as given."""
    if not isinstance(value, str):
        return value
    try:
        found = import_object(value)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"Evaluation: {name}={value!r} does not import ({error}); expected the import path of a "
                          "function, or {class_path: ..., init_args: ...} for a class") from None
    if not callable(found):
        raise ConfigError(f"Evaluation: {name}={value!r} is a {type(found).__name__}, not callable")
    return found


def samples_table(rows: list[tuple]) -> str:
    """(prompt, response, reward, extra columns) rows as a Markdown table, what TensorBoard's text tab shows: a cell's
    "|" escaped and its line breaks written as <br>, so each sample stays one row.

    Example: [("Hi", "Hello|there\nfriend", 0.5, {})] -> "| reward | prompt | response |\n|---|---|---|\n| +0.500 | Hi |
    Hello\\|there<br>friend |"."""
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    extra = any(e for *_, e in rows)
    lines = ["| reward | prompt | response |" + (" extra |" if extra else ""), "|---|---|---|" + ("---|" if extra else "")]
    lines += [f"| {v:+.3f} | {cell(prompt_text(p))} | {cell(r)} |" + (f" {cell(extra_text(e))} |" if extra else "")
              for p, r, v, e in rows]
    return "\n".join(lines)


def _log_text_and_figure(logger, rows, history, step) -> None:
    experiment = getattr(logger, "experiment", None)
    if experiment is None or not hasattr(experiment, "add_text"):
        return
    experiment.add_text("val/samples", samples_table(rows), step)
    points = [(h["val/kl"], h.get("val/gold_reward", h.get("val/reward"))) for h in history if "val/kl" in h]
    if not points:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
    ax.set_xlabel("KL(policy || reference)")
    ax.set_ylabel("gold reward" if "val/gold_reward" in history[-1] else "proxy reward")
    ax.set_title("KL-reward frontier")
    fig.tight_layout()
    experiment.add_figure("val/frontier", fig, step)
    plt.close(fig)


def _to_device(judge, device: torch.device) -> None:
    """A judge holding a model (`PreferenceModel`, `LLMJudge`) runs where the policy does."""
    model = judge if isinstance(judge, torch.nn.Module) else getattr(judge, "model", None)
    weight = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    if weight is not None and weight.device != device:
        model.to(device)


def _generate(pl_module, fields: dict[str, list]):
    """The stage's generation: the RL module's (`RLModule.generate`: its engine, and the data's tools, reset from the
    prompts' record `fields` where they have an environment, so evaluation samples as training does), else our
    sampler."""
    return functools.partial(pl_module.generate, fields=fields) if hasattr(pl_module, "engine") else sample
