"""modules/verifiable.py: the answer read from a response, compared with the record's reference; a format rule."""
import pytest

from modules.verifiable import AnswerMatch, PatternMatch


@pytest.mark.parametrize("response, answer, expected", [         # AnswerMatch's docstring examples, and more
    ("She sold 48 + 24 = 72 clips.", "72", 1.0),
    ("72.0", "72", 1.0),
    ("about 70", "72", 0.0),
    ("no idea", "72", 0.0),
    ("the total is 1,234", "Natalia sold ... #### 1234", 1.0),   # GSM8K's reference: its last number
    ("-3.5 degrees", -3.5, 1.0),                                   # a number as the reference
    ("first 5, then 7", 5, 0.0),                                   # the last number counts
    ("0.1 + 0.2 = 0.30000000000000004", "0.3", 1.0),               # within the tolerance
    ("1e3", "1000", 1.0),
])
def test_last_number(response, answer, expected):
    assert AnswerMatch()(["q"], [response], answer=[answer]) == [expected]


@pytest.mark.parametrize("response, answer, expected", [
    ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),              # nested braces balanced
    ("\\boxed{2} then \\boxed{ 3 }", "$3$", 1.0),                  # the last box; $ and spaces dropped
    ("\\boxed{3", "3", 0.0),                                       # unclosed: no answer
    ("3", "3", 0.0),                                               # no box: no answer
])
def test_boxed(response, answer, expected):
    assert AnswerMatch(extract="boxed")(["q"], [response], answer=[answer]) == [expected]


def test_all_and_a_regular_expression_and_the_field_name():
    assert AnswerMatch(extract="all")(["q"] * 2, [" Paris ", "paris"], answer=["Paris", "Paris"]) == [1.0, 0.0]
    rule = AnswerMatch(field="label", extract=r"answer:\s*(\w+)")
    assert rule(["q"] * 3, ["answer: yes", "Answer: no", "answer: no, answer: yes"], label=["yes"] * 3) == [1.0, 0.0, 1.0]
    assert rule.record_fields == ("label",)


@pytest.mark.parametrize("kwargs, message", [
    ({"extract": "(unclosed"}, r"extract='\(unclosed' is neither one of \['last_number', 'boxed', 'all'\] nor a "
                               r"valid regular expression"),
    ({"tolerance": -1}, r"tolerance=-1; expected a number >= 0"),
])
def test_answer_match_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AnswerMatch(**kwargs)


def test_pattern_match():
    """Docstring example: pattern \\d+, full: "42" -> 1, "42 apples" -> 0; anywhere: "42 apples" -> 1."""
    assert PatternMatch(r"\d+", full=True)(["q"] * 2, ["42", "42 apples"]) == [1.0, 0.0]
    assert PatternMatch(r"\d+")(["q"], ["42 apples"]) == [1.0]
    think = PatternMatch(r"<think>.*</think>\s*\S.*", full=True)
    assert think(["q"] * 2, ["<think>a\nb</think> 4", "4 <think>a</think>"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"PatternMatch: pattern='\[' is not a valid regular expression"):
        PatternMatch("[")


def test_contains():
    """Docstring examples (place = "spa"): "the spa was lovely" -> 1; "a spacious room" -> 0 (1 with whole_word
    false); "The SPA" -> 1 (0 with case_sensitive); place ["spa", "gym"]: "the gym" -> 1."""
    from modules.verifiable import Contains

    rule = Contains("place")
    assert rule(["q"] * 4, ["the spa was lovely", "a spacious room", "The SPA", "the gym"],
                place=["spa", "spa", "spa", ["spa", "gym"]]) == [1.0, 0.0, 1.0, 1.0]
    assert Contains("place", whole_word=False)(["q"], ["a spacious room"], place=["spa"]) == [1.0]
    assert Contains("place", case_sensitive=True)(["q"], ["The SPA"], place=["spa"]) == [0.0]
    assert Contains("place")(["q"], ["a (c++) course"], place=["(c++)"]) == [1.0]      # the text, not a pattern


def test_the_embedded_task_records_name_their_place():
    from datamodules.task import PLACES, ChatReviewTask, ReviewTask

    for task in (ReviewTask(num_train=4, num_val=2), ChatReviewTask(num_train=4, num_val=2)):
        for record in task.load("train")[1] + task.load_prompts("val")[1]:
            words = record["prompt"].replace(".", " ").replace("?", " ").split()
            assert record["place"] in words and record["place"] in PLACES


def test_the_sum_task_records_carry_their_answer_and_demonstrations_right_at_the_stated_share():
    from datamodules.sums import SumTask

    task = SumTask(num_train=2000, num_val=10, max_operand=5, accuracy=0.5, seed=0)
    records = task.load("train")[1]
    for record in records:
        a, b = (int(w) for w in record["prompt"].split()[1:4:2])
        assert record["answer"] == a + b and record["prompt"] == f"add {a} and {b} :"
        assert record["rejected"] != str(a + b) and record["rejected"] != record["chosen"]
        assert abs(int(record["chosen"]) - (a + b)) <= 2 and int(record["rejected"]) >= 0
    right = sum(r["chosen"] == str(r["answer"]) for r in records) / len(records)
    assert 0.45 < right < 0.55
    assert task.load("val")[1] != SumTask(num_train=2000, num_val=10, max_operand=5, seed=0).load("train")[1][:10]
    with pytest.raises(ValueError, match=r"SumTask: accuracy=1.5; expected a share in \[0, 1\]"):
        SumTask(accuracy=1.5)


def test_two_numbers_compare_as_numbers_whatever_read_them():
    """GSM8K's format read by a regex: "#### 1,000" against the reference "1000" (or the raw "... #### 1000")."""
    rule = AnswerMatch(extract=r"####\s*(\S+)")
    assert rule(["q"] * 4, ["so #### 1,000", "so #### 1000.0", "1000", "#### about"],
                answer=["1000", "work ... #### 1000", "1000", "about"]) == [1.0, 1.0, 0.0, 1.0]


def test_a_list_of_accepted_answers():
    rule = AnswerMatch(extract="boxed")
    assert rule(["q"] * 3, ["\\boxed{1/2}", "\\boxed{0.5}", "\\boxed{2}"],
                answer=[["1/2", "0.5"], ["1/2", "0.5"], ["1/2", "0.5"]]) == [1.0, 1.0, 0.0]


def test_python_tests():
    """Docstring example (timeout 0.5 s here): add as +, as *, as abs(a) + b, an endless loop; and the code of
    the last fenced block. The endless loop is killed with what it started (its process group)."""
    import time

    from modules.verifiable import PythonTests, code_of

    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
    responses = ["def add(a, b): return a + b", "def add(a, b): return a * b", "def add(a, b): return abs(a) + b",
                 "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'while True: pass'])\nwhile True: pass",
                 "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nand `add(1, 2)` is 3."]
    start = time.time()
    assert PythonTests(timeout=0.5)(["q"] * 5, responses, tests=[tests] * 5) == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert PythonTests(timeout=0.5, partial=True)(["q"] * 5, responses, tests=[tests] * 5) == [1.0, 0.0, 0.5, 0.0, 1.0]
    assert time.time() - start < 20                                 # the endless loops were cut at 0.5 s
    assert PythonTests()(["q"], ["x = 1"], tests=["assert x == 1"]) == [1.0]      # one test as a string
    assert code_of("```py\na = 1\n```\n```\nb = 2\n```") == "b = 2\n" and code_of("plain") == "plain"
    with pytest.raises(ValueError, match=r"PythonTests: timeout=0, workers=2, memory_mb=1024; expected timeout > 0"):
        PythonTests(timeout=0)
    with pytest.raises(ValueError, match=r"memory_mb=16; expected .* memory_mb >= 64 \(an interpreter needs some\)"):
        PythonTests(memory_mb=16)


def test_python_tests_fail_code_that_exits_before_its_test_and_cap_its_memory():
    """Exiting with status 0 before the test runs (a known reward hack) passed while a test passed on exit status
    alone: `sys.exit(0)`, `os._exit(0)`, an `atexit` hook that exits 0 after the failed assert. Now the program
    must run past the test to its end. A response that allocates 2 GiB fails at once under `memory_mb` (before:
    it took the memory, for as long as the machine had it); one that changes directory still passes."""
    from modules.verifiable import PythonTests

    hacks = ["import sys\nsys.exit(0)", "import os\nos._exit(0)",
             "import atexit, os\natexit.register(lambda: os._exit(0))",
             "x = bytearray(2 * 1024 ** 3)\ndef f(): return 1"]
    fine = ["def f(): return 1", "import os\nos.chdir('/')\ndef f(): return 1"]
    responses = hacks + fine
    assert PythonTests(memory_mb=256)(["q"] * 6, responses, tests=["assert f() == 1"] * 6) == [0.0] * 4 + [1.0] * 2
    # the environment is the test's own: none of the trainer's variables, one thread for numeric libraries
    environment = "import os\ndef f(): return os.environ.get('OMP_NUM_THREADS'), 'HOME' in os.environ"
    assert PythonTests()(["q"], [environment], tests=["assert f() == ('1', False)"]) == [1.0]


def test_python_tests_kill_what_a_test_started_when_it_runs_past_the_timeout(tmp_path):
    """A response that starts an endless child process and then loops: at the timeout its whole process group is
    killed, the child included (it is gone, or a zombie waiting for the init process to reap it)."""
    import os
    import time

    from modules.verifiable import PythonTests

    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys\n"
            "child = subprocess.Popen([sys.executable, '-c', 'while True: pass'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
            "while True: pass")
    assert PythonTests(timeout=1.0)(["q"], [code], tests=["pass"]) == [0.0]
    pid = int(pid_file.read_text())
    time.sleep(0.2)
    state = open(f"/proc/{pid}/status").read().split("State:")[1].split()[0] if os.path.exists(f"/proc/{pid}") else None
    assert state in (None, "Z"), state


def test_python_tests_of_the_contest_kind_compare_standard_output():
    """Docstring example: {input "2 3", output "5"}: reading and adding -> 1.0, printing 5 -> 1.0 (one test cannot
    tell), a trailing space -> 1.0, two lines -> 0.0; a crash after the right output -> 0.0 (status 1). Two tests
    of a record, one of each kind, with `partial`."""
    from modules.verifiable import PythonTests

    test = {"input": "2 3", "output": "5"}
    responses = ["a, b = map(int, input().split())\nprint(a + b)", "print(5)", "print(2 + 3, '')", "print('5\\n5')",
                 "print(5)\nraise SystemExit(1)"]
    assert PythonTests()(["q"] * 5, responses, tests=[test] * 5) == [1.0, 1.0, 1.0, 0.0, 0.0]
    both = [{"input": "4 4", "output": "8"}, "assert add(1, 2) == 3"]
    reader = "import sys\ndef add(a, b): return a + b\nprint(sum(map(int, sys.stdin.read().split())))"
    assert PythonTests(partial=True)(["q"], [reader], tests=[both]) == [1.0]
    assert PythonTests(partial=True)(["q"], ["print(8)"], tests=[both]) == [0.5]     # add is undefined: the assert fails


def test_same_output_ignores_trailing_whitespace_and_blank_lines_only():
    from modules.verifiable import same_output

    assert same_output("3 \n4\n\n", "3\n4") and same_output("", "\n")
    assert not same_output("3 4", "3\n4") and not same_output(" 3", "3")


def test_python_tests_cap_what_a_program_writes_and_name_a_malformed_test():
    """A program printing without end is stopped at 16 MiB of output (SIGXFSZ), long before a 60 s timeout; a test
    that is neither source nor {input, output} is one line."""
    import time

    from modules.rewards import RewardError
    from modules.verifiable import PythonTests

    start = time.time()
    assert PythonTests(timeout=60)(["q"], ["while True: print('x' * 4096)"], tests=[{"input": "", "output": "x"}]) == [0.0]
    assert time.time() - start < 30
    with pytest.raises(RewardError, match=r"PythonTests: a test \"\{'input': 'x'\}\"; expected Python source, or "
                                          r"\{input: <text>, output: <text>\}"):
        PythonTests()(["q"], ["pass"], tests=[{"input": "x"}])
