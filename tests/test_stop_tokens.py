"""A response ends at any of the model's stop tokens (`datamodules.collate.stop_ids`), and training data end a turn
with the token the chat template ends one with (`turn_end_id`). Gemma's `<end_of_turn>` and Phi-3's `<|end|>` are
not their tokenizer's EOS: before, a Gemma turn ran past its end, SFT taught `<eos>` instead, and a simulated user's
message was appended without the newline the template writes. `tests/templates/gemma3.jinja` is Gemma 3's own
template and `tests/templates/phi3_5.jinja` Phi-3.5's, as their checkpoints ship them; the tokenizer is SmolLM2's with
their turn tokens and EOS added."""
import json

import pytest
import torch

from datamodules.collate import encode_prompt, encode_response, pad, stop_ids, turn_end_id
from datamodules.tools import Tools, encode_trace, user_suffix
from modules import functional as F
from modules.sampling import SamplingConfig, generate_with_tools, sample
from tests.helpers import with_template
from tests.test_tools import hermes, scripted  # noqa: F401  (fixtures)

GEMMA3 = open("tests/templates/gemma3.jinja").read()


@pytest.fixture(scope="module")
def gemma(hermes):  # noqa: F811
    """SmolLM2's tokenizer with Gemma 3's template, turn tokens, `<bos>` and EOS `<eos>`."""
    tokenizer = with_template(hermes, GEMMA3)
    tokenizer.add_special_tokens({"eos_token": "<eos>", "bos_token": "<bos>",
                                  "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    return tokenizer


def test_the_end_of_a_turn_is_the_token_the_template_writes_and_every_stop_token_ends_a_response(gemma, hermes):  # noqa: F811
    """The docstrings' examples: Gemma's turn ends with `<end_of_turn>`, not its EOS, and its stop tokens are both
    (with its generation config's, each once); SmolLM2's ChatML turn ends with its EOS. A tokenizer without a chat
    template ends a response with EOS. `response_mask` cuts after the first of several stop ids."""
    end, eos = gemma.convert_tokens_to_ids("<end_of_turn>"), gemma.convert_tokens_to_ids("<eos>")
    assert turn_end_id(gemma) == end != gemma.eos_token_id == eos and stop_ids(gemma) == [end, eos]
    assert turn_end_id(hermes) == hermes.eos_token_id and stop_ids(hermes) == [hermes.eos_token_id]
    plain = with_template(hermes, None)
    assert turn_end_id(plain) == hermes.eos_token_id
    gemma.generation_eos_ids = [eos, end, 7]
    try:
        assert stop_ids(gemma) == [end, eos, 7]
    finally:
        del gemma.generation_eos_ids
    ids = torch.tensor([[5, 2, 7], [5, 9, 7]])
    assert F.response_mask(ids, [2, 9]).tolist() == [[1, 1, 0], [1, 1, 0]]
    assert F.response_mask(ids, 2).tolist() == [[1, 1, 0], [1, 1, 1]]
    assert F.has_eos(ids, [2, 9]).tolist() == [True, True] and F.has_eos(ids, 2).tolist() == [True, False]


def test_sampling_stops_at_the_end_of_a_gemma_turn(gemma, tiny_spec):
    """A tiny model made to write "a" then `<end_of_turn>` then "b" for ever: the response is "a" + `<end_of_turn>`,
    it has its EOS, and the rest is padding outside the mask (with the tokenizer's EOS alone it ran on to
    max_new_tokens, and counted as cut off)."""
    from modules.backbone import build_causal_lm

    model = build_causal_lm(tiny_spec, gemma)
    end, a, b = turn_end_id(gemma), gemma.convert_tokens_to_ids("a"), gemma.convert_tokens_to_ids("b")
    steps = []

    def force(module, inputs, logits):
        token = a if not steps else end if len(steps) == 1 else b
        steps.append(token)
        return logits + 1e4 * torch.nn.functional.one_hot(torch.tensor(token), logits.shape[-1]).to(logits.dtype)

    model.lm_head.register_forward_hook(force)
    ids, mask = pad([encode_prompt(gemma, "Say a.")], gemma.pad_token_id, "left")
    roll = sample(model, gemma, ids, mask, ["Say a."], SamplingConfig(max_new_tokens=8, do_sample=False))
    assert roll.response_mask[0].tolist()[:2] == [1, 1] and roll.response_mask[0, 2:].sum() == 0
    assert roll.input_ids[0, roll.prompt_length:roll.prompt_length + 2].tolist() == [a, end]
    assert roll.has_eos.tolist() == [True] and roll.responses == ["a"] and len(steps) == 2


def test_gemma_training_data_and_a_simulated_users_turns_are_laid_out_as_its_template_writes_them(gemma):
    """An SFT response ends with `<end_of_turn>`; a conversation with a simulated user, laid out as a rollout lays it
    out (the policy's turns, each ended by `<end_of_turn>`, and the user's message with the next model header), is
    token for token the template's rendering of the whole conversation (less its last newline)."""
    from tests.test_user_turns import RETRY

    end = turn_end_id(gemma)
    assert encode_response(gemma, "Hi")[-1] == end and encode_response(gemma, "Hi", eos=False)[-1] != end
    trace = [{"role": "assistant", "content": "4"}, {"role": "user", "content": RETRY},
             {"role": "assistant", "content": "5"}]
    ids, own = encode_trace(gemma, "What is 2 + 3?", trace, None)
    whole = gemma.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}] + trace, tokenize=True)
    whole = list(whole["input_ids"] if hasattr(whole, "keys") else whole)
    assert encode_prompt(gemma, "What is 2 + 3?") + ids == whole[:-1]
    assert gemma.decode(user_suffix(gemma, RETRY)) == f"\n<start_of_turn>user\n{RETRY}<end_of_turn>\n<start_of_turn>model\n"
    assert gemma.decode([t for t, o in zip(ids, own) if o]) == "4<end_of_turn>5<end_of_turn>"


def test_a_rollout_with_a_simulated_user_ends_each_gemma_turn_at_its_end_of_turn(gemma):  # noqa: F811
    """Turns scripted as a Gemma policy writes them ("5", then "7", each ended by `<end_of_turn>`): the Tutor (wanting
    7) gets the first and answers; the second ends the conversation. The response's tokens are the trace's, its
    messages have no `<end_of_turn>` in them, and it counts as ended (has its EOS)."""
    from tests.test_user_turns import RETRY, Tutor

    tools = Tools(environment=Tutor)
    ids, mask = pad([encode_prompt(gemma, "Guess.")], gemma.pad_token_id, "left")
    generate, _ = scripted(gemma, ["5", "7"])
    roll = generate_with_tools(generate, tools, gemma, ids, mask, ["Guess."], SamplingConfig(max_new_tokens=100), 1,
                               fields={"answer": [7]})
    assert [m["content"] for m in roll.messages[0]] == ["5", RETRY, "7"] and roll.has_eos.tolist() == [True]
    trace, own = encode_trace(gemma, "Guess.", roll.messages[0], None)
    n = int(roll.attention_mask[0, roll.prompt_length:].sum())
    assert roll.input_ids[0, roll.prompt_length:roll.prompt_length + n].tolist() == trace
    assert roll.response_mask[0, :n].tolist() == own


def test_an_export_keeps_every_stop_token_and_a_reload_reads_them(gemma, tiny_spec, tmp_path):
    """The export's generation config lists the turn's end and EOS (it wrote the tokenizer's EOS alone, and a Gemma
    served from it ran past its turns); `load_tokenizer` reads them back as `generation_eos_ids`. The reward model's
    usage code ends a response with the same token as training did."""
    from modules.backbone import build_causal_lm, load_tokenizer
    from modules.export import save_pretrained
    from modules.reward_model import USAGE

    save_pretrained(build_causal_lm(tiny_spec, gemma), gemma, str(tmp_path))
    written = json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"]
    assert written == stop_ids(gemma) == [turn_end_id(gemma), gemma.eos_token_id]
    again = load_tokenizer(str(tmp_path))
    assert again.generation_eos_ids == written and stop_ids(again) == written
    assert "+ [end]" in USAGE and "end = {END}" in USAGE


def test_phi_3_5s_turns_end_with_end_not_its_eos(hermes):  # noqa: F811
    """Phi-3.5's template ends every turn with <|end|> (its EOS <|endoftext|> closes the whole conversation): that is
    the end of a turn and the first stop token, an SFT response ends with it, and a conversation with a simulated
    user laid out as a rollout is token for token the template's rendering of it (less its closing EOS)."""
    from tests.test_user_turns import RETRY

    phi = with_template(hermes, open("tests/templates/phi3_5.jinja").read())
    phi.add_special_tokens({"eos_token": "<|endoftext|>",
                            "additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
    end = phi.convert_tokens_to_ids("<|end|>")
    assert turn_end_id(phi) == end and stop_ids(phi) == [end, phi.eos_token_id] and encode_response(phi, "Hi")[-1] == end
    trace = [{"role": "assistant", "content": "4"}, {"role": "user", "content": RETRY},
             {"role": "assistant", "content": "5"}]
    ids, own = encode_trace(phi, "What is 2 + 3?", trace, None)
    whole = phi.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}] + trace, tokenize=True)
    whole = list(whole["input_ids"] if hasattr(whole, "keys") else whole)
    assert encode_prompt(phi, "What is 2 + 3?") + ids == whole[:-2] and phi.decode(whole[-2:]) == "\n<|endoftext|>"
    assert phi.decode([t for t, o in zip(ids, own) if o]) == "4<|end|>5<|end|>"
