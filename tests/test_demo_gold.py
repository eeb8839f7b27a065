"""The demo's gold rater: it scores answers as the seeds' human rankers would, and ranks them for the rank step."""
from __future__ import annotations

import json
import random

import pytest

from posttrain.demo import restaurant as R
from posttrain.demo.chat import STYLES, answer, question
from posttrain.demo.gold import fact_score, gold, gold_reward, parts
from posttrain.recipe import rank_file
from posttrain.rl.rewards import build_sources, score


def test_full_polite_answer_beats_every_other_style():
    rng = random.Random(0)
    for _ in range(300):
        q = question(rng)
        full = gold(q.spec, answer(q, "full", rng))
        assert full == 1.0, (q, answer(q, "full", rng))
        for style in STYLES:
            if style != "full":
                text = answer(q, style, rng)
                assert gold(q.spec, text) < full, (style, text)
        for style in ("rude", "persona"):  # a human ranker would not accept these, whatever else is right
            assert gold(q.spec, answer(q, style, rng)) <= 0.3


@pytest.mark.parametrize("spec, text, expected", [
    ("$6.50", "The tomato soup costs $6.50.", 1.0),
    ("$6.50", "The tomato soup costs $8.00.", 0.0),           # a wrong price
    ("$6.50", "It costs $6.50, or $8.00 with bread.", 0.5),   # the right one and another value of its kind
    ("11:00 | 22:00", "On Tuesday we are open from 11:00 to 22:00.", 1.0),
    ("11:00 | 22:00", "On Tuesday we are open from 11:00 to 23:00.", 0.5),
    ("closed", "On Monday we are open from 11:00 to 22:00.", 0.0),
    ("yes | !not", "Yes, the apple pie is vegetarian.", 1.0),
    ("yes | !not", "No, the apple pie is not vegetarian.", 0.0),
    ("no ~ not | !yes", "No.", 1.0),                         # either alternative counts
    ("terrace | !welcome inside", "Dogs are welcome inside and on the terrace.", 0.5),
    ("a quarter off | apple pie", "Today we offer a quarter off the apple pie.", 1.0),
    ("a quarter off | apple pie", "Today we offer half price on the apple pie.", 0.5),
    ("MAPLE", "Mention the code MAPLE when you order.", 1.0),
    ("MAPLE", "Mention the code CEDAR when you order.", 0.0),
])
def test_facts(spec, text, expected):
    assert fact_score(spec, text) == expected


def test_visible_parts():
    spec = "$6.50"
    assert gold(spec, "The tomato soup costs $6.50.") == 1.0
    assert gold(spec, "$6.50") == pytest.approx(0.65)                       # a fragment: no sentence
    assert parts(spec, "Ugh, it is $6.50. Read the menu yourself.")["rude"]
    assert parts(spec, "As an AI I cannot eat, but it is $6.50.")["out_of_persona"]
    long = "Well, " + "this is a long answer that goes on and on, " * 5 + "and the soup costs $6.50."
    assert parts(spec, long)["concise"] == 0.0 and gold(spec, long) == pytest.approx(0.75)
    assert gold(spec, "") == 0.0
    assert gold(spec, "zz qq") == 0.0  # no fact, no sentence: brevity alone earns nothing


def test_reward_source_with_weight_zero_adds_nothing():
    """The weight-0 source PPO logs: its mean is reported, the total is the other source's alone."""
    completions = ["The tomato soup costs $6.50.", "$6.50", "Ugh. $6.50. Read it yourself."]
    columns = {"answer": ["$6.50"] * 3}
    sources = build_sources([{"builtin": "length", "target": 10, "unit": "words"},
                             {"function": "posttrain.demo.gold:gold_reward", "weight": 0, "name": "gold"}])
    totals, metrics = score(sources, ["q"] * 3, completions, columns)
    alone, _ = score(sources[:1], ["q"] * 3, completions, columns)
    assert totals == alone
    assert metrics["reward/gold"] == pytest.approx(sum(gold("$6.50", c) for c in completions) / 3)


def test_ranks_sampled_answers_like_a_labeller(tmp_path):
    """The rank step with the gold rater writes the rankings format a labelling UI writes (ties share a rank)."""
    candidates = tmp_path / "candidates.jsonl"
    responses = ["$6.50", "The tomato soup costs $6.50.", "Dunno, google it.", "The tomato soup costs $6.50. Enjoy!"]
    candidates.write_text(json.dumps({"prompt": "How much is the tomato soup?", "responses": responses,
                                      "answer": "$6.50", "kind": "price"}) + "\n")
    out = tmp_path / "rankings.jsonl"
    rank_file(str(candidates), str(out), [{"function": "posttrain.demo.gold:gold_reward"}], tie_within=0.1)
    row = json.loads(out.read_text())
    assert row["responses"][:2] == [responses[1], responses[3]] and row["ranks"] == [1, 1, 2, 3]
    assert row["responses"][2:] == ["$6.50", "Dunno, google it."]
    assert gold_reward(["q"], ["$6.50"], answer=["$6.50"]) == [pytest.approx(0.65)]


def test_facts_come_from_the_restaurant():
    """The rater's facts are the restaurant's (one source of truth with the documents the demo indexes)."""
    rng = random.Random(1)
    seen = set()
    for _ in range(500):
        q = question(rng)
        seen.add(q.kind)
        if q.kind == "price" and q.spec.startswith("$"):
            dish = next(d for d in R.DISHES if d in q.text)
            assert q.spec == R.money(R.PRICE[dish])
        if q.kind == "promotion":
            assert q.spec in (f"{R.TODAY.offer.rsplit(' the ', 1)[0]} | {R.TODAY.dish}", R.TODAY.code)
    assert seen == {"price", "hours", "vegetarian", "inside", "policy", "promotion"}
