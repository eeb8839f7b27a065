"""The generated demo data: deterministic, well-formed, verifiable, with held-out eval files."""
from __future__ import annotations

import csv
import json
import re

import pytest

from posttrain.demo.data import (KINDS, LABELS, SYSTEM_PROMPT, Task, check, make_alpaca_rows,
                                 make_classification_rows, make_pretraining_text, make_sft_rows, make_tasks,
                                 normalize_answer, write_demo_data)

SIZES = dict(pretrain=40, sft=120, sft_eval=20, tasks=60, tasks_eval=30, classify=45, classify_eval=15)
FILES = ("pretrain", "sft", "sft_alpaca", "sft_eval", "tasks", "tasks_eval", "classify", "classify_eval",
         "tokenizer_corpus")


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
    assert set(demo) == set(FILES)
    assert all(path.is_file() and path.stat().st_size > 0 for path in demo.values())
    docs = demo["pretrain"].read_text(encoding="utf-8").strip().split("\n\n")
    assert len(docs) == SIZES["pretrain"] and all(d.strip() for d in docs)
    for name in ("sft", "sft_eval", "tasks", "tasks_eval"):
        assert len(read_jsonl(demo[name])) == SIZES[name]
    assert len(json.loads(demo["sft_alpaca"].read_text(encoding="utf-8"))) == SIZES["sft"]
    for name in ("classify", "classify_eval"):
        assert len(read_csv(demo[name])) == SIZES[name]


def test_deterministic(demo, tmp_path):
    same = write_demo_data(tmp_path / "same", seed=0, sizes=SIZES)
    other = write_demo_data(tmp_path / "other", seed=1, sizes=SIZES)
    for name in FILES:
        assert same[name].read_bytes() == demo[name].read_bytes(), name
        assert other[name].read_bytes() != demo[name].read_bytes(), name
    assert make_tasks(20, seed=3) == make_tasks(20, seed=3) != make_tasks(20, seed=4)
    assert make_pretraining_text(5, seed=3) == make_pretraining_text(5, seed=3)


def test_messages_rows_well_formed(demo):
    rows = read_jsonl(demo["sft"]) + read_jsonl(demo["sft_eval"])
    for row in rows:
        msgs = row["messages"]
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) and m["content"].strip()
                   for m in msgs)
        turns = msgs[1:] if msgs[0]["role"] == "system" else msgs
        assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2) and len(turns) >= 2
    persona = [r for r in rows if r["messages"][0]["role"] == "system"]
    assert persona and all(r["messages"][0]["content"] == SYSTEM_PROMPT for r in persona)
    assert len(persona) < len(rows)  # tasks too
    assert any(len(r["messages"]) > 3 for r in rows)  # some multi-turn


def test_alpaca_rows_well_formed(demo):
    rows = json.loads(demo["sft_alpaca"].read_text(encoding="utf-8"))
    for row in rows:
        assert set(row) == {"instruction", "input", "output", "system"}
        assert row["instruction"].strip() and row["output"].strip() and row["system"] in ("", SYSTEM_PROMPT)
    assert {r["system"] for r in rows} == {"", SYSTEM_PROMPT}
    assert make_alpaca_rows(10, seed=5) == make_alpaca_rows(10, seed=5)


def test_classification_rows(demo):
    assert demo["classify"].read_text(encoding="utf-8").splitlines()[0] == "text,label"
    rows = read_csv(demo["classify"])
    assert all(set(r) == {"text", "label"} and r["text"].strip() and r["label"] in LABELS for r in rows)
    assert {r["label"] for r in rows} == set(LABELS)
    assert make_classification_rows(30, seed=2) == make_classification_rows(30, seed=2)


def test_eval_does_not_overlap_train(demo):
    sft, alpaca = read_jsonl(demo["sft"]), json.loads(demo["sft_alpaca"].read_text(encoding="utf-8"))
    train_prompts = user_texts(sft) | {r["instruction"] for r in alpaca} | {r["prompt"] for r in read_jsonl(demo["tasks"])}
    eval_tasks = read_jsonl(demo["tasks_eval"])
    assert not {r["prompt"] for r in eval_tasks} & train_prompts
    assert len({r["prompt"] for r in eval_tasks}) == len(eval_tasks)
    small_talk = {"Hello!", "Hi there.", "Thanks!", "Thank you, that helps."}
    assert not (user_texts(read_jsonl(demo["sft_eval"])) - small_talk) & train_prompts
    pretrain_lines = set(demo["pretrain"].read_text(encoding="utf-8").splitlines())
    assert not {line.split(": ", 1)[1] for line in pretrain_lines if line.startswith(("Q: ", "Question: "))} & {
        r["prompt"] for r in eval_tasks}
    assert any(line.startswith("Q: ") for line in pretrain_lines)  # worked examples are there
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


def test_unknown_size_rejected(tmp_path):
    with pytest.raises(ValueError):
        write_demo_data(tmp_path, sizes={"sfft": 3})
