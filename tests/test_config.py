"""The config system: validation messages, overrides, the examples and the generated reference page."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from posttrain.config import build_config, load_config, reference_markdown
from posttrain.errors import ConfigError
from posttrain.train import run_training

ROOT = Path(__file__).resolve().parents[1]
# training configs; recipes (a `steps:` list) are checked in test_recipe.py
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.yaml") if "steps" not in yaml.safe_load(p.read_text()))


def minimal(**extra) -> dict:
    return {"stage": "sft", "model": "m", "output_dir": "o", "data": {"train": "x.jsonl"}, **extra}


def test_unknown_keys_get_the_closest_valid_name():
    with pytest.raises(ConfigError, match=r"unknown key 'data.max_lenght'; did you mean 'data.max_length'"):
        build_config(minimal(data={"train": "x", "max_lenght": 5}))
    with pytest.raises(ConfigError, match=r"unknown key 'trian'; did you mean 'train'"):
        build_config(minimal(trian={"lr": 1}))
    with pytest.raises(ConfigError, match=r"did you mean 'data.train.format'"):
        build_config(minimal(data={"train": [{"path": "x", "fromat": "alpaca"}]}))


def test_wrong_types_and_combinations_are_named():
    with pytest.raises(ConfigError, match=r"'train.lr'.*abc"):
        build_config(minimal(train={"lr": "abc"}))
    with pytest.raises(ConfigError, match="missing required key 'output_dir'"):
        build_config({"stage": "sft", "model": "m", "data": {"train": "x"}})
    with pytest.raises(ConfigError, match="not both"):
        build_config(minimal(adapter={"type": "lora"}, freeze={"trainable_layers": 1}))


def test_length_grouping_defaults_on_except_for_online_rl():
    assert build_config(minimal()).train.group_by_length is True
    grpo = minimal(stage="grpo", rewards=[{"function": "posttrain.demo.tasks:check_reward"}])
    assert build_config(grpo).train.group_by_length is False
    assert build_config({**grpo, "train": {"group_by_length": True}}).train.group_by_length is True
    assert build_config(minimal(train={"group_by_length": False})).train.group_by_length is False


def test_dotted_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: sft\nmodel: m\noutput_dir: o\ndata: {train: x.jsonl}\n")
    config = load_config(path, ["train.max_steps=6", "train.lr=1e-4", "adapter.target=[q_proj,v_proj]",
                                "train.bf16=true", "data.eval=null"])
    assert config.train.max_steps == 6 and config.train.lr == 1e-4 and config.train.bf16 is True
    assert config.adapter.target == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(path, ["train.max_steps"])


def test_reference_page_is_current_and_documents_every_key():
    page = (ROOT / "docs" / "config.md").read_text()
    assert page.strip() == reference_markdown().strip(), "run `make docs` to regenerate docs/config.md"
    assert "| `train.grad_accum` |" in page and "| `adapter.target` |" in page


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_config_runs(example, tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    overrides = [f"model={tiny_model}", f"output_dir={tmp_path / 'out'}", "train.max_steps=2",
                 "train.eval_steps=2", "train.save_steps=null"]
    summary = run_training(load_config(example, overrides))
    assert summary["steps"] == 2


def test_rules_across_keys_are_explained():
    with pytest.raises(ConfigError, match=r"^invalid config:\n  reference: adapter needs adapter.type: lora"):
        build_config(minimal(stage="dpo", dpo={"reference": "adapter"}))
    with pytest.raises(ConfigError, match=r"'grpo.reference': Input should be 'auto', 'adapter' or 'copy'"):
        build_config(minimal(stage="grpo", rewards=[{"builtin": "json_valid"}], grpo={"reference": "precompute"}))
    # prefix sharing works with every reference strategy (the reference scores the shared-prefix batch too)
    assert build_config(minimal(stage="dpo", dpo={"prefix_sharing": True, "reference": "copy"})).dpo.prefix_sharing
