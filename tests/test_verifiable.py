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
