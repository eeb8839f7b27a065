"""The generated demo data: deterministic, well-formed, verifiable, with held-out eval files."""
from __future__ import annotations

import csv
import json
import random
import re

import pytest

from posttrain.demo import restaurant as R
from posttrain.demo.chat import STYLES, answer, question
from posttrain.demo.data import (KINDS, LABELS, Task, check, make_alpaca_rows, make_chat_prompts,
                                 make_classification_rows, make_pretraining_text, make_sft_rows, make_tasks,
                                 normalize_answer, write_demo_data)
from posttrain.demo.gold import gold

SIZES = dict(pretrain=40, sft=120, sft_eval=20, tasks=60, tasks_eval=30, chat=40, chat_eval=20, classify=45,
             classify_eval=15)
RAG = ("rag_train1", "rag_train2", "rag_train3", "rag_train4", "rag_eval", "rag_new")
FILES = ("pretrain", "sft", "sft_alpaca", "sft_eval", "tasks", "tasks_eval", "chat", "chat_eval", *RAG, "classify",
         "classify_eval", "tokenizer_corpus")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("demo"), seed=0, sizes=SIZES)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_csv(path):
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def user_texts(rows):
    return {m["content"] for r in rows for m in r["messages"] if m["role"] == "user"}


def solve(task: Task) -> str:
    """Recompute the answer from the prompt alone."""
    if task.kind == "add":
        a, op, b = re.search(r"(\d+) ([-+*]) (\d+)", task.prompt).groups()
        return str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])
    if task.kind in ("reverse", "upper"):
        word = re.search(r"(?:word|Write|is|of|Make) (?!the )(\w+)", task.prompt).group(1)
        return word[::-1] if task.kind == "reverse" else word.upper()
    if task.kind == "sort":
        return " ".join(map(str, sorted(int(x) for x in task.prompt.split(":")[1].split())))
    facts = dict(re.findall(r"(\w+'s \w+) is (\w+)\.", task.prompt))
    return facts[re.search(r"What is (\w+'s \w+)\?", task.prompt).group(1)]


def test_files_and_sizes(demo):
    assert set(demo) == {*FILES, "kb"}
    assert all(demo[name].is_file() and demo[name].stat().st_size > 0 for name in FILES)
    docs = demo["pretrain"].read_text(encoding="utf-8").strip().split("\n\n")
    assert len(docs) == SIZES["pretrain"] and all(d.strip() for d in docs)
    for name in ("sft", "sft_eval", "tasks", "tasks_eval", "chat", "chat_eval"):
        assert len(read_jsonl(demo[name])) == SIZES[name]
    assert len(json.loads(demo["sft_alpaca"].read_text(encoding="utf-8"))) == SIZES["sft"]
    for name in ("classify", "classify_eval"):
        assert len(read_csv(demo[name])) == SIZES[name]
    assert sorted(p.name for p in demo["kb"].iterdir()) == list(R.SNAPSHOTS)


def test_deterministic(demo, tmp_path):
    same = write_demo_data(tmp_path / "same", seed=0, sizes=SIZES)
    other = write_demo_data(tmp_path / "other", seed=1, sizes=SIZES)
    for name in FILES:
        assert same[name].read_bytes() == demo[name].read_bytes(), name
        if name != "rag_new":  # the promotion after training is a fact of the restaurant, not of the seed
            assert other[name].read_bytes() != demo[name].read_bytes(), name
    for day in demo["kb"].iterdir():  # the documents are the restaurant's: the same for every seed
        for doc in day.iterdir():
            assert (tmp_path / "other" / "kb" / day.name / doc.name).read_bytes() == doc.read_bytes()
    assert make_tasks(20, seed=3) == make_tasks(20, seed=3) != make_tasks(20, seed=4)
    assert make_pretraining_text(5, seed=3) == make_pretraining_text(5, seed=3)


def test_messages_rows_well_formed(demo):
    rows = read_jsonl(demo["sft"]) + read_jsonl(demo["sft_eval"])
    for row in rows:
        msgs = row["messages"]
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) and m["content"].strip()
                   for m in msgs)
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2) and len(msgs) >= 2
    tasks = {t.prompt for t in make_tasks(3000, seed=0)} | {r["prompt"] for r in read_jsonl(demo["tasks"])}
    chats = [r for r in rows if r["messages"][0]["content"] not in tasks]
    assert chats and len(chats) < len(rows)  # tasks too
    assert any(len(r["messages"]) > 2 for r in rows)  # some multi-turn


def test_sft_chats_mix_answer_styles():
    """Every style is in the SFT data, in about its share, and the gold rater tells them apart."""
    rng = random.Random(0)
    counts = dict.fromkeys(STYLES, 0)
    for _ in range(2000):
        q = question(rng)
        scores = {style: gold(q.spec, answer(q, style, rng)) for style in STYLES}
        best = max(scores, key=scores.get)
        counts[best] += 1
    assert counts["full"] == 2000  # the full answer is the one the rater prefers, every time
    rows = make_sft_rows(1500, seed=0, multi_turn=False)
    answers = [r["messages"][1]["content"] for r in rows]
    terse = sum(len(a.split()) <= 3 for a in answers)
    rude = sum(any(w in a.lower() for w in ("ugh", "whatever", "yourself", "obviously")) for a in answers)
    ramble = sum(len(a.split()) > 25 for a in answers)
    chats = sum(not a.strip().isdigit() for a in answers)  # roughly: tasks answer with the bare answer
    assert terse > 0.05 * chats and rude > 0.05 * chats and ramble > 0.05 * chats


def test_alpaca_rows_well_formed(demo):
    rows = json.loads(demo["sft_alpaca"].read_text(encoding="utf-8"))
    for row in rows:
        assert set(row) == {"instruction", "input", "output", "system"}
        assert row["instruction"].strip() and row["output"].strip() and row["system"] == ""
    assert make_alpaca_rows(10, seed=5) == make_alpaca_rows(10, seed=5)


def test_chat_prompts_carry_the_facts(demo):
    rows = read_jsonl(demo["chat"]) + read_jsonl(demo["chat_eval"])
    assert all(set(r) == {"prompt", "answer", "kind"} and r["prompt"] and r["answer"] for r in rows)
    assert make_chat_prompts(10, seed=2) == make_chat_prompts(10, seed=2)


def test_documents_agree_with_the_bot(demo):
    """One source of truth: the documents hold the facts the chats are built from; every RAG question's
    answer is in its source document; the promotion after training is in no training file."""
    before = demo["kb"] / R.SNAPSHOTS[R.TRAINING_SNAPSHOTS - 1]
    after = demo["kb"] / R.SNAPSHOTS[R.TRAINING_SNAPSHOTS]
    menu = (before / "menu.md").read_text()
    for dish in R.DISHES:
        assert f"The {dish} costs {R.money(R.PRICE[dish])}." in menu
    assert all(R.hours_sentence(day) in (before / "hours.md").read_text() for day in R.DAYS)
    assert R.TODAY.text in (before / "promotions.md").read_text()
    for name in RAG:
        for row in read_jsonl(demo[name]):
            folder = after if name in ("rag_eval", "rag_new") else demo["kb"] / R.SNAPSHOTS[int(name[-1]) - 1]
            text = (folder / row["source"].split("#")[0]).read_text()
            assert row["answer"].lower() in text.lower() and row["response"].removesuffix(" [1]") in text, (name, row)
    new = R.AFTER_TRAINING
    assert f"## {R.TODAY_IS} (today)\n\n{new.text}" in (after / "promotions.md").read_text()
    training = ("pretrain", "sft", "sft_alpaca", "chat", "tasks", "rag_train1", "rag_train2", "rag_train3",
                "rag_train4", "tokenizer_corpus")
    for name in training:  # the promotions after training are in no training file
        for promotion in R.knowledge(R.TRAINING_SNAPSHOTS + 1):
            assert promotion.text not in demo[name].read_text(), (name, promotion)
    assert {r["answer"] for r in read_jsonl(demo["rag_new"])} == {new.offer, new.code}


def test_classification_rows(demo):
    assert demo["classify"].read_text(encoding="utf-8").splitlines()[0] == "text,label"
    rows = read_csv(demo["classify"])
    assert all(set(r) == {"text", "label"} and r["text"].strip() and r["label"] in LABELS for r in rows)
    assert {r["label"] for r in rows} == set(LABELS)
    assert make_classification_rows(30, seed=2) == make_classification_rows(30, seed=2)


def test_eval_does_not_overlap_train(demo):
    sft, alpaca = read_jsonl(demo["sft"]), json.loads(demo["sft_alpaca"].read_text(encoding="utf-8"))
    train_prompts = (user_texts(sft) | {r["instruction"] for r in alpaca} | {r["prompt"] for r in read_jsonl(demo["tasks"])}
                     | {r["prompt"] for r in read_jsonl(demo["chat"])})
    eval_tasks = read_jsonl(demo["tasks_eval"])
    assert not {r["prompt"] for r in eval_tasks} & train_prompts
    assert len({r["prompt"] for r in eval_tasks}) == len(eval_tasks)
    eval_chats = {r["prompt"] for r in read_jsonl(demo["chat_eval"])}
    assert len(eval_chats) == SIZES["chat_eval"] and not eval_chats & train_prompts
    small_talk = {"Hello!", "Hi there.", "Thanks!", "Thank you, that helps."}
    assert not (user_texts(read_jsonl(demo["sft_eval"])) - small_talk) & train_prompts
    pretrain = demo["pretrain"].read_text(encoding="utf-8")
    pretrain_lines = set(pretrain.splitlines())
    assert not {line.split(": ", 1)[1] for line in pretrain_lines if line.startswith(("Q: ", "Question: "))} & (
        {r["prompt"] for r in eval_tasks} | eval_chats)
    assert any(line.startswith("Q: ") for line in pretrain_lines)  # worked examples are there
    rag_train = {r["question"] for name in RAG[:4] for r in read_jsonl(demo[name])}
    held = {r["question"] for r in read_jsonl(demo["rag_eval"]) if r["source"] != "promotions.md"}
    assert held and not held & rag_train  # (a promotion question has another answer every week)
    eval_texts = {r["text"] for r in read_csv(demo["classify_eval"])}
    assert len(eval_texts) == SIZES["classify_eval"]
    assert not eval_texts & {r["text"] for r in read_csv(demo["classify"])}


def test_task_rows_and_answers(demo):
    rows = read_jsonl(demo["tasks_eval"])
    assert all(set(r) == {"prompt", "answer", "kind"} and r["kind"] in KINDS for r in rows)
    assert {r["kind"] for r in rows} == set(KINDS)
    for task in make_tasks(200, seed=7):
        assert solve(task) == task.answer, task
        assert check(task, task.answer) == 1.0
    assert {t.kind for t in make_tasks(10, seed=0, kinds=["sort"])} == {"sort"}
    with pytest.raises(ValueError):
        make_tasks(3, kinds=["nope"])


def test_sft_answers_use_the_bare_answer_format():
    tasks = {t.prompt: t.answer for t in make_tasks(2000, seed=0)}
    for row in make_sft_rows(200, seed=0):
        msgs = row["messages"]
        for user, assistant in zip(msgs, msgs[1:]):
            if user["role"] == "user" and user["content"] in tasks:
                assert assistant["content"] == tasks[user["content"]]


@pytest.mark.parametrize("answer, good, bad", [
    ("12", [" 12", "12.", "12\n", "The answer is 12.", "Answer: 12", "**12**", "12!\nmore text"],
     ["13", "", "112", "12 13", "twelve", "1 2"]),
    ("2 5 9", ["2 5 9.", "2, 5, 9", "2,5,9", "  2  5 9 "], ["9 5 2", "2 5", "2 5 9 9"]),
    ("tac", ["tac", "tac.", "'tac'", "The answer is tac"], ["cat", "Tac", "TAC", "ta c"]),
    ("CAT", ["CAT", "CAT."], ["cat", "Cat"]),
    ("blue", ["blue", "blue."], ["red", "bluegreen"]),
])
def test_check(answer, good, bad):
    task = Task("x", "prompt", answer)
    for completion in good:
        assert check(task, completion) == 1.0, completion
        assert check({"answer": answer}, completion) == check(answer, completion) == 1.0
    for completion in bad:
        assert check(task, completion) == 0.0, completion


def test_normalize_answer():
    assert normalize_answer("  The answer is 7. ") == "7"
    assert normalize_answer("1, 2,3") == "1 2 3"
    assert normalize_answer("") == ""


def test_tokenizer_corpus_covers_training_text(demo):
    corpus = demo["tokenizer_corpus"].read_text(encoding="utf-8")
    used = set("".join(m["content"] for r in read_jsonl(demo["sft_eval"]) for m in r["messages"]))
    used |= set("".join(r["prompt"] + r["answer"] for r in read_jsonl(demo["tasks_eval"])))
    assert used <= set(corpus)
    assert set("0123456789.,?:$'") <= set(corpus)
    for word in ("system", "user", "assistant", *LABELS):
        assert word in corpus
    documents = "".join(p.read_text(encoding="utf-8") for p in (demo["kb"] / R.SNAPSHOTS[0]).iterdir())
    assert set(documents) <= set(corpus)  # what the RAG prompts show the model
    assert "{context}" in corpus and "sources do not contain the answer" in corpus


def test_unknown_size_rejected(tmp_path):
    with pytest.raises(ValueError):
        write_demo_data(tmp_path, sizes={"sfft": 3})
