"""Vision-language fine-tuning for real: tiny VLMs built by `posttrain init-model --arch qwen2-vl|llava`, images
drawn with PIL in the test, every image data shape (the seeds' image + conversations, LLaMA-Factory's mllm rows
through dataset_info, OpenAI image_url parts), bad rows, SFT with assistant-only labels, the freeze options, LoRA
placement and DPO on image + text pairs."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CORPUS, run_cli, write_jsonl
from posttrain.config import build_config
from posttrain.data.encode import encode_all
from posttrain.data.formats import load_examples
from posttrain.data.vision import IMAGE_SLOT, load_vision
from posttrain.errors import DataError
from posttrain.train import run_training
from posttrain.vlm import part_of

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}
ARCHS = ("qwen2-vl", "llava")


def draw(path: Path, colour: str, shape: str = "circle", side: int = 56) -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (side, side), "white")
    box = (side // 6, side // 6, side - side // 6, side - side // 6)
    pen = ImageDraw.Draw(image)
    (pen.ellipse if shape == "circle" else pen.rectangle)(box, fill=COLOURS[colour])
    image.save(path)
    return path


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def vlms(tmp_path_factory) -> dict[str, Path]:
    """Both tiny VLMs, built by the real CLI."""
    root = tmp_path_factory.mktemp("vlms")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 10 + ["What colour is the shape? It is red, green or blue."] * 20))
    models = {}
    for arch in ARCHS:
        result = run_cli("init-model", "--arch", arch, "--tokenizer-corpus", corpus, "--vocab-size", "400",
                         "--out", root / arch)
        assert f"{arch}/tiny" in result.stdout
        models[arch] = root / arch
    return models


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    """A data folder with images/red.png, images/green.png, images/blue.png."""
    root = tmp_path_factory.mktemp("pictures")
    (root / "images").mkdir()
    for colour in COLOURS:
        draw(root / "images" / f"{colour}.png", colour)
    return root


def seeds_rows(n: int = 12) -> list[dict]:
    """The seeds' visual question answering shape: one `image` and sharegpt `conversations`."""
    names = list(COLOURS)
    return [{"image": f"images/{names[i % 3]}.png",
             "conversations": [{"from": "human", "value": "<image>\nWhat colour is the shape?"},
                               {"from": "gpt", "value": names[i % 3]}]} for i in range(n)]


def test_init_model_cli_builds_vlms_that_load_with_their_image_processor(vlms):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    for arch, path in vlms.items():
        model = AutoModelForImageTextToText.from_pretrained(path)
        assert model.config.vision_config is not None and sum(p.numel() for p in model.parameters()) < 1e6
        vision = load_vision(str(path))
        assert vision is not None and vision.image_token_id == model.config.image_token_id
        assert vision.tokens_for(_open(draw(path.parent / f"{arch}.png", "red"))) > 0
    assert type(AutoProcessor.from_pretrained(vlms["llava"])).__name__ == "LlavaProcessor"


def _open(path):
    from PIL import Image

    return Image.open(path)


def test_every_image_data_shape_reads_to_the_same_examples(pictures):
    red = pictures / "images" / "red.png"
    write_jsonl(pictures / "seeds.jsonl", seeds_rows(3))
    lf_rows = [{"messages": [{"role": "user", "content": "<image>\nWhat colour is the shape?"},
                             {"role": "assistant", "content": name}], "pictures": [f"images/{name}.png"]}
               for name in ("red", "green", "blue")]
    (pictures / "vqa_lf.json").write_text(json.dumps(lf_rows))
    (pictures / "dataset_info.json").write_text(json.dumps({"vqa": {
        "file_name": "vqa_lf.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "pictures"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    openai_rows = [{"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": ref}},
                                     {"type": "text", "text": "\nWhat colour is the shape?"}]},
        {"role": "assistant", "content": "red"}]} for ref in ("images/red.png", data_url(red))]
    write_jsonl(pictures / "openai.jsonl", openai_rows)

    seeds, _ = load_examples(str(pictures / "seeds.jsonl"), kind="conversation", images=True)
    lf, _ = load_examples("vqa", kind="conversation", images=True, dataset_info=str(pictures / "dataset_info.json"))
    openai, _ = load_examples(str(pictures / "openai.jsonl"), kind="conversation", images=True)
    expected = [{"role": "user", "content": f"{IMAGE_SLOT}\nWhat colour is the shape?"},
                {"role": "assistant", "content": "red"}]
    for example in (seeds[0], lf[0], openai[0], openai[1]):
        assert [{"role": m["role"], "content": m["content"]} for m in example.messages] == expected
    assert seeds[0].images == lf[0].images == openai[0].images == [str(red.resolve())]
    assert openai[1].images[0].startswith("data:image/png;base64,")
    assert [e.images[0].rsplit("/", 1)[-1] for e in seeds] == ["red.png", "green.png", "blue.png"]


def test_placeholder_mismatch_and_missing_images_name_the_row(pictures):
    rows = seeds_rows(3)
    rows[1]["conversations"][0]["value"] = "<image><image> What colour is the shape?"
    write_jsonl(pictures / "two_marks.jsonl", rows)
    with pytest.raises(DataError, match=r"two_marks.jsonl:2.*1 image but 2 <image> placeholders"):
        load_examples(str(pictures / "two_marks.jsonl"), kind="conversation", images=True)

    rows = seeds_rows(4)
    rows[2]["image"] = "images/purple.png"
    write_jsonl(pictures / "missing.jsonl", rows)
    with pytest.raises(DataError, match=r"missing.jsonl:3.*field 'image'.*image file not found: "
                                        r"images/purple.png"):
        load_examples(str(pictures / "missing.jsonl"), kind="conversation", images=True)
    examples, report = load_examples(str(pictures / "missing.jsonl"), kind="conversation", images=True,
                                     skip_invalid=True)
    assert len(examples) == 3 and sum(report.skipped.values()) == 1
    assert "skipped 1 invalid rows" in report.summary() and "image file not found" in report.summary()

    rows[2]["image"] = "http://127.0.0.1:9/red.png"  # nothing is downloaded while training
    write_jsonl(pictures / "remote.jsonl", rows)
    with pytest.raises(DataError, match=r"remote.jsonl:3: field 'image': remote image"):
        load_examples(str(pictures / "remote.jsonl"), kind="conversation", images=True)


def test_an_unreadable_image_is_named_or_skipped_and_counted(vlms, pictures, tmp_path):
    (tmp_path / "images").mkdir()
    draw(tmp_path / "images" / "red.png", "red")
    (tmp_path / "images" / "green.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rows = seeds_rows(2)
    write_jsonl(tmp_path / "broken.jsonl", rows)
    from posttrain.modeling import load_tokenizer

    model = str(vlms["qwen2-vl"])
    examples, _ = load_examples(str(tmp_path / "broken.jsonl"), kind="conversation", images=True)
    tokenizer, vision = load_tokenizer(model), load_vision(model)
    with pytest.raises(DataError, match=r"broken.jsonl:2.*unreadable image"):
        encode_all(examples, tokenizer, "sft", max_length=256, vision=vision)
    features, stats = encode_all(examples, tokenizer, "sft", max_length=256, vision=vision, skip_invalid=True)
    assert len(features) == 1 and sum(stats.skipped.values()) == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_sft_labels_only_the_answer_and_image_tokens_match_the_processor(vlms, pictures, arch):
    from transformers import AutoImageProcessor

    from posttrain.modeling import load_tokenizer

    model = str(vlms[arch])
    write_jsonl(pictures / "seeds.jsonl", seeds_rows(3))
    examples, _ = load_examples(str(pictures / "seeds.jsonl"), kind="conversation", images=True)
    tokenizer, vision = load_tokenizer(model), load_vision(model)
    features, _ = encode_all(examples, tokenizer, "sft", max_length=512, vision=vision)
    for feature, colour in zip(features, COLOURS):
        ids, labels = feature["input_ids"], feature["labels"]
        trained = [t for t, label in zip(ids, labels) if label != -100]
        assert tokenizer.decode(trained, skip_special_tokens=True).strip() == colour
        image_positions = [i for i, t in enumerate(ids) if t == vision.image_token_id]
        assert image_positions and all(labels[i] == -100 for i in image_positions)
        # as many image tokens as the model's own image features for this picture
        pixels = AutoImageProcessor.from_pretrained(model)(images=[_open(pictures / "images" / f"{colour}.png")
                                                                   .convert("RGB")], return_tensors="pt")
        if arch == "qwen2-vl":
            expected = int(pixels["image_grid_thw"].prod()) // 4
        else:
            side = json.loads((vlms[arch] / "config.json").read_text())["vision_config"]
            expected = (side["image_size"] // side["patch_size"]) ** 2  # CLIP patches; "default" drops the class token
        assert len(image_positions) == expected


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def changed_parts(before: dict, after: dict) -> set[str]:
    return {part_of(name) for name in before if not torch.equal(before[name], after[name])}


def sft_config(model: Path, data: Path, out: Path, **sections) -> dict:
    config = {"stage": "sft", "model": str(model), "output_dir": str(out),
              "data": {"train": str(data), "max_length": 256},
              "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "seed": 1, "log_steps": 1}}
    config.update(sections)
    return config


@pytest.mark.parametrize("arch", ARCHS)
def test_sft_trains_the_language_model_and_the_vision_parts_only_when_asked(vlms, pictures, tmp_path, arch):
    data = write_jsonl(pictures / f"seeds-{arch}.jsonl", seeds_rows(8))
    before = weights(vlms[arch])
    summary = run_training(build_config(sft_config(vlms[arch], data, tmp_path / "frozen")))
    assert summary["steps"] == 2
    assert changed_parts(before, weights(tmp_path / "frozen")) == {"language"}  # both frozen by default
    assert (tmp_path / "frozen" / "processor_config.json").is_file()
    assert load_vision(str(tmp_path / "frozen")) is not None

    run_training(build_config(sft_config(vlms[arch], data, tmp_path / "projector",
                                         freeze={"projector": False})))
    assert changed_parts(before, weights(tmp_path / "projector")) == {"language", "projector"}
    run_training(build_config(sft_config(vlms[arch], data, tmp_path / "all",
                                         freeze={"projector": False, "vision_tower": False})))
    assert changed_parts(before, weights(tmp_path / "all")) == {"language", "projector", "vision_tower"}


def test_lora_adapts_the_language_model_only_unless_the_vision_parts_are_unfrozen(vlms, pictures, tmp_path):
    data = write_jsonl(pictures / "seeds-lora.jsonl", seeds_rows(8))
    model = vlms["qwen2-vl"]
    run_training(build_config(sft_config(model, data, tmp_path / "lora", adapter={"type": "lora", "r": 4})))
    adapted = {part_of(name) for name in load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))}
    assert adapted == {"language"}
    run_training(build_config(sft_config(model, data, tmp_path / "everywhere", adapter={"type": "lora", "r": 4},
                                         freeze={"projector": False, "vision_tower": False})))
    adapted = {part_of(name) for name in load_file(str(tmp_path / "everywhere" / "adapter_model.safetensors"))}
    assert adapted == {"language", "projector", "vision_tower"}


@pytest.mark.parametrize("arch", ARCHS)
def test_dpo_on_image_and_text_pairs(vlms, pictures, tmp_path, arch):
    names = list(COLOURS)
    rows = [{"prompt": [{"role": "user", "content": "<image>What colour is the shape?"}],
             "chosen": [{"role": "assistant", "content": names[i % 3]}],
             "rejected": [{"role": "assistant", "content": names[(i + 1) % 3]}],
             "images": [f"images/{names[i % 3]}.png"]} for i in range(8)]
    data = write_jsonl(pictures / f"pairs-{arch}.jsonl", rows)
    config = sft_config(vlms[arch], data, tmp_path / "dpo", stage="dpo")
    config["train"] = {**config["train"], "max_steps": 3, "lr": 3e-3}
    summary = run_training(build_config(config))
    metrics = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert summary["steps"] == 3 and losses and all(loss == loss for loss in losses)
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # the policy starts as its reference: -log sigmoid(0)


def test_a_text_only_model_refuses_image_rows_naming_them(tiny_model, pictures, tmp_path):
    data = write_jsonl(pictures / "seeds-text.jsonl", seeds_rows(4))
    config = tmp_path / "sft.yaml"
    config.write_text(json.dumps(sft_config(tiny_model, data, tmp_path / "out")))
    result = run_cli("train", config, check=False)
    assert result.returncode != 0
    assert "seeds-text.jsonl:" in result.stderr and "field 'image'" in result.stderr
    assert "vision-language model" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_mllm_rows_train_unchanged_through_dataset_info_with_the_cli(vlms, tmp_path):
    """A folder shaped like LLaMA-Factory's data/ (our own rows): mllm rows with <image> placeholders, an images
    list and a text-only row, trained by the real CLI through dataset_info."""
    (tmp_path / "mllm_demo_data").mkdir()
    for i, colour in enumerate(COLOURS):
        draw(tmp_path / "mllm_demo_data" / f"{i + 1}.png", colour, shape="square")
    rows = [{"messages": [{"role": "user", "content": "<image>Which colour is the square?"},
                          {"role": "assistant", "content": f"The square is {colour}."},
                          {"role": "user", "content": "And its shape?"},
                          {"role": "assistant", "content": "A square."}],
             "images": [f"mllm_demo_data/{i + 1}.png"]} for i, colour in enumerate(COLOURS)]
    rows.append({"messages": [{"role": "user", "content": "<image><image>Are these the same colour?"},
                              {"role": "assistant", "content": "No."}],
                 "images": ["mllm_demo_data/1.png", "mllm_demo_data/2.png"]})
    (tmp_path / "mllm_demo.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mllm_demo": {
        "file_name": "mllm_demo.json", "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    config = sft_config(vlms["qwen2-vl"], "mllm_demo", tmp_path / "out")
    config["data"]["dataset_info"] = str(tmp_path / "dataset_info.json")
    (tmp_path / "sft.yaml").write_text(json.dumps(config))
    result = run_cli("train", tmp_path / "sft.yaml")
    assert "4 examples from 4 rows" in result.stderr + result.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 2
