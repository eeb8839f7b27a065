"""AI feedback: the `judge` reward source and ranker against a real `posttrain serve` subprocess, and the Label
tab's judge (suggest an order, rank the rest) through gradio_client. The judge is a tiny model trained here to
answer every pointwise request with "Score: 7" and every pairwise one with "Verdict: A": real verdicts over HTTP,
with known content."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import serving, write_jsonl

pytest.importorskip("gradio")

RUBRIC = "Prefer correct, polite and brief answers."
QUESTIONS = ["Do you have soup today?", "What time do you open?", "Is there parking?", "Can I book a table?"]
ANSWERS = ["Yes, tomato soup.", "We open at nine.", "No.", "Sure, for how many?"]


def judge_rows() -> list[dict]:
    from posttrain.rl.rewards import PAIRWISE_INSTRUCTION, POINTWISE_INSTRUCTION

    rows = []
    for q in QUESTIONS:
        for a in ANSWERS:
            rows.append({"messages": [
                {"role": "system", "content": POINTWISE_INSTRUCTION.format(rubric=RUBRIC, scale=10)},
                {"role": "user", "content": f"Question:\n{q}\n\nAnswer:\n{a}"},
                {"role": "assistant", "content": "Score: 7"}]})
            rows.append({"messages": [
                {"role": "system", "content": PAIRWISE_INSTRUCTION.format(rubric=RUBRIC)},
                {"role": "user", "content": f"Question:\n{q}\n\nAnswer A:\n{a}\n\nAnswer B:\n{ANSWERS[0]}"},
                {"role": "assistant", "content": "Verdict: A"}]})
    return rows


@pytest.fixture(scope="module")
def judge_url(tiny_model, tmp_path_factory):
    from posttrain.config import build_config
    from posttrain.train import run_training

    root = tmp_path_factory.mktemp("judge")
    write_jsonl(root / "judge.jsonl", judge_rows())
    run_training(build_config({"stage": "sft", "model": str(tiny_model), "output_dir": str(root / "judge"),
                               "data": {"train": str(root / "judge.jsonl"), "max_length": 256},
                               "train": {"max_steps": 80, "batch_size": 8, "lr": 3.0e-3, "warmup_ratio": 0.05}}))
    with serving(["--model", root / "judge"], root / "serve.log") as url:
        yield url + "/v1", str(root / "judge")


def test_judge_scores_compares_caches_and_counts_malformed(judge_url, tmp_path):
    from posttrain.errors import DataError
    from posttrain.rl.rewards import Judge, build_sources, score

    url, model = judge_url
    cache = tmp_path / "verdicts.jsonl"
    pointwise = Judge(url, model, RUBRIC, "pointwise", cache=str(cache))
    ranks, scores = pointwise.rank(QUESTIONS[0], ANSWERS[:3])
    assert scores == [6 / 9] * 3 and ranks == [1, 1, 1]  # "Score: 7" each: a three-way tie
    assert pointwise.stats == {"requests": 3, "cached": 0, "malformed": 0}
    pointwise.rank(QUESTIONS[0], ANSWERS[:3])
    assert pointwise.stats == {"requests": 3, "cached": 3, "malformed": 0}  # asked again: from the cache
    again = Judge(url, model, RUBRIC, "pointwise", cache=str(cache))  # a new process reads the cache file
    again.rank(QUESTIONS[0], ANSWERS[:3])
    assert again.stats["requests"] == 0 and len(cache.read_text().splitlines()) == 3

    # pairwise: the judge always says "A"; asked in both orders, every answer wins half: a tie, not a bias
    assert Judge(url, model, RUBRIC, "pairwise").rank(QUESTIONS[1], ANSWERS[:3]) == ([1, 1, 1], [0.5] * 3)
    first_wins = Judge(url, model, RUBRIC, "pairwise", swap=False)
    assert first_wins.rank(QUESTIONS[1], ANSWERS[:3]) == ([1, 2, 3], [1.0, 0.5, 0.0])

    # "Score: 7" on a 1..5 scale cannot be read: malformed, counted, no reward (never a silent 0)
    strict = Judge(url, model, RUBRIC, "pointwise", scale=5)
    assert strict.rank(QUESTIONS[2], ANSWERS[:2]) == ([None, None], [None, None])
    assert strict.stats["malformed"] == 2 and "Score: 7" in strict.malformed[-1]
    sources = build_sources([{"judge": {"url": url, "model": model, "rubric": RUBRIC, "scale": 5}}])
    with pytest.raises(DataError, match="returned None"):
        score(sources, QUESTIONS[:2], ANSWERS[:2], {})
    totals, metrics = score(sources, QUESTIONS[:2], ANSWERS[:2], {}, skip_invalid=True)
    assert totals == [0.0, 0.0] and metrics["reward/skipped"] == 2 and metrics["reward/judge"] is None


def test_judge_ranks_a_recipe_step(judge_url, tmp_path):
    """The `rank` step (recipe.rank_file) with the judge as its ranker: pairwise within each row's answers."""
    from posttrain.recipe import rank_file

    url, model = judge_url
    write_jsonl(tmp_path / "candidates.jsonl", [{"prompt": q, "responses": ANSWERS[:3]} for q in QUESTIONS[:2]])
    counts = rank_file(str(tmp_path / "candidates.jsonl"), str(tmp_path / "rankings.jsonl"),
                       [{"judge": {"url": url, "model": model, "rubric": RUBRIC, "mode": "pairwise", "swap": False}}])
    rows = [json.loads(line) for line in (tmp_path / "rankings.jsonl").read_text().splitlines()]
    assert counts["rows"] == 2 and [r["ranks"] for r in rows] == [[1, 2, 3]] * 2
    assert rows[0]["responses"] == ANSWERS[:3]  # the first shown wins every comparison


def test_label_tab_judge_through_gradio_client(judge_url, tiny_model, tmp_path):
    from gradio_client import Client

    from posttrain.ui.app import launch
    from conftest import free_port

    url, model = judge_url
    shutil.copytree(tiny_model, tmp_path / "model")
    (tmp_path / "label").mkdir()
    write_jsonl(tmp_path / "label/chat.candidates.jsonl",
                [{"prompt": q, "responses": ANSWERS[:3]} for q in QUESTIONS[:3]])
    port = free_port()
    app = launch(str(tmp_path), port=port, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        candidates = "label/chat.candidates.jsonl"
        suggestion = client.predict(candidates, 0, url, model, RUBRIC, "pointwise", api_name="/label_judge")
        assert suggestion["ranks"] == [1, 1, 1] and suggestion["malformed"] == 0
        # the person corrects the judge's three-way tie and submits, recording what the judge said
        client.predict(candidates, "alice", 0, [1, 2, 3], api_name="/label_submit")
        line = client.predict(candidates, url, model, RUBRIC, "pointwise", api_name="/label_judge_rest")
        assert line.startswith("the judge ranked 2 of 2 unranked prompts"), line
        rows = [json.loads(r) for r in (tmp_path / "label/chat.rankings.jsonl").read_text().splitlines()]
        assert [(r["labeller"], r["item"]) for r in rows] == [("alice", 0), (f"judge:{model}", 1),
                                                               (f"judge:{model}", 2)]
        assert Path(tmp_path / "label/chat.judge-cache.jsonl").is_file()
    finally:
        app.close()
