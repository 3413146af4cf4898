"""The embedded guessing game (`datamodules.guess`): a simulated user's hints, its reward and the `followed` share,
the demonstrations, and a rollout with it as the user."""
import pytest
import torch

from datamodules.guess import GuessTask, Hints, guessed
from datamodules.sums import last_number
from datamodules.tools import Tools, encode_trace
from modules.sampling import SamplingConfig, generate_with_tools


def said(text: str) -> list[dict]:
    return [{"role": "user", "content": "guess a number from 0 to 8"}, {"role": "assistant", "content": text}]


def test_last_number_reads_the_last_whole_number_word():
    assert [last_number(t) for t in ("3 or 4", "no idea", "", "7.", "12")] == [4, None, None, None, 12]


def test_hints_says_higher_or_lower_until_the_secret_and_counts_the_guesses_that_followed():
    """The docstring's example (secret 6: 4 -> higher, 3 -> higher, 6 -> None; 2 guesses after a hint, 1 went its
    way); a turn without a number ends the conversation at reward 0 (counted as a guess after a hint that did not
    follow it); reset starts over."""
    user = Hints()
    user.reset(answer=6)
    assert [user.respond(said(t)) for t in ("4", "3", "6")] == ["higher", "higher", None]
    assert (user.get_reward(), user.answered, user.followed) == (1.0, 2, 1)
    user.reset(answer="2")
    assert user.respond(said("5")) == "lower" and user.get_reward() == 0.0
    assert user.respond(said("I give up")) is None
    assert (user.get_reward(), user.answered, user.followed) == (0.0, 1, 0)
    user.reset(answer=0)
    assert user.respond(said("0")) is None and (user.get_reward(), user.answered) == (1.0, 0)


def test_guessed_is_each_users_reward_and_logs_the_share_of_hints_followed():
    """Users with (answered, followed) (2, 1) and (1, 1) -> followed 2/3; none answered -> nothing logged."""
    first, second = Hints(), Hints()
    first.reset(6), second.reset(2)
    for text in ("4", "3", "6"):
        first.respond(said(text))
    second.respond(said("3")), second.respond(said("2"))
    logged = {}
    assert guessed([[], []], [first, second], log_metric=logged.__setitem__) == [1.0, 1.0]
    assert logged == {"followed": pytest.approx(2 / 3)}
    fresh, logged = Hints(), {}
    fresh.reset(1)
    assert guessed([[]], [fresh], log_metric=logged.__setitem__) == [0.0] and logged == {}


@pytest.mark.parametrize("follow", [0.0, 0.5, 1.0])
def test_the_demonstrations_are_conversations_with_the_user_stepping_one_away(tmp_path, follow):
    """Each demonstration is what Hints would say to its guesses: after a hint the next guess is one away, the
    hint's way with probability `follow` where either way is in 0..top (else the hint's way), at most `max_hints`
    hints; a first guess right is a plain answer. At follow 1 every secret within max_hints of the first guess is
    found. Secrets and first guesses cover 0..top; the prompt never names the secret."""
    task = GuessTask(num_train=2000, num_val=10, follow=follow, cache_dir=str(tmp_path))
    records = task.records("train")
    steps, towards, firsts = 0, 0, []
    for record in records:
        user, chosen = Hints(), record["chosen"]
        user.reset(record["answer"])
        turns = [{"role": "assistant", "content": chosen}] if isinstance(chosen, str) else chosen
        assert [m["role"] for m in turns] == ["assistant", "user"] * (len(turns) // 2) + ["assistant"]
        assert len(turns) <= 2 * task.max_hints + 1 and record["prompt"] == [
            {"role": "user", "content": "guess a number from 0 to 8"}]
        guesses = [int(m["content"]) for m in turns[::2]]
        firsts.append(guesses[0])
        for i, guess in enumerate(guesses):
            hint = user.respond(turns[:2 * i + 1])
            if i + 1 < len(guesses):
                assert hint == turns[2 * i + 1]["content"] and abs(guesses[i + 1] - guess) == 1
                away = guess - 1 if hint == "higher" else guess + 1
                if 0 <= away <= task.top:                  # a free step: either way was in range
                    steps += 1
                    towards += guesses[i + 1] != away
            elif len(guesses) <= task.max_hints:
                assert hint is None          # the conversation ended because the guess was right
        if follow == 1.0 and abs(guesses[0] - record["answer"]) <= task.max_hints:
            assert guesses[-1] == record["answer"]
    assert sorted(set(firsts)) == sorted({r["answer"] for r in records}) == list(range(9))
    assert towards / steps == follow if follow in (0.0, 1.0) else 0.45 < towards / steps < 0.55


def test_a_demonstration_is_laid_out_as_the_rollout_with_that_user(tmp_path):
    """Through the game's word-level tokenizer and template (every word known): a demonstration's tokens and the
    policy's mask are those of a rollout whose turns said its guesses, with Hints as the simulated user; its last
    guess is the secret, so the user ended the conversation (reward 1)."""
    from modules.backbone import load_tokenizer
    from tests.test_tools import scripted

    task = GuessTask(num_train=200, num_val=10, follow=1.0, cache_dir=str(tmp_path))
    tokenizer = load_tokenizer(task.tokenizer())
    record = next(r for r in task.records("train") if isinstance(r["chosen"], list) and len(r["chosen"]) == 5)
    ids, own = encode_trace(tokenizer, record["prompt"], record["chosen"], None)
    assert tokenizer.unk_token_id not in ids
    tools = Tools(environment=Hints)
    prompt = tokenizer.apply_chat_template(record["prompt"], add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    guesses = [m["content"] for m in record["chosen"][::2]]
    roll = generate_with_tools(scripted(tokenizer, guesses)[0], tools, tokenizer, torch.tensor([prompt]),
                               torch.ones(1, len(prompt), dtype=torch.long), [record["prompt"]],
                               SamplingConfig(max_new_tokens=24), 1, {"answer": [record["answer"]]})
    assert roll.response_ids[0, :len(ids)].tolist() == ids and roll.response_mask[0, :len(ids)].tolist() == own
    assert roll.messages[0] == record["chosen"] and roll.environments[0].get_reward() == 1.0
    assert roll.timings["tools/user_turns"] == 2


def test_the_game_refuses_bad_settings_in_one_line():
    with pytest.raises(ValueError, match=r"^GuessTask: top=0; expected at least 1$"):
        GuessTask(top=0)
    with pytest.raises(ValueError, match=r"^GuessTask: follow=1.5; expected a share in \[0, 1\]$"):
        GuessTask(follow=1.5)
