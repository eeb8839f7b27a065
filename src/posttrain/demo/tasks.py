"""Verifiable tasks for the demo (offline, deterministic, stdlib only): arithmetic, reversing, sorting,
lookup, uppercase. `make_tasks` draws them, `check` scores a completion against the reference answer.

Answer format: the answer alone, nothing else ("12", "tac", "2 5 9", "CAT").
"""
from __future__ import annotations

import difflib
import random
from dataclasses import dataclass
from typing import Callable, Iterable

from ..rl.rewards import exact_answer, normalize_answer  # noqa: F401  (normalize_answer: re-exported)

Seed = int | str

# --------------------------------------------------------------------------------------- tasks
KINDS = ("add", "reverse", "sort", "lookup", "upper")
# The tasks are sized for the demo's 1M-parameter model and a few minutes of CPU: 30 short words, one-digit
# operands (up to 5 for products), three or four numbers below 10 to sort, two or three people to look up.
WORDS = ("cat dog sun map cup pen box hat bird fish frog lamp desk door rain snow tree leaf rock sand "
         "milk soup rice cake salt plum pear lime corn bean").split()
NAMES = ("Ana Ben Cleo Dan Eva Finn Gus Hana Ivo Jade Kim Leo Mia Nico Omar Pia Quinn Rosa Sam Tara "
         "Uma Vic Wes Yara Zoe").split()
NUM_THINGS = ("locker", "seat", "room", "table", "ticket", "bus")
COLOR_THINGS = ("bag", "scarf", "bike", "car", "umbrella")
COLORS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "grey")
OPS = {"+": ("plus", lambda a, b: a + b), "-": ("minus", lambda a, b: a - b),
       "*": ("times", lambda a, b: a * b)}
# how hard the tasks are: operands up to ADD_MAX (MUL_MAX for *), SORT_LEN numbers below SORT_MAX, up to
# LOOKUP_PEOPLE people in a lookup context
ADD_MAX, MUL_MAX, SORT_MAX, SORT_LEN, LOOKUP_PEOPLE = 9, 5, 10, (3, 4), 3

ADD_TEMPLATES = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}.")
REVERSE_TEMPLATES = ("Reverse the word {w}.", "Write {w} backwards.", "Spell the word {w} in reverse.",
                     "What is {w} spelled backwards?", "Give the letters of {w} in reverse order.")
SORT_TEMPLATES = ("Sort these numbers from smallest to largest: {xs}", "Put in ascending order: {xs}",
                  "Order from low to high: {xs}")
UPPER_TEMPLATES = ("Write the word {w} in capital letters.", "Uppercase the word {w}.",
                   "Write {w} in upper case.", "Capitalize every letter of {w}.", "Make {w} all caps.")


@dataclass(frozen=True)
class Task:
    """A verifiable task: `answer` is the exact reference; `check` compares a completion to it."""

    kind: str
    prompt: str
    answer: str


def make_task(kind: str, rng: random.Random) -> Task:
    if kind == "add":
        op = rng.choice(list(OPS))
        top = MUL_MAX if op == "*" else ADD_MAX
        a, b = rng.randint(0, top), rng.randint(0, top)
        if op == "-" and b > a:
            a, b = b, a
        return Task(kind, rng.choice(ADD_TEMPLATES).format(a=a, op=op, b=b), str(OPS[op][1](a, b)))
    if kind in ("reverse", "upper"):
        w = rng.choice(WORDS)
        if kind == "reverse":
            return Task(kind, rng.choice(REVERSE_TEMPLATES).format(w=w), w[::-1])
        return Task(kind, rng.choice(UPPER_TEMPLATES).format(w=w), w.upper())
    if kind == "sort":
        xs = rng.sample(range(0, SORT_MAX), rng.randint(*SORT_LEN))
        return Task(kind, rng.choice(SORT_TEMPLATES).format(xs=" ".join(map(str, xs))),
                    " ".join(map(str, sorted(xs))))
    if kind == "lookup":
        people = rng.sample(NAMES, rng.randint(2, LOOKUP_PEOPLE))
        if rng.random() < 0.6:
            thing, values = rng.choice(NUM_THINGS), [str(v) for v in rng.sample(range(1, 60), len(people))]
        else:
            thing, values = rng.choice(COLOR_THINGS), rng.sample(COLORS, len(people))
        context = " ".join(f"{p}'s {thing} is {v}." for p, v in zip(people, values))
        i = rng.randrange(len(people))
        return Task(kind, f"{context} What is {people[i]}'s {thing}?", values[i])
    raise ValueError(f"unknown task kind '{kind}' (choose from {', '.join(KINDS)})")


def draw_distinct(n: int, make: Callable[[], object], keys: Callable[[object], Iterable[str]],
          exclude: Iterable[str] = (), unique: bool = False) -> list:
    """Draw `n` items from `make`, skipping any whose keys are in `exclude` (and repeats if `unique`)."""
    banned, out = set(exclude), []
    for _ in range(100 * n + 100):
        if len(out) == n:
            break
        item = make()
        ks = list(keys(item))
        if banned.intersection(ks):
            continue
        if unique:
            banned.update(ks)
        out.append(item)
    if len(out) < n:
        raise ValueError(f"could only draw {len(out)} of {n} distinct items; ask for fewer")
    return out


def make_tasks(n: int, seed: Seed = 0, kinds: Iterable[str] | None = None, *, exclude: Iterable[str] = (),
               unique: bool = False) -> list[Task]:
    """`n` tasks, kinds in turn (balanced), skipping prompts in `exclude`; `unique` forbids repeats."""
    kinds = tuple(kinds or KINDS)
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown task kind '{k}' (choose from {', '.join(KINDS)})")
    rng, counter = random.Random(seed), iter(range(10**9))
    return draw_distinct(n, lambda: make_task(kinds[next(counter) % len(kinds)], rng), lambda t: [t.prompt], exclude,
                         unique)


def check(task_or_answer: Task | dict | str, completion: str) -> float:
    """1.0 if the completion's answer equals the reference (a Task, a row with "answer", or a string)."""
    answer = task_or_answer if isinstance(task_or_answer, str) else (
        task_or_answer["answer"] if isinstance(task_or_answer, dict) else task_or_answer.answer)
    return exact_answer(answer, completion)


def _shape(text: str) -> str:
    """The answer's form: each character as d (digit), a (lower case), A (upper case) or itself."""
    return "".join("d" if c.isdigit() else "a" if c.islower() else "A" if c.isupper() else c for c in text)


def partial(task_or_answer: Task | dict | str, completion: str) -> float:
    """A graded checker: 1.0 for the exact answer, else at most 0.5 for a well-formed, close one:
    0.5 * (0.4 * similarity of the strings + 0.3 * similarity of their forms (digits, lower / upper case
    letters, spaces: the right kind and number of items) + 0.3 * closeness of their lengths). Only the
    right answer reaches 1; `task_accuracy` still counts exact answers only."""
    answer = task_or_answer if isinstance(task_or_answer, str) else (
        task_or_answer["answer"] if isinstance(task_or_answer, dict) else task_or_answer.answer)
    if check(answer, completion):
        return 1.0
    got, want = normalize_answer(completion), normalize_answer(answer)
    if not got or not want:
        return 0.0
    same = difflib.SequenceMatcher(None, got, want).ratio()
    form = difflib.SequenceMatcher(None, _shape(got), _shape(want)).ratio()
    length = max(0.0, 1.0 - abs(len(got) - len(want)) / len(want))
    return 0.5 * (0.4 * same + 0.3 * form + 0.3 * length)


def partial_reward(prompts, completions, *, answer, **columns) -> list[float]:
    """`partial` as a reward source: `rewards: [{function: "posttrain.demo.tasks:partial_reward"}]`."""
    return [partial(str(a), c) for a, c in zip(answer, completions)]


def check_reward(prompts, completions, *, answer, **columns) -> list[float]:
    """`check` as a reward source (`rewards: [{function: "posttrain.demo.tasks:check_reward"}]`): the
    rows' `answer` column against each completion."""
    return [check(str(a), c) for a, c in zip(answer, completions)]
