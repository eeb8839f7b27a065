"""The demo restaurant, "Pebble & Pine": its facts, the documents that hold them, and questions about them.

One source of truth: the chat data (chat.py), the gold rater (gold.py), the pretraining text (data.py) and the
RAG knowledge base below all read these constants, so the documents the demo indexes agree with what the bot
was fine-tuned on.

`write_documents(folder, promotions)` writes the knowledge base: menu.md (a heading per dish), hours.md (a
heading per day), faq.jsonl (one policy per row), promotions.md (the week's promotions, one a day, today's
marked), reviews.jsonl and news.md (distractors: they name the dishes without their prices) and about.html.
Promotions are drawn from a seed (`draw_week`): "a quarter off the apple pie with the code MAPLE", so a model can
only know one it was trained on or reads in its context. The documents change every week (`knowledge(snapshot)`):
the RAG training data comes from the snapshots before training, and AFTER_TRAINING is today's promotion in the
one after: the case RAG exists for.

`rag_questions(promotions)` makes rows `{question, answer, source, response}`: `answer` occurs in the chunk that
answers (what `rag eval` checks), `response` is that chunk's sentence holding it, citing it as [1] (the RAFT
target).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

NAME, ADDRESS, CHEF, OPENED = "Pebble & Pine", "8 Harbor Street, Millbrook", "Nora Field", 2011
# dish, course, price, vegetarian, what it has
MENU = (
    ("tomato soup", "Starters", 6.50, True, "tomatoes, basil and a little cream"),
    ("garden salad", "Starters", 8.00, True, "lettuce, cucumber, radish and a lemon dressing"),
    ("garlic bread", "Starters", 4.50, True, "garlic butter on toasted bread"),
    ("mushroom risotto", "Mains", 13.00, True, "rice, mushrooms, parmesan and thyme"),
    ("grilled salmon", "Mains", 17.50, False, "salmon with lemon butter and green beans"),
    ("chicken curry", "Mains", 14.00, False, "chicken in a mild coconut sauce with rice"),
    ("lentil burger", "Mains", 12.00, True, "a lentil patty with pickles and fries"),
    ("beef stew", "Mains", 15.50, False, "slow-cooked beef with carrots and potatoes"),
    ("apple pie", "Desserts", 5.50, True, "warm apples and vanilla ice cream"),
    ("chocolate cake", "Desserts", 6.00, True, "dark chocolate and whipped cream"),
    ("fresh lemonade", "Drinks", 3.50, True, "lemons, mint and sparkling water"),
    ("mint tea", "Drinks", 2.50, True, "fresh mint leaves in hot water"),
)
DISHES = tuple(d for d, *_ in MENU)
PRICE = {d: p for d, _, p, _, _ in MENU}
VEGETARIAN = {d: v for d, _, _, v, _ in MENU}
INSIDE = {d: i for d, _, _, _, i in MENU}
KEY_INGREDIENT = {"tomato soup": "basil", "garden salad": "cucumber", "garlic bread": "toasted",  # in no other dish
                  "mushroom risotto": "parmesan", "grilled salmon": "beans", "chicken curry": "coconut",
                  "lentil burger": "pickles", "beef stew": "carrots", "apple pie": "vanilla",
                  "chocolate cake": "whipped", "fresh lemonade": "sparkling", "mint tea": "leaves"}
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
HOURS = {"Monday": None, "Tuesday": ("11:00", "22:00"), "Wednesday": ("11:00", "22:00"),
         "Thursday": ("11:00", "22:00"), "Friday": ("11:00", "23:00"), "Saturday": ("10:00", "23:00"),
         "Sunday": ("10:00", "16:00")}
# id, the questions, the answer sentence, the fact (a phrase the answer must hold)
POLICIES = (
    ("reservations", ("Can I book a table?", "Do you take reservations?", "Do I need a reservation?"),
     "We take reservations for groups of six or more.", "six or more"),
    ("dogs", ("Can I bring my dog?", "Are dogs allowed?", "Is my dog welcome?"),
     "Dogs are welcome on the terrace, but not inside.", "terrace"),
    ("payment", ("Can I pay by card?", "Do you accept cash?", "How can I pay?"),
     "We accept cash and all major cards.", "cash and all major cards"),
    ("takeaway", ("Do you deliver?", "Can I order takeaway?", "Do you do takeaway?"),
     "We do not deliver, but every dish can be ordered for takeaway.", "takeaway"),
    ("address", ("Where are you?", "What is your address?", "Where is the restaurant?"),
     f"We are at {ADDRESS}.", "8 Harbor Street"),
    ("parking", ("Is there parking?", "Can I park nearby?", "Where can I park?"),
     "There is free parking behind the restaurant.", "free parking"),
)
CODE_WORDS = ("PINE", "CEDAR", "MAPLE", "BIRCH", "FERN", "MOSS", "OAK", "ELM", "HAZEL", "WILLOW", "ASPEN", "LARCH",
              "ACORN", "THYME", "SAGE", "CLOVER")
OFFERS = ("half price on", "a third off", "a quarter off", "two for one on", "a free drink with",
          "a free dessert with")


def money(x: float) -> str:
    return f"${x:.2f}"


def listing(items: list[str]) -> str:  # "a, b and c"
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def hours_sentence(day: str) -> str:
    h = HOURS[day]
    return f"We are closed on {day}s." if h is None else f"On {day} we are open from {h[0]} to {h[1]}."


def hours_fact(day: str) -> str:
    h = HOURS[day]
    return "closed" if h is None else f"{h[0]} to {h[1]}"


@dataclass(frozen=True)
class Promotion:
    day: str       # the weekday it runs: "Thursday"
    offer: str     # the answer string: "a quarter off the apple pie"
    code: str      # a word: "MAPLE"

    @property
    def dish(self) -> str:
        return next(d for d in DISHES if self.offer.endswith(d))

    @property
    def text(self) -> str:  # as promotions.md writes it
        return f"{cap(self.offer)} with the code {self.code}."


def draw_week(week: int, seed: int | str = 0) -> list[Promotion]:
    """One promotion for each day of the week: an offer on a dish and a code word, none repeated in the week."""
    rng = random.Random(f"{seed}:promotions:{week}")
    codes = rng.sample(CODE_WORDS, len(DAYS))
    return [Promotion(day, f"{rng.choice(OFFERS)} the {rng.choice(DISHES)}", code) for day, code in zip(DAYS, codes)]


# Every week has new promotions, one a day. The knowledge base is kept as weekly snapshots, each taken on the
# Thursday: promotions.md holds the week's promotions, Thursday's marked as today's. The four snapshots of October
# and early November come before training (the RAG fine-tuning data is drawn from them; the chat bot is fine-tuned
# on the last one's, TODAY); the one of 13 November comes after: its promotions, AFTER_TRAINING among them, are in
# no training file and no model's weights. The same question ("What is the promotion on Monday?") has another
# answer in every snapshot, so a model cannot learn the answers by heart: it has to read them.
SNAPSHOTS = ("2025-10-16", "2025-10-23", "2025-10-30", "2025-11-06", "2025-11-13")
TRAINING_SNAPSHOTS, TODAY_IS = 4, "Thursday"


def knowledge(index: int) -> list[Promotion]:
    """The week's promotions in snapshot `index` (1 .. len(SNAPSHOTS))."""
    return draw_week(index)


def todays(promotions: list[Promotion]) -> Promotion:
    return next(p for p in promotions if p.day == TODAY_IS)


TODAY = todays(knowledge(TRAINING_SNAPSHOTS))
AFTER_TRAINING = todays(knowledge(TRAINING_SNAPSHOTS + 1))


# --------------------------------------------------------------------------------------- documents
REVIEW_LINES = ("We shared the {d} and loved every bite.", "The {d} was a little salty this time.",
                "My kids asked for the {d} twice.", "Try the {d} if you sit on the terrace.",
                "The {d} came quickly and was still hot.", "I would skip the {d}, but the rest was fine.")
NEWS = (("Summer terrace", "Our terrace opens again with twelve new tables and heaters for cool evenings."),
        ("New supplier", "Our vegetables now come from Hill Farm, a short drive from Millbrook."),
        ("Cooking class", "Once a month our chef teaches a cooking class for eight guests in the kitchen."),
        ("Music nights", "On the last Friday of each month a local band plays from eight in the evening."),
        ("Gift cards", "Gift cards can be bought at the counter for any amount."),
        ("Kids menu", "Children under ten get a small portion of any main at half the price."),
        ("Staff", "Our team has grown to fourteen people, most of them from Millbrook."),
        ("Birthday", "Tell us when it is your birthday and the dessert is on the house."))


def _promotion_section(p: Promotion) -> str:
    return f"## {p.day}{' (today)' if p.day == TODAY_IS else ''}\n\n{p.text}\n"


def price_sentence(dish: str) -> str:
    return f"The {dish} costs {money(PRICE[dish])}."


def inside_sentence(dish: str) -> str:
    return f"The {dish} has {INSIDE[dish]}."


CHEF_SENTENCE = f"Our head chef is {CHEF}, who cooks everything from scratch."
OPENED_SENTENCE = f"{NAME} opened in {OPENED} at {ADDRESS}."


def write_documents(folder: str | Path, promotions: list[Promotion], seed: int | str = 0) -> Path:
    """The restaurant's knowledge base (see the module docstring); returns the folder."""
    rng = random.Random(f"{seed}:documents")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    menu = [f"# Menu of {NAME}\n\nAll prices are in dollars and include tax.\n"]
    for course in dict.fromkeys(c for _, c, *_ in MENU):
        menu.append(f"\n## {course}\n")
        for dish, c, price, veg, inside in MENU:
            if c == course:
                menu.append(f"\n### {cap(dish)}\n\n{price_sentence(dish)} {inside_sentence(dish)}"
                            f"{' Vegetarian.' if veg else ''}\n")
    (folder / "menu.md").write_text("".join(menu), encoding="utf-8")
    (folder / "hours.md").write_text("# Opening hours\n" + "".join(f"\n## {day}\n\n{hours_sentence(day)}\n"
                                                                   for day in DAYS), encoding="utf-8")
    (folder / "faq.jsonl").write_text("".join(json.dumps({"id": key, "title": questions[0], "text": answer}) + "\n"
                                              for key, questions, answer, _ in POLICIES), encoding="utf-8")
    (folder / "promotions.md").write_text("# This week's promotions\n" + "".join("\n" + _promotion_section(p)
                                                                            for p in promotions), encoding="utf-8")
    reviews = []
    for i in range(36):
        lines = [line.format(d=d) for line, d in zip(rng.sample(REVIEW_LINES, 2), rng.sample(DISHES, 2))]
        reviews.append({"id": f"review-{i + 1}", "title": f"Review {i + 1}", "text": " ".join(lines)})
    (folder / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reviews), encoding="utf-8")
    (folder / "news.md").write_text("# News\n" + "".join(f"\n## {title}\n\n{text}\n" for title, text in NEWS),
                                    encoding="utf-8")
    (folder / "about.html").write_text(
        f"<html><head><title>About {NAME}</title></head><body><h1>Our story</h1><p>{OPENED_SENTENCE}</p>"
        f"<h2>Our kitchen</h2><p>{CHEF_SENTENCE}</p></body></html>", encoding="utf-8")
    return folder


# --------------------------------------------------------------------------------------- questions
PRICE_Q = ("How much is the {d}?", "What does the {d} cost?", "What is the price of the {d}?",
           "How much do you charge for the {d}?")
INSIDE_Q = ("What is in the {d}?", "What comes with the {d}?", "Tell me about the {d}.")
HOURS_Q = ("When are you open on {day}?", "What are your hours on {day}?", "What are the opening hours on {day}?")
PROMO_Q = ("What is the promotion on {day}?", "Which dish is on offer on {day}?", "What is the deal on {day}?")
CODE_Q = ("Which code do I use on {day}?", "What is the promotion code on {day}?")
TODAY_Q = ("What is today's promotion?", "Is there a special offer today?", "Any discount today?")
TODAY_CODE_Q = ("Which code do I mention for today's promotion?", "What is today's promotion code?")


def _promotion_questions(p: Promotion) -> list[dict]:
    offers, codes = (PROMO_Q + TODAY_Q, CODE_Q + TODAY_CODE_Q) if p.day == TODAY_IS else (PROMO_Q, CODE_Q)
    return ([_row(q.format(day=p.day), p.offer, "promotions.md", p.text) for q in offers]
            + [_row(q.format(day=p.day), p.code, "promotions.md", p.text) for q in codes])


def _row(question: str, answer: str, source: str, sentence: str) -> dict:
    return {"question": question, "answer": answer, "source": source, "response": f"{sentence} [1]"}


def rag_questions(promotions: list[Promotion]) -> list[dict]:
    """Every question the documents with these promotions answer: rows {question, answer,
    source, response}: `answer` is a string the answering chunk holds (what `rag eval` checks), `response` the
    sentence of the chunk that holds it, citing it as source [1] (the RAG fine-tuning target: the demo's model
    answers from the best retrieved chunk)."""
    rows = []
    for dish in DISHES:
        rows += [_row(q.format(d=dish), money(PRICE[dish]), "menu.md", price_sentence(dish)) for q in PRICE_Q]
        rows += [_row(q.format(d=dish), INSIDE[dish], "menu.md", inside_sentence(dish)) for q in INSIDE_Q]
    for day in DAYS:
        rows += [_row(q.format(day=day), hours_fact(day), "hours.md", hours_sentence(day)) for q in HOURS_Q]
    for key, questions, sentence, fact in POLICIES:
        rows += [_row(q, fact, f"faq.jsonl#{key}", sentence) for q in questions]
    for p in promotions:
        rows += _promotion_questions(p)
    rows += [_row("Who is the head chef?", CHEF, "about.html", CHEF_SENTENCE),
             _row(f"When did {NAME} open?", str(OPENED), "about.html", OPENED_SENTENCE)]
    return rows
