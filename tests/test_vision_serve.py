"""Prompts with images through the generation engine and `posttrain serve`: the engine's greedy tokens and
log-probs equal transformers' generate on tiny VLMs (Qwen2-VL's 3-D positions, LLaVA), left-padded rows with
different images in one batch; the real server over HTTP with the official openai SDK reads image_url data URLs,
refuses remote URLs unless --allow-remote-images (then fetches them from a real local HTTP server), refuses local
paths and undecodable images, and a text-only model refuses images, all as OpenAI-shaped 400s."""
from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForImageTextToText

from conftest import CORPUS, free_port
from posttrain.data.vision import IMAGE_SLOT, PROCESSOR_FILES
from posttrain.engine import Engine, SamplingParams
from posttrain.errors import ConfigError
from test_vision import draw

QUESTION = "\nWhat colour is the shape?"


def varied_vlm(arch: str, root: Path) -> Path:
    """A tiny VLM (init-model's) with larger random weights: varied, peaked next-token distributions, so that
    parity checks are not trivially one repeated token."""
    from posttrain.init_model import init_vision_model

    base = init_vision_model(arch, "tiny", CORPUS * 10, root / f"{arch}-base", vocab_size=400)
    model = AutoModelForImageTextToText.from_pretrained(base)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.35)
    out = root / arch
    model.save_pretrained(out)
    for path in base.iterdir():
        if path.name.startswith("tokenizer") or path.name in (*PROCESSOR_FILES, "chat_template.jinja"):
            shutil.copyfile(path, out / path.name)
    return out


@pytest.fixture(scope="module")
def vlms(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("varied-vlms")
    return {arch: varied_vlm(arch, root) for arch in ("qwen2-vl", "llava")}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    return {"red": draw(root / "red.png", "red"), "blue": draw(root / "blue.png", "blue", "square", side=84),
            "green": draw(root / "green.png", "green", side=42)}


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": IMAGE_SLOT + text}]


@pytest.mark.parametrize("arch", ["qwen2-vl", "llava"])
def test_engine_greedy_with_images_equals_transformers_generate(vlms, images, arch):
    engine = Engine.load(vlms[arch])
    questions = [("red", QUESTION), ("blue", " Which colour and which shape is it, please?"), ("green", " Colour?")]
    prompts, pictures = zip(*[engine.image_prompt(user(text), [str(images[name])]) for name, text in questions])
    assert len({len(p) for p in prompts}) == 3  # rows of different lengths: left padding in one batch
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    batched = engine.generate(list(prompts), params, images=list(pictures))
    model = AutoModelForImageTextToText.from_pretrained(vlms[arch]).eval()
    for prompt, picture, completion in zip(prompts, pictures, batched):
        ids = torch.tensor([prompt])
        inputs = picture.vision.pixels(list(picture.refs), ids)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs, max_new_tokens=8,
                             do_sample=False, output_scores=True, return_dict_in_generate=True)
        expected = out.sequences[0, len(prompt):].tolist()
        assert completion.token_ids == expected
        reference = [torch.log_softmax(score[0].float(), -1)[token].item()
                     for score, token in zip(out.scores, expected)]
        assert completion.logprobs == pytest.approx(reference, abs=1e-4)
    assert len({tuple(c.token_ids) for c in batched}) > 1, "different pictures should give different answers"


def test_the_picture_changes_the_answer_and_mismatches_are_clear_errors(vlms, images, tiny_model):
    engine = Engine.load(vlms["qwen2-vl"])
    params = SamplingParams(max_new_tokens=1, temperature=0, top_logprobs=5)
    answers = [engine.generate([p], params, images=[pics])[0]
               for p, pics in (engine.image_prompt(user(QUESTION), [str(images[c])]) for c in ("red", "blue"))]
    assert answers[0].top_logprobs != answers[1].top_logprobs
    with pytest.raises(ConfigError, match="2 images for 1 image places"):
        engine.image_prompt(user(QUESTION), [str(images["red"])] * 2)
    with pytest.raises(ConfigError, match="reads no images"):
        Engine.load(tiny_model).image_prompt(user(QUESTION), [str(images["red"])])


class ImageSite:
    """A real local HTTP server serving a folder (what --allow-remote-images fetches from)."""

    def __init__(self, folder: Path):
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *args: None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def start_servers(specs: dict[str, list[str]], root: Path):
    """Start `posttrain serve` for each name at once (their start-ups overlap); yields {name: url}."""
    processes, urls, logs = {}, {}, {}
    for name, args in specs.items():
        port = free_port()
        logs[name] = root / f"{name}.log"
        with open(logs[name], "w") as handle:
            processes[name] = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "serve", "--port", str(port),
                                                *args], stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy())
        urls[name] = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    for name, url in urls.items():
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                if processes[name].poll() is not None or time.time() > deadline:
                    raise AssertionError(f"server {name} did not start:\n{logs[name].read_text()}") from None
                time.sleep(0.2)
    return processes, urls, logs


@pytest.fixture(scope="module")
def servers(vlms, tiny_model, images, tmp_path_factory):
    root = tmp_path_factory.mktemp("servers")
    processes, urls, logs = start_servers({
        "vlm": ["--model", str(vlms["qwen2-vl"])],
        "remote": ["--model", str(vlms["qwen2-vl"]), "--allow-remote-images"],
        "text": ["--model", str(tiny_model)]}, root)
    try:
        yield {name: openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
               for name, url in urls.items()}, urls
    finally:
        for process in processes.values():
            process.terminate()
            process.wait(timeout=20)
    for log in logs.values():
        assert "Traceback" not in log.read_text(), log.read_text()  # no request crashed a handler


def image_message(url: str, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def ask(client, model, messages, **extra):
    return client.chat.completions.create(model=str(model), messages=messages, max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True}, **extra)


def test_serve_reads_data_urls_like_the_engine(servers, vlms, images):
    clients, urls = servers
    engine = Engine.load(vlms["qwen2-vl"])
    for colour in ("red", "blue"):
        answer = ask(clients["vlm"], vlms["qwen2-vl"], image_message(data_url(images[colour])), logprobs=True)
        prompt, pictures = engine.image_prompt(user(QUESTION), [data_url(images[colour])])
        expected = engine.generate([prompt], SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True),
                                   images=[pictures])[0]
        assert answer.choices[0].message.content == expected.text
        assert answer.usage.prompt_tokens == len(prompt)
        assert [t.logprob for t in answer.choices[0].logprobs.content] == pytest.approx(expected.logprobs, abs=1e-4)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in clients["vlm"].chat.completions.create(
        model=str(vlms["qwen2-vl"]), messages=image_message(data_url(images["red"])), max_tokens=6, temperature=0,
        stream=True, extra_body={"ignore_eos": True}) if chunk.choices)
    assert streamed == ask(clients["vlm"], vlms["qwen2-vl"], image_message(data_url(images["red"]))).choices[0] \
        .message.content
    request = urllib.request.Request(urls["vlm"] + "/tokenize", method="POST",
                                     headers={"Content-Type": "application/json"},
                                     data=json.dumps({"messages": image_message(data_url(images["red"]))}).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.loads(response.read())["count"] == len(engine.image_prompt(
            user(QUESTION), [data_url(images["red"])])[0])


def refused(client, model, messages) -> dict:
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, model, messages)
    assert error.value.status_code == 400
    return error.value.body


def test_serve_refuses_remote_urls_unless_allowed_local_paths_and_bad_images(servers, vlms, images):
    clients, _ = servers
    model = vlms["qwen2-vl"]
    site = ImageSite(images["red"].parent)
    try:
        remote = image_message(f"{site.url}/red.png")
        body = refused(clients["vlm"], model, remote)
        assert body["code"] == "remote_image_refused" and "--allow-remote-images" in body["message"]
        assert body["param"] == "messages.0.content.0"
        fetched = ask(clients["remote"], model, remote).choices[0].message.content
        assert fetched == ask(clients["remote"], model, image_message(data_url(images["red"]))).choices[0] \
            .message.content
        assert refused(clients["remote"], model, image_message(f"{site.url}/missing.png"))["code"] == \
            "image_fetch_failed"
    finally:
        site.httpd.shutdown()
    for local in (str(images["red"]), f"file://{images['red']}"):
        for name in ("vlm", "remote"):
            body = refused(clients[name], model, image_message(local))
            assert body["code"] == "invalid_image_url" and "local paths are refused" in body["message"]
    broken = "data:image/png;base64," + base64.b64encode(b"not a picture").decode()
    assert refused(clients["vlm"], model, image_message(broken))["code"] == "invalid_image"
    two_parts = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(images["red"])}},
                                              {"type": "text", "text": "and"},
                                              {"type": "image_url", "image_url": {"url": "/etc/hostname"}}]}]
    assert refused(clients["vlm"], model, two_parts)["param"] == "messages.0.content.2"


def test_a_text_only_server_refuses_images(servers, tiny_model, images):
    clients, _ = servers
    body = refused(clients["text"], tiny_model, image_message(data_url(images["red"])))
    assert body["code"] == "images_not_supported" and "reads no images" in body["message"]
    assert ask(clients["text"], tiny_model, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]).choices


def test_generate_cli_answers_prompts_with_images_like_the_engine(vlms, images, tmp_path):
    from conftest import run_cli, write_jsonl

    for name, path in images.items():
        shutil.copyfile(path, tmp_path / f"{name}.png")
    rows = [{"prompt": "<image>" + QUESTION, "images": ["red.png"], "id": 1},
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "blue.png"}},
                                                       {"type": "text", "text": QUESTION}]}], "id": 2},
            {"prompt": "No picture here.", "id": 3}]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    run_cli("generate", "--model", vlms["qwen2-vl"], "--prompts", prompts, "--out", tmp_path / "out.jsonl",
            "--temperature", "0", "--max-new-tokens", "6", "--n", "1")
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["id"] for row in written] == [1, 2, 3] and written[0]["images"] == ["red.png"]
    engine = Engine.load(vlms["qwen2-vl"])
    params = SamplingParams(max_new_tokens=6, temperature=0)
    for row, colour in zip(written[:2], ("red", "blue")):
        prompt, pictures = engine.image_prompt(user(QUESTION), [str(tmp_path / f"{colour}.png")])
        assert row["responses"] == [engine.generate([prompt], params, images=[pictures])[0].text]
    assert written[2]["responses"] == [engine.chat([[{"role": "user", "content": "No picture here."}]], params)[0].text]

    write_jsonl(prompts, [rows[0], {**rows[0], "images": ["purple.png"]}])
    result = run_cli("generate", "--model", vlms["qwen2-vl"], "--prompts", prompts, "--out", tmp_path / "bad.jsonl",
                     check=False)
    assert result.returncode != 0 and "prompts.jsonl:2: field 'images[0]': image file not found" in result.stderr
    assert not (tmp_path / "bad.jsonl").exists()


def test_eval_cli_scores_image_tasks_with_the_engines_answers(vlms, images, tmp_path):
    from conftest import run_cli, write_jsonl
    from posttrain.rl.rewards import normalize_answer

    for name, path in images.items():
        shutil.copyfile(path, tmp_path / f"{name}.png")
    engine = Engine.load(vlms["llava"])
    params = SamplingParams(max_new_tokens=6, temperature=0)
    answers = {}
    for colour in ("red", "blue"):
        prompt, pictures = engine.image_prompt(user(QUESTION), [str(tmp_path / f"{colour}.png")])
        answers[colour] = engine.generate([prompt], params, images=[pictures])[0].text
    assert normalize_answer(answers["red"]), "the model's answer should not be empty"
    # the red row's answer is what the model says (right); the blue row's is not (wrong): accuracy 0.5 exactly
    rows = [{"prompt": "<image>" + QUESTION, "images": ["red.png"], "answer": answers["red"]},
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "blue.png"}},
                                                       {"type": "text", "text": QUESTION}]}],
             "answer": answers["blue"] + " not this"}]
    tasks = write_jsonl(tmp_path / "tasks.jsonl", rows)
    run_cli("eval", "--model", vlms["llava"], "--tasks", tasks, "--max-new-tokens", "6", "--out", tmp_path / "r.json",
            "--generations", tmp_path / "g.jsonl")
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["task_accuracy"] == 0.5 and result["tasks"] == 2
    generations = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert [g["response"] for g in generations] == [answers["red"], answers["blue"]]
    assert [g["score"] for g in generations] == [1.0, 0.0]

    refused = run_cli("eval", "--model", vlms["llava"], "--tasks", tasks, "--reference", vlms["llava"], check=False)
    assert refused.returncode != 0 and "have images" in refused.stderr and "Traceback" not in refused.stderr
