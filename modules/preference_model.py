"""Pairwise preference model stage: reads (prompt, A, B) together and says how much A is preferred over B.

g(x, a, b) is a scalar head read at the last token of `prompt + a + EOS + b + EOS`; the preference is
f(x, a, b) = g(x, a, b) - g(x, b, a), the logit of P(a preferred over b). It is antisymmetric by construction:
f(x, b, a) = -f(x, a, b) exactly, and f(x, a, a) = 0. Trained with the Bradley-Terry loss -log sigmoid(f(x, y_w,
y_l)) on the same `{prompt, chosen, rejected}` pairs as the reward stage; both orders of a pair run in one forward.
The export is a plain `AutoModelForSequenceClassification` directory with `preference.json` and a README.md whose
code computes f with transformers alone; `modules.rewards.PreferenceModel` loads it as the RL stage's pairwise
reward (or as the evaluation's judge).
"""
from __future__ import annotations

import json
import os

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric

from datamodules.batch import PairBatch
from datamodules.collate import encode_prompt, encode_response, pad, turn_end_id
from modules import functional as F
from modules import optimizers
from modules.backbone import BackboneSpec, autocast_dtype, build_scorer, load_tokenizer, use_data_template
from modules.checkpoints import TrainedOnlyCheckpoints
from modules.checks import check_calibration_prompts, check_positions, check_responses
from modules.export import export_model
from modules.forward import in_parts, micro_batch_ranges, sequence_rewards
from modules.reward_model import read_last_token_when_pad_is_eos
from modules.sampling import SamplingConfig, sample_policy
from modules.sharding import build_sharded, fsdp_mesh

CONFIG_FILE = "preference.json"

# Written into the export as README.md, with {PATH} the export folder; tests/test_preference_model.py runs it.
USAGE = """\
# Pairwise preference model exported by p3o-rlhf

`preference(prompt, a, b)` is the logit of P(a preferred over b): g(a, b) - g(b, a), where g is this
`AutoModelForSequenceClassification` (one label) read at the last token of **prompt + a + end + b + end**
(the prompt through the tokenizer's chat template when it has one; responses encoded without special tokens, each
followed by `end`, the token the chat template ends an assistant turn with: EOS for most models).
It is antisymmetric: preference(prompt, b, a) = -preference(prompt, a, b).

```python
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

path = {PATH}   # this folder
end = {END}   # the token that ends a response
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path).eval()

def preference(prompt: str, a: str, b: str) -> float:
    if tok.chat_template:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tok(prompt)["input_ids"]
    response = lambda text: tok(text, add_special_tokens=False)["input_ids"] + [end]
    with torch.no_grad():   # one unpadded sequence at a time
        g = lambda x, y: model(input_ids=torch.tensor([ids + response(x) + response(y)])).logits[0, 0].item()
        return g(a, b) - g(b, a)
```
"""


def pair_inputs(prompts: list[list[int]], a: list[list[int]], b: list[list[int]],
                pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `prompt + a + b` then `prompt + b + a` rows (each response already ending in its EOS):
    (2B, T) ids and mask, the two orders of every pair in one batch."""
    rows = [p + x + y for p, x, y in zip(prompts, a, b)] + [p + y + x for p, x, y in zip(prompts, a, b)]
    return pad(rows, pad_id, "right")


def text_pair_inputs(tokenizer, prompts: list[str], a: list[str], b: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`pair_inputs` of texts: prompts through the shared collation path, each response followed by EOS (how a
    preference export reads any two responses; `modules.rewards.PreferenceModel`)."""
    return pair_inputs([encode_prompt(tokenizer, p) for p in prompts], [encode_response(tokenizer, x) for x in a],
                       [encode_response(tokenizer, y) for y in b], tokenizer.pad_token_id)


def preferences(scorer, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """f (B,) from the 2B rows of `pair_inputs`: g(a, b) - g(b, a)."""
    g = sequence_rewards(scorer, ids, mask)
    forward, backward = g.chunk(2)
    return forward - backward


def _token_lists(batch: PairBatch) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """(prompt, chosen, rejected) token lists of a batch (responses with their EOS), from its right-padded rows."""
    def part(seq, i, keep):
        return seq.input_ids[i][keep].tolist()

    c, r = batch.chosen, batch.rejected
    prompts = [part(c, i, c.attention_mask[i].bool() & ~c.loss_mask[i].bool()) for i in range(len(batch))]
    chosen = [part(c, i, c.loss_mask[i].bool()) for i in range(len(batch))]
    rejected = [part(r, i, r.loss_mask[i].bool()) for i in range(len(batch))]
    return prompts, chosen, rejected


class PreferenceModule(TrainedOnlyCheckpoints, L.LightningModule):
    """Pairwise preference model training: Bradley-Terry on f(x, chosen, rejected), antisymmetric by construction.

    Args:
        backbone: the model's backbone, usually `pretrained: <SFT export>` (a fresh scalar head).
        tokenizer: linked from the datamodule.
        optimizer: the optimizer factory (class_path + init_args).
        scheduler: a learning-rate scheduler factory, stepped every optimizer step (None: constant).
        micro_batch_tokens: score each batch in micro-batches of pairs with at most this many real tokens (both
            orders), each recomputed in the backward (`modules.forward.in_parts`): the loss and gradient of the whole
            batch. None (default): one pass.
        calibration_policy: causal LM whose pairs of samples calibrate the preference's scale (default:
            `backbone.pretrained`).
        calibration_prompts: held-out prompts used for calibration (two samples each).
        sampling: how the calibration prompts are sampled.
    """

    def __init__(self, backbone: BackboneSpec, tokenizer: str, optimizer: OptimizerCallable = torch.optim.AdamW,
                 scheduler: LRSchedulerCallable | None = None, micro_batch_tokens: int | None = None,
                 calibration_policy: str | None = None, calibration_prompts: int = 128,
                 sampling: SamplingConfig | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = backbone
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.micro_batch_tokens = micro_batch_tokens
        self.tokenizer = load_tokenizer(tokenizer)
        self.calibration_policy = calibration_policy or backbone.pretrained
        if self.calibration_policy is None:       # (else the export, after training, fails for want of it)
            raise ValueError("PreferenceModule: a random-init backbone (config) gives no default calibration_policy; set "
                             "model.init_args.calibration_policy to the causal LM whose samples set the preference's "
                             "scale (the SFT export): the export stores that scale")
        self.calibration_prompts, self.sampling = calibration_prompts, sampling or SamplingConfig()
        self.calibration: dict | None = None
        self.scorer = None
        self.val_loss, self.val_accuracy = MeanMetric(), MeanMetric()

    def configure_model(self) -> None:
        if self.scorer is None:
            linears = autocast_dtype(self._trainer)     # (a LoRA base's linears: bf16 under bf16-mixed)
            self.scorer = build_sharded(build_scorer, self.backbone, self.tokenizer, fsdp_mesh(self), linears)

    def setup(self, stage: str) -> None:
        use_data_template(self.tokenizer, self.trainer.datamodule)
        check_responses("PreferenceModule", self.trainer.datamodule, "pairs")

    def on_fit_start(self) -> None:
        data = self.trainer.datamodule
        if hasattr(data, "splits"):      # (the pair datamodule; None without one)
            check_calibration_prompts("PreferenceModule", data)
            longest = max(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
                          for split in ("train", "val") for e in data.splits[split])      # the rows it reads
            check_positions("PreferenceModule", longest, f"prompt + chosen + rejected (the longest pair of the data, "
                            f"at max_length {data.max_length})", {"preference model": self.scorer})

    def pair_margins(self, batch: PairBatch) -> torch.Tensor:
        """f(x, chosen, rejected) (B,): > 0 where the model prefers the chosen response."""
        ids, mask = pair_inputs(*_token_lists(batch), self.tokenizer.pad_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        B = len(batch)
        ranges = micro_batch_ranges(mask[:B].sum(-1) + mask[B:].sum(-1), self.micro_batch_tokens, self.scorer)

        def part(ab_ids, ab_mask, ba_ids, ba_mask):
            return preferences(self.scorer, torch.cat([ab_ids, ba_ids]), torch.cat([ab_mask, ba_mask]))

        return in_parts(part, ranges, ids[:B], mask[:B], ids[B:], mask[B:])

    def training_step(self, batch: PairBatch, batch_idx: int) -> torch.Tensor:
        margin = self.pair_margins(batch)
        loss = F.bradley_terry_loss(margin, torch.zeros_like(margin))
        self.log_dict({"train/loss": loss, "train/accuracy": (margin > 0).float().mean()}, prog_bar=True,
                      batch_size=len(batch))
        optimizers.log_learning_rate(self, len(batch))
        return loss

    def validation_step(self, batch: PairBatch, batch_idx: int) -> None:
        margin = self.pair_margins(batch)
        self.val_loss.update(F.bradley_terry_loss(margin, torch.zeros_like(margin)), weight=len(batch))
        self.val_accuracy.update((margin > 0).float().mean(), weight=len(batch))
        self.log_dict({"val/loss": self.val_loss, "val/accuracy": self.val_accuracy}, prog_bar=True,
                      batch_size=len(batch))

    def configure_optimizers(self):
        return optimizers.configure(self.optimizer_factory, self.scheduler_factory, self.scorer)

    @torch.no_grad()
    def calibrate(self, examples: list[dict], seed: int = 0) -> dict:
        """Two samples per held-out prompt from the calibration policy; store the std of f over those pairs (the
        scale `modules.rewards.PreferenceModel(normalize=True)` divides by, so that f has the spread of the
        difference of two normalised scalar rewards, sqrt(2))."""
        if self.calibration is None:
            if self.calibration_policy is None:
                raise ValueError("PreferenceModule: set calibration_policy (a causal LM) to calibrate the preference")
            roll = sample_policy(self.calibration_policy, self.tokenizer, examples[: self.calibration_prompts],
                                 self.sampling, num_samples=2, seed=seed, device=self.device)
            ids, mask = text_pair_inputs(self.tokenizer, roll.prompts[::2], roll.responses[::2], roll.responses[1::2])
            margins = preferences(self.scorer, ids.to(self.device), mask.to(self.device)).float().cpu()
            self.calibration = {"prompts": roll.prompts[::2], "responses_a": roll.responses[::2],
                                "responses_b": roll.responses[1::2], "pair_margins": margins,
                                "std": margins.std().clamp(min=1e-6).item()}
        return self.calibration

    def before_export(self) -> None:
        """On every rank before rank 0 exports: the calibration the export stores, under the run's precision
        context (see `RewardModule`)."""
        if self.calibration is None and self._trainer is not None and self.trainer.datamodule is not None:
            with self.trainer.precision_plugin.forward_context():
                self.calibrate(self.trainer.datamodule.splits["val"])

    def export(self, directory: str, merge_lora: bool = True, final_dir: str | None = None) -> None:
        """AutoModelForSequenceClassification (num_labels=1) + tokenizer + preference.json (with the calibration
        std) + README.md (its code names `final_dir`, the folder the export ends up in, default `directory`)."""
        export_model(self.scorer, self.backbone, self.tokenizer, directory, merge_lora, final_dir)
        if self.calibration is None:
            self.before_export()
        stats = {"std": 1.0, "n": 0, "source": "uncalibrated"}
        if self.calibration is not None:
            stats = {"std": self.calibration["std"], "n": len(self.calibration["pair_margins"]),
                     "source": f"pairs of samples of {self.calibration_policy}"}
        with open(os.path.join(directory, CONFIG_FILE), "w") as handle:
            json.dump({"kind": "pairwise preference model",
                       "input": "prompt (chat template if any) + response a + end of turn + response b + end of turn",
                       "output": "f(a, b) = g(a, b) - g(b, a), the logit of P(a preferred over b); see README.md",
                       **stats}, handle, indent=2)
        with open(os.path.join(directory, "README.md"), "w") as handle:
            handle.write(USAGE.replace("{PATH}", json.dumps(final_dir or directory))
                         .replace("{END}", str(turn_end_id(self.tokenizer))))
        read_last_token_when_pad_is_eos(directory, self.tokenizer)
