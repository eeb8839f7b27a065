"""Does a tiny vision-language model learn to read pictures? Coloured shapes drawn with PIL (a circle, square or
triangle of random size and place, in one of four colours), the question "What colour is the shape?", a short
SFT of a random tiny VLM (`posttrain.init_model.init_vision_model`, the same as `posttrain init-model --arch`),
then greedy answers on held-out pictures, and on the same questions with the picture blanked (a white image of
the same size): the answer must come from the picture, so blanked accuracy stays near chance (1/4).

    python benchmarks/vision_learning.py                       # qwen2-vl, the defaults below
    python benchmarks/vision_learning.py --arch llava --steps 300

Prints one JSON line: accuracy, blanked accuracy, chance, steps, seconds. tests/test_vision_learns.py runs a
shorter version of the same task.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")
QUESTION = "What colour is the shape?"
SIDE = 28  # pixels: Qwen2-VL's smallest image (2 x 2 merged patches of the tiny model), LLaVA's fixed size


def draw(path: Path, colour: str, rng: random.Random) -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIDE, SIDE), "white")
    pen, fill = ImageDraw.Draw(image), COLOURS[colour]
    size = rng.randint(SIDE // 3, SIDE * 2 // 3)
    x, y = rng.randint(0, SIDE - size), rng.randint(0, SIDE - size)
    shape = rng.choice(SHAPES)
    if shape == "circle":
        pen.ellipse((x, y, x + size, y + size), fill=fill)
    elif shape == "square":
        pen.rectangle((x, y, x + size, y + size), fill=fill)
    else:
        pen.polygon([(x, y + size), (x + size, y + size), (x + size // 2, y)], fill=fill)
    image.save(path)
    return path


def make_task(folder: Path, count: int, seed: int, name: str) -> list[dict]:
    """`count` pictures in folder/name-i.png with their colours; the seeds' rows (image + conversations)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        colour = rng.choice(list(COLOURS))
        image = draw(folder / f"{name}-{i}.png", colour, rng)
        rows.append({"image": image.name, "colour": colour,
                     "conversations": [{"from": "human", "value": f"<image>{QUESTION}"},
                                       {"from": "gpt", "value": colour}]})
    return rows


def tokenizer_corpus() -> list[str]:
    """Text for the tiny model's tokenizer: each colour and the question often enough to be single tokens."""
    return [f"{QUESTION} It is {colour}. The {colour} shape is {colour}." for colour in COLOURS] * 50


def accuracy(model_dir: Path, rows: list[dict], folder: Path, blank: bool = False) -> float:
    """Share of greedy answers whose first word is the picture's colour (`blank`: a white picture instead)."""
    from PIL import Image

    from posttrain.data.vision import IMAGE_SLOT
    from posttrain.engine import Engine, SamplingParams

    engine = Engine.load(model_dir)
    white = folder / "blank.png"
    Image.new("RGB", (SIDE, SIDE), "white").save(white)
    messages = [{"role": "user", "content": IMAGE_SLOT + QUESTION}]
    prompts, pictures = zip(*[engine.image_prompt(messages, [str(white if blank else folder / row["image"])])
                              for row in rows])
    answers = engine.generate(list(prompts), SamplingParams(max_new_tokens=4, temperature=0), images=list(pictures))
    said = [(answer.text.split() or [""])[0].strip(".") for answer in answers]
    return sum(word == row["colour"] for word, row in zip(said, rows)) / len(rows)


def run(workdir: Path, arch: str = "qwen2-vl", steps: int = 150, train_size: int = 256, test_size: int = 100,
        batch_size: int = 16, lr: float = 5e-3, seed: int = 0) -> dict:
    from posttrain.config import build_config
    from posttrain.init_model import init_vision_model
    from posttrain.train import run_training

    start = time.time()
    pictures = workdir / "pictures"
    train = make_task(pictures, train_size, seed, "train")
    test = make_task(pictures, test_size, seed + 1, "test")
    data = pictures / "train.jsonl"
    data.write_text("".join(json.dumps({k: row[k] for k in ("image", "conversations")}) + "\n" for row in train))
    model = init_vision_model(arch, "tiny", tokenizer_corpus(), workdir / "model", vocab_size=300, seed=seed)
    trained = time.time()
    run_training(build_config({
        "stage": "sft", "model": str(model), "output_dir": str(workdir / "out"), "overwrite_output_dir": True,
        "data": {"train": str(data), "max_length": 64},
        "train": {"max_steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "log_steps": 10,
                  "warmup_steps": min(10, steps // 10), "scheduler": "cosine"},
        "freeze": {"vision_tower": False, "projector": False}}))
    trained = time.time() - trained
    return {"arch": arch, "steps": steps, "batch_size": batch_size, "lr": lr, "train_size": train_size,
            "test_size": test_size, "chance": 1 / len(COLOURS),
            "accuracy_before": accuracy(model, test, pictures),
            "accuracy": accuracy(workdir / "out", test, pictures),
            "accuracy_blanked": accuracy(workdir / "out", test, pictures, blank=True),
            "train_seconds": round(trained, 1), "total_seconds": round(time.time() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["qwen2-vl", "llava"], default="qwen2-vl")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--test-size", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep pictures, model and run here (default: a temporary folder)")
    args = parser.parse_args()
    options = {k: v for k, v in vars(args).items() if k != "workdir"}
    if args.workdir:
        print(json.dumps(run(Path(args.workdir), **options)))
        return
    with tempfile.TemporaryDirectory() as workdir:
        print(json.dumps(run(Path(workdir), **options)))


if __name__ == "__main__":
    main()
