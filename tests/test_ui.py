"""The web UI driven through gradio_client, as a script would drive it: every api_name on a real server (in this
process) with real `posttrain` subprocesses behind it and a tiny model built in the test."""
from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402

from conftest import free_port, write_jsonl  # noqa: E402

PROMPTS = ["What time do you open?", "Do you have soup today?"]


@pytest.fixture(scope="module")
def workdir(tiny_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ui-workdir")
    shutil.copytree(tiny_model, root / "model")
    chats = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(24)]
    (root / "data").mkdir()
    write_jsonl(root / "data" / "sft.jsonl", chats)
    write_jsonl(root / "data" / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    return root


@pytest.fixture(scope="module")
def ui(workdir):
    from posttrain.ui.app import launch

    port = free_port()
    app = launch(str(workdir), port=port, block=False)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    yield client, app
    for job in app.tabs["Train"].jobs.list():  # nothing left running behind the test
        if app.tabs["Train"].jobs.state(job) == "running":
            app.tabs["Train"].jobs.stop(job.id)
    app.close()


def wait(client, job: str, until, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while True:
        status = client.predict(job, api_name="/job_status")
        if until(status):
            return status
        assert time.time() < deadline, f"job {job} never got there: {status}"
        time.sleep(0.5)


SFT = {"stage": "sft", "model": "model", "output_dir": "runs/sft",
       "data": {"train": "data/sft.jsonl", "max_length": 64},
       "train": {"max_steps": 200, "batch_size": 2, "lr": 1.0e-3}}


def test_train_watch_stop_resume(ui, workdir):
    client, app = ui
    text, valid = client.predict("sft", "model", "runs/sft", ["data/sft.jsonl"], None,
                                 {"train.max_steps": 200, "train.lr": 1.0e-3, "data.max_length": 64,
                                  "train.batch_size": 2}, api_name="/config_yaml")
    assert yaml.safe_load(text) == SFT and valid.startswith("valid"), (text, valid)
    text, valid = client.predict("sft", "model", "runs/sft", ["data/sft.jsonl"], None, {"train.lr": -1},
                                 api_name="/config_yaml")
    assert valid.startswith("not valid yet") and "train.lr" in valid
    job, message = client.predict(yaml.safe_dump(SFT), False, api_name="/train_start")
    assert job, message
    status = wait(client, job, lambda s: s["metric_lines"] >= 2 or s["state"] != "running")
    assert status["state"] == "running" and status["total"] == 200 and status["last_metrics"]["loss"] > 0
    # a second training into the same output_dir is refused while the first runs
    again, refused = client.predict(yaml.safe_dump(SFT), False, api_name="/train_start")
    assert again == "" and "runs/sft" in refused and "not started" in refused
    # a restarted UI server (a new job registry over the same workdir) re-attaches to the running job
    from posttrain.ui.jobs import Jobs
    from posttrain.ui.workspace import Workspace

    assert Jobs(Workspace(workdir)).state(Jobs(Workspace(workdir)).get(job)) == "running"
    assert client.predict(job, api_name="/train_stop").startswith(f"job {job}: stopping")
    status = wait(client, job, lambda s: s["state"] != "running")
    assert status["state"] == "stopped", status
    checkpoints = list((workdir / "runs/sft/checkpoints").iterdir())
    assert len(checkpoints) == 1 and not (workdir / "runs/sft/summary.json").exists()
    stopped_at = int(checkpoints[0].name.removeprefix("step-"))
    assert 2 <= stopped_at < 200
    jobs = client.predict(api_name="/jobs")
    assert [job, "train", "sft -> runs/sft", "stopped"] in jobs

    resumed, message = client.predict(job, api_name="/train_resume")
    assert resumed and resumed != job, message
    status = wait(client, resumed, lambda s: s["state"] != "running")
    assert status["state"] == "finished", status["log_tail"]
    summary = json.loads((workdir / "runs/sft/summary.json").read_text())
    assert summary["steps"] == 200
    lines = [json.loads(line) for line in (workdir / "runs/sft/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 201))  # the resumed run continued the same file

    table, _, _ = client.predict(api_name="/runs_list")
    assert any(row[0] == "runs/sft" and row[2] == "finished" for row in table["data"])
    details = client.predict("runs/sft", api_name="/run_details")
    assert details["summary"]["steps"] == 200 and details["lineage"][:2] == ["runs/sft", "model"]
    assert any(p.endswith(".png") for p in details["plots"])
    curves, finals, note = client.predict(["runs/sft"], "loss", api_name="/runs_compare")
    assert len(curves["data"]) == 200 and not note


def test_recipe_and_demo_jobs(ui, workdir):
    client, _ = ui
    recipe = {"out": "runs/recipe", "steps": [{"name": "tune", **{k: v for k, v in SFT.items() if k != "output_dir"},
                                               "train": {**SFT["train"], "max_steps": 3}}]}
    (workdir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    job, message = client.predict("recipe.yaml", api_name="/recipe_start")
    assert job, message
    status = wait(client, job, lambda s: s["state"] != "running")
    assert status["state"] == "finished" and status["recipe"]["name"] == "tune" and status["recipe"]["steps"] == 1
    assert (workdir / "runs/recipe/tune/summary.json").is_file()

    sft = yaml.safe_load(client.predict(api_name="/demo_sft_config"))
    assert sft["stage"] == "sft" and sft["model"] == "demo/pt" and sft["data"]["train"] == "demo/data/sft.jsonl"
    job, message = client.predict(api_name="/demo_prepare")  # the demo's data now, its first steps as a job
    assert job, message
    assert (workdir / "demo/data/sft.jsonl").is_file() and (workdir / "demo/prepare.yaml").is_file()
    assert [s["name"] for s in yaml.safe_load((workdir / "demo/prepare.yaml").read_text())["steps"]] == ["init", "pt"]
    client.predict(job, api_name="/train_stop")
    assert wait(client, job, lambda s: s["state"] != "running")["state"] in ("stopped", "failed")


def test_inspect_and_paths_confined(ui, workdir):
    client, _ = ui
    report = client.predict(["data/sft.jsonl"], "model", "sft", api_name="/inspect_data")
    assert "24" in report and "sft" in report
    outside = workdir.parent / "outside.jsonl"
    outside.write_text('{"text": "secret"}\n')
    for bad in ("../outside.jsonl", str(outside), "/etc/passwd"):
        assert "outside the workdir" in client.predict([bad], "model", "sft", api_name="/inspect_data")
    for key, value in (("model", "../model"), ("output_dir", "/tmp/elsewhere")):
        job, message = client.predict(yaml.safe_dump({**SFT, key: value}), False, api_name="/train_start")
        assert job == "" and "outside the workdir" in message, message
    job, message = client.predict(yaml.safe_dump({**SFT, "stage": "grpo", "rewards": [{"function": "os:system"}]}),
                                  False, api_name="/train_start")
    assert job == "" and "posttrain module" in message
    with pytest.raises(Exception, match="outside the workdir"):
        client.predict("../outside.jsonl", "alice", api_name="/label_next")
    from posttrain.ui.app import exposure_warning

    assert exposure_warning("127.0.0.1", 7860, None) is None
    assert "without --auth" in exposure_warning("0.0.0.0", 7860, None)
    assert exposure_warning("0.0.0.0", 7860, ("user", "pass")) is None


def test_no_workdir_path_chosen_unasked(ui):
    """Gradio's Dropdown selects its first choice when given no value: then a model, adapter or eval file would be
    used without the person choosing it, and a run shown as chosen in the Runs tab never showed its details."""
    import gradio as gr

    _, app = ui
    ws = app.workspace
    paths = set(ws.models()) | set(ws.data_files()) | set(ws.adapters()) | set(ws.recipes())
    assert {"model", "data/sft.jsonl"} <= paths
    chosen = {(b.label, b.value) for b in app.blocks.values() if isinstance(b, gr.Dropdown)
              and isinstance(b.value, str) and b.value in paths}
    assert not chosen, chosen


def test_label_two_prompts_into_pairs(ui, workdir):
    client, _ = ui
    job, message = client.predict("data/prompts.jsonl", "model", "", 3, 6, 1.0, 0, api_name="/label_sample")
    assert job, message
    assert wait(client, job, lambda s: s["state"] != "running")["state"] == "finished"
    candidates = "label/prompts.candidates.jsonl"
    first = client.predict(candidates, "alice", api_name="/label_next")
    assert (first["item"], first["done"], first["total"], first["prompt"]) == (0, 0, 2, PROMPTS[0])
    assert len(first["responses"]) == 3
    second = client.predict(candidates, "alice", 0, [2, 1, 3], api_name="/label_submit")
    assert (second["item"], second["done"]) == (1, 1)
    # a closed browser loses nothing: asking again resumes at the first prompt not done
    assert client.predict(candidates, "alice", api_name="/label_next")["item"] == 1
    done = client.predict(candidates, "alice", 1, [1, 1, 2], api_name="/label_submit")  # a tie
    assert done["finished"] and done["done"] == 2
    client.predict(candidates, "bob", 0, [2, 1, 3], api_name="/label_submit")  # agrees with alice
    after_flag = client.predict(candidates, "bob", 1, api_name="/label_flag")
    assert after_flag["finished"]
    with pytest.raises(Exception, match="give a rank"):
        client.predict(candidates, "carol", 0, [1, 2], api_name="/label_submit")

    rankings = [json.loads(line) for line in (workdir / "label/prompts.rankings.jsonl").read_text().splitlines()]
    responses = [json.loads(line)["responses"] for line in (workdir / candidates).read_text().splitlines()]
    assert [(r["labeller"], r["item"], r["ranks"]) for r in rankings] == \
        [("alice", 0, [2, 1, 3]), ("alice", 1, [1, 1, 2]), ("bob", 0, [2, 1, 3])]
    assert rankings[0]["responses"] == responses[0] and rankings[0]["prompt"] == PROMPTS[0]
    skips = [json.loads(line) for line in (workdir / "label/prompts.skips.jsonl").read_text().splitlines()]
    assert [(s["labeller"], s["item"], s["action"]) for s in skips] == [("bob", 1, "flag")]
    assert client.predict(candidates, api_name="/label_agreement") == [
        {"labellers": ["alice", "bob"], "prompts": 1, "answer_pairs": 3, "agree": 1.0}]

    line = client.predict(candidates, api_name="/label_pairs")
    assert "3 rankings -> 8 pairs (1 tied pairs skipped)" in line, line
    pairs = [json.loads(line) for line in (workdir / "label/prompts.pairs.jsonl").read_text().splitlines()]
    r0 = responses[0]
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs[:3]] == \
        [(r0[1], r0[0]), (r0[1], r0[2]), (r0[0], r0[2])]
    from posttrain.data.formats import load_examples

    examples, _ = load_examples(str(workdir / "label/prompts.pairs.jsonl"), kind="preference")
    assert len(examples) == 8  # what stage rm / dpo reads


def test_chat_feedback_files(ui, workdir):
    client, _ = ui
    history, sources = client.predict("What time do you open?", [], "model", "", "", "", 0.0, 8, api_name="/chat")
    assert [m["role"] for m in history] == ["user", "assistant"] and history[1]["content"] and sources == ""
    from posttrain.engine import Engine, SamplingParams

    engine = Engine.load(workdir / "model")  # the streamed answer is the engine's own greedy answer
    expected = engine.generate([engine.chat_prompt(history[:1])], SamplingParams(max_new_tokens=8, temperature=0))
    assert history[1]["content"] == expected[0].text
    assert "👍" in client.predict(history, 1, True, "model", api_name="/chat_thumbs")
    assert "👎" in client.predict(history, 1, False, "model", api_name="/chat_thumbs")
    with pytest.raises(Exception, match="not an answer"):
        client.predict(history, 0, True, "model", api_name="/chat_thumbs")

    a, b = client.predict("Do you have soup today?", [], [], "model", "", "model", "", "", "", 1.0, 8,
                          api_name="/chat_side_by_side")
    assert a[0] == b[0] and a[1]["role"] == b[1]["role"] == "assistant"
    message, kept_a, kept_b = client.predict(a, b, "B", "model", "model", api_name="/chat_compare")
    assert kept_a == kept_b == b
    if a[1]["content"] != b[1]["content"]:
        assert "B is better" in message
    tie, _, _ = client.predict(a, b, "tie", "model", "model", api_name="/chat_compare")
    assert tie.startswith("tie: no pair written")

    from posttrain.data.formats import load_examples

    feedback, _ = load_examples(str(workdir / "feedback/kto.jsonl"), kind="feedback")
    assert [f.desirable for f in feedback] == [True, False]
    assert feedback[0].completion[0]["content"] == history[1]["content"]
    if a[1]["content"] != b[1]["content"]:
        pairs, _ = load_examples(str(workdir / "feedback/pairs.jsonl"), kind="preference")
        assert len(pairs) == 1 and pairs[0].chosen[0]["content"] == b[1]["content"]
        assert pairs[0].rejected[0]["content"] == a[1]["content"]


def test_evaluate_and_export(ui, workdir):
    client, _ = ui
    job, message = client.predict("model", "", "", "data/sft.jsonl", "", "", "", 16, None, api_name="/eval_start")
    assert job, message
    deadline = time.time() + 240
    while (result := client.predict(job, api_name="/eval_result"))["state"] == "running":
        assert time.time() < deadline
        time.sleep(0.5)
    assert result["state"] == "finished" and result["result"]["perplexity"] > 1, result
    table = client.predict([result["output"]], api_name="/eval_table")
    assert "perplexity" in [row[0] for row in table["data"]]

    job, message = client.predict("model", "", "exports/model.gguf", "gguf", "f16", False, api_name="/export_start")
    assert job, message
    deadline = time.time() + 240
    while (status := client.predict(job, api_name="/export_status"))["state"] == "running":
        assert time.time() < deadline
        time.sleep(0.5)
    assert status["state"] == "finished", status["log_tail"]
    assert (workdir / "exports/model.gguf").stat().st_size > 0


def test_eval_curves_leave_the_token_count_out():
    """An SFT run with an eval set logs eval_loss, eval_perplexity and eval_tokens (a count): the eval plot shows the
    perplexity alone, the loss plot both losses."""
    from posttrain.ui.curves import curves

    rows = [{"step": 4, "loss": 5.38, "eval_loss": 5.28, "eval_perplexity": 196.8, "eval_tokens": 40000},
            {"step": 8, "loss": 4.87, "eval_loss": 4.75, "eval_perplexity": 115.6, "eval_tokens": 40000}]
    assert sorted(set(curves(rows, "eval")["metric"])) == ["eval_perplexity"]
    assert sorted(set(curves(rows, "loss")["metric"])) == ["eval_loss", "loss"]


def test_trainer_stops_on_sigterm_only_in_main_thread():
    """StopRequest installs its handler only where signals can arrive (the main thread, one process) and puts the
    previous handler back."""
    from posttrain.trainer import StopRequest

    before = signal.getsignal(signal.SIGTERM)
    request = StopRequest(1)
    assert signal.getsignal(signal.SIGTERM) == request._handle
    request.restore()
    assert signal.getsignal(signal.SIGTERM) == before
    StopRequest(2).restore()
    assert signal.getsignal(signal.SIGTERM) == before
