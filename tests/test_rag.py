"""RAG end to end on a generated restaurant corpus: index (md, txt, jsonl, html, pdf; a binary and an unsupported
file skipped and named), query in every mode, evaluate, re-index after an edit and a delete, snapshots during a
re-index, bad input, RAFT-style SFT data, synthetic pairs and reranking. Most commands run through the real CLI
entry point in-process (`main([...])`); the first index is built by the CLI in a subprocess."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, write_jsonl
from posttrain.cli import main
from posttrain.rag.chunk import Document, chunk_document, word_spans
from posttrain.rag.embed import Embedder, init_encoder
from posttrain.rag.evaluate import ranking_metrics
from posttrain.rag.prompt import NO_ANSWER
from posttrain.rag.retrieve import Retriever, reciprocal_rank_fusion
from posttrain.rag.sample import write_promotion, write_restaurant_corpus
from posttrain.rag.store import SQLiteStore

QUESTION = "How much does the lemon tart cost?"


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def corpus_texts(folder: Path) -> list[str]:
    return [p.read_text(errors="ignore") for p in sorted(folder.glob("*")) if p.suffix in (".md", ".jsonl", ".html")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("corpus") / "docs"
    questions = write_restaurant_corpus(folder, seed=5)
    (folder / "notes.txt").write_text("Staff notes.\n\nThe walk-in fridge is cleaned every Sunday night.\n")
    (folder / "broken.md").write_bytes(b"\x89PNG\x00\x01binary")
    (folder / "logo.png").write_bytes(b"\x89PNG")
    (folder / ".hidden.md").write_text("never indexed")
    return folder, questions


@pytest.fixture(scope="module")
def encoder(corpus, tmp_path_factory) -> Path:
    folder, questions = corpus
    texts = corpus_texts(folder) + [q["question"] for q in questions]
    return init_encoder(texts * 3, tmp_path_factory.mktemp("encoder") / "enc", hidden=32, layers=1, heads=2,
                        vocab_size=500)


@pytest.fixture(scope="module")
def index(corpus, encoder, tmp_path_factory) -> tuple[Path, str]:
    folder, _ = corpus
    out = tmp_path_factory.mktemp("index") / "idx.db"
    result = run_cli("rag", "index", folder, "--out", out, "--embedder", encoder, "--chunk-tokens", 48,
                     "--overlap", 8)
    return out, result.stdout


@pytest.fixture(scope="module")
def questions_file(corpus, tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("questions") / "questions.jsonl", corpus[1])


# ---------------------------------------------------------------- index and chunks

def test_index_reports_what_it_did_and_names_skipped_files(index):
    _, report = index
    assert "7 new, 0 changed, 0 removed, 0 unchanged files" in report
    assert "skipped 2 unreadable file(s)" in report
    assert "broken.md: binary file (NUL bytes)" in report
    assert "logo.png: unsupported file type .png" in report
    assert ".hidden" not in report


def test_chunks_are_exact_spans_under_their_headings(index, corpus):
    folder, _ = corpus
    store = SQLiteStore(index[0])
    chunks = list(store.chunks(store.all_chunk_ids()).values())
    store.close()
    for chunk in chunks:
        if chunk["source"].endswith((".md", ".txt")):
            assert Path(chunk["source"]).read_text()[chunk["start"]:chunk["end"]] == chunk["text"]
    headings = {c["heading"] for c in chunks}
    assert any(h.endswith("menu > Desserts") for h in headings)
    assert "page 2" in headings  # allergens.pdf, second page
    assert any(h.startswith("About ") and h.endswith("Our kitchen") for h in headings)  # html <title> > <h2>
    faq = {c["source"].rsplit("/", 1)[1]: c for c in chunks if "faq.jsonl#" in c["source"]}
    assert set(faq) == {"faq.jsonl#reservations", "faq.jsonl#deposit", "faq.jsonl#parking", "faq.jsonl#pets"}
    assert faq["faq.jsonl#parking"]["heading"] == "Is there parking?"
    desserts = next(c for c in chunks if c["heading"].endswith("Desserts"))
    assert "lemon tart" in desserts["text"] and "## " not in desserts["text"]


def test_long_paragraphs_are_cut_into_overlapping_windows_within_the_budget():
    words = " ".join(f"w{i}" for i in range(100))
    doc = Document("a.md", f"# A\n\n{words}\n\nshort one.\n\n# B\n\nother.\n", markdown=True)
    chunks = chunk_document(doc, chunk_tokens=30, overlap=5)
    windows = [c for c in chunks if c.text.startswith("w")]
    # windows of 30 tokens every 25; the last window (25 tokens) has room for the next short paragraph
    assert [len(word_spans(c.text)) for c in windows] == [30, 30, 30, 28]
    for first, second in zip(windows, windows[1:]):
        assert first.text.split()[-5:] == second.text.split()[:5]  # `overlap` tokens shared
    assert windows[-1].text.endswith("w99\n\nshort one.")
    assert [c.heading for c in chunks] == ["A"] * 4 + ["B"]
    assert chunks[-1].text == "other."  # never across a heading


# ---------------------------------------------------------------- query

def test_query_in_every_mode(index, capsys):
    path, _ = index
    results = {}
    for mode in ("bm25", "dense", "hybrid"):
        code, out, _ = cli(capsys, "rag", "query", path, QUESTION, "--k", 3, "--mode", mode, "--json")
        assert code == 0
        results[mode] = json.loads(out)
        assert len(results[mode]) == 3
        assert all({"source", "text", "score"} <= set(hit) for hit in results[mode])
    assert "lemon tart" in results["bm25"][0]["text"] and results["bm25"][0]["source"].endswith("menu.md")
    retriever = Retriever(path)
    try:
        lexical = [h.id for h in retriever.search(QUESTION, 30, "bm25")]
        dense = [h.id for h in retriever.search(QUESTION, 30, "dense")]
        fused = reciprocal_rank_fusion([lexical, dense])[:3]
        assert [(h["chunk_id"], h["score"]) for h in results["hybrid"]] == [(i, round(s, 6)) for i, s in fused]
        # dense search is real: a chunk's own indexed text finds that chunk first, at cosine 1
        target = results["bm25"][1]
        hit = retriever.search(f"{target['heading']}\n{target['text']}", 1, "dense")[0]
        assert hit.id == target["chunk_id"] and hit.score == pytest.approx(1.0, abs=1e-4)
    finally:
        retriever.close()
    code, out, _ = cli(capsys, "rag", "query", path, QUESTION, "--k", 2)
    assert code == 0 and out.startswith("[1] ") and "[2] " in out and "menu.md" in out


def test_reranker_orders_the_candidates_by_its_own_scores(index, encoder, tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=1))
    model.save_pretrained(tmp_path / "reranker")
    tokenizer.save_pretrained(tmp_path / "reranker")
    plain, reranked = Retriever(index[0]), Retriever(index[0], reranker=str(tmp_path / "reranker"))
    try:
        candidates = plain.search(QUESTION, 30, "bm25")
        hits = reranked.search(QUESTION, 4, "bm25")
    finally:
        plain.close(), reranked.close()
    model.eval()
    with torch.no_grad():
        texts = [f"{h.heading}\n{h.text}" if h.heading else h.text for h in candidates]
        inputs = tokenizer([QUESTION] * len(texts), texts, padding=True, truncation=True, return_tensors="pt")
        scores = model(**inputs).logits[:, 0].tolist()
    expected = sorted(zip(scores, [h.id for h in candidates]), key=lambda pair: -pair[0])[:4]
    assert [h.id for h in hits] == [i for _, i in expected]
    assert [h.score for h in hits] == pytest.approx([s for s, _ in expected], abs=1e-5)


# ---------------------------------------------------------------- evaluation

def test_ranking_metrics_follow_their_formulas():
    metrics = ranking_metrics([False, True, False, True], total_relevant=2, k=4)
    ideal = 1 + 1 / math.log2(3)
    assert metrics == pytest.approx({"recall@k": 1.0, "mrr@k": 0.5,
                                     "ndcg@k": (1 / math.log2(3) + 1 / math.log2(5)) / ideal})
    assert ranking_metrics([False, False, True], total_relevant=1, k=2) == {"recall@k": 0.0, "mrr@k": 0.0,
                                                                           "ndcg@k": 0.0}


def test_eval_reports_recall_mrr_ndcg_per_mode(index, questions_file, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code, printed, _ = cli(capsys, "rag", "eval", index[0], "--questions", questions_file, "--k", 5,
                           "--mode", "bm25", "dense", "hybrid", "--out", out)
    assert code == 0 and "recall@k" in printed
    result = json.loads(out.read_text())
    assert {"recall@k", "mrr@k", "ndcg@k"} <= set(result) and result["k"] == 5 and result["mode"] == "bm25"
    assert set(result["by_mode"]) == {"bm25", "dense", "hybrid"}
    assert result["unanswerable"] == 0  # every generated answer is in the corpus
    bm25 = result["by_mode"]["bm25"]
    assert bm25["recall@k"] >= 0.9 and 0 < bm25["mrr@k"] <= bm25["recall@k"]
    for metrics in result["by_mode"].values():
        assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_eval_with_a_model_measures_answer_accuracy_with_and_without_retrieval(index, questions_file, tiny_model,
                                                                               tmp_path, capsys):
    few = write_jsonl(tmp_path / "few.jsonl", [json.loads(line) for line in questions_file.read_text().splitlines()[:3]])
    code, out, _ = cli(capsys, "rag", "eval", index[0], "--questions", few, "--model", tiny_model,
                       "--max-new-tokens", 4, "--mode", "bm25")
    assert code == 0 and "answer accuracy on 3 questions" in out


# ---------------------------------------------------------------- incremental re-index and snapshots

def test_reindex_updates_only_what_changed(corpus, encoder, tmp_path, capsys):
    folder = tmp_path / "docs"
    shutil.copytree(corpus[0], folder, ignore=shutil.ignore_patterns("broken.md", "logo.png"))
    index = tmp_path / "idx.db"
    assert cli(capsys, "rag", "index", folder, "--out", index, "--embedder", encoder, "--chunk-tokens", 48)[0] == 0
    old_code = next(q["answer"] for q in corpus[1] if "code" in q["question"])
    store = SQLiteStore(index)
    menu_ids = sorted(i for i, c in store.chunks(store.all_chunk_ids()).items() if c["source"].endswith("menu.md"))
    store.close()

    new_questions = write_promotion(folder, seed=77)  # today's promotion replaces yesterday's
    (folder / "about.html").unlink()
    (folder / "events.md").write_text("# Events\n\nLive jazz every Friday from eight.\n")
    code, out, _ = cli(capsys, "rag", "index", folder, "--out", index, "--chunk-tokens", 48)  # the index's embedder
    assert code == 0
    assert "1 new, 1 changed, 1 removed, 5 unchanged files" in out
    assert "new: " in out and "events.md" in out and "changed: " in out and "promotion.md" in out
    assert "removed: " in out and "about.html" in out and "bm25 + dense" in out

    store = SQLiteStore(index)
    chunks = store.chunks(store.all_chunk_ids())
    store.close()
    assert sorted(i for i, c in chunks.items() if c["source"].endswith("menu.md")) == menu_ids  # not re-embedded
    assert not any(c["source"].endswith("about.html") for c in chunks.values())
    new_code = next(q["answer"] for q in new_questions if "code" in q["question"])
    code, out, _ = cli(capsys, "rag", "query", index, "Which code do I mention for today's promotion?", "--json",
                       "--k", 2, "--mode", "bm25")  # (the random encoder's ranking is noise)
    texts = " ".join(h["text"] for h in json.loads(out))
    assert new_code in texts and old_code not in " ".join(c["text"] for c in chunks.values())


def test_a_query_during_a_reindex_sees_the_index_before_it(tmp_path):
    from posttrain.rag.index import build_index
    from posttrain.rag.chunk import Chunk

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("The old opening hours are nine to five.\n")
    build_index([str(tmp_path / "docs")], str(tmp_path / "idx.db"))
    reader, writer = Retriever(tmp_path / "idx.db"), SQLiteStore(tmp_path / "idx.db")
    try:
        with writer.write():
            writer.remove_file(str(tmp_path / "docs" / "a.md"))
            writer.add_file("b.md", "hash", [Chunk("b.md", "The new opening hours are ten to six.", "", 0, 38)], None)
            during = [h.source for h in reader.search("opening hours", 5)]
        after = [h.source for h in reader.search("opening hours", 5)]
    finally:
        reader.close(), writer.close()
    assert during == [str(tmp_path / "docs" / "a.md")]
    assert after == ["b.md"]


# ---------------------------------------------------------------- bad input

def test_bad_input_is_one_clear_line(index, encoder, corpus, tmp_path, capsys):
    path, _ = index
    other = init_encoder(corpus_texts(corpus[0]), tmp_path / "other", hidden=32, layers=1, heads=2, vocab_size=400,
                         seed=1)
    cases = [
        (["rag", "query", path, QUESTION, "--embedder", other], "was built with the embedder"),
        (["rag", "index", corpus[0], "--out", path, "--embedder", other], "--rebuild"),
        (["rag", "query", tmp_path / "missing.db", QUESTION], "no index at"),
    ]
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database" * 300)
    cases.append((["rag", "query", corrupt, QUESTION], "corrupt or not an index"))
    bm25_only = tmp_path / "bm25.db"
    assert cli(capsys, "rag", "index", corpus[0] / "menu.md", "--out", bm25_only)[0] == 0
    cases.append((["rag", "query", bm25_only, QUESTION, "--mode", "dense"], "no vectors"))
    bad_questions = write_jsonl(tmp_path / "bad.jsonl", [{"question": "ok?", "source": "menu.md"}, {"question": "?"}])
    cases.append((["rag", "eval", bm25_only, "--questions", bad_questions], "bad.jsonl:2"))
    for args, expected in cases:
        code, out, err = cli(capsys, *args)
        assert code == 2, (args, out, err)
        assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_a_locked_index_is_one_line_not_a_traceback(corpus, tmp_path):
    import sqlean

    index = tmp_path / "idx.db"
    run_cli("rag", "index", corpus[0] / "hours.md", "--out", index)
    holder = sqlean.connect(str(index), isolation_level=None)
    holder.execute("begin immediate")  # another writer holds the index
    try:
        result = run_cli("rag", "index", corpus[0] / "menu.md", "--out", index, check=False)
    finally:
        holder.execute("rollback")
        holder.close()
    assert result.returncode == 2
    assert "locked by another writer" in result.stderr and "Traceback" not in result.stderr


def test_an_empty_index_answers_with_no_citations_and_says_so(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, out, _ = cli(capsys, "rag", "index", tmp_path / "empty", "--out", tmp_path / "idx.db")
    assert code == 0 and "the index is empty" in out
    code, out, _ = cli(capsys, "rag", "query", tmp_path / "idx.db", QUESTION)
    assert code == 0 and "is empty: no citations" in out
    assert json.loads(cli(capsys, "rag", "query", tmp_path / "idx.db", QUESTION, "--json")[1]) == []


# ---------------------------------------------------------------- data for fine-tuning

def test_sft_data_holds_the_answer_with_distractors_or_says_it_is_missing(index, questions_file, tmp_path, capsys,
                                                                          tiny_model):
    out = tmp_path / "sft.jsonl"
    code, printed, _ = cli(capsys, "rag", "sft-data", index[0], "--questions", questions_file, "--out", out,
                           "--k", 3, "--no-answer", 0.3, "--seed", 1)
    assert code == 0 and "SFT rows" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    questions = [json.loads(line) for line in questions_file.read_text().splitlines()]
    assert len(rows) == len(questions)
    counts = {True: 0, False: 0}
    for row, question in zip(rows, questions):
        user, assistant = row["messages"][0]["content"], row["messages"][1]["content"]
        blocks = user.split("\n\n[")
        assert question["question"] in user and len(row["sources"]) == 3 and "[3] " in user and "[4] " not in user
        answer = question["answer"].lower()
        if row["has_answer"]:
            number = int(assistant.rsplit("[", 1)[1].rstrip("]"))
            assert assistant == f"{question['answer']} [{number}]"
            assert answer in next(b for b in blocks if b.lstrip("[").startswith(f"{number}]")).lower()
        else:
            assert assistant == NO_ANSWER and answer not in user.lower().replace(question["question"].lower(), "")
        counts[row["has_answer"]] += 1
    assert counts[True] > counts[False] > 0
    code, printed, _ = cli(capsys, "data", "inspect", out, "--model", tiny_model, "--stage", "sft")
    assert code == 0 and "messages" in printed


def test_pairs_from_a_generator_model(index, tiny_model, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    code, printed, _ = cli(capsys, "rag", "pairs", index[0], "--model", tiny_model, "--out", out,
                           "--max-chunks", 3, "--max-new-tokens", 8, "--temperature", 1.0)
    assert code == 0 and "pairs from 3 chunks" in printed
    store = SQLiteStore(index[0])
    chunks = store.chunks(store.all_chunk_ids())
    store.close()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    empty = int(printed.split("; ")[1].split()[0])
    assert len(rows) + empty == 3
    for row in rows:
        chunk = chunks[row["chunk_id"]]
        assert row["query"] and row["positive"] == (f"{chunk['heading']}\n{chunk['text']}" if chunk["heading"]
                                                    else chunk["text"])
        assert row.get("negative", "") != row["positive"]


def test_embedder_vectors_are_unit_length_and_batch_independent(encoder):
    model = Embedder(encoder, batch_size=2)
    texts = ["lemon tart", "The kitchen opens at nine and closes late on Fridays.", "soup"]
    together = model.encode(texts)
    alone = np.array([model.encode([t])[0] for t in texts])
    assert together.shape == (3, 32)
    assert torch.allclose(torch.tensor(together), torch.tensor(alone), atol=1e-5)
    assert torch.allclose(torch.tensor(together).norm(dim=1), torch.ones(3), atol=1e-5)


def test_posttrain_eval_with_rag_answers_from_the_retrieved_context(index, corpus, tiny_model, tmp_path, capsys):
    from posttrain.engine import Engine, SamplingParams
    from posttrain.rag.prompt import DEFAULT_TEMPLATE, render

    tasks = write_jsonl(tmp_path / "tasks.jsonl", [{"prompt": q["question"], "answer": q["answer"], "kind": "rag"}
                                                   for q in corpus[1][:3]])
    generations = tmp_path / "generations.jsonl"
    code, out, _ = cli(capsys, "eval", "--model", tiny_model, "--tasks", tasks, "--rag", index[0], "--rag-k", 2,
                       "--rag-mode", "bm25", "--max-new-tokens", 6, "--generations", generations)
    assert code == 0
    answers = [json.loads(line)["response"] for line in generations.read_text().splitlines()]
    engine, retriever = Engine.load(tiny_model), Retriever(index[0])
    prompts = [engine.chat_prompt([{"role": "user", "content": render(DEFAULT_TEMPLATE, q["question"],
                                                                       retriever.search(q["question"], 2, "bm25"))}])
               for q in corpus[1][:3]]
    retriever.close()
    expected = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0))
    assert answers == [c.text for c in expected]


def test_recipe_steps_index_and_make_sft_data(corpus, questions_file, tmp_path):
    from posttrain.recipe import run_recipe

    folder = tmp_path / "docs"
    shutil.copytree(corpus[0], folder, ignore=shutil.ignore_patterns("broken.md", "logo.png"))
    recipe = {"out": str(tmp_path / "run"), "steps": [
        {"name": "index", "kind": "rag-index", "paths": str(folder), "chunk_tokens": 48},
        {"name": "raft", "kind": "rag-sft-data", "index": "${index.output}", "questions": str(questions_file),
         "k": 2, "no_answer": 0.5}]}
    results = run_recipe(recipe)
    assert results["index"]["result"]["chunks"] > 0 and results["raft"]["result"]["rows"] > 0
    assert all(not r["skipped"] for r in results.values())
    write_promotion(folder, seed=11)  # a changed document reruns the index step (incrementally) and what reads it
    again = run_recipe(recipe)
    assert again["index"]["result"]["changed"] == 1 and not again["raft"]["skipped"]


def test_pairs_from_your_own_questions(index, questions_file, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    code, printed, _ = cli(capsys, "rag", "pairs", index[0], "--questions", questions_file, "--out", out)
    assert code == 0 and "0 left out" in printed
    questions = [json.loads(line) for line in questions_file.read_text().splitlines()]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["query"] for r in rows] == [q["question"] for q in questions]
    for row, question in zip(rows, questions):
        assert question["answer"].lower() in " ".join(row["positive"].lower().split())
        assert row["source"].split("#")[0].endswith(question["source"].split("#")[0])
        assert row.get("negative") != row["positive"]
    # a hard negative needs a BM25 match that is not relevant; a question whose words only its answer has gets none
    assert sum("negative" in row for row in rows) >= len(rows) - 3
    code, _, err = cli(capsys, "rag", "pairs", index[0], "--out", out)
    assert code == 2 and "either --model" in err


def test_bad_jsonl_rows_are_named_and_counted(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "rows.jsonl").write_text('{"id": "a", "text": "The terrace opens in May."}\n'
                                                  'not json\n{"id": "c", "title": "no text"}\n')
    code, out, _ = cli(capsys, "rag", "index", tmp_path / "docs", "--out", tmp_path / "idx.db")
    assert code == 0 and "1 chunks written, 1 in the index" in out
    assert "skipped 2 bad row(s)" in out
    assert "rows.jsonl:2: not valid JSON" in out and "rows.jsonl:3: field 'text' is missing" in out
