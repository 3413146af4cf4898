"""modules/remote.py against servers on 127.0.0.1: the protocol, batching, retries, and one line for each failure."""
import json
import re
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from modules.batch import Rollout
from modules.remote import RemotePairwiseReward, RemoteReward
from modules.rewards import RewardError, score, score_pairs


@contextmanager
def serving(handler_class):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/score"
    finally:
        server.shutdown()
        server.server_close()


def scripted(answers: list, seen: list):
    """A handler answering each POST with the next of `answers`: (status, body bytes) or ("sleep", seconds)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            seen.append((json.loads(self.rfile.read(int(self.headers["Content-Length"]))), dict(self.headers)))
            status, body = answers.pop(0) if len(answers) > 1 else answers[0]
            if status == "sleep":
                import time
                time.sleep(body)
                status, body = 200, b'{"rewards": []}'
            if callable(body):
                body = body(seen[-1][0])
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):      # the client gave up (a timeout test): as it should
                pass

    return Handler


def lengths(request: dict) -> bytes:
    return json.dumps({"rewards": [float(len(r)) for r in request["responses"]]}).encode()


def test_a_remote_reward_sends_texts_and_fields_in_batches_and_reads_one_number_each(monkeypatch):
    seen = []
    monkeypatch.setenv("REWARD_TOKEN", "s3cret")
    with serving(scripted([(200, lengths)], seen)) as url:
        reward = RemoteReward(url, batch_size=2, headers={"Authorization": "Bearer $REWARD_TOKEN"})
        assert reward(["p0", "p0", "p1"], ["a", "bb", "ccc"], answer=[1, 1, 2]) == [1.0, 2.0, 3.0]
    assert [request for request, _ in seen] == [{"prompts": ["p0", "p0"], "responses": ["a", "bb"], "answer": [1, 1]},
                                                {"prompts": ["p1"], "responses": ["ccc"], "answer": [2]}]
    assert seen[0][1]["Authorization"] == "Bearer s3cret" and seen[0][1]["Content-Type"] == "application/json"


def test_concurrent_requests_are_in_flight_together_and_answers_come_back_in_order():
    """A server that holds each request until 3 are in flight (or 2 s pass) and answers each with its first
    response's length: with concurrency 3 all 3 batches wait together; the answers are in the batches' order."""
    import time

    lock, inflight, most = threading.Lock(), [0], [0]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                inflight[0] += 1
                most[0] = max(most[0], inflight[0])
            deadline = time.time() + 2
            while most[0] < 3 and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(0.05 * len(request["responses"][0]))          # later batches answer first
            with lock:
                inflight[0] -= 1
            body = json.dumps({"rewards": [float(len(r)) for r in request["responses"]]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with serving(Handler) as url:
        reward = RemoteReward(url, batch_size=2, concurrency=3)
        assert reward(["p"] * 6, ["aaa", "aaa", "bb", "bb", "c", "c"]) == [3.0, 3.0, 2.0, 2.0, 1.0, 1.0]
    assert most[0] == 3


def test_a_remote_reward_retries_what_may_pass_and_not_what_will_not():
    seen = []
    with serving(scripted([(503, b"busy"), (429, b""), (200, lengths)], seen)) as url:
        assert RemoteReward(url, retries=2, backoff=0.01)(["p"], ["abcd"]) == [4.0]
    assert len(seen) == 3
    seen.clear()
    with serving(scripted([(400, b'{"detail": "responses must be strings"}')], seen)) as url:
        with pytest.raises(RewardError, match=re.escape(f'RemoteReward {url}: HTTP 400 Bad Request: {{"detail": '
                                                        '"responses must be strings"}')):
            RemoteReward(url, retries=3, backoff=0.01)(["p"], ["a"])
    assert len(seen) == 1


@pytest.mark.parametrize("answer, message", [
    ((200, b"<html>oops</html>"), r"the answer is not JSON: '<html>oops</html>'"),
    ((200, b'{"scores": [1]}'), r'the answer has no "rewards" list \(got \[\'scores\'\]\); expected'),
    ((200, b"[1, 2]"), r'the answer has no "rewards" list \(got list\)'),
    ((200, b'{"rewards": [1, 2, 3]}'), r"answered 3 rewards for 2 responses; expected one each"),
    ((500, b"Traceback ..."), r"HTTP 500 Internal Server Error: Traceback ... \(2 tries\)"),
    (("sleep", 0.5), r"no answer within 0.2 s \(2 tries\)"),
])
def test_each_failure_of_a_remote_reward_is_one_line_naming_the_url(answer, message):
    with serving(scripted([answer], [])) as url:
        with pytest.raises(RewardError, match=re.escape(f"RemoteReward {url}: ") + message):
            RemoteReward(url, timeout=0.2, retries=1, backoff=0.01)(["p", "p"], ["a", "b"])


def test_a_remote_reward_nobody_serves_and_bad_settings():
    with serving(scripted([(200, lengths)], [])) as url:
        pass                                                    # the port is free again: nothing listens there
    with pytest.raises(RewardError, match=re.escape(f"RemoteReward {url}: cannot connect (") + r".*refused.*\) "
                                          r"\(2 tries\)"):
        RemoteReward(url, retries=1, backoff=0.01)(["p"], ["a"])
    with pytest.raises(RewardError, match=r"the request is not JSON .*; record fields must be JSON values"):
        RemoteReward(url)(["p"], ["a"], answer=[object()])
    with pytest.raises(ValueError, match=r"RemoteReward: url='localhost:8000'; expected an http:// or https:// address"):
        RemoteReward("localhost:8000")
    with pytest.raises(ValueError, match=r"RemoteReward: retries=-1; expected at least 0"):
        RemoteReward("http://x", retries=-1)


def group_rollout(responses: list[str]) -> Rollout:
    n = len(responses)
    return Rollout(input_ids=torch.zeros(n, 3, dtype=torch.long), attention_mask=torch.ones(n, 3, dtype=torch.long),
                   response_mask=torch.ones(n, 1, dtype=torch.long), prompt_length=2, group_size=2,
                   prompts=[f"prompt {i // 2}" for i in range(n)], responses=responses,
                   has_eos=torch.ones(n, dtype=torch.bool))


def test_a_remote_pairwise_judge_is_asked_in_both_orders_and_its_position_bias_cancels():
    """f(a, b) = len(a) - len(b) + 1 (the first position favoured by 1): asked in both orders, M[0, 1] =
    ((1 - 3 + 1) - (3 - 1 + 1)) / 2 = -2 for responses of lengths 1 and 3, as len(a) - len(b) alone."""
    seen = []
    biased = lambda request: json.dumps({"rewards": [len(a) - len(b) + 1.0 for a, b in  # noqa: E731
                                                     zip(request["responses_a"], request["responses_b"])]}).encode()
    with serving(scripted([(200, biased)], seen)) as url:
        M, _, agreement = score_pairs(RemotePairwiseReward(url), group_rollout(["a", "ccc", "bb", "bb"]))
        assert M.tolist() == [[0.0, -2.0], [2.0, 0.0], [0.0, 0.0], [0.0, 0.0]] and agreement == 0.5
        assert sorted(seen[0][0]) == ["prompts", "responses_a", "responses_b"] and len(seen[0][0]["prompts"]) == 4
        seen.clear()
        score_pairs(RemotePairwiseReward(url, antisymmetric=True), group_rollout(["a", "ccc", "bb", "bb"]))
        assert len(seen[0][0]["prompts"]) == 2                 # antisymmetric: each pair once


def test_the_server_in_the_docs_works_with_remote_reward():
    """docs/rewards.md's server, run as written (all but its `__main__` block), scores a rollout."""
    text = Path("docs/rewards.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.DOTALL) if "ThreadingHTTPServer" in b)
    namespace = {"__name__": "docs_server"}
    exec(compile(block, "docs/rewards.md", "exec"), namespace)
    namespace["Handler"].log_message = lambda *args: None
    with serving(namespace["Handler"]) as url:
        rewards, _ = score(RemoteReward(url), group_rollout(["one", "one two three"]), tokenizer=None)
    assert rewards.tolist() == pytest.approx([-0.1, -0.3])
