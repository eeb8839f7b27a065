"""posttrain run: a real recipe (sft -> generate -> rank -> pairs -> dpo -> eval) on a tiny model: runs, skips
what is unchanged, reruns what changed and what follows, --from, lineage, crashes, and one-line errors."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, write_jsonl
from posttrain.data.preference import write_pairs
from posttrain.errors import ConfigError, DataError
from posttrain.recipe import rank_file, resolve, run_recipe

WORDS = ["cat", "dog", "tea", "fish", "cake", "lamp"]
STEPS = ["sft", "candidates", "rankings", "pairs", "dpo", "eval"]


@pytest.fixture
def recipe(tiny_model, tmp_path) -> dict:
    sft = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": [{"role": "user", "content": f"Reverse {w}"}, {"role": "assistant", "content": w[::-1]}]}
        for w in WORDS] * 3)
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Reverse {w}", "answer": w[::-1], "kind": "reverse"}
                                             for w in WORDS[:4]])
    return {"out": str(tmp_path / "run"), "vars": {"model": str(tiny_model), "data": str(tmp_path), "steps": 2},
            "steps": [
                {"name": "sft", "kind": "train", "stage": "sft", "model": "${vars.model}",
                 "data": {"train": str(sft), "max_length": 64},
                 "train": {"max_steps": "${vars.steps}", "batch_size": 4, "lr": 3e-3}},
                {"name": "candidates", "kind": "generate", "model": "${sft.output}",
                 "prompts": "${vars.data}/prompts.jsonl", "n": 3, "max_new_tokens": 8, "seed": 0},
                # the length reward gives the random model's answers distinct scores, hence pairs
                {"name": "rankings", "kind": "rank", "input": "${candidates.output}",
                 "rewards": [{"builtin": "length", "target": 6}]},
                {"name": "pairs", "kind": "pairs", "input": "${rankings.output}"},
                {"name": "dpo", "kind": "train", "stage": "dpo", "model": "${sft.output}",
                 "data": {"train": "${pairs.output}", "max_length": 64},
                 "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3}},
                {"name": "eval", "kind": "eval", "model": "${dpo.output}", "tasks": "${vars.data}/prompts.jsonl",
                 "reference": "${sft.output}", "data": str(sft), "max_new_tokens": 8},
            ]}


def ran(results: dict) -> list[str]:
    return [name for name, r in results.items() if not r["skipped"]]


def step(recipe: dict, name: str) -> dict:
    return next(s for s in recipe["steps"] if s["name"] == name)


def test_cli_runs_every_step_then_skips_every_step(recipe, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    first = run_cli("run", path).stdout
    assert "6 of 6 steps ran" in first
    out = Path(recipe["out"])
    for name in STEPS:
        assert (out / name / "lineage.json").is_file()
    assert "0 of 6 steps ran" in run_cli("run", path).stdout
    assert "2 of 6 steps ran" in run_cli("run", path, "--from", "dpo").stdout

    dpo = json.loads((out / "dpo" / "lineage.json").read_text())
    assert dpo["config"]["stage"] == "dpo" and dpo["config"]["model"] == str(out / "sft")
    assert set(dpo["inputs"]) == {str(out / "sft"), str(out / "pairs" / "pairs.jsonl")}
    chain = dpo["parents"]["pairs"]["parents"]["rankings"]["parents"]["candidates"]["parents"]["sft"]
    assert chain["config"]["train"]["max_steps"] == 2 and chain["output_hash"]
    assert set(dpo["parents"]) == {"sft", "pairs"}
    result = json.loads((out / "eval" / "eval.json").read_text())
    assert result["tasks"] == 4 and result["kl"] is not None and result["perplexity"] > 1
    rankings = [json.loads(line) for line in (out / "rankings" / "rankings.jsonl").read_text().splitlines()]
    assert all(r["scores"] == sorted(r["scores"], reverse=True) and r["answer"] for r in rankings)


def test_changes_rerun_the_step_and_what_reads_it(recipe, tmp_path):
    assert ran(run_recipe(recipe)) == STEPS
    assert ran(run_recipe(recipe)) == []

    changed = copy.deepcopy(recipe)
    step(changed, "dpo")["train"]["lr"] = 2e-3
    results = run_recipe(changed)
    assert ran(results) == ["dpo", "eval"]
    assert results["eval"]["result"]["tasks"] == 4  # the result is there whether the step ran or was skipped
    assert run_recipe(changed)["eval"]["result"] == results["eval"]["result"]

    # a deleted output is rebuilt; the same content downstream means nothing more reruns
    (Path(recipe["out"]) / "rankings" / "rankings.jsonl").unlink()
    assert ran(run_recipe(changed)) == ["rankings"]

    # an edited input file reruns every step that reads it, and what follows
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(prompts.read_text().replace("Reverse cat", "Reverse the word cat"))
    assert ran(run_recipe(changed)) == ["candidates", "rankings", "pairs", "dpo", "eval"]

    assert ran(run_recipe(changed, from_step="rankings")) == ["rankings", "pairs", "dpo", "eval"]
    with pytest.raises(ConfigError, match="did you mean 'pairs'"):
        run_recipe(changed, from_step="pair")


def test_a_failed_step_is_never_complete(recipe, tmp_path):
    flag = tmp_path / "fail"
    flag.write_text("1")
    reward = tmp_path / "reward.py"
    reward.write_text(f"from pathlib import Path\n"
                      f"def length(prompts, completions, **columns):\n"
                      f"    if Path({str(flag)!r}).exists():\n"
                      f"        raise RuntimeError('reward service down')\n"
                      f"    return [float(len(c)) for c in completions]\n")
    step(recipe, "rankings")["rewards"] = [{"function": f"{reward}:length"}]
    recipe["steps"] = recipe["steps"][:4]
    with pytest.raises(DataError, match="reward service down"):
        run_recipe(recipe)
    out = Path(recipe["out"])
    assert (out / "candidates" / "lineage.json").is_file()
    assert not (out / "rankings" / "lineage.json").exists() and not (out / "rankings" / "rankings.jsonl").exists()
    flag.unlink()
    assert ran(run_recipe(recipe)) == ["rankings", "pairs"]
    rankings = json.loads((out / "rankings" / "lineage.json").read_text())
    assert str(reward) in rankings["inputs"]  # a reward function's file is an input too


BAD = [
    (lambda r: step(r, "dpo").update(model="${sfft.output}"), "step 'dpo': unknown reference ${sfft.output}; "
                                                              "did you mean 'sft'?"),
    (lambda r: step(r, "sft").update(model="${eval.output}"), "step 'sft' refers to ${eval.output}, but step "
                                                              "'eval' runs later"),
    (lambda r: step(r, "pairs").update(input="${pairs.output}"), "step 'pairs' refers to its own output"),
    (lambda r: step(r, "dpo").update(model="${sft.outptu}"), "did you mean ${sft.output}?"),
    (lambda r: step(r, "sft").update(model="${vars.modle}"), "unknown variable ${vars.modle}; did you mean 'model'?"),
    (lambda r: step(r, "candidates").update(kind="generat"), "step 'candidates': unknown kind 'generat'; "
                                                             "did you mean 'generate'?"),
    (lambda r: step(r, "candidates").update(promts="x"), "step 'candidates': unknown key 'promts' for a generate "
                                                         "step; did you mean 'prompts'?"),
    (lambda r: step(r, "rankings").pop("rewards"), "step 'rankings': missing required key 'rewards'"),
    (lambda r: step(r, "dpo").update(trian={"lr": 1}), "step 'dpo': unknown key 'trian'; did you mean 'train'?"),
    (lambda r: step(r, "eval").update(name="sft"), "step name 'sft' is used twice"),
    (lambda r: r.update(step=[]), "recipe: unknown key 'step'; did you mean 'steps'?"),
]


@pytest.mark.parametrize("mutate,message", BAD, ids=[m.split(":")[0][:40] for _, m in BAD])
def test_bad_recipes_fail_before_anything_runs_with_one_line(recipe, mutate, message):
    mutate(recipe)
    with pytest.raises(ConfigError) as error:
        run_recipe(recipe)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not Path(recipe["out"]).exists()


def test_rank_orders_best_first_with_ties_and_pairs_expand_them(tmp_path):
    candidates = write_jsonl(tmp_path / "candidates.jsonl", [
        {"prompt": "Reverse cat", "responses": ["nope", "tac", "also nope"], "answer": "tac",
         "finish_reasons": ["stop", "stop", "length"], "logprobs": [-1.0, -2.0, -3.0]}])
    counts = rank_file(str(candidates), str(tmp_path / "rankings.jsonl"), [{"builtin": "answer_match"}])
    row = json.loads((tmp_path / "rankings.jsonl").read_text())
    assert row["responses"] == ["tac", "nope", "also nope"] and row["ranks"] == [1, 2, 2]
    assert row["scores"] == [1.0, 0.0, 0.0] and row["logprobs"] == [-2.0, -1.0, -3.0]
    assert row["finish_reasons"] == ["stop", "stop", "length"] and row["answer"] == "tac"
    assert counts["rows"] == 1 and counts["reward/answer_match"] == pytest.approx(1 / 3)
    pairs = write_pairs(tmp_path / "rankings.jsonl", tmp_path / "pairs.jsonl")
    assert pairs["pairs"] == 2 and pairs["ties_skipped"] == 1


def test_example_recipe_is_valid(tmp_path):
    steps = resolve(Path(__file__).parents[1] / "examples" / "recipe.yaml", out=tmp_path)
    assert [s.kind for s in steps][:2] == ["init-model", "train"]
    assert all(str(s.output).startswith(str(tmp_path)) for s in steps)


def test_rank_tie_within_makes_near_equal_scores_ties(tmp_path):
    candidates = write_jsonl(tmp_path / "candidates.jsonl", [
        {"prompt": "Say hi", "responses": ["x" * 10, "x" * 11, "x" * 20, "x" * 2]},
        {"prompt": "Say hi", "responses": ["x" * 10, "x" * 10]}])
    length = [{"builtin": "length", "target": 20}]  # scores 0.5, 0.55, 1.0, 0.1 and 0.5, 0.5
    plain = rank_file(str(candidates), str(tmp_path / "plain.jsonl"), length)
    assert [json.loads(line)["ranks"] for line in (tmp_path / "plain.jsonl").read_text().splitlines()] == \
        [[1, 2, 3, 4], [1, 1]]
    assert plain["all_tied"] == 1
    coarse = rank_file(str(candidates), str(tmp_path / "coarse.jsonl"), length, tie_within=0.2)
    rows = [json.loads(line) for line in (tmp_path / "coarse.jsonl").read_text().splitlines()]
    assert rows[0]["ranks"] == [1, 2, 2, 3] and rows[0]["scores"] == pytest.approx([1.0, 0.55, 0.5, 0.1])
    assert coarse["all_tied"] == 1
