"""`stage: embed`: InfoNCE against its formula, a few real training steps on a tiny BERT built from a config,
and the output loaded back by sentence-transformers, by posttrain's own embedder and by `rag index`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_cli, write_jsonl
from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.losses import info_nce
from posttrain.rag.embed import Embedder, init_encoder
from posttrain.rag.sample import write_restaurant_corpus


def test_info_nce_is_the_cross_entropy_of_cosines_over_in_batch_candidates():
    torch.manual_seed(0)
    queries, candidates, tau = torch.randn(3, 8), torch.randn(5, 8), 0.1  # 3 positives, then 2 hard negatives
    losses, logits = info_nce(queries, candidates, tau)
    for i in range(3):
        sims = [torch.nn.functional.cosine_similarity(queries[i], c, dim=0) / tau for c in candidates]
        expected = -sims[i] + torch.logsumexp(torch.stack(sims), 0)
        assert losses[i] == pytest.approx(float(expected), abs=1e-5)
        assert logits[i].tolist() == pytest.approx([float(s) for s in sims], abs=1e-5)
    # identical query and positive, far from everything else: the loss goes to 0
    aligned = torch.eye(4)
    assert info_nce(aligned, aligned, 0.01)[0].max() < 1e-6


@pytest.fixture(scope="module")
def pairs_and_encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    questions = write_restaurant_corpus(root / "docs", seed=4)
    rows = [{"query": q["question"], "positive": f"Answer: {q['answer']}.",
             "negative": f"Answer: {questions[(i + 1) % len(questions)]['answer']}."} for i, q in enumerate(questions)]
    rows[0].pop("negative")  # rows with and without a hard negative mix in one batch
    pairs = write_jsonl(root / "pairs.jsonl", rows[:24])
    texts = [q["question"] for q in questions] + [r["positive"] for r in rows]
    encoder = init_encoder(texts * 3, root / "encoder", hidden=32, layers=1, heads=2, vocab_size=400, pooling="cls")
    return root, pairs, encoder


def test_embed_stage_trains_and_writes_a_sentence_transformers_model(pairs_and_encoder):
    root, pairs, encoder = pairs_and_encoder
    out = root / "trained"
    config = root / "embed.yaml"
    config.write_text(f"stage: embed\nmodel: {encoder}\noutput_dir: {out}\n"
                      f"data: {{train: {pairs}, eval: {pairs}, max_length: 48}}\n"
                      "train: {max_steps: 6, batch_size: 12, lr: 2.0e-3, scheduler: constant, eval_steps: 3}\n"
                      "embed: {temperature: 0.05}\n")
    run_cli("train", config)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [line["eval_loss"] for line in lines if "eval_loss" in line]
    assert len(evals) == 2 and all(np.isfinite(evals))
    assert lines[-1]["loss"] < lines[0]["loss"] and "accuracy" in lines[-1] and "eval_accuracy" in lines[-1]
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_cls_token"] is True  # auto

    from sentence_transformers import SentenceTransformer

    texts = ["How much does the lemon tart cost?", "Answer: 12 dollars."]
    ours = Embedder(out).encode(texts)
    theirs = SentenceTransformer(str(out), device="cpu").encode(texts)
    assert np.allclose(ours, theirs, atol=1e-5)
    assert not np.allclose(ours, Embedder(encoder).encode(texts), atol=1e-3)  # training changed the weights

    index = root / "idx.db"
    run_cli("rag", "index", root / "docs" / "menu.md", "--out", index, "--embedder", out)
    hits = json.loads(run_cli("rag", "query", index, "lemon tart", "--mode", "dense", "--json").stdout)
    assert hits and all(h["source"].endswith("menu.md") for h in hits)


def test_embed_stage_refuses_lora(pairs_and_encoder):
    root, pairs, encoder = pairs_and_encoder
    with pytest.raises(ConfigError, match="not a LoRA adapter"):
        load_config(None, [f"stage=embed", f"model={encoder}", f"output_dir={root}/x", f"data.train={pairs}",
                           "adapter.type=lora"])
