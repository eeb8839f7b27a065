"""Proof that vision-language SFT learns from the picture: coloured shapes drawn with PIL (a circle, square or
triangle of random size and place in one of four colours), "What colour is the shape?", a short SFT of a random
tiny LLaVA built as `posttrain init-model --arch llava` builds it, then greedy answers through the engine on
held-out pictures: far above chance (1/4), and far above the same model shown a blank picture, so the answer
comes from the image. The task and a longer run (both architectures) are benchmarks/vision_learning.py."""
from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "vision_learning.py"


def load_task():
    spec = importlib.util.spec_from_file_location("vision_learning", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_tiny_vlm_learns_the_colour_from_the_picture(tmp_path):
    task = load_task()
    result = task.run(tmp_path, arch="llava", steps=80, train_size=128, test_size=60, batch_size=16, lr=5e-3)
    assert result["chance"] == 0.25 and result["accuracy_before"] <= 0.4
    assert result["accuracy"] >= 0.8, result
    assert result["accuracy_blanked"] <= 0.45, result  # a blank picture: the model can only guess
    assert result["accuracy"] >= result["accuracy_blanked"] + 0.35, result
