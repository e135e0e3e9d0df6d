"""The shapes tasks' scoring functions, called directly: right answers score 1, wrong ones 0, and answers
written differently (case, punctuation, articles, number words) count as the same answer.

These are the functions lmms-eval calls through the task YAMLs (`process_results`, `doc_to_choice`,
`doc_to_target`); the end-to-end runs in tests/test_lmms_eval.py show they are wired in.
"""

from __future__ import annotations

import math

import pytest

from dove_vlm.lmms_tasks.dove_shapes_vqa.utils import (
    doc_to_choice,
    doc_to_choice_index,
    normalise_answer,
    process_multiple_choice,
    process_short_answer,
)
from dove_vlm.shapes import COLOURS, SHAPES


@pytest.mark.parametrize(
    "written, normalised",
    [
        ("red", "red"),
        ("Red", "red"),
        (" RED! ", "red"),
        ("red.", "red"),
        ("A red", "red"),
        ("the circle", "circle"),
        ("three", "3"),
        ("Three.", "3"),
        ("zero", "0"),
        ("Yes,", "yes"),
        ("an  Apple", "apple"),
        ("red circle", "red circle"),
    ],
)
def test_normalise_answer_folds_case_punctuation_articles_and_number_words(written, normalised):
    assert normalise_answer(written) == normalised


def test_normalise_answer_keeps_answers_that_differ_apart():
    assert normalise_answer("circles") != normalise_answer("circle")  # no stemming: a plural is another answer
    assert normalise_answer("red") != normalise_answer("green")
    assert normalise_answer("3") != normalise_answer("4")
    assert normalise_answer("yes") != normalise_answer("no")


@pytest.mark.parametrize(
    "answer, prediction, expected",
    [
        ("red", "red", 1.0),
        ("red", "Red.", 1.0),
        ("red", "the red", 1.0),
        ("3", "three", 1.0),
        ("3", "Three!", 1.0),
        ("yes", "YES", 1.0),
        ("circle", "A circle.", 1.0),
        ("red", "blue", 0.0),
        ("3", "4", 0.0),
        ("3", "three objects", 0.0),  # exact match: an answer with extra words is wrong
        ("yes", "no", 0.0),
        ("circle", "circles", 0.0),
        ("red", "", 0.0),
    ],
)
def test_process_short_answer_gives_credit_exactly_for_the_right_answer(answer, prediction, expected):
    assert process_short_answer({"answer": answer}, [prediction]) == {"exact_match": expected}


def test_process_short_answer_normalises_the_ground_truth_too_and_scores_no_result_as_wrong():
    assert process_short_answer({"answer": "Three"}, ["3"]) == {"exact_match": 1.0}
    assert process_short_answer({"answer": "red"}, []) == {"exact_match": 0.0}


def test_choices_cover_every_answer_the_generator_gives_and_the_target_is_the_answer():
    assert doc_to_choice({"question_type": "colour", "answer": "blue"}) == list(COLOURS)
    assert doc_to_choice({"question_type": "shape", "answer": "square"}) == list(SHAPES)
    assert doc_to_choice({"question_type": "presence", "answer": "no"}) == ["yes", "no"]
    counts = doc_to_choice({"question_type": "count", "answer": "2"})
    assert counts[0] == "0" and "2" in counts
    assert doc_to_choice_index({"question_type": "colour", "answer": "Blue"}) == list(COLOURS).index("blue")
    assert doc_to_choice_index({"question_type": "count", "answer": "two"}) == counts.index("2")
    # An answer outside the type's list (an unknown type) is appended, so the target always exists.
    assert doc_to_choice({"question_type": "other", "answer": "Maybe"}) == ["yes", "no", "maybe"]
    assert doc_to_choice_index({"question_type": "other", "answer": "Maybe"}) == 2


def _results(scores):
    return [(score, False) for score in scores]


def test_process_multiple_choice_picks_the_lowest_score_and_credits_only_the_target():
    doc = {"question_type": "colour", "answer": "blue"}
    target = list(COLOURS).index("blue")
    scores = [5.0] * len(COLOURS)
    scores[target] = 1.0  # lmms-eval scores are losses: the lowest is the likeliest
    assert process_multiple_choice(doc, _results(scores)) == {"acc": 1.0}
    wrong = list(scores)
    wrong[(target + 1) % len(wrong)] = 0.5
    assert process_multiple_choice(doc, _results(wrong)) == {"acc": 0.0}
    # The highest score is the least likely choice, never the pick.
    inverted = [1.0] * len(COLOURS)
    inverted[target] = 9.0
    assert process_multiple_choice(doc, _results(inverted)) == {"acc": 0.0}


def test_process_multiple_choice_scores_unanswerable_samples_as_wrong():
    doc = {"question_type": "presence", "answer": "yes"}
    assert process_multiple_choice(doc, _results([math.inf, math.inf])) == {"acc": 0.0}
    assert process_multiple_choice(doc, []) == {"acc": 0.0}
    # One choice that could not be scored (+inf) loses to any finite score.
    assert process_multiple_choice(doc, _results([2.0, math.inf])) == {"acc": 1.0}
    assert process_multiple_choice(doc, _results([math.inf, 2.0])) == {"acc": 0.0}
