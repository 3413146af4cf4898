"""Where records come from, and their validation.

A `Source` yields raw records for a split; `validate_records` maps them to `{prompt, chosen, rejected}` and
either raises a `DataError` naming file, record index (in the file) and field, or (with `skip_invalid`) drops
the record and counts it, so nothing vanishes silently.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass

from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)
warn = rank_zero_only(log.warning)   # every process reads the same data: its warnings once, from the first

FIELDS = ("prompt", "chosen", "rejected")


class DataError(ValueError):
    """Bad input data; the message names the file, the record index and the field."""


@dataclass
class FieldMap:
    """Names of the prompt / chosen / rejected fields in the source records.

    Args:
        prompt: the prompt's field.
        chosen: the preferred response's field.
        rejected: the other response's field.
    """

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


class Source:
    """Where records come from; subclass it (the CLI then accepts your class by `class_path`, and dotted overrides
    such as `--data.init_args.source.init_args.num_train=100` reach its arguments).

    `load(split)` returns `(origin, rows)` for split 'train' / 'val' (origin names the file or dataset in error
    messages). `load_prompts(split)` returns the same rows for a prompts-only datamodule (RL), which reads only
    their prompts: override it where a row's responses cost work to make (the embedded task labels them).
    `first_index(split)` is the index in that file of the split's first row (a held-out tail starts after the
    training rows), so errors name the record as it is numbered in the file. `tokenizer()` returns the path of a
    tokenizer the source ships, or None.
    """

    def load(self, split: str) -> tuple[str, list[dict]]:
        raise NotImplementedError

    def load_prompts(self, split: str) -> tuple[str, list[dict]]:
        return self.load(split)

    def first_index(self, split: str) -> int:
        return 0

    def tokenizer(self) -> str | None:
        return None


class LocalFiles(Source):
    """Records from local `.jsonl`, `.json`, `.parquet`, `.csv` or `.tsv` files (`read_file`).

    Args:
        train: path of the training file.
        val: path of the validation file; when omitted, the last `val_fraction` of the training records (in file
            order) is held out.
        val_fraction: the share of the training file held out when `val` is omitted.
    """

    def __init__(self, train: str, val: str | None = None, val_fraction: float = 0.05):
        if not 0 < val_fraction < 1:
            raise ValueError(f"LocalFiles: val_fraction={val_fraction}; expected a share of the training file "
                             "between 0 and 1 (at least one record is held out)")
        self.train, self.val, self.val_fraction = train, val, val_fraction

    @property
    def name(self) -> str:
        return self.train

    def load(self, split: str) -> tuple[str, list[dict]]:
        if self.val is not None:
            path = self.train if split == "train" else self.val
            return path, read_file(path)
        rows = read_file(self.train)
        n_train = self._n_train(len(rows))
        return self.train, (rows[:n_train] if split == "train" else rows[n_train:])

    def first_index(self, split: str) -> int:
        if self.val is not None or split == "train":
            return 0
        return self._n_train(len(read_file(self.train)))

    def _n_train(self, n_rows: int) -> int:
        return n_rows - (max(1, int(round(n_rows * self.val_fraction))) if n_rows > 1 else 0)


class HubDataset(Source):
    """Records from `datasets.load_dataset(name, config)` (needs network access to the hub).

    Args:
        name: the dataset's hub id (e.g. `Anthropic/hh-rlhf`).
        config: the dataset's configuration name, if it has several.
        train_split: the split read as training data.
        val_split: the split read as validation data.
        max_records: read at most this many records per split (None: all).
    """

    def __init__(self, name: str, config: str | None = None, train_split: str = "train", val_split: str = "test",
                 max_records: int | None = None):
        self.hub_name, self.config = name, config
        self.splits = {"train": train_split, "val": val_split}
        self.max_records = max_records

    @property
    def name(self) -> str:
        return self.hub_name

    def load(self, split: str) -> tuple[str, list[dict]]:
        import datasets

        where = f"{self.hub_name}[{self.splits[split]}]"
        try:
            ds = datasets.load_dataset(self.hub_name, self.config, split=self.splits[split])
        except (OSError, ValueError) as err:        # out of reach (no network, no such id), no such split or config
            raise DataError(f"{where}: datasets cannot load it: {' '.join(str(err).split())}") from err
        if self.max_records is not None:
            ds = ds.select(range(min(self.max_records, len(ds))))
        return where, ds.to_list()


class Episodes(Source):
    """Records for an environment that writes each prompt itself (TRL's dataset-free mode: no `train_dataset`, the
    `environment_factory`'s `reset` returns the task): `num_train` training and `num_val` held-out records
    `{prompt: [{role: user, content: ""}], episode: i}`, numbered from 0 for training and on from `num_train` for
    validation, so no held-out episode is a trained one. For RL (data `prompts_only: true`) with `reward_fields:
    [episode]` and a tools environment whose `reset(episode)` returns the task's text, drawn from the episode number
    (`random.Random(episode)`): the text becomes the user message, the K responses to a record get the same task (as
    their group needs; different texts stop the run in one line), and a rerun gets the same tasks. A reset that
    returns None leaves the prompt empty and stops the run in one line. The training records set the run's length,
    `batch_size` of them per rollout, as TRL's `max_steps` does there.

    Args:
        num_train: training episodes.
        num_val: held-out episodes (the evaluation's prompts).
    """

    name = "episodes"

    def __init__(self, num_train: int = 1000, num_val: int = 100):
        for arg, value in (("num_train", num_train), ("num_val", num_val)):
            if value < 1:
                raise ValueError(f"Episodes: {arg}={value}; expected at least 1")
        self.num_train, self.num_val = num_train, num_val

    def load(self, split: str) -> tuple[str, list[dict]]:
        first, count = self.first_index(split), self.num_train if split == "train" else self.num_val
        return f"episodes ({split})", [{"prompt": [{"role": "user", "content": ""}], "episode": first + i}
                                       for i in range(count)]

    def first_index(self, split: str) -> int:
        return 0 if split == "train" else self.num_train


def read_file(path: str) -> list[dict]:
    """All rows of a .jsonl / .json / .parquet / .csv / .tsv file as dicts; unreadable files raise DataError naming
    the file (and, for .jsonl, .csv and .tsv, the record and line). .json and .parquet are read through `datasets`."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        return _read_jsonl(path)
    if ext in (".csv", ".tsv"):
        return _read_table(path, "," if ext == ".csv" else "\t")
    if ext not in (".json", ".parquet"):
        raise DataError(f"{path}: unsupported file type {ext!r}; expected .jsonl, .json, .parquet, .csv or .tsv")
    import datasets

    try:
        ds = datasets.load_dataset("json" if ext == ".json" else "parquet", data_files=path, split="train")
    except Exception as err:  # datasets raises many types; the user needs the file and the reason
        raise DataError(f"{path}: could not be read as {ext[1:]}: {type(err).__name__}: {err}") from err
    return ds.to_list()


def _read_jsonl(path: str) -> list[dict]:
    # Line by line so a broken line is reported with its record index (datasets would only name the file).
    rows = []
    with open(path, "rb") as handle:
        for i, raw in enumerate(handle):
            try:
                line = raw.decode("utf-8-sig" if i == 0 else "utf-8")   # a byte-order mark on the first line is fine
            except UnicodeDecodeError as err:
                raise DataError(f"{path}: record {len(rows)} (line {i + 1}): not valid UTF-8 at byte {err.start} of the "
                                f"line ({raw[max(0, err.start - 10): err.start + 10]!r})") from None
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: record {len(rows)} (line {i + 1}): not valid JSON: {err.msg}") from err
    return rows


def _read_table(path: str, delimiter: str) -> list[dict]:
    """The rows of a CSV / TSV file with a header line, every cell a string as written: a response '42' or 'NA'
    stays that text (pandas, under `datasets`' csv reader, would make them a number and a missing value), quoted cells
    may hold the delimiter and newlines. A row with more or fewer cells than the header raises DataError naming it."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter, strict=True)
            header, rows = reader.fieldnames or [], []
            for row in reader:
                if None in row or None in row.values():      # extra cells (under None) or missing ones (None)
                    cells = len(header) + len(row.get(None, [])) - sum(v is None for v in row.values())
                    raise DataError(f"{path}: record {len(rows)} (line {reader.line_num}): {cells} cells, the header "
                                    f"line has {len(header)} ({', '.join(header)})")
                rows.append(row)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 at byte {err.start} of the file") from None
    except csv.Error as err:
        raise DataError(f"{path}: not readable as {'CSV' if delimiter == ',' else 'TSV'}: {err}") from None
    return rows


def validate_records(rows: list, origin: str, fields: FieldMap, need: tuple[str, ...] = FIELDS,
                     skip_invalid: bool = False, first: int = 0, keep: tuple[str, ...] = (),
                     optional: tuple[str, ...] = (), empty_prompts: bool = False) -> list[tuple[int, dict]]:
    """Map rows to `(index in the file, {prompt, chosen, rejected})` (only `need`), raising or counting every bad
    record; `first` is the file index of `rows[0]`. `keep`: further fields every record must hold (any value but
    null), carried as they are in the record's `fields` dict (the reward's record fields, e.g. a reference answer);
    those also in `optional` may be missing or null, and are carried as None. `empty_prompts`: a prompt without
    text is no problem (a tools environment's `reset` writes it, `Episodes`)."""
    out, skipped = [], Counter()
    required = tuple(name for name in keep if name not in optional)
    for index, row in enumerate(rows, start=first):
        problem = _problem(row, fields, need, empty_prompts) or _missing(row, required)
        if problem is None:
            rec = {key: _value(row[getattr(fields, key)], key != "prompt") for key in need}
            if keep:
                rec["fields"] = {name: row.get(name) for name in keep}
            out.append((index, rec))
            continue
        field, reason = problem
        if not skip_invalid:
            raise DataError(f"{origin}: record {index}: field {field!r}: {reason} "
                            "(set data skip_invalid: true to drop such records with a count)")
        skipped[f"{field}: {reason}"] += 1
    if skipped:
        warn("%s: skipped %d of %d records: %s", origin, sum(skipped.values()), len(rows), dict(skipped))
    if need != ("prompt",):   # a prompt set may repeat prompts on purpose (one prompt, many rollouts)
        _warn_duplicates(out, origin)
    return out


def _warn_duplicates(records: list[tuple[int, dict]], origin: str) -> None:
    """Warn, with a count and the first example, about records identical to an earlier one (kept: repeating a
    record weights it, which may be meant)."""
    seen, repeats = {}, []
    for index, rec in records:
        key = json.dumps(rec, sort_keys=True, default=repr)
        if key in seen:
            repeats.append((index, seen[key]))
        else:
            seen[key] = index
    if repeats:
        index, first = repeats[0]
        warn("%s: %d of %d records repeat an earlier record (e.g. record %d = record %d); they are kept",
             origin, len(repeats), len(records), index, first)


def _problem(row, fields: FieldMap, need: tuple[str, ...], empty_prompts: bool = False) -> tuple[str, str] | None:
    if not isinstance(row, dict):
        return "<record>", f"expected an object, got {type(row).__name__}"
    if "_invalid" in row:  # set by a format adapter (datamodules.formats)
        return tuple(row["_invalid"])
    for key in need:
        name = getattr(fields, key)
        if name not in row:
            return name, (f"missing (the record has fields {sorted(row)}; name yours with data "
                          f"fields: {{prompt: ..., chosen: ..., rejected: ...}})")
        if row[name] is None:
            return name, "null; expected a string"
        blank_ok = empty_prompts and key == "prompt"
        if isinstance(row[name], list):             # TRL's conversational format
            problem = _conversation_problem(row[name], response=key != "prompt", blank_ok=blank_ok)
            if problem:
                return name, problem
            continue
        if not isinstance(row[name], str):
            what = "a string or a list of messages" if key == "prompt" else "a string or one assistant message"
            return name, f"expected {what}, got {type(row[name]).__name__}"
        if not row[name].strip() and not blank_ok:
            return name, "empty"
    if "chosen" in need and "rejected" in need and row[fields.chosen] == row[fields.rejected]:
        return fields.rejected, "identical to 'chosen'"
    return None


def _conversation_problem(messages: list, response: bool, blank_ok: bool = False) -> str | None:
    """What is wrong with a field in TRL's conversational format, or None: a prompt is a non-empty list of
    `{role, content}` messages with text content (the last's may be blank where `blank_ok`); a response (chosen,
    rejected) is one message of role assistant, or a multi-turn trace (`_is_trace`, `_trace_problem`)."""
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if response and roles != ["assistant"]:
        if len(roles) > 1 and _is_trace(roles):
            return _trace_problem(messages)
        return (f"a list of {len(messages)} items; expected a string, or one message {{role: assistant, content: ...}} "
                "(TRL's conversational format), or a multi-turn trace: assistant turns separated by tool results or "
                "by one user message, the last an assistant's")
    if not messages:
        return "an empty list of messages"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not message["role"]:
            return f"message {i}: expected {{role: <text>, content: <text>}}, got {message!r:.80}"
        if not isinstance(message.get("content"), str):
            return (f"message {i} ({message['role']}): content: expected text, got "
                    f"{type(message.get('content')).__name__} (text-only messages)")
    if not messages[-1]["content"].strip() and not blank_ok:
        return f"message {len(messages) - 1} ({messages[-1]['role']}): empty"
    return None


def _is_trace(roles: list) -> bool:
    """Roles of a multi-turn trace: assistant turns, the last an assistant's, each pair separated by one or more tool
    results or by one user message (what a rollout's tool calls or simulated user put between two turns).

    Example: [assistant, tool, tool, assistant, user, assistant] -> True; [assistant, user, user, assistant],
    [assistant, tool, user, assistant] -> False."""
    if not roles or roles[0] != "assistant" or roles[-1] != "assistant" or not set(roles) <= {"assistant", "tool", "user"}:
        return False
    gaps = "".join("a" if role == "assistant" else role[0] for role in roles).split("a")[1:-1]
    return all(gap == "u" or (gap and set(gap) == {"t"}) for gap in gaps)


def _trace_problem(messages: list[dict]) -> str | None:
    """What is wrong with a multi-turn trace (SFT on the turns of a rollout with tools or a simulated user,
    `datamodules.tools.encode_trace`), or None: an assistant turn has text content, or `tool_calls` (TRL's
    `[{"type": "function", "function": {"name": ..., "arguments": {...}}}]`) and content text or none; a tool result
    and a user message have text content."""
    for i, message in enumerate(messages):
        content, calls = message.get("content"), message.get("tool_calls")
        if message["role"] == "assistant" and calls is not None:
            if not isinstance(calls, list) or not calls or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict)
                    and isinstance(c["function"].get("name"), str) for c in calls):
                return (f'message {i} (assistant): tool_calls: expected [{{"type": "function", "function": {{"name": '
                        f'..., "arguments": {{...}}}}}}, ...], got {calls!r:.80}')
            if content is None:
                continue
        if not isinstance(content, str):
            return f"message {i} ({message['role']}): content: expected text, got {type(content).__name__}"
    if not (messages[-1].get("content") or "").strip():
        return f"message {len(messages) - 1} (assistant): empty (a trace ends with the assistant's answer)"
    return None


TURN_KEYS = ("thinking", "reasoning_content", "reasoning", "tool_calls")


def _value(value, response: bool):
    """A field's value as the stages use it: a response given as one assistant message becomes its text, unless it
    carries what a chat template writes beside the text (`TURN_KEYS`: gpt-oss's `thinking`, Qwen3's and GLM's
    `reasoning_content`, calls), which a text would drop: that one, and a multi-turn trace, stay lists of messages
    (`datamodules.tools.encode_trace` writes them through the template)."""
    if response and isinstance(value, list) and len(value) == 1 and not any(value[0].get(k) for k in TURN_KEYS):
        return value[0]["content"]
    return value


def _missing(row: dict, keep: tuple[str, ...]) -> tuple[str, str] | None:
    """The first of the reward's record fields (`PairDataModule reward_fields`) that `row` lacks or holds null."""
    for name in keep:
        if name not in row:
            return name, (f"missing; data reward_fields names it for the reward (the record has fields "
                          f"{sorted(row)})")
        if row[name] is None:
            return name, "null; the reward reads it (data reward_fields)"
    return None
