"""bench/eval.py (`switchyard eval`): the scorer on hand-made outputs, the set and its stored baseline, and
a subset of the set through the default in-process engine with no answer's tokens changed."""
from __future__ import annotations

import json

import pytest

from bench.eval import BASELINE_PATH, Answer, evaluate, load_baseline, load_set, normalize, score, set_digest

SUBSET = 40


def item(*answers: str, case_sensitive: bool = False, category: str = "t") -> dict:
    return {"id": "t-000", "category": category, "prompt": "", "answers": list(answers), "max_tokens": 4,
            "case_sensitive": case_sensitive}


@pytest.mark.parametrize("text, want", [
    (" Paris", "paris"),
    ("Paris.", "paris"),
    ("  Paris  \nQ: What is", "paris"),          # only the first line counts
    ('"Paris"', "paris"),
    ("'Paris'.", "paris"),
    ("The Nile", "nile"),                        # a leading article goes (case-insensitive items)
    ("an apple", "apple"),
    ("New   Delhi", "new delhi"),                # whitespace collapsed
    ("42!", "42"),
    ("", ""),
    ("\n", ""),
])
def test_normalize(text, want):
    assert normalize(text) == want


def test_normalize_case_sensitive_keeps_case_and_articles():
    assert normalize(" The Quick fox.", case_sensitive=True) == "The Quick fox"
    assert normalize(" APPLE\n", case_sensitive=True) == "APPLE"


@pytest.mark.parametrize("text, it, ok", [
    (" Paris", item("Paris"), True),
    (" paris.", item("Paris"), True),
    (" Kiev", item("Kyiv", "Kiev"), True),       # any alias
    (" Pari", item("Paris"), False),
    (" Paris is the capital", item("Paris"), False),   # exact match, not containment
    (" 12", item("12"), True),
    (" 120", item("12"), False),
    (" 12\n13 + 4 = 17", item("12"), True),
    (" Istanbul", item("Ankara"), False),
    (" APPLE", item("APPLE", case_sensitive=True), True),
    (" Apple", item("APPLE", case_sensitive=True), False),
    (" apple, river, stone", item("apple, river, stone", case_sensitive=True), True),
    (" apple, stone, river", item("apple, river, stone", case_sensitive=True), False),
    (" the Sun", item("Sun"), True),
])
def test_score(text, it, ok):
    assert score(text, it) is ok


def test_evaluate_counts_per_category_and_changed_answers():
    items = [{**item("a", category="x"), "id": "x-0"}, {**item("b", category="x"), "id": "x-1"},
             {**item("c", category="y"), "id": "y-0"}]
    answers = [Answer(" a", [1, 2]), Answer(" nope", [3]), Answer(" c", [4])]
    base = {"token_ids": {"x-0": [1, 2], "x-1": [9], "y-0": [4]}}
    res = evaluate(items, answers, base)
    assert res["n"] == 3 and res["accuracy"] == pytest.approx(2 / 3)
    assert res["categories"]["x"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert res["categories"]["y"]["accuracy"] == 1.0
    assert res["wrong_ids"] == ["x-1"]
    assert (res["changed"], res["compared"], res["changed_ids"]) == (1, 3, ["x-1"])
    assert "changed" not in evaluate(items, answers)


def test_the_set_and_its_baseline_agree():
    items = load_set()
    assert len(items) >= 200 and len({it["id"] for it in items}) == len(items)
    assert all(it["answers"] and it["prompt"] and it["max_tokens"] <= 16 for it in items)
    sub = load_set(subset=SUBSET)
    assert len(sub) == SUBSET and {it["category"] for it in sub} == {it["category"] for it in items}
    assert [it["id"] for it in load_set(subset=SUBSET)] == [it["id"] for it in sub]   # the same items every time
    base = load_baseline()
    assert base is not None, f"no {BASELINE_PATH}: run `switchyard eval --write-baseline`"
    assert base["set_digest"] == set_digest(items), "the set changed: run `switchyard eval --write-baseline`"
    assert set(base["token_ids"]) == {it["id"] for it in items}
    # the stored answers still score as they did when recorded (the scorer was not changed under the baseline)
    stored = [Answer(base["text"][it["id"]], base["token_ids"][it["id"]]) for it in items]
    assert evaluate(items, stored)["accuracy"] == pytest.approx(base["accuracy"])


def test_subset_through_the_default_engine_changes_no_answer(tmp_path):
    """`switchyard eval --subset 40` on the default in-process engine (a freshly loaded model, so no other
    test's engine settings are attached to it): every answer's tokens equal the baseline's."""
    from services.cli import main
    out = tmp_path / "eval.json"
    assert main(["eval", "--inproc", "--subset", str(SUBSET), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == SUBSET and res["compared"] == SUBSET
    assert res["changed"] == 0, f"answers changed vs the baseline: {res['changed_ids']}"
    assert 0.2 < res["accuracy"] < 0.9     # informative: neither floor nor ceiling
