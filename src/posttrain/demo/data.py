"""The project's own generated data for the embedded default (offline, deterministic, stdlib only).

Everything here is made from templates written for this project:

* verifiable tasks (`make_tasks`, `check`, from tasks.py): arithmetic, reversing, sorting, lookup, uppercase;
* a helper bot for an invented restaurant, "Pebble & Pine" (`SYSTEM_PROMPT`, `make_sft_rows`);
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

from .tasks import KINDS, OPS, WORDS, Seed, draw_distinct, make_task, make_tasks
from .tasks import Task, check, normalize_answer  # noqa: F401  (re-exported: imported from here elsewhere)

# ---------------------------------------------------------------------------------- restaurant
NAME, ADDRESS = "Pebble & Pine", "8 Harbor Street, Millbrook"
MENU = (  # dish, price, vegetarian, what is in it
    ("tomato soup", 6.50, True, "tomatoes, basil and a little cream"),
    ("mushroom risotto", 13.00, True, "rice, mushrooms, parmesan and thyme"),
    ("grilled salmon", 17.50, False, "salmon with lemon butter and green beans"),
    ("chicken curry", 14.00, False, "chicken in a mild coconut sauce, served with rice"),
    ("lentil burger", 12.00, True, "a lentil patty with pickles, lettuce and fries"),
    ("beef stew", 15.50, False, "slow-cooked beef with carrots and potatoes"),
    ("garden salad", 8.00, True, "lettuce, cucumber, radish and a lemon dressing"),
    ("apple pie", 5.50, True, "warm apple pie with vanilla ice cream"),
)
HOURS = {"Monday": None, "Tuesday": ("11:00", "22:00"), "Wednesday": ("11:00", "22:00"),
         "Thursday": ("11:00", "22:00"), "Friday": ("11:00", "23:00"), "Saturday": ("10:00", "23:00"),
         "Sunday": ("10:00", "16:00")}
POLICIES = (
    (("Can I book a table?", "Do you take reservations?", "Do I need a reservation?"),
     "We take reservations for groups of six or more. Smaller groups can just walk in."),
    (("Can I bring my dog?", "Are dogs allowed?"), "Dogs are welcome on the terrace, but not inside."),
    (("Can I pay by card?", "Do you accept cash?", "How can I pay?"), "We accept cash and all major cards."),
    (("Do you deliver?", "Can I order takeaway?", "Do you do takeaway?"),
     "We do not deliver, but every dish can be ordered for takeaway."),
    (("Where are you?", "What is your address?", "Where is the restaurant?"), f"We are at {ADDRESS}."),
)
SYSTEM_PROMPT = (f"You are the helper bot of {NAME}, a small restaurant at {ADDRESS}. Answer questions about "
                 "the menu, prices, opening hours and policies briefly and politely, using only the facts "
                 "you know.")
GREETINGS = (("Hello!", f"Hello! Welcome to {NAME}. How can I help you?"),
             ("Hi there.", "Hi! What would you like to know?"))
THANKS = (("Thanks!", "You're welcome! We hope to see you soon."),
          ("Thank you, that helps.", "Glad I could help. Enjoy your meal!"))
SMALL_TALK = {q for q, _ in GREETINGS + THANKS}
LEADS = ("", "", "Hi! ", "Hello, ", "Quick question: ", "Excuse me, ")


def _money(x: float) -> str:
    return f"${x:.2f}"


def _listing(items: list[str]) -> str:  # "a, b and c"
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _hours(day: str) -> str:
    h = HOURS[day]
    return f"we are closed on {day}s" if h is None else f"on {day} we are open from {h[0]} to {h[1]}"


VEGETARIAN = "the " + _listing([d for d, _, v, _ in MENU if v])


def _persona_qa(rng: random.Random) -> tuple[str, str]:
    """One question to the restaurant bot and its answer."""
    dish, price, veg, inside = rng.choice(MENU)
    day = rng.choice(list(HOURS))
    h = HOURS[day]
    topic = rng.choice(("price", "price", "hours", "hours", "open", "veg", "veg_all", "inside", "policy",
                        "menu", "cheap"))
    if topic == "price":
        q = rng.choice(("How much is the {d}?", "What does the {d} cost?", "What is the price of the {d}?",
                        "How much do you charge for the {d}?")).format(d=dish)
        a = f"The {dish} costs {_money(price)}."
    elif topic == "hours":
        q = rng.choice(("What are your hours on {d}?", "When are you open on {d}?",
                        "What are the opening hours on {d}?")).format(d=day)
        a = _cap(_hours(day)) + "."
    elif topic == "open":
        q, a = rng.choice((("When do you open on {d}?", "On {d} we open at {o}."),
                           ("What time do you close on {d}?", "On {d} we close at {c}."),
                           ("Are you open on {d}?", "Yes, {h}.")))
        q = q.format(d=day)
        a = f"Sorry, {_hours(day)}." if h is None else a.format(d=day, o=h[0], c=h[1], h=_hours(day))
    elif topic == "veg":
        q = rng.choice(("Is the {d} vegetarian?", "Does the {d} have meat or fish in it?")).format(d=dish)
        a = f"Yes, the {dish} is vegetarian." if veg else f"The {dish} is not vegetarian."
    elif topic == "veg_all":
        q = rng.choice(("Do you have vegetarian dishes?", "What can a vegetarian eat here?",
                        "Which dishes are vegetarian?"))
        a = f"Yes: {VEGETARIAN} are vegetarian."
    elif topic == "inside":
        q = rng.choice(("What is in the {d}?", "What comes with the {d}?", "Tell me about the {d}.")).format(d=dish)
        a = f"The {dish} is {inside}."
    elif topic == "policy":
        qs, a = rng.choice(POLICIES)
        q = rng.choice(qs)
    elif topic == "menu":
        q = rng.choice(("What is on the menu?", "What do you serve?", "Can I see the menu?"))
        a = "We serve " + _listing([f"{d} ({_money(p)})" for d, p, _, _ in MENU]) + "."
    else:
        cheap = rng.random() < 0.5
        d, p, _, _ = (min if cheap else max)(MENU, key=lambda m: m[1])
        q = "What is your cheapest dish?" if cheap else "What is your most expensive dish?"
        a = f"The {d}, at {_money(p)}."
    lead = rng.choice(LEADS)
    return (lead + (q[0].lower() + q[1:] if lead.endswith((", ", ": ")) else q)), a


# ------------------------------------------------------------------------------------ SFT rows
def _questions(row: dict) -> list[str]:
    """The user messages of a chat row that carry a real question (the dedupe key)."""
    return [m["content"] for m in row["messages"] if m["role"] == "user" and m["content"] not in SMALL_TALK]


TASK_SHARE = 0.7  # of SFT rows: verifiable tasks; the rest are restaurant chats


def _chat(rng: random.Random, task_rng: random.Random, multi_turn: bool = True) -> dict:
    turns: list[tuple[str, str]] = []
    multi = multi_turn and rng.random() < 0.25
    if rng.random() < TASK_SHARE:  # a task; answered with the answer alone
        for _ in range(2 if multi else 1):
            t = make_task(rng.choice(KINDS), task_rng)
            turns.append((t.prompt, t.answer))
        messages = []
    else:
        if multi and rng.random() < 0.5:
            turns.append(rng.choice(GREETINGS))
        for _ in range(rng.randint(1, 2) if multi else 1):
            turns.append(_persona_qa(rng))
        if multi and rng.random() < 0.5:
            turns.append(rng.choice(THANKS))
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for q, a in turns:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": messages}


def make_sft_rows(n: int, seed: Seed = 0, *, exclude: Iterable[str] = (), unique: bool = False,
                  multi_turn: bool = True) -> list[dict]:
    """`n` OpenAI-style rows {"messages": [...]}: 70% tasks, 30% restaurant chats (with the system
    prompt); a quarter are multi-turn. Rows asking anything in `exclude` are skipped."""
    rng, task_rng = random.Random(f"{seed}:chat"), random.Random(f"{seed}:task")
    return draw_distinct(n, lambda: _chat(rng, task_rng, multi_turn), _questions, exclude, unique)


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
        facts = [f"{NAME} is a small restaurant at {ADDRESS}."]
        facts += [f"The {d} costs {_money(p)}. It is {i}." for d, p, _, i in rng.sample(MENU, 3)]
        facts += [_cap(_hours(day)) + "." for day in rng.sample(list(HOURS), 2)]
        facts += [rng.choice(POLICIES)[1], f"Vegetarian dishes: {VEGETARIAN}."]
        rng.shuffle(facts)
        return " ".join(facts)
    if kind == "math":
        out = []
        for _ in range(rng.randint(2, 4)):
            t = make_task("add", rng)
            a, op, b = re.search(r"(\d+) (\S) (\d+)", t.prompt).groups()
            sent = f"{number_words(int(a))} {OPS[op][0]} {number_words(int(b))} is {number_words(int(t.answer))}."
            out.append(f"{_cap(sent)} {a} {op} {b} = {t.answer}.")
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
        context, question = t.prompt.rsplit(" What is ", 1)
        return f"{context} So {question[:-1]} is {t.answer}."
    if kind == "story":
        return " ".join(f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(SCENES)}."
                        for _ in range(rng.randint(2, 4)))
    if kind == "qa":
        t = _task_not_in(rng, exclude)
        q, a = _persona_qa(rng)
        return f"Question: {t.prompt}\nAnswer: {t.answer}\nQuestion: {q}\nAnswer: {a}"
    label = rng.choice(LABELS)
    return " ".join(_review(rng, label)["text"] for _ in range(2))


def make_pretraining_text(n_docs: int, seed: Seed = 0, *, exclude: Iterable[str] = ()) -> list[str]:
    """`n_docs` raw-text documents of a few sentences each; no task prompt in `exclude` appears."""
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
    dish = rng.choice(MENU)[0]
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
                 "classify": 300, "classify_eval": 60}


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["text", "label"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_demo_data(out_dir: str | Path, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Write the demo data set to `out_dir`; returns {name: path}. Eval files share no prompt with
    the training files. `sizes` overrides entries of `DEFAULT_SIZES`."""
    unknown = set(sizes or {}) - set(DEFAULT_SIZES)
    if unknown:
        raise ValueError(f"unknown sizes {sorted(unknown)} (known: {', '.join(DEFAULT_SIZES)})")
    size = {**DEFAULT_SIZES, **(sizes or {})}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tasks_eval = make_tasks(size["tasks_eval"], f"{seed}:tasks_eval", unique=True)
    sft_eval = make_sft_rows(size["sft_eval"], f"{seed}:sft_eval", unique=True)
    held = {t.prompt for t in tasks_eval} | {q for r in sft_eval for q in _questions(r)}
    tasks = make_tasks(size["tasks"], seed, exclude=held)
    sft = make_sft_rows(size["sft"], seed, exclude=held)
    alpaca = make_alpaca_rows(size["sft"], seed, exclude=held)
    classify_eval = make_classification_rows(size["classify_eval"], f"{seed}:classify_eval", unique=True)
    classify = make_classification_rows(size["classify"], seed, exclude={r["text"] for r in classify_eval})
    pretrain = make_pretraining_text(size["pretrain"], seed, exclude=held)

    corpus = (pretrain + [f"{m['role']}\n{m['content']}" for r in sft for m in r["messages"]]
              + [f"{t.prompt}\n{t.answer}" for t in tasks] + [f"{r['text']}\n{r['label']}" for r in classify])
    files = {"pretrain.txt": "\n\n".join(pretrain) + "\n",
             "sft.jsonl": _jsonl(sft),
             "sft_alpaca.json": json.dumps(alpaca, indent=1) + "\n",
             "sft_eval.jsonl": _jsonl(sft_eval),
             "tasks.jsonl": _jsonl([asdict(t) for t in tasks]),
             "tasks_eval.jsonl": _jsonl([asdict(t) for t in tasks_eval]),
             "classify.csv": _csv(classify),
             "classify_eval.csv": _csv(classify_eval),
             "tokenizer_corpus.txt": "\n".join(corpus) + "\n"}
    paths = {}
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
        paths[name.split(".")[0]] = out / name
    return paths
