"""rm, dpo and kto for real: tiny models, real steps, the CLI for `data pairs` and `score`."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import run_cli, write_jsonl
from posttrain.config import build_config
from posttrain.train import run_training
from test_train import WORDS, read_metrics

GOOD = ["lovely", "great", "tasty", "superb"]
BAD = ["awful", "cold", "rude", "bland"]


def pair_rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        word = WORDS[i % len(WORDS)]
        rows.append({"prompt": f"Describe the {word} {i % 5}.",
                     "chosen": f"The {word} is {GOOD[i % 4]}.", "rejected": f"The {word} is {BAD[(i // 4) % 4]}."})
    return rows


def config(model, stage, train_path, out, eval_path=None, **sections) -> dict:
    body = {"stage": stage, "model": str(model), "output_dir": str(out),
            "data": {"train": str(train_path), "max_length": 64, **({"eval": str(eval_path)} if eval_path else {})},
            "train": {"max_steps": 6, "batch_size": 4, "lr": 3e-3, "seed": 3, "log_steps": 1}}
    for key, value in sections.items():
        body[key] = {**body.get(key, {}), **value}
    return body


def test_reward_model_separates_held_out_pairs_and_scores_centred(tiny_model, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", pair_rows(48))
    held_out = write_jsonl(tmp_path / "eval.jsonl", pair_rows(16, offset=100))
    out = tmp_path / "rm"
    summary = run_training(build_config(config(tiny_model, "rm", train, out, held_out,
                                               train={"max_steps": 40, "eval_steps": 20, "lr": 5e-3},
                                               rm={"center_coef": 0.01})))
    assert summary["final_eval"]["eval_accuracy"] >= 0.95
    assert summary["final_eval"]["eval_margin"] > 0
    assert any("eval_accuracy" in r and "eval_margin" in r for r in read_metrics(out))
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1
    assert model.config.reward_offset == pytest.approx(-summary["reward_mean_on_train_responses"])
    scored = tmp_path / "scored.jsonl"
    run_cli("score", "--model", out, "--data", train, "--out", scored)
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    rewards = [r["chosen_reward"] for r in rows] + [r["rejected_reward"] for r in rows]
    assert abs(sum(rewards) / len(rewards)) < 1e-3, "rewards are centred on the training responses"
    assert sum(r["chosen_reward"] > r["rejected_reward"] for r in rows) >= 0.95 * len(rows)


def test_dpo_starts_at_ln2_and_raises_the_held_out_margin(tiny_model, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", pair_rows(32))
    held_out = write_jsonl(tmp_path / "eval.jsonl", pair_rows(12, offset=100))
    out = tmp_path / "dpo"
    summary = run_training(build_config(config(tiny_model, "dpo", train, out, held_out,
                                               train={"max_steps": 16, "eval_steps": 8, "lr": 2e-3},
                                               dpo={"beta": 0.1})))
    rows = read_metrics(out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5), "policy == reference at step 0"
    for key in ("rewards_chosen", "rewards_rejected", "margin", "accuracy", "logps_chosen", "logps_rejected"):
        assert key in rows[0]
    assert summary["final_eval"]["eval_margin"] > 0.05
    assert summary["final_eval"]["eval_accuracy"] >= 0.9
    assert AutoModelForCausalLM.from_pretrained(out) is not None


@pytest.mark.parametrize("loss", ["ipo", "hinge", "robust", "simpo", "orpo"])
def test_every_dpo_variant_trains(tiny_model, tmp_path, loss):
    train = write_jsonl(tmp_path / "train.jsonl", pair_rows(16))
    out = tmp_path / loss
    extra = {"label_smoothing": 0.1} if loss == "robust" else {}
    summary = run_training(build_config(config(tiny_model, "dpo", train, out, dpo={"loss": loss, **extra})))
    rows = read_metrics(out)
    assert summary["steps"] == 6 and all(math.isfinite(r["loss"]) for r in rows)


@pytest.mark.parametrize("reference", ["copy", "precompute", "adapter"])
def test_reference_strategies_agree_at_step_zero(tiny_model, tmp_path, reference):
    train = write_jsonl(tmp_path / "train.jsonl", pair_rows(8))
    out = tmp_path / reference
    adapter = {"type": "lora", "r": 4} if reference == "adapter" else {"type": "none"}
    run_training(build_config(config(tiny_model, "dpo", train, out, dpo={"reference": reference},
                                     adapter=adapter, train={"max_steps": 2})))
    assert read_metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.parametrize("run", ["dpo-prefix-sharing", "dpo-plain", "kto"])
def test_precomputed_reference_values_belong_to_their_own_pair(tiny_model, tmp_path, run):
    """The pass scores units in order of length, several to a batch, in the training layout; each train and
    eval unit must still get the log-probs of its own sequences (dpo: chosen and rejected; kto: its completion
    and its mismatched one), as scored alone."""
    from posttrain.data.pairs import collate_feedback, collate_pairs
    from posttrain.forward import sequence_logps
    from posttrain.stages.kto import _kl_rows, _main_rows
    from posttrain.train import build_trainer

    rows = pair_rows(11)
    for i, row in enumerate(rows):  # lengths that differ, so sorting reorders them
        row["chosen"] += " Yes." * (i % 4)
        row["rejected"] += " No, not at all." * ((i * 3) % 5)
    if run == "kto":
        rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                for r in rows for side in ("chosen", "rejected")][:11]
        sections = {"kto": {"reference": "precompute"}}
    else:
        sections = {"dpo": {"reference": "precompute", "prefix_sharing": run == "dpo-prefix-sharing"}}
    train = write_jsonl(tmp_path / "train.jsonl", rows[:8])
    held_out = write_jsonl(tmp_path / "eval.jsonl", rows[8:])
    body = config(tiny_model, run[:3], train, tmp_path / "out", eval_path=held_out, train={"batch_size": 3},
                  **sections)
    trainer, _ = build_trainer(build_config(body), tmp_path / "out")
    trainer.stage.prepare(trainer, trainer.ctx)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    pad = trainer.ctx.extra["pad_id"]
    units = trainer.units + trainer.eval_units
    assert len(units) == 11
    with torch.no_grad():
        for unit in units:
            if run == "kto":
                batch = collate_feedback([unit], pad, 64)
                alone = [sequence_logps(model, _main_rows(batch))[0], sequence_logps(model, _kl_rows(batch))[0]]
                keys = ("ref_logps", "ref_kl_logps")
            else:
                alone = sequence_logps(model, collate_pairs([unit], pad))[0]
                keys = ("ref_chosen_logps", "ref_rejected_logps")
            for key, value in zip(keys, alone):
                assert unit[key] == pytest.approx(float(value), abs=1e-4), key


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_prefix_sharing_gives_the_same_losses_and_gradients(tiny_model, tmp_path, attention):
    from posttrain.data.examples import Preference
    from posttrain.data.pairs import collate_pairs, encode_preferences
    from posttrain.modeling import load_tokenizer
    from posttrain.stages.dpo import dpo_loss
    from posttrain.stages.prefix import collate_shared_prefix
    from posttrain.stages.pairwise import StageContext

    tokenizer = load_tokenizer(str(tiny_model))
    rows = pair_rows(4)
    examples = [Preference([{"role": "system", "content": "Be kind."}, {"role": "user", "content": r["prompt"]}],
                           [{"role": "assistant", "content": r["chosen"]}],
                           [{"role": "assistant", "content": r["rejected"] + " Really."}]) for r in rows]
    features, _ = encode_preferences(examples, tokenizer, max_length=64)
    for i, f in enumerate(features):
        f["ref_chosen_logps"], f["ref_rejected_logps"] = -20.0 - i, -21.5 + i
    for loss in ("sigmoid", "simpo"):
        ctx = StageContext(build_config(config(tiny_model, "dpo", "x", "y", dpo={"loss": loss})))
        model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention)
        results = []
        for batch in (collate_pairs(features, tokenizer.pad_token_id),
                      collate_shared_prefix(features, tokenizer.pad_token_id)):
            model.zero_grad()
            total, n, metrics = dpo_loss(model, batch, ctx)
            total.backward()
            grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
            results.append((total.detach(), n, metrics, grads))
        (plain, n1, m1, g1), (shared, n2, m2, g2) = results
        assert n1 == n2 == 4
        torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m2["logps_chosen"], m1["logps_chosen"], atol=1e-4, rtol=1e-5)
        for key in g1:
            torch.testing.assert_close(g2[key], g1[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("reference", ["precompute", "copy"])
def test_dpo_with_prefix_sharing_trains_end_to_end(tiny_model, tmp_path, reference):
    """The reference scores the shared-prefix batch as the policy does (a copy) or ahead of time (precompute)."""
    train = write_jsonl(tmp_path / "train.jsonl", pair_rows(16))
    out = tmp_path / "shared"
    run_training(build_config(config(tiny_model, "dpo", train, out, dpo={"prefix_sharing": True,
                                                                          "reference": reference})))
    assert read_metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_kto_trains_on_unpaired_feedback(tiny_model, tmp_path):
    rows = []
    for r in pair_rows(24):
        rows.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        rows.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    train = write_jsonl(tmp_path / "kto.jsonl", rows)
    out = tmp_path / "kto"
    summary = run_training(build_config(config(tiny_model, "kto", train, out, data={"eval_fraction": 0.2},
                                               train={"max_steps": 12, "eval_steps": 12})))
    metrics = read_metrics(out)
    assert "kl" in metrics[0] and "rewards_desirable" in metrics[-1]
    assert metrics[0]["loss"] == pytest.approx(0.5, abs=1e-4), "policy == reference: 1 - sigmoid(0)"
    assert summary["final_eval"]["eval_loss"] < 0.5


def test_data_pairs_cli_expands_rankings(tmp_path):
    rankings = write_jsonl(tmp_path / "rankings.jsonl", [
        {"prompt": "Pick a fruit.", "responses": ["B", "A", "C", "D"]},
        {"prompt": "Pick a colour.", "responses": ["red", "blue", "green"], "ranks": [1, 1, 2]}])
    out = tmp_path / "pairs.jsonl"
    result = run_cli("data", "pairs", rankings, "--out", out)
    assert "8 pairs" in result.stdout
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    first = [(p["chosen"][-1]["content"], p["rejected"][-1]["content"]) for p in pairs[:6]]
    assert first == [("B", "A"), ("B", "C"), ("B", "D"), ("A", "C"), ("A", "D"), ("C", "D")]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "responses": ["only one"]}])
    failed = run_cli("data", "pairs", bad, "--out", tmp_path / "x.jsonl", check=False)
    assert failed.returncode == 2 and "bad.jsonl:1" in failed.stderr and "responses" in failed.stderr


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_reward_model_prefix_sharing_gives_the_same_rewards_and_gradients(tiny_model, tmp_path, attention):
    from posttrain.data.examples import Preference
    from posttrain.data.pairs import collate_pairs, encode_preferences
    from posttrain.modeling import load_model, load_tokenizer
    from posttrain.stages.prefix import collate_shared_prefix
    from posttrain.stages.pairwise import StageContext
    from posttrain.stages.rm import rm_loss

    tokenizer = load_tokenizer(str(tiny_model))
    examples = [Preference([{"role": "user", "content": r["prompt"]}], [{"role": "assistant", "content": r["chosen"]}],
                           [{"role": "assistant", "content": r["rejected"] + " Sorry."}], margin=0.5)
                for r in pair_rows(4)]
    features, _ = encode_preferences(examples, tokenizer, max_length=64)
    ctx = StageContext(build_config(config(tiny_model, "rm", "x", "y", rm={"center_coef": 0.01})))
    torch.manual_seed(0)
    model = load_model(str(tiny_model), "reward", tokenizer=tokenizer, attn_implementation=attention)
    results = []
    for batch in (collate_pairs(features, tokenizer.pad_token_id), collate_shared_prefix(features, tokenizer.pad_token_id)):
        model.zero_grad()
        total, n, metrics = rm_loss(model, batch, ctx)
        total.backward()
        results.append((total.detach(), metrics, {k: p.grad.clone() for k, p in model.named_parameters()
                                                  if p.grad is not None}))
    (plain, m1, g1), (shared, m2, g2) = results
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m2["rewards_chosen"], m1["rewards_chosen"], atol=1e-5, rtol=1e-5)
    for key in g1:
        torch.testing.assert_close(g2[key], g1[key], atol=1e-5, rtol=1e-4, msg=key)


def test_prefix_sharing_refuses_a_kernel_without_explicit_masks(tiny_model, tmp_path):
    from posttrain.errors import ConfigError

    train = write_jsonl(tmp_path / "train.jsonl", pair_rows(8))
    body = config(tiny_model, "dpo", train, tmp_path / "flex", dpo={"prefix_sharing": True})
    with pytest.raises(ConfigError, match="dpo.prefix_sharing needs attn_implementation sdpa or eager"):
        run_training(build_config({**body, "attn_implementation": "flex_attention"}))


def pad_is_eos_copy(model_dir, tmp_path):
    """A copy of the tiny model whose tokenizer pads with its end-of-turn token, which is also its EOS (as the
    Llama-3, DeepSeek and Mistral tokenizers do once a pad token is needed): every response ends with the pad id."""
    import shutil

    copy = tmp_path / "pad-is-eos"
    shutil.copytree(model_dir, copy)
    tokenizer_config = json.loads((copy / "tokenizer_config.json").read_text())
    tokenizer_config.update(pad_token="<|im_end|>", eos_token="<|im_end|>")
    (copy / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    from posttrain.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(copy))
    model_config = json.loads((copy / "config.json").read_text())
    model_config.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    (copy / "config.json").write_text(json.dumps(model_config))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    return copy, tokenizer


def test_reward_is_read_at_the_last_real_token_on_every_path_when_pad_is_eos(tiny_model, tmp_path):
    """Plain pairs, shared-prefix pairs, `posttrain score` and a reward model inside RL all read the reward at the
    response's last token (its end-of-turn, or the last kept token of a truncated response), as an independent
    forward of each sequence alone says."""
    from posttrain.data.examples import Preference
    from posttrain.data.pairs import collate_pairs, encode_preferences
    from posttrain.modeling import load_model, save_pretrained
    from posttrain.rl.rewards import model_source
    from posttrain.stages.prefix import collate_shared_prefix
    from posttrain.stages.rm import rewards

    model_dir, tokenizer = pad_is_eos_copy(tiny_model, tmp_path)
    torch.manual_seed(0)
    model = load_model(str(model_dir), "reward", tokenizer=tokenizer).eval()
    rows = pair_rows(4)
    rows[1]["chosen"] = "The soup is " + "very " * 30 + "good."  # truncated at max_length: no end-of-turn
    examples = [Preference([{"role": "user", "content": r["prompt"]}], [{"role": "assistant", "content": r["chosen"]}],
                           [{"role": "assistant", "content": r["rejected"]}]) for r in rows]
    features, stats = encode_preferences(examples, tokenizer, max_length=40)
    eot = tokenizer.pad_token_id
    assert features[0]["chosen_ids"][-1] == eot and features[1]["chosen_ids"][-1] != eot

    def alone(ids):  # the reward of one unpadded sequence, from the body's last hidden state
        with torch.no_grad():
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            return float(model.score(hidden))

    sequences = [f["prompt_ids"] + f["chosen_ids"] for f in features] + \
                [f["prompt_ids"] + f["rejected_ids"] for f in features]
    expected = [alone(ids) for ids in sequences]
    with torch.no_grad():
        plain = rewards(model, collate_pairs(features, tokenizer.pad_token_id)).tolist()
        shared = rewards(model, collate_shared_prefix(features, tokenizer.pad_token_id)).tolist()
    assert plain == pytest.approx(expected, abs=1e-5)
    assert shared == pytest.approx(expected, abs=1e-5)

    rm_dir = tmp_path / "rm"
    save_pretrained(model, tokenizer, rm_dir, "reward")
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                                                 for r in rows])
    run_cli("score", "--model", rm_dir, "--data", data, "--out", tmp_path / "scored.jsonl", "--max-length", "40")
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [r["chosen_reward"] for r in scored] + [r["rejected_reward"] for r in scored] == \
        pytest.approx(expected, abs=1e-5)

    source = model_source(str(rm_dir), max_length=40)
    in_rl = source([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    assert in_rl == pytest.approx(expected[:4], abs=1e-5)


def test_dropout_is_off_by_default_so_dpo_and_kto_start_at_their_reference_values(make_model, tmp_path):
    """GPT-2 has dropout 0.1: with it on, the policy's training-mode log-probs differ from the reference's and
    DPO's first loss is not ln 2 (TRL turns dropout off too). `train.disable_dropout: false` keeps it."""
    gpt2 = make_model("gpt2")
    assert json.loads((gpt2 / "config.json").read_text())["resid_pdrop"] > 0
    train = write_jsonl(tmp_path / "train.jsonl", pair_rows(8))
    run_training(build_config(config(gpt2, "dpo", train, tmp_path / "dpo", train={"max_steps": 1})))
    assert read_metrics(tmp_path / "dpo")[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"], "label": i % 2 == 0}
                                                for i, r in enumerate(pair_rows(8))])
    run_training(build_config(config(gpt2, "kto", kto, tmp_path / "kto", train={"max_steps": 1})))
    assert read_metrics(tmp_path / "kto")[0]["loss"] == pytest.approx(0.5, abs=1e-5)
    run_training(build_config(config(gpt2, "dpo", train, tmp_path / "kept", train={"max_steps": 1,
                                                                                    "disable_dropout": False})))
    assert abs(read_metrics(tmp_path / "kept")[0]["loss"] - math.log(2)) > 1e-3
