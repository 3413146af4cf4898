"""PairDataModule: the one datamodule shared by the SFT, reward and RL stages.

Records are `{prompt, chosen, rejected}`. SFT trains on (prompt, chosen), the reward stage on all three, RL on
prompts (`prompts_only: true` accepts records without responses; `chosen_only: true` records without a rejected
response, for SFT on demonstrations). Every batch is a `datamodules.batch.PairBatch`.
"""
from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader, DistributedSampler

from datamodules.collate import NoChatTemplate, PairCollator, encode_prompt, encode_response
from datamodules.sources import FIELDS, DataError, FieldMap, Source, validate_records, warn
from datamodules.tools import Tools, encode_trace

# apply_chat_template's own arguments, which the stages set (chat_template_kwargs may not)
TEMPLATE_ARGUMENTS = {"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                      "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                      "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}


class PairDataModule(L.LightningDataModule):
    """The one datamodule of every stage: tokenized `{prompt, chosen, rejected}` pairs (or prompts alone).

    Args:
        source: where records come from (`datamodules.task.ReviewTask`, `datamodules.sources.LocalFiles`,
            `datamodules.sources.HubDataset`, an adapter of `datamodules.formats`, or your `Source` subclass).
        tokenizer: tokenizer directory, hub id or .gguf file; defaults to the source's own tokenizer.
            Linked to the model by the CLI (`data.tokenizer_path` -> `model.tokenizer`).
        fields: names of the prompt / chosen / rejected fields in the raw records.
        max_length: prompt + response tokens; longer responses are cut (counted in the log).
        max_prompt_length: longer prompts are bad records (they would leave no room for a response).
        prompts_only: records need only a prompt (RL on a prompt set).
        chosen_only: records need a prompt and a chosen response only (SFT on demonstrations, e.g. `{prompt,
            completion}` with `fields: {chosen: completion}`); batches then have no `rejected`. A `chosen` may be a
            multi-turn trace, assistant turns separated by user messages or tool results (TRL's conversational
            `messages`, through `datamodules.formats.Messages`): the loss is on every assistant turn.
        skip_invalid: drop bad records with a logged count instead of raising.
        batch_size: records per training batch (prompts per rollout in RL).
        val_batch_size: records per validation batch (None: batch_size).
        num_workers: DataLoader worker processes.
        seed: shuffles the train split.
        reward_fields: further fields of each record the reward reads, by keyword, one value per response (a
            verifiable reward's reference answer, a test case): e.g. `[answer]` gives a reward whose call takes
            `answer=` the answers of the rollout's prompts (`modules.rewards.field_kwargs`). A record without one
            is a bad record. Values are kept as read (text, number, list, ...). A tools environment's `reset` takes
            them too.
        optional_fields: those of `reward_fields` a record may lack or hold null, given to the reward as None: a
            mixed dataset whose tasks carry different fields (maths records an `answer`, coding records `tests`),
            each scored by the term of a `modules.rewards.Composed` that reads its field (a term returns None
            where it does not apply, as the `modules.verifiable` rewards do for a None field).
        tools: Python functions the policy may call (`datamodules.tools.Tools`, TRL's `tools`): their schemas are
            rendered into every prompt by the tokenizer's chat template (every stage, so SFT on tool-use traces sees
            the prompts RL samples from), and the RL stage's rollouts and evaluation run the calls, feeding the
            results back as tool messages (docs/tools.md). With `chosen_only`, a `chosen` may then be a tool-use
            trace (assistant turns with `tool_calls`, tool results, the answer): SFT trains on the assistant's turns.
            Its `environment` (TRL's `environment_factory`) gives each response an instance whose methods are tools,
            reset from the record's prompt and `reward_fields`.
        chat_template_kwargs: further variables for the tokenizer's chat template wherever it renders the policy's
            conversations: prompts, SFT traces, and in rollouts tool results and a simulated user's messages (TRL's
            `chat_template_kwargs`, veRL's `apply_chat_template_kwargs`), e.g. `{enable_thinking: false}` for Qwen3's
            non-thinking mode. A reward model's or judge's own template does not get them.
        chat_template: a chat template to use in place of the tokenizer's, in this stage and in its export (TRL's
            `chat_template_path`, veRL's `custom_chat_template`): a `.jinja` file, or the template itself (a text
            holding `{{` or `{%`). Tools and a simulated user need one that renders earlier turns the same whatever
            follows them; Qwen3's and Qwen3.5's own drop the think block from earlier turns, and
            `configs/chat_templates/` holds theirs with that rule removed.
    """

    def __init__(self, source: Source, tokenizer: str | None = None, fields: FieldMap | None = None,
                 batch_size: int = 16, val_batch_size: int | None = None, max_length: int = 64,
                 max_prompt_length: int = 32, prompts_only: bool = False, chosen_only: bool = False,
                 skip_invalid: bool = False,
                 num_workers: int = 0, seed: int = 0, reward_fields: list[str] | None = None,
                 optional_fields: list[str] | None = None, tools: Tools | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None, chat_template: str | None = None):
        super().__init__()
        self.chat_template = read_chat_template(chat_template) if chat_template is not None else None
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        if taken := sorted(set(self.chat_template_kwargs) & TEMPLATE_ARGUMENTS):
            raise ValueError(f"PairDataModule: chat_template_kwargs sets {taken}, which the stages set themselves; "
                             "expected the template's own variables (e.g. enable_thinking)")
        self.tools = tools
        for name, value, least in (("batch_size", batch_size, 1), ("val_batch_size", val_batch_size or 1, 1),
                                   ("max_length", max_length, 2), ("max_prompt_length", max_prompt_length, 1),
                                   ("num_workers", num_workers, 0)):
            if value < least:
                raise ValueError(f"PairDataModule: {name}={value}; expected at least {least}")
        self.source, self.fields = source, fields or FieldMap()
        self.tokenizer_path = tokenizer or _source_tokenizer(source)
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        if prompts_only and chosen_only:
            raise ValueError("PairDataModule: prompts_only and chosen_only are both true; expected at most one (prompts "
                             "alone, or prompts with a chosen response)")
        self.prompts_only, self.chosen_only, self.skip_invalid = prompts_only, chosen_only, skip_invalid
        self.num_workers, self.seed = num_workers, seed
        self.reward_fields = tuple(reward_fields or ())
        taken = [name for name in self.reward_fields
                 if name in ("prompts", "responses", "responses_a", "responses_b", "completions", "completion_ids",
                             "trainer_state", "log_metric", "log_extra", "environments")]
        if taken or len(set(self.reward_fields)) < len(self.reward_fields):
            raise ValueError(f"PairDataModule: reward_fields={list(self.reward_fields)}; expected distinct names other "
                             "than prompts / responses / responses_a / responses_b / completions / completion_ids / "
                             "trainer_state / log_metric / log_extra / environments (what a reward is called with)")
        if tools is not None and tools.multi and "environment" not in self.reward_fields:
            self.reward_fields += ("environment",)              # (each record's environment, for its rollouts)
        self.optional_fields = tuple(optional_fields or ())
        if stray := [name for name in self.optional_fields if name not in self.reward_fields]:
            raise ValueError(f"PairDataModule: optional_fields names {stray}, which reward_fields "
                             f"{list(self.reward_fields)} does not; expected a subset of reward_fields")
        self.splits: dict[str, list[dict]] = {}
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from modules.backbone import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_path)
            if self.chat_template is not None:
                use_chat_template(self._tokenizer, self.chat_template)
        return self._tokenizer

    @property
    def responses(self) -> str:
        """What each record holds besides its prompt: 'pairs' (chosen and rejected), 'chosen', or 'none'."""
        return "none" if self.prompts_only else "chosen" if self.chosen_only else "pairs"

    def setup(self, stage: str | None = None) -> None:
        if self.chat_template_kwargs:
            check_template_kwargs(self.tokenizer, self.tokenizer_path, self.chat_template_kwargs)
        if self.tools is not None:
            self.tools.check_template(self.tokenizer, self.chat_template_kwargs)
        for split in ("train", "val"):
            if split not in self.splits:
                self.splits[split] = self.encoded(split)

    def records(self, split: str) -> tuple[str, list[dict]]:
        """(origin, validated records) of a split: `{prompt, chosen, rejected}` or `{prompt}`."""
        origin, indexed = self._indexed_records(split)
        return origin, [rec for _, rec in indexed]

    def _indexed_records(self, split: str) -> tuple[str, list[tuple[int, dict]]]:
        prompts = self.prompts_only and hasattr(self.source, "load_prompts")
        origin, rows = self.source.load_prompts(split) if prompts else self.source.load(split)
        if not rows:
            raise DataError(f"{origin}: the {split} split is empty{_why_empty(self.source, split)}")
        need = {"none": ("prompt",), "chosen": ("prompt", "chosen"), "pairs": FIELDS}[self.responses]
        first = self.source.first_index(split) if hasattr(self.source, "first_index") else 0
        written = need == ("prompt",) and self.tools is not None and self.tools.environment is not None
        return origin, validate_records(rows, origin, self.fields, need, self.skip_invalid, first, self.reward_fields,
                                        self.optional_fields, empty_prompts=written)   # (reset writes the text)

    def encoded(self, split: str) -> list[dict]:
        origin, records = self._indexed_records(split)
        out, cut = [], 0
        for index, rec in records:
            example = self.encode(rec, index, origin)
            if example is None:
                continue
            cut += example.pop("_cut")
            out.append(example)
        if cut:
            warn("%s: %d of %d responses cut to max_length=%d tokens", origin, cut, 2 * len(out), self.max_length)
        if not out:
            raise DataError(f"{origin}: no usable records in the {split} split: every record was "
                            "skipped (see the warnings above)")
        return out

    def encode(self, rec: dict, index: int, origin: str) -> dict | None:
        """Token ids of one record; a prompt that leaves no room for a response is a bad record."""
        try:
            schemas = self.schemas(rec)
        except DataError as error:
            raise DataError(f"{origin}: record {index}: {error}") from None
        try:
            prompt_ids = encode_prompt(self.tokenizer, rec["prompt"], schemas, self.chat_template_kwargs)
        except NoChatTemplate as error:
            raise DataError(f"{origin}: record {index}: field {self.fields.prompt!r}: {error}; use a tokenizer that "
                            "has one (data tokenizer), or give prompts as text") from None
        budget = min(self.max_prompt_length, self.max_length - 1)
        if len(prompt_ids) > budget:
            message = (f"{origin}: record {index}: field {self.fields.prompt!r}: {len(prompt_ids)} tokens leave no "
                       f"room for a response (max_prompt_length={self.max_prompt_length}, max_length={self.max_length})")
            if not self.skip_invalid:
                raise DataError(message)
            warn("skipped: %s", message)
            return None
        example = {"prompt": rec["prompt"], "prompt_ids": prompt_ids, "_cut": 0}
        if "fields" in rec:
            example["fields"] = rec["fields"]
        if not self.prompts_only:
            room = self.max_length - len(prompt_ids)
            for key in ("chosen",) if self.chosen_only else ("chosen", "rejected"):
                text = rec[key]
                if isinstance(rec[key], list):      # a trace (a turn that reasons): written through the template
                    ids, own = self.encode_trace(rec, key, index, origin)
                    example[f"{key}_own"] = own[:room]
                    text = rec[key][0]["content"] if len(rec[key]) == 1 else rec[key]   # (one turn: its answer)
                else:
                    ids = encode_response(self.tokenizer, rec[key])
                example["_cut"] += len(ids) > room
                example[f"{key}_ids"], example[key] = ids[:room], text
        return example

    def schemas(self, rec: dict) -> list[dict] | None:
        """The tool schemas a record's prompt carries: None without tools; with several environments, those of the
        one its `environment` field names (`Tools.schemas_for`)."""
        if self.tools is None:
            return None
        return self.tools.schemas_for(rec.get("fields", {}).get("environment") if self.tools.multi else None)

    def encode_trace(self, rec: dict, key: str, index: int, origin: str) -> tuple[list[int], list[int]]:
        """A multi-turn trace's ids and the policy's tokens among them (`datamodules.tools.encode_trace`): tool use
        (with data tools) or a conversation with user turns (any chat template)."""
        where = f"{origin}: record {index}: field {getattr(self.fields, key)!r}"
        if self.tools is None and any(m["role"] == "tool" or m.get("tool_calls") for m in rec[key]):
            raise DataError(f"{where}: a tool-use trace (tool calls and tool messages) needs data tools, whose "
                            "schemas the prompts carry")
        if not self.chosen_only and len(rec[key]) > 1:
            raise DataError(f"{where}: multi-turn traces are SFT demonstrations (data chosen_only: true); the reward "
                            "and preference stages take single responses")
        try:
            return encode_trace(self.tokenizer, rec["prompt"], rec[key], self.schemas(rec), self.chat_template_kwargs)
        except DataError as error:
            raise DataError(f"{where}: {error}") from None

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        # A DistributedSampler even on one process: its order is a function of (seed, epoch) alone, so a run
        # resumed at an epoch boundary sees the same batches as an uninterrupted one; under DDP it shards.
        trainer = self.trainer
        sampler = DistributedSampler(self.splits[split], num_replicas=trainer.world_size if trainer else 1,
                                     rank=trainer.global_rank if trainer else 0, shuffle=shuffle, seed=self.seed,
                                     drop_last=shuffle and trainer is not None and trainer.world_size > 1)
        return ResumableLoader(self.splits[split], batch_size=self.batch_size if shuffle else self.val_batch_size,
                               sampler=sampler, num_workers=self.num_workers,
                               collate_fn=PairCollator(self.tokenizer.pad_token_id))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)


class ResumableLoader(DataLoader):
    """A DataLoader that resumes mid-epoch: Lightning saves its `state_dict` (the sampler's epoch and the batches
    yielded in it) with every checkpoint and restores it before iterating again. The sampler's order is a function
    of (seed, epoch) alone, so the resumed iterator replays that epoch's order and skips the batches already
    trained on: a run killed after a mid-epoch checkpoint continues with exactly the batch it would have seen."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.position = {"epoch": 0, "batches": 0}
        self._resume_at: dict | None = None

    def __iter__(self):
        epoch = getattr(self.sampler, "epoch", 0)
        resume, self._resume_at = self._resume_at, None
        skip = resume["batches"] if resume is not None and resume["epoch"] == epoch else 0
        self.position = {"epoch": epoch, "batches": skip}
        for index, batch in enumerate(super().__iter__()):
            if index < skip:
                continue
            self.position = {"epoch": epoch, "batches": index + 1}   # counted before Lightning sees the batch
            yield batch

    def state_dict(self) -> dict:
        return dict(self.position)

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_at = dict(state_dict)


def _why_empty(source, split: str) -> str:
    """What to do about an empty split, for the sources whose split sizes a user sets."""
    from datamodules.sources import LocalFiles

    if isinstance(source, LocalFiles) and split == "val" and source.val is None:
        return (f" (val_fraction={source.val_fraction} of the file's records holds none out); add records or give "
                "a validation file (LocalFiles val: <path>)")
    return ""


def _source_tokenizer(source) -> str:
    path = source.tokenizer() if hasattr(source, "tokenizer") else None
    if path is None:
        raise ValueError(f"PairDataModule: source {type(source).__name__} ships no tokenizer; set data tokenizer: "
                         "<directory, hub id or .gguf file>")
    return path


def read_chat_template(value: str) -> str:
    """Data `chat_template`'s text: the template itself where `value` holds `{{` or `{%`, else the file `value`
    names (one line where there is none). Its Jinja is checked where a tokenizer renders it (`use_chat_template`)."""
    if "{{" in value or "{%" in value:
        return value
    from modules.backbone import resolve_path

    try:
        with open(resolve_path(value), encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"PairDataModule: chat_template {value!r}: {getattr(error, 'strerror', None) or error}; "
                         "expected a Jinja chat template file (or the template itself, holding {{ or {%)") from None


def use_chat_template(tokenizer, template: str) -> None:
    """Make `template` `tokenizer`'s chat template (so its renderings and a `save_pretrained` use it), after one
    rendering of a user message shows it compiles: a Jinja error stops here in one line, with its line number."""
    import jinja2

    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template, tokenize=False,
                                      add_generation_prompt=True)
    except jinja2.TemplateSyntaxError as error:
        raise DataError(f"data chat_template: line {error.lineno}: {error.message}") from None
    except jinja2.TemplateError as error:
        raise DataError(f"data chat_template: rendering a user message failed: {type(error).__name__}: {error}") \
            from None
    tokenizer.chat_template = template


def check_template_kwargs(tokenizer, path: str, kwargs: dict) -> None:
    """Data `chat_template_kwargs` that would change nothing stop here in one line: a tokenizer without a chat
    template, or a name the template never reads (a misspelt `enable_thinking` would otherwise be ignored). A
    template Jinja cannot parse here (one using transformers' own tags) is not checked.

    Example: {enable_thinking: false} with Qwen3's template passes; {enable_thinkng: false} is refused."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise DataError(f"data chat_template_kwargs: tokenizer {path!r} has no chat template, so {sorted(kwargs)} "
                        "would change nothing; remove them or use a tokenizer with one")
    import jinja2
    from jinja2 import meta

    try:
        names = meta.find_undeclared_variables(jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(
            template if isinstance(template, str) else next(iter(template.values()))))
    except jinja2.TemplateError:
        return
    if unread := sorted(set(kwargs) - names):
        raise DataError(f"data chat_template_kwargs: the chat template of {path!r} never reads {unread}; expected "
                        f"names it uses (it reads {sorted(names)})")
