"""`posttrain demo --quick`: the embedded default runs end to end through the real CLI."""
from __future__ import annotations

import json

from transformers import AutoModelForCausalLM

from conftest import run_cli


def test_quick_demo_runs_the_pipeline(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--quick", "--out", out, timeout=900)
    assert "held-out task accuracy" in result.stdout
    for stage in ("pt", "sft"):
        assert (out / "configs" / f"{stage}.yaml").is_file()
        summary = json.loads((out / stage / "summary.json").read_text())
        assert summary["steps"] > 0
        assert (out / stage / "plots" / "loss.png").is_file()
    pt_metrics = [json.loads(line) for line in (out / "pt" / "metrics.jsonl").read_text().splitlines()]
    assert pt_metrics[-1]["loss"] < pt_metrics[0]["loss"]
    demo = json.loads((out / "demo_result.json").read_text())
    assert 0.0 <= demo["task_accuracy"] <= 1.0 and 0.0 <= demo["persona_exact_match"] <= 1.0
    assert AutoModelForCausalLM.from_pretrained(out / "sft") is not None
