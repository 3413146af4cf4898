"""PairDataModule: the shared tokenization path and every bad-input case."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from datamodules.pairs import PairDataModule
from datamodules.sources import DataError, FieldMap, LocalFiles
from datamodules.task import ChatReviewTask, GoldReward, ReviewTask, gold_reward
from tests.helpers import child_env
from train import cli_main

GOOD = {"prompt": "write a review of the cafe :", "chosen": "the food was great .", "rejected": "the food was bad ."}


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def module(path, tokenizer_path, **kw):
    dm = PairDataModule(LocalFiles(str(path), val=str(path)), tokenizer=tokenizer_path, **kw)
    dm.setup()
    return dm


@pytest.mark.parametrize("record, field, reason", [
    ({"chosen": "a", "rejected": "b"}, "prompt", "missing"),
    ({**GOOD, "chosen": 3}, "chosen", "expected a string or one assistant message, got int"),
    ({**GOOD, "prompt": "  "}, "prompt", "empty"),
    ({**GOOD, "rejected": ""}, "rejected", "empty"),
    ({**GOOD, "rejected": GOOD["chosen"]}, "rejected", "identical to 'chosen'"),
    ({**GOOD, "chosen": None}, "chosen", "null; expected a string"),
])
def test_bad_record_error_names_file_record_and_field(tmp_path, task_tokenizer_path, record, field, reason):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, GOOD, record])
    with pytest.raises(DataError) as err:
        module(path, task_tokenizer_path)
    message = str(err.value)
    assert path in message and "record 2" in message and f"field {field!r}" in message and reason in message


def test_skip_invalid_drops_with_a_logged_count(tmp_path, task_tokenizer_path, caplog):
    rows = [GOOD, {**GOOD, "chosen": ""}, GOOD, {"prompt": "x"}, {**GOOD, "rejected": GOOD["chosen"]}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        dm = module(path, task_tokenizer_path, skip_invalid=True)
    assert len(dm.splits["train"]) == 2
    assert "skipped 3 of 5 records" in caplog.text


def test_prompt_leaving_no_room_for_a_response(tmp_path, task_tokenizer_path):
    long_prompt = " ".join(["the food was great"] * 10)
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, {**GOOD, "prompt": long_prompt}])
    with pytest.raises(DataError, match=r"record 1: field 'prompt': 40 tokens leave no room"):
        module(path, task_tokenizer_path, max_prompt_length=16, max_length=48)


def test_unreadable_files(tmp_path, task_tokenizer_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl: record 1 \(line 2\): not valid JSON"):
        module(bad_json, task_tokenizer_path)
    with pytest.raises(DataError, match="file not found"):
        module(tmp_path / "missing.jsonl", task_tokenizer_path)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not a parquet file")
    with pytest.raises(DataError, match="broken.parquet: could not be read as parquet"):
        module(broken, task_tokenizer_path)
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        module(tmp_path / "x.txt", task_tokenizer_path) if (tmp_path / "x.txt").write_text("a") else None


def test_json_parquet_csv_and_field_names(tmp_path, task_tokenizer_path):
    import datasets

    rows = [{"q": GOOD["prompt"], "good": GOOD["chosen"], "bad": GOOD["rejected"]}] * 3
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    (tmp_path / "p.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "p.csv"), index=False)
    for name in ("p.parquet", "p.json", "p.csv"):
        dm = module(tmp_path / name, task_tokenizer_path, fields=FieldMap(prompt="q", chosen="good", rejected="bad"))
        assert len(dm.splits["train"]) == 3


def test_collation_masks_and_boundaries(tmp_path, tokenizer, task_tokenizer_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, {**GOOD, "prompt": "write a review :"}])
    dm = module(path, task_tokenizer_path, batch_size=2)
    batch = next(iter(dm.val_dataloader()))
    p0 = tokenizer(GOOD["prompt"])["input_ids"]
    r0 = tokenizer(GOOD["chosen"])["input_ids"] + [tokenizer.eos_token_id]
    seq = batch.chosen
    assert seq.input_ids[0, : len(p0) + len(r0)].tolist() == p0 + r0
    assert seq.loss_mask[0].tolist()[: len(p0) + len(r0)] == [0] * len(p0) + [1] * len(r0)
    p1 = tokenizer("write a review :")["input_ids"]                                  # 3 tokens shorter
    assert seq.attention_mask.sum(-1).tolist() == [len(p0) + len(r0), len(p1) + len(r0)]
    assert seq.input_ids[1, : len(p1) + len(r0)].tolist() == p1 + r0
    assert batch.prompt_mask[1].tolist() == [0, 0, 0] + [1] * len(p1)              # left-padded prompts
    assert batch.prompt_ids[1].tolist() == [tokenizer.pad_token_id] * 3 + p1


def test_long_responses_are_cut_to_max_length(tmp_path, task_tokenizer_path, caplog):
    long = {**GOOD, "chosen": " ".join(["the food was great and"] * 20)}
    path = write_jsonl(tmp_path / "pairs.jsonl", [long])
    with caplog.at_level(logging.WARNING):
        dm = module(path, task_tokenizer_path, max_length=24)
    assert len(dm.splits["train"][0]["prompt_ids"]) + len(dm.splits["train"][0]["chosen_ids"]) == 24
    assert "1 of 2 responses cut to max_length=24" in caplog.text


def test_prompts_only_records(tmp_path, task_tokenizer_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": GOOD["prompt"]}] * 2)
    dm = module(path, task_tokenizer_path, prompts_only=True)
    batch = next(iter(dm.train_dataloader()))
    assert batch.chosen is None and batch.prompts == [GOOD["prompt"]] * 2


def test_an_rl_datamodule_reads_the_task_prompts_without_labelling_them(tmp_path, task_tokenizer_path, monkeypatch):
    """Prompts only (RL): the embedded task's prompts, in the order of its labelled records, and no gold reward
    computed for responses nobody reads (0.8 s of CPU for the quickstart's 3200 records, here)."""
    task = ReviewTask(num_train=40, num_val=10, seed=5, cache_dir=str(tmp_path))
    labelled = {split: [r["prompt"] for r in task.records(split)] for split in ("train", "val")}
    monkeypatch.setattr("datamodules.task.gold_reward", lambda *a, **k: pytest.fail("a response was labelled"))
    dm = PairDataModule(task, tokenizer=task_tokenizer_path, prompts_only=True)
    dm.setup("fit")
    assert {split: [e["prompt"] for e in dm.splits[split]] for split in ("train", "val")} == labelled
    with pytest.raises(pytest.fail.Exception, match="labelled"):
        PairDataModule(task, tokenizer=task_tokenizer_path).setup("fit")     # pairs: labelled as before


def test_task_is_deterministic_noisy_and_inside_the_range(tmp_path):
    task = ReviewTask(num_train=400, num_val=50, seed=3, cache_dir=str(tmp_path))
    again = ReviewTask(num_train=400, num_val=50, seed=3, cache_dir=str(tmp_path))
    train = task.records("train")
    assert train == again.records("train")
    assert {r["prompt"] for r in task.records("val")}  # val split exists
    agree = sum(gold_reward("", r["chosen"]) > gold_reward("", r["rejected"]) for r in train) / len(train)
    assert 0.7 < agree < 0.98          # labels follow the gold reward, with Bradley-Terry noise
    chosen = sum(gold_reward("", r["chosen"]) for r in train) / len(train)
    assert -0.5 < chosen < 0.5         # SFT demonstrations sit well inside [-1, 1]
    assert all(r["chosen"] != r["rejected"] for r in train)
    # the first records alone (the tokenizer's corpus) are the same records
    assert task.records("train", limit=30) == train[:30] and task.records("val", limit=10**6) == task.records("val")


def test_gold_reward_penalises_repetition():
    assert gold_reward("", "the food was great .") > gold_reward("", "great great great great great")
    assert gold_reward("", "the food was great .") > 0 > gold_reward("", "the food was awful .")


def test_gold_reward_brevity_term_on_literal_text():
    short = "The food was great."                                    # 4 words
    sentiment = gold_reward("", short)
    assert gold_reward("", short, max_words=4) == sentiment           # within the limit: no penalty
    assert gold_reward("", short, max_words=2, length_weight=0.1) == pytest.approx(sentiment - 0.2)
    assert gold_reward("", short, max_words=0, length_weight=1.0) == pytest.approx(sentiment - 1.0)  # capped at 1
    assert gold_reward("", "Great food, great.") < gold_reward("", "Great food, lovely.")  # case/punct-blind repeats
    assert GoldReward(max_words=2, length_weight=0.1)(["p"], [short]) == [pytest.approx(sentiment - 0.2)]


def test_chat_task_is_english_sentences_and_needs_a_model_tokenizer(tmp_path):
    task = ChatReviewTask(num_train=20, num_val=5, seed=0, cache_dir=str(tmp_path))
    for record in task.records("train"):
        assert record["prompt"][0].isupper() and record["prompt"].endswith((".", "?"))
        assert record["chosen"][0].isupper() and record["chosen"].endswith(".") and " ," not in record["chosen"]
    with pytest.raises(ValueError, match="ships no tokenizer"):
        PairDataModule(task)


def test_datamodules_do_not_import_the_modules_package_at_import_time():
    """One-way flow: modules/ imports datamodules/ (PairBatch, collation), never the reverse at module level (the
    tokenizer loader, `modules.backbone.load_tokenizer`, is imported lazily where the datamodule needs it)."""
    import ast

    for path in Path("datamodules").glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "modules" or n.startswith("modules.") for n in names), f"{path}: imports {names}"


def test_an_empty_validation_split_is_named_as_the_cause(tmp_path, task_tokenizer_path):
    """Before: a 1-record file said 'no usable records'."""
    path = write_jsonl(tmp_path / "one.jsonl", [GOOD])
    dm = PairDataModule(LocalFiles(path), tokenizer=task_tokenizer_path)
    with pytest.raises(DataError, match=r"one.jsonl: the val split is empty \(val_fraction=0.05 of the file's records "
                                        r"holds none out\); add records or give a validation file"):
        dm.setup()


def test_duplicate_records_are_counted_in_a_warning_said_by_the_first_process_alone(tmp_path, task_tokenizer_path,
                                                                                     caplog, monkeypatch):
    """Before: 200 identical records passed without a word. They are kept (repeating a record may be meant). Every
    process of a multi-process run reads the same data: only the first says so (before: each did)."""
    from lightning.pytorch.utilities import rank_zero_only

    path = write_jsonl(tmp_path / "same.jsonl", [GOOD] * 200)
    with caplog.at_level(logging.WARNING):
        dm = module(path, task_tokenizer_path)
    assert "same.jsonl: 199 of 200 records repeat an earlier record (e.g. record 1 = record 0); they are kept" \
        in caplog.text
    assert len(dm.splits["train"]) == 200
    caplog.clear()
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    with caplog.at_level(logging.WARNING):
        assert len(module(path, task_tokenizer_path).splits["train"]) == 200
    assert "repeat an earlier record" not in caplog.text


def test_a_jsonl_file_with_a_byte_order_mark_is_read(tmp_path, task_tokenizer_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\n").encode() * 2)
    assert module(path, task_tokenizer_path).splits["train"][0]["prompt"] == GOOD["prompt"]


@pytest.mark.slow
def test_a_data_error_is_one_line_without_a_traceback(tmp_path, task_tokenizer_path):
    """Before: every data error printed a 31-60-line traceback before its clear last line."""

    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, {**GOOD, "chosen": None}])
    proc = subprocess.run([sys.executable, "train.py", "fit", "--config", "configs/quickstart/sft.yaml",
                           "--data.init_args.source=datamodules.sources.LocalFiles",
                           f"--data.init_args.source.init_args.train={path}",
                           f"--data.init_args.source.init_args.val={path}", f"--data.init_args.tokenizer={task_tokenizer_path}",
                           f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.callbacks=[]"],
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {path}: record 1: field 'chosen': null; expected a string " \
                                                   "(set data skip_invalid: true to drop such records with a count)"


def test_dotted_overrides_reach_the_source_arguments():
    cli = cli_main(["--config", "configs/quickstart/sft.yaml", "--data.init_args.source.init_args.num_train=100"],
                   run=False)
    assert cli.datamodule.source.num_train == 100


def test_invalid_utf8_and_wrong_field_names_name_the_file_and_line(tmp_path):
    from datamodules.sources import DataError, FieldMap, read_file, validate_records

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b\xff", "rejected": "c"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: record 1 \(line 2\): not valid UTF-8"):
        read_file(str(bad))
    cols = tmp_path / "cols.jsonl"
    cols.write_text('{"question": "a", "good": "b", "bad": "c"}\n')
    with pytest.raises(DataError, match=r"record 0: field 'prompt': missing \(the record has fields \['bad', 'good', "
                                        r"'question'\]; name yours with data fields"):
        validate_records(read_file(str(cols)), str(cols), FieldMap())


def test_a_bad_record_in_the_validation_tail_is_named_by_its_index_in_the_file(tmp_path, task_tokenizer_path, caplog):
    """10 records, val_fraction 0.2: records 0-7 train, 8-9 validation. The bad record is the file's record 9
    (split-relative it would be 1); with skip_invalid, a too-long prompt after a dropped record keeps its file index."""
    from datamodules.pairs import PairDataModule
    from datamodules.sources import DataError, LocalFiles

    rows = [{"prompt": "the film was", "chosen": "good", "rejected": "bad"} for _ in range(10)]
    rows[9] = {"prompt": "the film was", "chosen": "good"}
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dm = PairDataModule(LocalFiles(str(path), val_fraction=0.2), tokenizer=task_tokenizer_path)
    with pytest.raises(DataError, match=r"data.jsonl: record 9: field 'rejected': missing"):
        dm.setup()
    rows[1] = {"prompt": "x", "chosen": "same", "rejected": "same"}
    rows[3] = {"prompt": "word " * 40, "chosen": "good", "rejected": "bad"}
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dm = PairDataModule(LocalFiles(str(path), val_fraction=0.2), tokenizer=task_tokenizer_path, skip_invalid=True)
    dm.setup()
    assert len(dm.splits["train"]) == 6 and len(dm.splits["val"]) == 1
    assert "record 3: field 'prompt'" in caplog.text


def test_a_hub_dataset_out_of_reach_is_one_data_error(monkeypatch):
    """`datasets` raises ConnectionError (an OSError) after its retries without network, ValueError for a split
    the dataset lacks: one DataError naming the dataset and split (before: datasets' traceback)."""
    import datasets

    from datamodules.sources import DataError, HubDataset

    def unreachable(name, config=None, split=None):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub\n(LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match=r"^Anthropic/hh-rlhf\[test\]: datasets cannot load it: Couldn't reach "
                                        r"'Anthropic/hh-rlhf' on the Hub \(LocalEntryNotFoundError\)$"):
        HubDataset("Anthropic/hh-rlhf").load("val")


def test_csv_and_tsv_cells_are_read_as_written_and_a_ragged_row_is_named(tmp_path):
    """Quoted cells keep their commas and newlines; '42', 'NA' and '' stay strings (pandas would read a number, a
    missing value and NaN); a byte-order mark is dropped. A row with a cell too many or too few stops with the
    record, its line and the header."""
    from datamodules.sources import DataError, FieldMap, read_file, validate_records

    table = tmp_path / "pairs.csv"
    table.write_text('\ufeffprompt,chosen,rejected\n"a, b",42,NA\nq,"two\nlines",\n', encoding="utf-8")
    rows = read_file(str(table))
    assert rows == [{"prompt": "a, b", "chosen": "42", "rejected": "NA"},
                    {"prompt": "q", "chosen": "two\nlines", "rejected": ""}]
    assert validate_records(rows[:1], str(table), FieldMap()) == [(0, rows[0])]
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("question\tgood\tbad\nx, y\tyes\tno\n")
    assert read_file(str(tsv)) == [{"question": "x, y", "good": "yes", "bad": "no"}]
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("prompt,chosen,rejected\na,b,c\nd,e\nf,g,h,i\n")
    with pytest.raises(DataError, match=r"ragged.csv: record 1 \(line 3\): 2 cells, the header line has 3 "
                                        r"\(prompt, chosen, rejected\)"):
        read_file(str(ragged))
    ragged.write_text("prompt,chosen,rejected\na,b,c,d\n")
    with pytest.raises(DataError, match=r"record 0 \(line 2\): 4 cells, the header line has 3"):
        read_file(str(ragged))
    with pytest.raises(DataError, match=r"unsupported file type '.txt'; expected .jsonl, .json, .parquet, .csv or .tsv"):
        (tmp_path / "pairs.txt").write_text("x")
        read_file(str(tmp_path / "pairs.txt"))
