"""Rewards served over HTTP: a reward model, a sandbox that runs code, an LLM judge behind an API, anything a
team serves once and shares between runs. Each call POSTs the texts (and the record fields the data keeps, by
`PairDataModule reward_fields`) as JSON and reads one number per response, or per pair. Every failure is one line
naming the URL: no answer within the timeout, an HTTP error with the start of its body, an answer that is not
the expected JSON. Connection errors, timeouts, 429 and 5xx answers are retried with a growing wait.

The protocol (docs/rewards.md has a server to start from):
  RemoteReward:          {"prompts": [...], "responses": [...], <field>: [...]} -> {"rewards": [...]}
  RemotePairwiseReward:  {"prompts": [...], "responses_a": [...], "responses_b": [...], <field>: [...]}
                         -> {"rewards": [...]}: the logit of P(a preferred over b) per pair
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from modules.rewards import PairwiseReward, RewardError

RETRIED_STATUS = {429, 500, 502, 503, 504}


class RemoteReward:
    """A per-response reward served at `url`: `{"prompts", "responses", <record fields>}` -> `{"rewards"}`.

    Args:
        url: the endpoint, e.g. http://localhost:8000/score.
        timeout: seconds to wait for each request's answer.
        retries: further tries after a connection error, a timeout or a 429 / 5xx answer.
        backoff: seconds before the first retry, doubled before each next one.
        batch_size: responses per request (None: the whole rollout in one).
        concurrency: requests in flight at once (threads), for a server that scores several batches in parallel;
            the answers are put back in order.
        headers: extra HTTP headers, e.g. {Authorization: Bearer $REWARD_TOKEN}; `$NAME` in a value is read from
            the environment variable NAME when the request is made, so no secret sits in a config.
    """

    texts = ("prompts", "responses")

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 2, backoff: float = 1.0,
                 batch_size: int | None = None, concurrency: int = 1, headers: dict[str, str] | None = None):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{type(self).__name__}: url={url!r}; expected an http:// or https:// address")
        for name, value, least in (("timeout", timeout, 1e-3), ("retries", retries, 0), ("backoff", backoff, 0),
                                   ("batch_size", batch_size or 1, 1), ("concurrency", concurrency, 1)):
            if not value >= least:
                raise ValueError(f"{type(self).__name__}: {name}={value}; expected at least {least}")
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self.batch_size, self.concurrency, self.headers = batch_size, concurrency, dict(headers or {})

    def __call__(self, prompts: list[str], *texts: list[str], **fields) -> list[float]:
        columns = dict(zip(self.texts, (prompts, *texts)), **fields)
        size = self.batch_size or max(len(prompts), 1)
        parts = [{key: values[start: start + size] for key, values in columns.items()}
                 for start in range(0, len(prompts), size)]
        if self.concurrency > 1 and len(parts) > 1:
            with ThreadPoolExecutor(min(self.concurrency, len(parts))) as pool:
                answers = list(pool.map(self.request, parts))         # in order; the first failure is raised
        else:
            answers = [self.request(part) for part in parts]
        out: list[float] = []
        for part, got in zip(parts, answers):
            if len(got) != len(part["prompts"]):
                raise RewardError(f"{self.where}: answered {len(got)} rewards for {len(part['prompts'])} "
                                  f"{'pairs' if len(self.texts) == 3 else 'responses'}; expected one each")
            out += got
        return out

    @property
    def where(self) -> str:
        return f"{type(self).__name__} {self.url}"

    def request(self, body: dict) -> list:
        """POST `body`; the answer's "rewards" list, or a `RewardError` in one line."""
        try:
            data = json.dumps(body).encode()
        except (TypeError, ValueError) as error:
            raise RewardError(f"{self.where}: the request is not JSON ({error}); record fields must be JSON values") from None
        request = urllib.request.Request(self.url, data=data, method="POST", headers={
            "Content-Type": "application/json", **{k: os.path.expandvars(v) for k, v in self.headers.items()}})
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as error:
                if error.code not in RETRIED_STATUS or last:
                    body_start = error.read(200).decode(errors="replace").strip()
                    raise RewardError(f"{self.where}: HTTP {error.code} {error.reason}"
                                      f"{': ' + body_start if body_start else ''}{self._tries(attempt)}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
                if last:
                    reason = getattr(error, "reason", error)
                    what = (f"no answer within {self.timeout:g} s" if isinstance(reason, TimeoutError)
                            or "timed out" in str(reason) else f"cannot connect ({reason})")
                    raise RewardError(f"{self.where}: {what}{self._tries(attempt)}") from None
            time.sleep(self.backoff * 2 ** attempt)
        try:
            answer = json.loads(raw)
        except ValueError:
            raise RewardError(f"{self.where}: the answer is not JSON: {raw[:200].decode(errors='replace')!r}") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("rewards"), list):
            keys = sorted(answer) if isinstance(answer, dict) else type(answer).__name__
            raise RewardError(f"{self.where}: the answer has no \"rewards\" list (got {keys}); expected "
                              "{\"rewards\": [one number each]}")
        return answer["rewards"]

    def _tries(self, attempt: int) -> str:
        return f" ({attempt + 1} tries)" if attempt else ""


class RemotePairwiseReward(RemoteReward, PairwiseReward):
    """A pairwise reward or judge served at `url`: `{"prompts", "responses_a", "responses_b", <record fields>}` ->
    `{"rewards"}`, the logit of P(a preferred over b) per pair. Arguments as `RemoteReward`, and:

    Args:
        antisymmetric: the server's f(b, a) is -f(a, b) exactly, so each pair is asked once; else (an LLM judge)
            each pair is asked in both orders and the position bias cancels (`modules.rewards.PairwiseReward`).
    """

    texts = ("prompts", "responses_a", "responses_b")

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 2, backoff: float = 1.0,
                 batch_size: int | None = None, concurrency: int = 1, headers: dict[str, str] | None = None,
                 antisymmetric: bool = False):
        super().__init__(url, timeout, retries, backoff, batch_size, concurrency, headers)
        self.antisymmetric = antisymmetric
