"""QA metrics: the exact normalisation of DESIGN.md §8.1 and the four reported numbers."""
from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from hitbench_utils.scoring.qa import normalize_answer, round_decimals, score_answer, word_f1


@pytest.mark.parametrize("text, expected", [
    ("2.25", "2.2"),        # exactly representable: round-half-even gives 2.2
    ("2.35", "2.4"),        # the float is 2.35000000000000008882 -> 2.4
    ("0.35", "0.3"),        # the float is 0.34999999999999997780 -> 0.3
    ("10.05", "10.1"),      # 10.05000000000000071054 -> 10.1
    ("10.04", "10.0"),      # str() of the rounded float keeps ".0"
    ("3.0", "3.0"),
    ("-2.25", "-2.2"),      # no sign in the pattern: the "-" stays, the number is rounded
    ("abc1.25", "abc1.25"),  # no word boundary between "c" and "1"
    ("1.25abc", "1.25abc"),  # no word boundary between "5" and "a"
    ("1.2.3", "1.2.3"),     # "1.2" matches and rounds to itself, ".3" is left
    ("x 1.96, y 12.345%", "x 2.0, y 12.3%"),
    ("1,234.56", "1,234.6"),
    ("0.05", "0.1"),
])
def test_round_decimals(text: str, expected: str) -> None:
    assert round_decimals(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("2.25", "22"),                         # rounded first, then the "." is punctuation
    ("-2.25", "22"),
    ("10.05", "101"),
    ("The Answer: 2.35!", "answer 24"),
    ("A", ""),                              # a lone article disappears
    ("an apple a day", "apple day"),
    ("theatre another", "theatre another"),  # only whole words are articles
    ("The-End", "theend"),                  # punctuation goes before articles are looked for
    ("  red\tgreen\n blue ", "red green blue"),
    ("It's", "its"),
    ("It’s “Yes”", "it’s “yes”"),           # unicode quotes are not in string.punctuation: they stay
    ("The “Yes”", "“yes”"),                 # ... but still make a word boundary for "the"
    ("Café, naïve", "café naïve"),
    ("", ""),
])
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_word_f1_is_multiset_overlap() -> None:
    assert word_f1("red green blue", "green blue yellow black") == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert word_f1("x x y", "x y y") == pytest.approx(2 / 3)  # overlap counts min(counts): x:1, y:1
    assert word_f1("x y", "z") == 0.0


def test_f1_and_em_on_hand_made_pairs() -> None:
    s = score_answer("red green blue", "Green, blue, yellow and black")
    assert s["F1"] == round(2 * (2 / 5) * (2 / 3) / (2 / 5 + 2 / 3) * 100, 2) == 50.0
    assert s["EM"] == 0.0
    s = score_answer("The answer is 12.34", "answer is 12.3")  # both normalise to "answer is 123"
    assert (s["F1"], s["EM"]) == (100.0, 100.0)
    s = score_answer("Yes", "yes.")
    assert (s["F1"], s["EM"], s["ROUGE-L"]) == (100.0, 100.0, 100.0)
    assert score_answer("2.25", "2.2")["EM"] == 100.0
    assert score_answer("2.35", "2.3")["EM"] == 0.0


def test_empty_prediction_becomes_hash() -> None:
    s = score_answer("some answer", "")
    assert s == {"F1": 0.0, "EM": 0.0, "ROUGE-L": 0.0, "SacreBLEU": 0.0}
    # Only the prediction gets '#': a reference that normalises to '' (e.g. the letter answer "A")
    # can never be matched, and a literal '#' reference is punctuation, so it normalises to ''.
    assert score_answer("A", "A")["EM"] == 0.0
    assert score_answer("#", "")["EM"] == 0.0
    assert score_answer("x", None)["F1"] == 0.0  # None is an empty prediction


@pytest.mark.parametrize("ref, pred", [
    ("the total population increased from 263973 to 266942", "population rose from 263973 to 266942"),
    ("Positive correlation, 0.87", "Strong positive correlation, 0.872"),
    ("men 12.5 women 7.25", "women 7.3 men 12.5"),
    ("alpha beta gamma delta epsilon", "alpha beta gamma delta epsilon"),
    ("one", "two"),
])
def test_rouge_and_bleu_match_the_libraries(ref: str, pred: str) -> None:
    nref, npred = normalize_answer(ref), normalize_answer(pred) or "#"
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    expected_rouge = round(scorer.score(nref, npred)["rougeL"].fmeasure * 100, 2)
    expected_bleu = round(sacrebleu.corpus_bleu([npred], [[nref]]).score, 2)
    s = score_answer(ref, pred)
    assert s["ROUGE-L"] == expected_rouge
    assert s["SacreBLEU"] == expected_bleu
    assert all(isinstance(v, float) for v in s.values())


def test_scores_are_rounded_to_two_decimals() -> None:
    s = score_answer("a b c d e f g", "b c d x")  # "a" is an article: ref tokens b..g (6), overlap 3
    assert s["F1"] == round(2 * (3 / 4) * (3 / 6) / (3 / 4 + 3 / 6) * 100, 2) == 60.0
    s = score_answer("one two three", "one two four five six seven")
    assert s["F1"] == 44.44
