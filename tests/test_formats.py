"""HH and TL;DR adapters on fixture files in exactly the hub layouts, malformed records included."""
import json

import pytest

from datamodules.formats import AnthropicHH, CarperTLDR, SummarizeFromFeedback
from datamodules.pairs import PairDataModule
from datamodules.sources import DataError, LocalFiles

HH = [
    {"chosen": "\n\nHuman: What is a good name for a cat?\n\nAssistant: Whiskers is a classic.",
     "rejected": "\n\nHuman: What is a good name for a cat?\n\nAssistant: I don't know."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Great, thanks.",
     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Go away."},
]
TLDR_OPENAI = [
    {"info": {"id": "t3_1", "post": "I lost my keys again today.", "title": "Keys", "subreddit": "tifu",
              "site": None, "article": None},
     "summaries": [{"text": " Lost keys.", "policy": "sup2", "note": None},
                   {"text": " I went outside.", "policy": "ref", "note": None}],
     "choice": 0, "worker": "w1", "batch": "batch3", "split": "train", "extra": {"confidence": 8}},
    {"info": {"id": "t3_2", "post": "My dog ate the couch.", "title": "Dog", "subreddit": "dogs"},
     "summaries": [{"text": "Cats are nice."}, {"text": "Dog ate couch."}], "choice": 1,
     "worker": "w2", "batch": "batch3", "split": "train", "extra": {}},
]
CARPER = [
    {"prompt": "SUBREDDIT: r/tifu\nTITLE: Keys\nPOST: I lost my keys again today.",
     "chosen": "TL;DR: Lost keys.", "rejected": "TL;DR: I went outside."},
]


def write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def load(adapter, tmp_path, rows, tokenizer_path, **kw):
    path = write(tmp_path, rows)
    dm = PairDataModule(adapter(LocalFiles(path, val=path)), tokenizer=tokenizer_path, max_length=512,
                        max_prompt_length=256, **kw)
    return dm.records("train")[1]


def test_hh_prompt_is_the_shared_prefix_up_to_the_last_assistant_turn(tmp_path, task_tokenizer_path):
    records = load(AnthropicHH, tmp_path, HH, task_tokenizer_path)
    assert records[0] == {"prompt": "\n\nHuman: What is a good name for a cat?\n\nAssistant:",
                          "chosen": "Whiskers is a classic.", "rejected": "I don't know."}
    assert records[1]["prompt"].endswith("How are you?\n\nAssistant:") and records[1]["chosen"] == "Great, thanks."


def test_hh_malformed_records(tmp_path, task_tokenizer_path):
    with pytest.raises(DataError, match=r"record 2: field 'chosen': no '\\n\\nAssistant:' turn"):
        load(AnthropicHH, tmp_path, HH + [{"chosen": "no turns here", "rejected": "x"}], task_tokenizer_path)
    with pytest.raises(DataError, match=r"record 2: field 'rejected': missing"):
        load(AnthropicHH, tmp_path, HH + [{"chosen": HH[0]["chosen"]}], task_tokenizer_path)
    bad = HH + [{"chosen": "x", "rejected": None}, {"chosen": HH[0]["chosen"], "rejected": HH[0]["chosen"]}]
    assert len(load(AnthropicHH, tmp_path, bad, task_tokenizer_path, skip_invalid=True)) == 2


def test_summarize_from_feedback_comparisons(tmp_path, task_tokenizer_path):
    records = load(SummarizeFromFeedback, tmp_path, TLDR_OPENAI, task_tokenizer_path)
    assert records[0] == {"prompt": "SUBREDDIT: r/tifu\nTITLE: Keys\nPOST: I lost my keys again today.\nTL;DR:",
                          "chosen": "Lost keys.", "rejected": "I went outside."}
    assert records[1]["chosen"] == "Dog ate couch." and records[1]["rejected"] == "Cats are nice."
    broken = TLDR_OPENAI + [{**TLDR_OPENAI[0], "choice": 2}]
    with pytest.raises(DataError, match=r"record 2: field 'choice': expected 0 or 1, got 2"):
        load(SummarizeFromFeedback, tmp_path, broken, task_tokenizer_path)
    broken = TLDR_OPENAI + [{**TLDR_OPENAI[0], "summaries": [{"text": "only one"}]}]
    with pytest.raises(DataError, match=r"record 2: field 'summaries'"):
        load(SummarizeFromFeedback, tmp_path, broken, task_tokenizer_path)
    broken = TLDR_OPENAI + [{**TLDR_OPENAI[0], "info": {"title": "no post"}}]
    with pytest.raises(DataError, match=r"record 2: field 'info.post'"):
        load(SummarizeFromFeedback, tmp_path, broken, task_tokenizer_path)


def test_carper_layout_moves_the_tldr_cue_into_the_prompt(tmp_path, task_tokenizer_path):
    records = load(CarperTLDR, tmp_path, CARPER, task_tokenizer_path)
    assert records[0] == {"prompt": CARPER[0]["prompt"] + "\nTL;DR:", "chosen": "Lost keys.",
                          "rejected": "I went outside."}
    with pytest.raises(DataError, match=r"record 1: field 'rejected': missing"):
        load(CarperTLDR, tmp_path, CARPER + [{"prompt": "p", "chosen": "TL;DR: a"}], task_tokenizer_path)
