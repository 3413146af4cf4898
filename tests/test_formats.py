"""HH, TL;DR, GSM8K, MBPP and TRL's `messages` and implicit-prompt adapters on fixture files in exactly the hub
layouts, malformed records included."""
import json

import pytest

from datamodules.formats import GSM8K, MBPP, AnthropicHH, CarperTLDR, ImplicitPrompt, Messages, SummarizeFromFeedback
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

GSM = [  # openai/gsm8k, config main: its first training record, and one with a thousands comma
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
               "in April and May.\n#### 72"},
    {"question": "A shop sells 250 pens a day. How many in 8 days?", "answer": "250 * 8 = <<250*8=2000>>2000\n#### 2,000"},
]

MBPP_FULL = [  # google-research-datasets/mbpp, config full (Windows line ends in `code`, as the dataset has them)
    {"task_id": 11, "text": "Write a python function to remove first and last occurrence of a given character from "
                            "the string.",
     "code": "def remove_Occ(s,ch): \r\n    for i in range(len(s)): \r\n        if (s[i] == ch): \r\n"
             "            s = s[0 : i] + s[i + 1:] \r\n            break\r\n    for i in range(len(s) - 1,-1,-1):  "
             "\r\n        if (s[i] == ch): \r\n            s = s[0 : i] + s[i + 1:] \r\n            break\r\n"
             "    return s ",
     "test_list": ['assert remove_Occ("hello","l") == "heo"', 'assert remove_Occ("abcda","a") == "bcd"',
                   'assert remove_Occ("PHP","P") == "H"'],
     "test_setup_code": "", "challenge_test_list": []},
]
MBPP_SANITIZED = [  # config sanitized: `prompt` for the task, `test_imports` for the set-up
    {"source_file": "x.py", "task_id": 2, "prompt": "Write a function to find the shared elements from the given "
                                                    "two lists.",
     "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
     "test_imports": ["import math"],
     "test_list": ["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
                   "assert math.isclose(len(similar_elements((1, 2), (2, 3))), 1)"]},
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


def test_gsm8k_gives_the_solution_as_chosen_and_the_final_number_as_the_answer(tmp_path, task_tokenizer_path):
    """Docstring example: calculator annotations dropped, the instruction appended, "#### 72" -> answer "72"; the
    records carry it with `reward_fields: [answer]`, and SFT reads them with `chosen_only: true`."""
    records = load(GSM8K, tmp_path, GSM, task_tokenizer_path, chosen_only=True, reward_fields=["answer"])
    assert records[0] == {
        "prompt": GSM[0]["question"] + "\n\nSolve it step by step; end with #### and the final number.",
        "chosen": "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May."
                  "\n#### 72",
        "fields": {"answer": "72"}}
    assert records[1]["fields"] == {"answer": "2000"} and "<<" not in records[1]["chosen"]
    from modules.verifiable import AnswerMatch

    assert AnswerMatch()(["q"], [records[0]["chosen"]], answer=["72"]) == [1.0]   # its own solution is right


def test_gsm8k_malformed_records(tmp_path, task_tokenizer_path):
    with pytest.raises(DataError, match=r"record 2: field 'answer': missing, not a string, or without '#### <final "):
        load(GSM8K, tmp_path, GSM + [{"question": "q", "answer": "no final line"}], task_tokenizer_path,
             chosen_only=True)
    with pytest.raises(DataError, match=r"record 2: field 'question': missing, empty or not a string"):
        load(GSM8K, tmp_path, GSM + [{"answer": "#### 1"}], task_tokenizer_path, chosen_only=True)


def test_mbpp_gives_the_code_as_chosen_and_the_asserts_as_tests(tmp_path, task_tokenizer_path):
    """Docstring example's shape, both configurations: one assert shown in the prompt, the code fenced (Windows line
    ends made Unix), every assert a test (sanitized: after its imports); the reference code passes its own tests."""
    from modules.verifiable import PythonTests

    records = load(MBPP, tmp_path, MBPP_FULL + MBPP_SANITIZED, task_tokenizer_path, chosen_only=True,
                   reward_fields=["tests"])
    first = records[0]
    assert first["prompt"] == (MBPP_FULL[0]["text"] + "\nYour code should pass this test:\n"
                               + MBPP_FULL[0]["test_list"][0] + "\n\nWrite the Python code in a ```python block.")
    assert first["chosen"].startswith("```python\ndef remove_Occ(s,ch): \n") and "\r" not in first["chosen"]
    assert first["fields"] == {"tests": MBPP_FULL[0]["test_list"]}
    assert records[1]["fields"]["tests"][1].startswith("import math\nassert math.isclose")
    assert PythonTests()(["q", "q"], [r["chosen"] for r in records], tests=[r["fields"]["tests"] for r in records]) == \
        [1.0, 1.0]
    all_shown = MBPP(LocalFiles(write(tmp_path, MBPP_FULL)), shown_tests=3, instruction="").load("train")[1][0]
    assert all_shown["prompt"].endswith("these tests:\n" + "\n".join(MBPP_FULL[0]["test_list"]))


def test_mbpp_malformed_records(tmp_path, task_tokenizer_path):
    bad = {**MBPP_FULL[0], "test_list": []}
    with pytest.raises(DataError, match=r"record 1: field 'test_list': expected a non-empty list of asserts"):
        load(MBPP, tmp_path, MBPP_FULL + [bad], task_tokenizer_path, chosen_only=True)
    with pytest.raises(DataError, match=r"record 1: field 'code': missing, empty or not a string"):
        load(MBPP, tmp_path, MBPP_FULL + [{**MBPP_FULL[0], "code": None}], task_tokenizer_path, chosen_only=True)
    with pytest.raises(ValueError, match=r"MBPP: shown_tests=-1; expected 0 or more"):
        MBPP(LocalFiles(write(tmp_path, MBPP_FULL)), shown_tests=-1)


CHAT = [  # TRL's conversational language-modelling layout (UltraChat's): one list of messages per record
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2 + 2?"},
                  {"role": "assistant", "content": "4"}], "id": 7},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
]


def test_messages_splits_each_conversation_at_its_first_assistant_turn():
    """The prompt is what comes before the first assistant turn, `chosen` the rest (a trace of several turns, or
    one message, read as its text downstream); the record's other fields are kept."""
    records = Messages(None).convert
    assert records(CHAT[0]) == {"id": 7, "prompt": CHAT[0]["messages"][:2], "chosen": CHAT[0]["messages"][2:]}
    assert records(CHAT[1]) == {"prompt": CHAT[1]["messages"][:1], "chosen": CHAT[1]["messages"][1:]}
    assert Messages(None, field="conversation").convert(
        {"conversation": CHAT[1]["messages"]})["chosen"] == [{"role": "assistant", "content": "Hello!"}]


@pytest.mark.parametrize("messages, reason", [
    (None, r"missing, empty, or not a list of \{role, content\} messages"),
    ([{"role": "user", "content": "Hi"}], r"no assistant message \(nothing to train on\)"),
    ([{"role": "assistant", "content": "Hello!"}], r"starts with an assistant message; expected the user's turn"),
    (CHAT[1]["messages"] + [{"role": "user", "content": "Bye"}],
     r"the response \(messages 1 on\): a list of 2 items; expected .* a multi-turn trace: assistant turns separated "
     r"by tool results or by one user message, the last an assistant's \(set data skip_invalid"),
    (CHAT[1]["messages"] + [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                            {"role": "assistant", "content": "c"}], r"the response \(messages 1 on\): a list of 4 items"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}],
     r"the prompt \(messages 0 on\): message 0 \(user\): content: expected text, got int"),
])
def test_messages_malformed_records(tmp_path, task_tokenizer_path, messages, reason):
    with pytest.raises(DataError, match=rf"record 2: field 'messages': {reason}"):
        load(Messages, tmp_path, CHAT + [{"messages": messages}], task_tokenizer_path, chosen_only=True)


SKY = {"role": "user", "content": "What color is the sky?"}
ULTRAFEEDBACK = [  # trl-lib/ultrafeedback_binarized's layout: whole conversations, the prompt implicit in both
    {"chosen": [SKY, {"role": "assistant", "content": "It is blue."}],
     "rejected": [SKY, {"role": "assistant", "content": "It is green."}], "score_chosen": 8.0, "score_rejected": 2.0},
    {"chosen": [{"role": "system", "content": "Be brief."}, SKY, {"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "system", "content": "Be brief."}, SKY, {"role": "assistant", "content": "Green."}]},
]


def test_implicit_prompt_is_the_messages_chosen_and_rejected_share(tmp_path, task_tokenizer_path):
    """TRL's `extract_prompt` docstring example (record 0), a system turn in the shared part (record 1); the other
    fields kept; a record with its own prompt of the same kind as its responses kept as it is, a text prompt beside
    conversations replaced (TRL's `maybe_extract_prompt`)."""
    records = load(ImplicitPrompt, tmp_path, ULTRAFEEDBACK, task_tokenizer_path)
    assert records[0] == {"prompt": [SKY], "chosen": "It is blue.", "rejected": "It is green."}
    assert records[1]["prompt"] == ULTRAFEEDBACK[1]["chosen"][:2] and records[1]["chosen"] == "Blue."
    converted = ImplicitPrompt(None).convert(ULTRAFEEDBACK[0])
    assert converted["score_chosen"] == 8.0 and converted["chosen"] == [{"role": "assistant", "content": "It is blue."}]
    given = {"prompt": "q", "chosen": "a", "rejected": "b"}
    assert ImplicitPrompt(None).convert(given) is given
    h4 = {"prompt": SKY["content"], **ULTRAFEEDBACK[0]}    # HuggingFaceH4's layout: a text prompt beside conversations
    assert ImplicitPrompt(None).convert(h4)["prompt"] == [SKY]


@pytest.mark.parametrize("row, reason", [
    ({"chosen": "It is blue.", "rejected": "It is green."}, r"field 'chosen': expected a conversation, a list of "
                                                            r"\{role, content\} messages \(TRL's implicit prompt\)"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
      "rejected": ULTRAFEEDBACK[0]["rejected"]}, r"field 'chosen': shares no first message with 'rejected'"),
    ({"chosen": [SKY], "rejected": [SKY, {"role": "assistant", "content": "Green."}]},
     r"field 'chosen': ends where the other one's shared messages end: no response after the prompt"),
    ({"chosen": [SKY, {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
      "rejected": [SKY, {"role": "assistant", "content": "c"}]}, r"field 'chosen': a list of 2 items; expected"),
])
def test_implicit_prompt_malformed_records(tmp_path, task_tokenizer_path, row, reason):
    with pytest.raises(DataError, match=rf"record 2: {reason}"):
        load(ImplicitPrompt, tmp_path, ULTRAFEEDBACK + [row], task_tokenizer_path)
