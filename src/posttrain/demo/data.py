"""The project's own generated data for the embedded default (offline, deterministic, stdlib only).

Everything here is made from templates written for this project:

* verifiable tasks (`make_tasks`, `check`, from tasks.py): arithmetic, reversing, sorting, lookup, uppercase;
* the helper bot of an invented restaurant, "Pebble & Pine" (restaurant.py holds its facts, chat.py its
  questions and answer styles): SFT chats (`make_sft_rows`) and customer questions as prompts with the facts
  the gold rater checks (`make_chat_prompts`);
* the restaurant's documents for RAG, before and after a promotion added after training, with questions;
* raw text for continued pretraining (`make_pretraining_text`): about half worked task examples ("Q: ...
  A: ..."), the rest restaurant facts, number sentences, word facts, stories, reviews;
* review sentiment for classification (`make_classification_rows`);
* `write_demo_data`, which writes all of it, with held-out eval files, to a directory.

Answer format for tasks (see tasks.py): the answer alone, nothing else ("12", "tac", "2 5 9", "CAT").
"""
from __future__ import annotations

import csv
import io
import json
import random
import re
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

from . import restaurant as R
from .chat import SMALL_TALK, chat_row, prompt_row, question
from .tasks import KINDS, OPS, WORDS, Seed, draw_distinct, make_task, make_tasks
from .tasks import Task, check, normalize_answer  # noqa: F401  (re-exported: imported from here elsewhere)

# ------------------------------------------------------------------------------------ SFT rows
def _questions(row: dict) -> list[str]:
    """The user messages of a chat row that carry a real question (the dedupe key)."""
    return [m["content"] for m in row["messages"] if m["role"] == "user" and m["content"] not in SMALL_TALK]


TASK_SHARE = 0.5  # of SFT rows: verifiable tasks; the rest are restaurant chats


def _chat(rng: random.Random, task_rng: random.Random, multi_turn: bool = True) -> dict:
    if rng.random() >= TASK_SHARE:
        return chat_row(rng, multi_turn)
    turns = [make_task(rng.choice(KINDS), task_rng) for _ in range(2 if multi_turn and rng.random() < 0.25 else 1)]
    return {"messages": [m for t in turns for m in ({"role": "user", "content": t.prompt},
                                                    {"role": "assistant", "content": t.answer})]}


def make_sft_rows(n: int, seed: Seed = 0, *, exclude: Iterable[str] = (), unique: bool = False,
                  multi_turn: bool = True) -> list[dict]:
    """`n` OpenAI-style rows {"messages": [...]}: half tasks (answered with the answer alone), half restaurant
    chats answered in mixed styles (chat.py); a quarter are multi-turn. Rows asking anything in `exclude` are
    skipped."""
    rng, task_rng = random.Random(f"{seed}:chat"), random.Random(f"{seed}:task")
    return draw_distinct(n, lambda: _chat(rng, task_rng, multi_turn), _questions, exclude, unique)


def make_chat_prompts(n: int, seed: Seed = 0, *, exclude: Iterable[str] = (), unique: bool = True) -> list[dict]:
    """`n` distinct customer questions as prompt rows {prompt, answer (the gold rater's facts), kind}."""
    rng = random.Random(f"{seed}:prompts")
    return draw_distinct(n, lambda: prompt_row(question(rng)), lambda r: [r["prompt"]], exclude, unique)


def to_alpaca(row: dict) -> dict:
    """A single-turn messages row as {"instruction", "input", "output", "system"}."""
    system = row["messages"][0]["content"] if row["messages"][0]["role"] == "system" else ""
    user, assistant = [m["content"] for m in row["messages"] if m["role"] != "system"]
    return {"instruction": user, "input": "", "output": assistant, "system": system}


def make_alpaca_rows(n: int, seed: Seed = 0, *, exclude: Iterable[str] = ()) -> list[dict]:
    """The same content as `make_sft_rows`, single-turn, in alpaca form."""
    return [to_alpaca(r) for r in make_sft_rows(n, seed, exclude=exclude, multi_turn=False)]


# ---------------------------------------------------------------------------- pretraining text
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 0 <= n < 1000."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))


SUBJECTS = ("The cook", "A waiter", "The old baker", "My neighbour", "A small child", "The farmer", "Our guest")
ACTIONS = ("carries a basket of plums", "opens the heavy door", "washes a blue cup", "buys three loaves of bread",
           "finds an old map", "paints the wooden fence", "sweeps the kitchen floor", "waters the herbs")
SCENES = ("in the morning", "before lunch", "after the rain", "near the harbor", "on a quiet street",
          "late at night")


# document kinds and how often each is drawn; "examples" (worked task examples, the densest teacher of the
# tasks) is half of the text
DOC_KINDS = {"examples": 8, "restaurant": 2, "math": 1, "words": 1, "sort": 1, "lookup": 1, "story": 1, "qa": 1,
             "review": 1}


def _task_not_in(rng: random.Random, exclude: set[str]) -> Task:
    """A task of a random kind whose prompt is not in `exclude` (the held-out prompts)."""
    t = make_task(rng.choice(KINDS), rng)
    while t.prompt in exclude:
        t = make_task(rng.choice(KINDS), rng)
    return t


def _examples(rng: random.Random, exclude: set[str]) -> str:
    """Worked task examples, "Q: ...\nA: ...", none of whose prompts are in `exclude`."""
    return "\n".join(f"Q: {t.prompt}\nA: {t.answer}" for t in (_task_not_in(rng, exclude) for _ in range(6)))


def _doc(rng: random.Random, exclude: set[str] = frozenset()) -> str:
    kind = rng.choices(list(DOC_KINDS), weights=list(DOC_KINDS.values()))[0]
    if kind == "examples":
        return _examples(rng, exclude)
    if kind == "restaurant":
        facts = [f"{R.NAME} is a small restaurant at {R.ADDRESS}."]
        facts += [f"{R.price_sentence(d)} {R.inside_sentence(d)}" for d in rng.sample(R.DISHES, 3)]
        facts += [R.hours_sentence(day) for day in rng.sample(R.DAYS, 2)]
        facts += [rng.choice(R.POLICIES)[2], f"Today's promotion: {R.TODAY.text}"]
        rng.shuffle(facts)
        return " ".join(facts)
    if kind == "math":
        out = []
        for _ in range(rng.randint(2, 4)):
            t = make_task("add", rng)
            a, op, b = re.search(r"(\d+) (\S) (\d+)", t.prompt).groups()
            sent = f"{number_words(int(a))} {OPS[op][0]} {number_words(int(b))} is {number_words(int(t.answer))}."
            out.append(f"{R.cap(sent)} {a} {op} {b} = {t.answer}.")
        return " ".join(out)
    if kind == "words":
        w = rng.choice(WORDS)
        return (f"The word {w} reversed is {w[::-1]}. In capital letters, {w} is {w.upper()}. "
                f"The word {w} has {number_words(len(w))} letters.")
    if kind == "sort":
        t = make_task("sort", rng)
        xs = t.prompt.split(": ")[1]
        return f"Here are some numbers: {xs}. Sorted from smallest to largest, they are {t.answer}."
    if kind == "lookup":
        t = make_task("lookup", rng)
        context, asked = t.prompt.rsplit(" What is ", 1)
        return f"{context} So {asked[:-1]} is {t.answer}."
    if kind == "story":
        return " ".join(f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(SCENES)}."
                        for _ in range(rng.randint(2, 4)))
    if kind == "qa":
        t = _task_not_in(rng, exclude)
        chat = question(rng)
        while chat.text in exclude:
            chat = question(rng)
        return f"Question: {t.prompt}\nAnswer: {t.answer}\nQuestion: {chat.text}\nAnswer: {chat.sentence}"
    label = rng.choice(LABELS)
    return " ".join(_review(rng, label)["text"] for _ in range(2))


def make_pretraining_text(n_docs: int, seed: Seed = 0, *, exclude: Iterable[str] = ()) -> list[str]:
    """`n_docs` raw-text documents of a few sentences each; no task prompt or question in `exclude` appears."""
    rng, banned = random.Random(f"{seed}:pretrain"), set(exclude)
    return [_doc(rng, banned) for _ in range(n_docs)]


# ----------------------------------------------------------------------------- classification
LABELS = ("positive", "negative", "neutral")
FOOD = {"positive": ("delicious", "wonderful", "excellent", "lovely", "perfect"),
        "negative": ("cold", "bland", "awful", "terrible", "burnt"),
        "neutral": ("okay", "average", "fine", "ordinary", "acceptable")}
STAFF = {"positive": ("friendly", "kind", "helpful"), "negative": ("rude", "careless", "unfriendly"),
         "neutral": ("polite enough", "busy", "quiet")}
OPENERS = {"positive": ("We loved it!", "What a great evening.", "Highly recommended."),
           "negative": ("Never again.", "What a letdown.", "Very disappointing."),
           "neutral": ("It was an ordinary visit.", "Nothing special.", "A normal evening out.")}
CLOSERS = {"positive": ("We will come back soon.", "Thank you for a lovely meal."),
           "negative": ("We will not come back.", "Save your money."),
           "neutral": ("Maybe we will try it again.", "It was fine for a quick bite.")}


def _review(rng: random.Random, label: str) -> dict:
    dish = rng.choice(R.DISHES)
    parts = [f"The {dish} was {rng.choice(FOOD[label])}."]
    if rng.random() < 0.6:
        parts.append(f"The staff were {rng.choice(STAFF[label])}.")
    if rng.random() < 0.5:
        parts.insert(0, rng.choice(OPENERS[label]))
    if rng.random() < 0.5:
        parts.append(rng.choice(CLOSERS[label]))
    return {"text": " ".join(parts), "label": label}


def make_classification_rows(n: int, seed: Seed = 0, *, exclude: Iterable[str] = (),
                             unique: bool = False) -> list[dict]:
    """`n` restaurant reviews {"text", "label"}, labels balanced over positive/negative/neutral."""
    rng, counter = random.Random(f"{seed}:classify"), iter(range(10**9))
    return draw_distinct(n, lambda: _review(rng, LABELS[next(counter) % 3]), lambda r: [r["text"]], exclude, unique)


# ------------------------------------------------------------------------------------- writing
DEFAULT_SIZES = {"pretrain": 400, "sft": 600, "sft_eval": 60, "tasks": 500, "tasks_eval": 100,
                 "chat": 400, "chat_eval": 100, "classify": 300, "classify_eval": 60,
                 "rag_eval": 1000}  # rag_eval: at most this many held-out RAG questions (all of them by default)
RAG_HELD_OUT = 0.15  # of the phrasings of questions about the menu, hours and policies: held out of RAG training


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["text", "label"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def rag_split(seed: Seed = 0) -> dict[str, list[dict]]:
    """The RAG questions {question, answer, source, response}. `train1` .. `train4`: the questions each snapshot
    before training answers, less the held-out phrasings (a share of those about the menu, hours and policies);
    `eval`: the held-out phrasings and every question about a promotion, asked of the snapshot after training
    (its promotions are in no training file); `new`: those about its today's promotion alone."""
    rng = random.Random(f"{seed}:rag")
    after = R.TRAINING_SNAPSHOTS + 1
    asked = {i: R.rag_questions(R.knowledge(i)) for i in range(1, after + 1)}
    phrasings = sorted({r["question"] for r in asked[after] if r["source"] != "promotions.md"})
    held = {q for q in phrasings if rng.random() < RAG_HELD_OUT}
    split = {f"train{i}": [r for r in asked[i] if r["question"] not in held] for i in range(1, after)}
    today = R.AFTER_TRAINING
    split["new"] = [r for r in asked[after] if r["answer"] in (today.offer, today.code)]
    split["eval"] = [r for r in asked[after] if r["question"] in held or r["source"] == "promotions.md"]
    return split


def write_knowledge_base(out: Path) -> list[Path]:
    """out/2025-10-16 .. out/2025-11-13: the restaurant's documents in each weekly snapshot (restaurant.knowledge)."""
    return [R.write_documents(out / name, R.knowledge(i)) for i, name in enumerate(R.SNAPSHOTS, 1)]


def write_demo_data(out_dir: str | Path, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Write the demo data set to `out_dir`; returns {name: path}. Eval files share no prompt with
    the training files. `sizes` overrides entries of `DEFAULT_SIZES`."""
    from ..rag.prompt import DEFAULT_TEMPLATE, NO_ANSWER

    unknown = set(sizes or {}) - set(DEFAULT_SIZES)
    if unknown:
        raise ValueError(f"unknown sizes {sorted(unknown)} (known: {', '.join(DEFAULT_SIZES)})")
    size = {**DEFAULT_SIZES, **(sizes or {})}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tasks_eval = make_tasks(size["tasks_eval"], f"{seed}:tasks_eval", unique=True)
    chat_eval = make_chat_prompts(size["chat_eval"], f"{seed}:chat_eval")
    sft_eval = make_sft_rows(size["sft_eval"], f"{seed}:sft_eval", unique=True, exclude={r["prompt"] for r in chat_eval})
    held = ({t.prompt for t in tasks_eval} | {r["prompt"] for r in chat_eval}
            | {q for r in sft_eval for q in _questions(r)})
    tasks = make_tasks(size["tasks"], seed, exclude=held)
    sft = make_sft_rows(size["sft"], seed, exclude=held)
    chat = make_chat_prompts(size["chat"], seed, exclude=held)
    alpaca = make_alpaca_rows(size["sft"], seed, exclude=held)
    classify_eval = make_classification_rows(size["classify_eval"], f"{seed}:classify_eval", unique=True)
    classify = make_classification_rows(size["classify"], seed, exclude={r["text"] for r in classify_eval})
    pretrain = make_pretraining_text(size["pretrain"], seed, exclude=held)
    rag = rag_split(seed)
    if len(rag["eval"]) > size["rag_eval"]:  # a deterministic subset, in file order
        keep = set(random.Random(f"{seed}:rag_eval").sample(range(len(rag["eval"])), size["rag_eval"]))
        rag["eval"] = [r for i, r in enumerate(rag["eval"]) if i in keep]
    snapshots = write_knowledge_base(out / "kb")
    documents = [p.read_text(encoding="utf-8") for p in sorted(snapshots[R.TRAINING_SNAPSHOTS - 1].iterdir())]

    corpus = (pretrain + [f"{m['role']}\n{m['content']}" for r in sft for m in r["messages"]]
              + [f"{t.prompt}\n{t.answer}" for t in tasks] + [f"{r['text']}\n{r['label']}" for r in classify]
              + documents + [q["question"] for q in rag[f"train{R.TRAINING_SNAPSHOTS}"]] + [DEFAULT_TEMPLATE, NO_ANSWER]
              + ["system", "user", "assistant"])  # the chat template's roles (a user may send a system prompt)
    files = {"pretrain.txt": "\n\n".join(pretrain) + "\n",
             "sft.jsonl": _jsonl(sft),
             "sft_alpaca.json": json.dumps(alpaca, indent=1) + "\n",
             "sft_eval.jsonl": _jsonl(sft_eval),
             "tasks.jsonl": _jsonl([asdict(t) for t in tasks]),
             "tasks_eval.jsonl": _jsonl([asdict(t) for t in tasks_eval]),
             "chat.jsonl": _jsonl(chat),
             "chat_eval.jsonl": _jsonl(chat_eval),
             **{f"rag_{name}.jsonl": _jsonl(rows) for name, rows in rag.items()},
             "classify.csv": _csv(classify),
             "classify_eval.csv": _csv(classify_eval),
             "tokenizer_corpus.txt": "\n".join(corpus) + "\n"}
    paths = {}
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
        paths[name.split(".")[0]] = out / name
    return {**paths, "kb": out / "kb"}
