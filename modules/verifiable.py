"""Verifiable rewards: a rule checks each response against the record it answers (a reference answer or tests
kept with the prompt by `PairDataModule reward_fields`), or against a required format. Each returns 1.0 or 0.0
per response (`PythonTests` optionally the share of tests passed), and composes with others in
`modules.rewards.Composed` (e.g. correctness plus a small format bonus). A rule that reads a record field returns
None for a record whose field is None (`PairDataModule optional_fields`): it does not apply there, and in a
`Composed` reward the terms that do apply score that response (a mixed dataset of maths and coding records).
"""
from __future__ import annotations

import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from modules.rewards import RewardError

NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
EXTRACTS = ("last_number", "boxed", "all")


class AnswerMatch:
    """1.0 where the answer read from a response equals the record's reference answer, else 0.0 (GSM8K- or
    MATH-style correctness).

    Args:
        field: the record field holding the reference answer (or a list of accepted answers); list it in the
            data's `reward_fields`.
        extract: how an answer is read from a response: `last_number` (the last number in it), `boxed` (the text
            inside the last `\\boxed{...}`, braces balanced), `all` (the whole response), or a regular expression
            whose first group (else its whole match) is the answer, at its last match (e.g. `####\\s*(\\S+)`). The
            reference is read the same way when it holds such an answer (GSM8K's "... #### 72" gives 72), else
            taken whole.
        tolerance: numbers closer than this (absolute) are equal.

    Two answers that are both numbers (thousands commas dropped: "1,000" is 1000) are compared as numbers within
    `tolerance`; otherwise as texts, with surrounding whitespace and `$` dropped and inner whitespace collapsed.
    Examples: extract `last_number`, answer "72": "She sold 48 + 24 = 72 clips." -> 1.0; "72.0" -> 1.0;
    "about 70" -> 0.0; "no idea" -> 0.0. Extract `boxed`, answer "\\frac{1}{2}": "so \\boxed{\\frac{1}{2}}" -> 1.0.
    """

    def __init__(self, field: str = "answer", extract: str = "last_number", tolerance: float = 1e-6):
        if extract not in EXTRACTS:
            try:
                re.compile(extract)
            except re.error as error:
                raise ValueError(f"AnswerMatch: extract={extract!r} is neither one of {list(EXTRACTS)} nor a valid "
                                 f"regular expression ({error})") from None
        if not tolerance >= 0:
            raise ValueError(f"AnswerMatch: tolerance={tolerance}; expected a number >= 0")
        self.field, self.extract, self.tolerance = field, extract, tolerance
        self.record_fields = (field,)

    def __call__(self, prompts: list[str], responses: list[str], **fields) -> list[float | None]:
        answers = fields[self.field]
        return [None if answer is None else float(self.matches(response, answer))
                for response, answer in zip(responses, answers)]

    def matches(self, response: str, answer) -> bool:
        """The response's answer equals `answer` (any of them, for a list of accepted answers)."""
        got = self.read(response)
        if got is None:
            return False
        if isinstance(answer, (list, tuple)):
            return any(self.matches(response, one) for one in answer)
        want = answer if isinstance(answer, (int, float)) and not isinstance(answer, bool) else \
            (self.read(str(answer)) or _normal(str(answer)))
        numbers = [_number(x) for x in (got, want)]
        if None not in numbers:                 # two numbers (whatever read them): equal within the tolerance
            return math.isclose(numbers[0], numbers[1], rel_tol=0.0, abs_tol=self.tolerance)
        return _normal(str(got)) == _normal(str(want))

    def read(self, text: str) -> str | None:
        """The answer in `text` (None: it holds none)."""
        if self.extract == "all":
            return text.strip() or None
        if self.extract == "last_number":
            found = NUMBER.findall(text)
            return found[-1] if found else None
        if self.extract == "boxed":
            return _last_boxed(text)
        found = list(re.finditer(self.extract, text, re.DOTALL))
        if not found:
            return None
        last = found[-1]
        return last.group(1) if last.groups() else last.group(0)


class Contains:
    """1.0 where the response contains the record's value of `field` (any of them, for a list), else 0.0: an
    instruction-following check ("mention the place you review", "use the keyword ..."), as in IFEval.

    Args:
        field: the record field holding the text (or list of texts) to find; list it in the data's `reward_fields`.
        whole_word: match whole words only ("spa" is not found in "spacious").
        case_sensitive: match case.

    Examples (field place = "spa"): "the spa was lovely" -> 1.0; "a spacious room" -> 0.0 (1.0 with whole_word
    false); "The SPA" -> 1.0 (0.0 with case_sensitive); place = ["spa", "gym"]: "the gym" -> 1.0.
    """

    def __init__(self, field: str, whole_word: bool = True, case_sensitive: bool = False):
        self.field, self.whole_word, self.case_sensitive = field, whole_word, case_sensitive
        self.record_fields = (field,)

    def __call__(self, prompts: list[str], responses: list[str], **fields) -> list[float | None]:
        return [None if value is None else
                float(any(self.found(str(v), response) for v in (value if isinstance(value, list) else [value])))
                for response, value in zip(responses, fields[self.field])]

    def found(self, text: str, response: str) -> bool:
        pattern = re.escape(text.strip())
        if self.whole_word:
            pattern = rf"(?<!\w){pattern}(?!\w)"
        return re.search(pattern, response, 0 if self.case_sensitive else re.IGNORECASE) is not None


class PatternMatch:
    """1.0 where the response matches a regular expression, else 0.0: a format reward (e.g. reasoning in
    `<think>...</think>` before the answer).

    Args:
        pattern: the regular expression (`.` matches newlines too).
        full: the whole response must match (`re.fullmatch`, surrounding whitespace dropped); else a match
            anywhere in it (`re.search`).

    Example: pattern `\\d+`, full true: "42" -> 1.0, "42 apples" -> 0.0; full false: "42 apples" -> 1.0.
    """

    def __init__(self, pattern: str, full: bool = False):
        try:
            self.regex = re.compile(pattern, re.DOTALL)
        except re.error as error:
            raise ValueError(f"PatternMatch: pattern={pattern!r} is not a valid regular expression ({error})") from None
        self.pattern, self.full = pattern, full

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        match = self.regex.fullmatch if self.full else self.regex.search
        return [float(match(r.strip() if self.full else r) is not None) for r in responses]


class OverlongPenalty:
    """DAPO's soft overlong punishment (Yu et al., "DAPO", arXiv 2503.14476, Eq. 13; TRL's
    `get_soft_overlong_punishment`, veRL's overlong buffer): 0 for a response of at most `max_tokens - buffer`
    tokens, falling linearly to -1 at `max_tokens`, -1 beyond. A length term to add to a correctness reward in
    `modules.rewards.Composed`, so that running into the length limit costs a little before it cuts an answer off.
    A response's length is its token count with its EOS (TRL's `completion_ids`).

        R(y) = 0                               if |y| <= L - B
               ((L - B) - |y|) / B             if L - B < |y| <= L
               -1                              if |y| > L

    Args:
        max_tokens: L, usually the sampling's `max_new_tokens` (our sampler never goes beyond it, so then -1 is the
            reward of a response that ends exactly at the limit).
        buffer: B, the tokens before L over which the penalty grows (0 <= B <= L; 0: -1 beyond L, else 0).

    Example (L = 100, B = 20): lengths 80 -> 0.0, 90 -> -0.5, 95 -> -0.75, 100 -> -1.0, 101 -> -1.0.
    """

    def __init__(self, max_tokens: int, buffer: int):
        if not 1 <= max_tokens or not 0 <= buffer <= max_tokens:
            raise ValueError(f"OverlongPenalty: max_tokens={max_tokens}, buffer={buffer}; expected max_tokens >= 1 and "
                             "0 <= buffer <= max_tokens")
        self.max_tokens, self.buffer = max_tokens, buffer

    def __call__(self, prompts: list[str], responses: list[str], completion_ids: list[list[int]]) -> list[float]:
        start = self.max_tokens - self.buffer
        return [0.0 if len(ids) <= start else (start - len(ids)) / self.buffer if len(ids) <= self.max_tokens else -1.0
                for ids in completion_ids]


def _number(text) -> float | None:
    if isinstance(text, (int, float)):
        return float(text)
    match = NUMBER.fullmatch(str(text).strip())
    return float(match.group(0).replace(",", "")) if match else None


def _normal(text: str) -> str:
    return " ".join(text.strip().strip("$").split())


def _last_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` in `text`, nested braces balanced (None: none, or unclosed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None


FENCED = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


class PythonTests:
    """1.0 where the Python code of a response passes the record's tests, else 0.0 (with `partial`: the share of
    its tests passed): a coding task's verifiable reward.

    Args:
        field: the record field holding the tests, one or a list: Python source run after the response's code
            (asserts; it passes when the program runs to its end and exits with status 0), or `{input, output}`
            (a contest-style test: the code, run with `input` as its standard input, must exit with status 0
            having printed `output`, compared line by line, trailing whitespace ignored). List it in the data's
            `reward_fields`.
        timeout: seconds each test may run; one that runs longer is killed and fails.
        partial: the share of a record's tests passed, instead of 1.0 only when all pass.
        workers: tests run at once (processes).
        memory_mb: the address space each test's process may use (`RLIMIT_AS`), so that code allocating without
            bound fails with a MemoryError instead of taking the training process's memory (None: no limit). As
            veRL's sandbox's `memory_limit_mb`.

    The code is the last fenced block of the response (```python ... ```), else the whole response. Each test
    runs in a fresh interpreter (`python -I`: no user site or environment variables) in an empty temporary
    directory, with a minimal environment, its memory capped and every file it writes, its output included, capped
    at 16 MiB; an assert test passes when the program runs past the test to its end (code that exits early with
    status 0, a known reward hack, fails) and exits with status 0. **That is not a sandbox**: model-written code runs
    with your permissions. For code from a model you do not trust, serve a sandbox and use
    `modules.remote.RemoteReward`.

    Example: tests ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]; "def add(a, b): return a + b" -> 1.0;
    "def add(a, b): return a * b" -> 0.0 (partial: 0.0, as 1*2 != 3 and -1*1 != 0); "def add(a, b): return abs(a)
    + b" -> 0.0 (partial: 0.5); "while True: pass" -> 0.0 (killed after `timeout`). Contest-style: test {input:
    "2 3", output: "5"}; "a, b = map(int, input().split())\\nprint(a + b)" -> 1.0; "print(5)" -> 1.0 too (one test
    cannot tell: give several); "print(2 + 3, '')" -> 1.0 (trailing space); "print('5\\n5')" -> 0.0.
    """

    def __init__(self, field: str = "tests", timeout: float = 5.0, partial: bool = False, workers: int = 2,
                 memory_mb: int | None = 1024):
        if not timeout > 0 or workers < 1 or (memory_mb is not None and memory_mb < 64):
            raise ValueError(f"PythonTests: timeout={timeout}, workers={workers}, memory_mb={memory_mb}; expected "
                             "timeout > 0, workers >= 1 and memory_mb >= 64 (an interpreter needs some) or null")
        self.field, self.timeout, self.partial, self.workers = field, timeout, partial, workers
        self.memory_mb = memory_mb
        self.record_fields = (field,)

    def __call__(self, prompts: list[str], responses: list[str], **fields) -> list[float | None]:
        jobs = [(i, code_of(response), test) for i, (response, tests) in enumerate(zip(responses, fields[self.field]))
                if tests is not None for test in (tests if isinstance(tests, list) else [tests])]
        with ThreadPoolExecutor(self.workers) as pool:
            passed = list(pool.map(lambda job: self.passes(job[1], job[2] if isinstance(job[2], dict) else str(job[2])),
                                   jobs))
        out = []
        for i, tests in enumerate(fields[self.field]):
            if tests is None:                       # (no test ran for it: the rule does not apply)
                out.append(None)
                continue
            mine = [ok for (row, _, _), ok in zip(jobs, passed) if row == i]
            share = sum(mine) / len(mine) if mine else 0.0
            out.append(share if self.partial else float(share == 1.0))
        return out

    def passes(self, code: str, test: str | dict) -> bool:
        """Whether `code` passes `test`, within `timeout`:
        - Python source: `code` then `test`, run as one program, reach its end and exit with status 0. The end is a
          line after the test that writes a random token to a file: code that exits early with status 0
          (`sys.exit(0)`, `os._exit(0)`, an `atexit` hook), so that the test never runs, does not pass.
        - `{input, output}`: `code` run with `input` as its standard input exits with status 0 having printed
          `output` (`same_output`)."""
        with tempfile.TemporaryDirectory() as folder:
            if isinstance(test, dict):
                if not (isinstance(test.get("input"), str) and isinstance(test.get("output"), str)):
                    raise RewardError(f"PythonTests: a test {str(test)[:80]!r}; expected Python source, or "
                                      "{input: <text>, output: <text>} (standard input and the output expected)")
                status = self.run(folder, code, test["input"])
                return status == 0 and same_output(_read(os.path.join(folder, "stdout"), OUTPUT_MB * 2 ** 20) or "",
                                                   test["output"])
            token, done = secrets.token_hex(16), os.path.join(folder, "done")
            status = self.run(folder, f"{code}\n\n{test}\n\nwith open({done!r}, 'w') as _done:\n    _done.write({token!r})\n")
            return status == 0 and _read(done, 64) == token

    def run(self, folder: str, program: str, stdin: str = "") -> int | None:
        """`program` (source) run in `folder` in a fresh `python -I`, its memory and file sizes capped, `stdin` as
        its standard input and its standard output in `folder`/stdout; its exit status, or None when it ran past
        `timeout` (then it is killed with its process group: whatever it started goes with it)."""
        path, inputs, outputs = (os.path.join(folder, name) for name in ("program.py", "stdin", "stdout"))
        for name, text in ((path, program), (inputs, stdin)):
            with open(name, "w") as handle:
                handle.write(text)
        with open(inputs) as stdin_file, open(outputs, "w") as stdout_file:
            process = subprocess.Popen([sys.executable, "-I", "-c", LIMITED, str(self.memory_mb or 0), str(OUTPUT_MB),
                                        path], cwd=folder, stdin=stdin_file, stdout=stdout_file,
                                       stderr=subprocess.DEVNULL, start_new_session=True,
                                       env=TEST_ENV)
            try:
                return process.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return None


def same_output(got: str, expected: str) -> bool:
    """Whether a program's output is the expected one, as judges of programming contests compare: line by line,
    trailing whitespace on each line and trailing blank lines ignored. "3 \\n4\\n\\n" equals "3\\n4"; "3 4" does not
    equal "3\\n4"."""
    def lines(text: str) -> list[str]:
        return [line.rstrip() for line in text.rstrip().splitlines()]

    return lines(got) == lines(expected)


def _read(path: str, limit: int) -> str | None:
    """At most `limit` characters of the text file at `path` (undecodable bytes replaced), or None if unreadable."""
    try:
        with open(path, errors="replace") as handle:
            return handle.read(limit)
    except OSError:
        return None


# Runs the program at argv[3] as __main__ with its address space capped at argv[1] MiB (0: no cap) and every file it
# writes, its standard output included, at argv[2] MiB (past it the process is killed by SIGXFSZ): the limits are
# set in the child itself (a `preexec_fn` is not safe in a process with threads, as the trainer is).
LIMITED = ("import resource, runpy, sys\n"
           "memory, files = (int(n) * 2 ** 20 for n in sys.argv[1:3])\n"
           "if memory:\n"
           "    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))\n"
           "resource.setrlimit(resource.RLIMIT_FSIZE, (files, files))\n"
           "sys.argv = sys.argv[3:]\n"
           "runpy.run_path(sys.argv[0], run_name='__main__')\n")
OUTPUT_MB = 16            # the most a test's program may write to a file or its standard output
# A test's whole environment: no variable of the trainer's (tokens, paths), one thread for the numeric libraries (a
# test is one of `workers` at once; with a thread per core each, a many-core machine would also need their stacks
# within `memory_mb`).
TEST_ENV = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def code_of(response: str) -> str:
    """The last fenced code block of a response (```python ... ```, ```py or bare ```), else the whole response."""
    blocks = FENCED.findall(response)
    return blocks[-1] if blocks else response
