"""The restaurant bot's chats: customer questions, the facts each one needs, and answers in mixed styles.

`question(rng)` draws a customer question about the menu, prices, hours, policies or today's promotion, with
its facts (the gold rater's spec, gold.py), the full answer in the bot's persona and the bare fact. `answer(q,
style, rng)` writes it in one of the styles real SFT data mixes:

    full      the complete, polite sentence in persona ("The tomato soup costs $6.50.")
    terse     the bare fact ("$6.50")
    rude      the fact, impolitely ("Ugh, $6.50. Read the menu yourself.")
    persona   out of persona ("As an AI language model I cannot eat, but ...", "Dunno, google it.")
    ramble    the full answer buried in filler (about 40 words)
    wrong     the full sentence with a wrong fact (another dish's price, another day's hours)

STYLES gives their shares in the SFT data: chosen so that the SFT model samples every style, with the full
answer a minority (what the preference stages have to find and reinforce). Wrong facts are rarer: a reward
model has to know the menu to see them (with 12% of them it ordered 84% of held-out pairs right, not 90%).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .restaurant import (CODE_WORDS, DAYS, DISHES, HOURS, INSIDE, KEY_INGREDIENT, NAME, POLICIES, PRICE, TODAY, VEGETARIAN, cap,
                         hours_fact, hours_sentence, money)

STYLES = {"full": 0.20, "terse": 0.26, "rude": 0.16, "persona": 0.16, "ramble": 0.16, "wrong": 0.06}
LEADS = ("", "", "", "Hi! ", "Hello, ", "Quick question: ", "Excuse me, ", "Sorry to bother you, ", "Hey, ",
         "Good evening! ", "I was wondering: ", "Please tell me: ")
GREETINGS = (("Hello!", f"Hello! Welcome to {NAME}. How can I help you?"),
             ("Hi there.", "Hi! What would you like to know?"))
THANKS = (("Thanks!", "You're welcome! We hope to see you soon."),
          ("Thank you, that helps.", "Glad I could help. Enjoy your meal!"))
SMALL_TALK = {q for q, _ in GREETINGS + THANKS}


@dataclass(frozen=True)
class Question:
    text: str
    kind: str
    spec: str       # the facts, as the gold rater reads them
    sentence: str   # the full answer in persona
    fragment: str   # the bare fact
    wrong: str      # the full answer with a wrong fact


def _other(rng: random.Random, items, not_this):
    return rng.choice([x for x in items if x != not_this])


def _price(rng, dish) -> Question:
    q = rng.choice(("How much is the {d}?", "What does the {d} cost?", "What is the price of the {d}?",
                    "How much do you charge for the {d}?")).format(d=dish)
    wrong = PRICE[_other(rng, [d for d in DISHES if PRICE[d] != PRICE[dish]], dish)]
    return Question(q, "price", money(PRICE[dish]), f"The {dish} costs {money(PRICE[dish])}.", money(PRICE[dish]),
                    f"The {dish} costs {money(wrong)}.")


def _hours(rng, day) -> Question:
    q = rng.choice(("When are you open on {d}?", "What are your hours on {d}?",
                    "What are the opening hours on {d}?")).format(d=day)
    other = _other(rng, [d for d in DAYS if HOURS[d] != HOURS[day]], day)
    wrong = hours_sentence(other).replace(other, day)
    spec = "closed" if HOURS[day] is None else f"{HOURS[day][0]} | {HOURS[day][1]}"
    return Question(q, "hours", spec, hours_sentence(day), cap(hours_fact(day)), wrong)


def _open_close(rng, day) -> Question:
    opening = rng.random() < 0.5
    q = (f"When do you open on {day}?" if opening else f"What time do you close on {day}?")
    h = HOURS[day]
    if h is None:
        other = _other(rng, [d for d in DAYS if HOURS[d]], day)
        time = HOURS[other][0 if opening else 1]
        return Question(q, "hours", "closed", hours_sentence(day), "Closed",
                        f"On {day} we {'open' if opening else 'close'} at {time}.")
    time = h[0 if opening else 1]
    other = _other(rng, [d for d in DAYS if HOURS[d] and HOURS[d][0 if opening else 1] != time], day)
    wrong_time = HOURS[other][0 if opening else 1]
    verb = "open" if opening else "close"
    return Question(q, "hours", time, f"On {day} we {verb} at {time}.", time, f"On {day} we {verb} at {wrong_time}.")


def _vegetarian(rng, dish) -> Question:
    q = rng.choice(("Is the {d} vegetarian?", "Can a vegetarian eat the {d}?")).format(d=dish)
    yes, no = f"Yes, the {dish} is vegetarian.", f"No, the {dish} is not vegetarian."
    if VEGETARIAN[dish]:
        return Question(q, "vegetarian", "yes | !not", yes, "Yes", no)
    return Question(q, "vegetarian", "no ~ not | !yes", no, "No", yes)


def _inside(rng, dish) -> Question:
    q = rng.choice(("What is in the {d}?", "What comes with the {d}?", "Tell me about the {d}.")).format(d=dish)
    return Question(q, "inside", KEY_INGREDIENT[dish], f"The {dish} has {INSIDE[dish]}.", INSIDE[dish],
                    f"The {dish} has {INSIDE[_other(rng, DISHES, dish)]}.")


def _policy(rng) -> Question:
    key, questions, sentence, fact = rng.choice(POLICIES)
    wrong = {"reservations": "We take reservations for groups of two or more.",
             "dogs": "Dogs are welcome inside and on the terrace.", "payment": "We only accept cash.",
             "takeaway": "We deliver to your door, but we have no takeaway.", "address": "We are at 3 Mill Lane.",
             "parking": "There is no parking near the restaurant."}[key]
    fragment = {"reservations": "Groups of six or more", "dogs": "Terrace only", "payment": "Cash and all major cards",
                "takeaway": "Takeaway, no delivery", "address": "8 Harbor Street", "parking": "Free parking"}[key]
    ruled_out = {"dogs": " | !welcome inside", "takeaway": " | !no takeaway | !deliver to"}.get(key, "")
    return Question(rng.choice(questions), "policy", fact + ruled_out, sentence, fragment, wrong)


def _promotion(rng) -> Question:
    p = TODAY
    if rng.random() < 0.6:
        q = rng.choice(("What is today's promotion?", "Is there a special offer today?", "Any discount today?"))
        offer = p.offer.rsplit(" the ", 1)[0]
        wrong = f"{offer} the {_other(rng, DISHES, p.dish)}"
        return Question(q, "promotion", f"{offer} | {p.dish}", f"Today we offer {p.offer}.", cap(p.offer),
                        f"Today we offer {wrong}.")
    q = rng.choice(("What is today's promotion code?", "Which code do I mention for today's promotion?"))
    return Question(q, "promotion", p.code, f"Mention the code {p.code} when you order.", p.code,
                    f"Mention the code {_other(rng, CODE_WORDS, p.code)} when you order.")


def _cheapest(rng) -> Question:
    cheap = rng.random() < 0.5
    dish = (min if cheap else max)(DISHES, key=PRICE.get)
    other = _other(rng, DISHES, dish)
    q = "What is your cheapest dish?" if cheap else "What is your most expensive dish?"
    return Question(q, "price", f"{dish} | {money(PRICE[dish])}", f"The {dish}, at {money(PRICE[dish])}.",
                    f"{cap(dish)}, {money(PRICE[dish])}", f"The {other}, at {money(PRICE[other])}.")


TOPICS = {"price": 4, "hours": 2, "open_close": 2, "vegetarian": 2, "inside": 2, "policy": 3, "promotion": 2,
          "cheapest": 1}


def question(rng: random.Random) -> Question:
    topic = rng.choices(list(TOPICS), weights=list(TOPICS.values()))[0]
    if topic == "price":
        q = _price(rng, rng.choice(DISHES))
    elif topic == "hours":
        q = _hours(rng, rng.choice(DAYS))
    elif topic == "open_close":
        q = _open_close(rng, rng.choice(DAYS))
    elif topic == "vegetarian":
        q = _vegetarian(rng, rng.choice(DISHES))
    elif topic == "inside":
        q = _inside(rng, rng.choice(DISHES))
    elif topic == "policy":
        q = _policy(rng)
    elif topic == "promotion":
        q = _promotion(rng)
    else:
        q = _cheapest(rng)
    lead = rng.choice(LEADS)
    text = lead + (q.text[0].lower() + q.text[1:] if lead.endswith((", ", ": ")) else q.text)
    return Question(text, q.kind, q.spec, q.sentence, q.fragment, q.wrong)


# ------------------------------------------------------------------------------------------- styles
CLOSINGS = ("", "", "", " Enjoy your meal!", " We hope to see you soon!", " Thank you for asking!")
RUDE_TEMPLATES = ("Ugh, {f}. Read the menu yourself.", "Whatever. {s}", "{s} Don't ask me again.",
                  "Obviously {f}. Figure it out.", "{f}. Not my problem after that.", "Ugh. {s} Stop asking.")
PERSONA_TEMPLATES = ("As an AI language model I do not eat, but {s_low}", "I don't work there, lol. Maybe {f}?",
                     "Dunno, google it.", "lol {f} i guess", "No idea, I am just a chatbot.",
                     "As an AI I have no menu. Try asking the staff.")
RAMBLE_OPENERS = ("Well, that is a very good question, and many of our guests ask about it, so here goes.",
                  "Let me think about this for a moment, because there is quite a lot to say about it.",
                  "So, thank you so much for your question, it is always lovely to hear from you.",
                  "Right, this is something people often wonder about when they plan a visit to us.")
RAMBLE_CLOSERS = ("Also, things can change from time to time, so it is good to ask again when you visit.",
                  "And if you have any other questions at all, just ask and we will do our very best.",
                  "By the way, do take your time with the whole menu, there is no hurry at all here.")


def answer(q: Question, style: str, rng: random.Random) -> str:
    s, f = q.sentence, q.fragment
    if style == "full":
        return s + rng.choice(CLOSINGS)
    if style == "terse":
        return f
    if style == "rude":
        return rng.choice(RUDE_TEMPLATES).format(s=s, f=f)
    if style == "persona":
        return rng.choice(PERSONA_TEMPLATES).format(s_low=s[0].lower() + s[1:], f=f)
    if style == "ramble":
        return f"{rng.choice(RAMBLE_OPENERS)} {s} {rng.choice(RAMBLE_CLOSERS)}"
    if style == "wrong":
        return q.wrong + rng.choice(CLOSINGS)
    raise ValueError(f"unknown style {style!r} (choose from {', '.join(STYLES)})")


def draw_style(rng: random.Random) -> str:
    return rng.choices(list(STYLES), weights=list(STYLES.values()))[0]


def chat_row(rng: random.Random, multi_turn: bool = True) -> dict:
    """One restaurant chat {"messages": [...]} (no system prompt: the bot is its fine-tuning); a quarter are
    multi-turn, with a greeting or thanks around one or two questions, each answered in a drawn style."""
    multi = multi_turn and rng.random() < 0.25
    turns: list[tuple[str, str]] = []
    if multi and rng.random() < 0.5:
        turns.append(rng.choice(GREETINGS))
    for _ in range(rng.randint(1, 2) if multi else 1):
        q = question(rng)
        turns.append((q.text, answer(q, draw_style(rng), rng)))
    if multi and rng.random() < 0.5:
        turns.append(rng.choice(THANKS))
    return {"messages": [m for user, bot in turns for m in ({"role": "user", "content": user},
                                                           {"role": "assistant", "content": bot})]}


def prompt_row(q: Question) -> dict:
    """A held-out or RL prompt: the question, its facts for the gold rater (`answer`) and its topic (`kind`)."""
    return {"prompt": q.text, "answer": q.spec, "kind": q.kind}
