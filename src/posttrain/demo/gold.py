"""The gold rater: how the demo's stand-in for human rankers scores an answer of the restaurant bot, in [0, 1].

Written for this project, deterministic, and hidden from training: no training step reads it. It ranks the
SFT model's sampled answers (the `rank` step, in place of people with a labelling UI); the reward model and
DPO learn from those rankings only; PPO's reward is the learned reward model. The rater only measures.

It judges what the seeds' human rankers judged ("The capital of France is Paris." over "Paris"; a restaurant
bot that stays in its persona), mostly from what is visible in the answer itself:

    base = 0.40 * fact + 0.35 * sentence + 0.25 * concise
    gold = base * (0.3 if rude) * (0.3 if out of persona)

* fact (the only part that needs knowledge): 1 when the answer holds every fact the question needs (the price,
  the hours, the promotion, from restaurant.py) and no other value of the same kind (another price, time,
  promotion offer or code) and nothing the facts rule out; 0.5 when it holds some; else 0;
* sentence: a complete sentence: a capital first letter, at least 4 words, a full stop or "!" at the end;
* concise: 1 up to 20 words, falling linearly to 0 at 36 (0 when the answer holds no fact: a short non-answer
  is not concise, it is empty);
* rude ("ugh", "whatever", "read it yourself", ...) or out of persona ("as an AI", "lol", "google it", ...): an
  answer a human ranker would not accept, whatever else it does right, scores at most 0.3 of its base.

The facts travel with each prompt in its `answer` column as a small spec: items joined by " | ", each item one
or more alternatives joined by " ~ " (any of them counts), "!" in front of an item that must not appear:
"$6.50", "11:00 | 22:00", "yes | !not", "no ~ not | !yes", "a quarter off | apple pie". Items match whole words,
case ignored.
"""
from __future__ import annotations

import re

from .restaurant import CODE_WORDS, OFFERS

RUDE = ("ugh", "whatever", "yourself", "don't ask", "obviously", "figure it out", "not my problem", "stop asking")
OUT_OF_PERSONA = ("as an ai", "language model", "i don't work", "lol", "dunno", "google", "no idea")
VALUES = (re.compile(r"\$\d+(?:\.\d\d)?"), re.compile(r"\b\d{1,2}:\d\d\b"),  # prices, times
          re.compile("|".join(re.escape(offer) for offer in OFFERS), re.IGNORECASE),  # promotion offers
          re.compile(r"\b(?:" + "|".join(CODE_WORDS) + r")\b"))  # promotion codes
WEIGHTS = {"fact": 0.40, "sentence": 0.35, "concise": 0.25}
GATE = 0.3
CONCISE_WORDS = (20, 36)  # full marks up to the first, none from the second


def _has(text: str, item: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(item) + r"(?!\w)", text, re.IGNORECASE) is not None


def parse_spec(spec: str) -> tuple[list[list[str]], list[str]]:
    """(required items, each a list of alternatives; forbidden items)."""
    required, forbidden = [], []
    for item in (part.strip() for part in str(spec).split("|")):
        if item.startswith("!"):
            forbidden.append(item[1:].strip())
        elif item:
            required.append([alt.strip() for alt in item.split("~") if alt.strip()])
    return required, forbidden


def fact_score(spec: str, answer: str) -> float:
    required, forbidden = parse_spec(spec)
    found = sum(any(_has(answer, alt) for alt in item) for item in required)
    allowed = {alt.lower() for item in required for alt in item}
    wrong = any(v.lower() not in allowed for pattern in VALUES for v in pattern.findall(answer))
    wrong = wrong or any(_has(answer, item) for item in forbidden)
    if required and found == len(required) and not wrong:
        return 1.0
    return 0.5 if found else (0.0 if required else float(not wrong))


def is_sentence(answer: str) -> bool:
    text = answer.strip()
    return bool(text) and text[0].isupper() and text[-1] in ".!" and len(text.split()) >= 4


def concise_score(answer: str) -> float:
    words = len(answer.split())
    short, long = CONCISE_WORDS
    return min(1.0, max(0.0, (long - words) / (long - short)))


def is_rude(answer: str) -> bool:
    low = answer.lower()
    return any(marker in low for marker in RUDE)


def out_of_persona(answer: str) -> bool:
    low = answer.lower()
    return any(marker in low for marker in OUT_OF_PERSONA)


def parts(spec: str, answer: str) -> dict:
    """Every component of the score, for the report."""
    fact, sentence = fact_score(spec, answer), float(is_sentence(answer))
    concise = concise_score(answer) if fact > 0 else 0.0  # brevity counts when something is said
    base = WEIGHTS["fact"] * fact + WEIGHTS["sentence"] * sentence + WEIGHTS["concise"] * concise
    rude, persona = is_rude(answer), out_of_persona(answer)
    score = base * (GATE if rude else 1.0) * (GATE if persona else 1.0) if answer.strip() else 0.0
    return {"score": score, "fact": fact, "sentence": sentence, "concise": concise, "rude": rude,
            "out_of_persona": persona}


def gold(spec: str, answer: str) -> float:
    """The gold score in [0, 1]; also the `checker` of `posttrain eval --tasks` (called as (answer, completion))."""
    return parts(spec, answer)["score"]


def gold_reward(prompts, completions, *, answer, **columns) -> list[float]:
    """The gold rater as a reward source: `{function: "posttrain.demo.gold:gold_reward"}` (the rank step, and a
    weight-0 source that only logs `reward/gold` during PPO)."""
    return [gold(str(spec), completion) for spec, completion in zip(answer, completions)]
