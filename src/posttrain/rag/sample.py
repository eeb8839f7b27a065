"""A generated restaurant knowledge base with questions whose answers are in it (tests, benchmark, demo).

`write_restaurant_corpus(folder, seed)` writes menu.md (Markdown headings per course, a price per dish),
hours.md, promotion.md (today's promotion), faq.jsonl (one answer per row), about.html and allergens.pdf, and
returns question rows `{question, answer, source}`: the answer string occurs in the chunk that answers it and
`source` is the file holding it. Names, prices, hours and the promotion are drawn from `seed`, so a model cannot
know them without reading the documents. `write_promotion` replaces today's promotion (the case RAG exists for:
knowledge that changes after training) and returns its questions.
`python -m posttrain.rag.sample OUT --seed N` writes OUT/docs/ and OUT/questions.jsonl.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

COURSES = {
    "Starters": ["tomato soup", "garlic bread", "green salad", "onion rings", "lentil soup", "bruschetta"],
    "Mains": ["mushroom risotto", "grilled salmon", "beef burger", "vegetable curry", "chicken pie", "lamb stew",
              "pasta carbonara", "fish tacos"],
    "Desserts": ["apple pie", "chocolate cake", "lemon tart", "rice pudding", "vanilla ice cream"],
    "Drinks": ["fresh lemonade", "mint tea", "espresso", "orange juice"],
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
CHEFS = ["Ana Ruiz", "Tomas Berg", "Mei Chen", "Omar Haddad", "Lena Novak", "Ravi Patel", "Sofia Costa"]
NAMES = ["The Blue Door", "Olive and Thyme", "Harbour Kitchen", "The Copper Pot", "Little Fig", "North Table"]
ALLERGENS = ["gluten", "nuts", "dairy", "eggs", "fish", "soy"]


def _lines_pdf(pages: list[list[str]]) -> bytes:
    """A minimal PDF (Helvetica text, one content stream per page) that any PDF reader can extract."""
    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    objects = ["<< /Type /Catalog /Pages 2 0 R >>",
               "<< /Type /Pages /Kids [" + " ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages)))
               + f"] /Count {len(pages)} >>",
               "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, lines in enumerate(pages):
        stream = "BT /F1 11 Tf 14 TL 72 740 Td " + " ".join(f"({escape(line)}) Tj T*" for line in lines) + " ET"
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> "
                       f">> /Contents {5 + 2 * i} 0 R >>")
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    out, offsets = "%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n" + "".join(f"{o:010d} 00000 n \n" for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"
    return out.encode("latin-1")


def write_promotion(folder: str | Path, seed: int) -> list[dict]:
    """(Re)write promotion.md with a promotion drawn from `seed`; returns its questions."""
    rng = random.Random(seed * 7919 + 1)
    dish = rng.choice([d for dishes in COURSES.values() for d in dishes])
    percent, code = rng.choice([10, 15, 20, 25, 30, 40, 50]), f"{rng.choice(['TASTE', 'FEAST', 'SAVE'])}{seed % 1000}"
    day = rng.choice(DAYS)
    Path(folder, "promotion.md").write_text(
        f"# Today's promotion\n\nToday only: {percent}% off the {dish}. Mention the code {code} when you order.\n\n"
        f"## Next week\n\nEvery {day} next week the {dish} comes with a free drink.\n")
    return [{"question": "What is today's promotion?", "answer": f"{percent}% off the {dish}", "source": "promotion.md"},
            {"question": "Which code do I mention for today's promotion?", "answer": code, "source": "promotion.md"}]


def write_restaurant_corpus(folder: str | Path, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name, chef = rng.choice(NAMES), rng.choice(CHEFS)
    questions: list[dict] = []

    menu = [f"# {name} menu\n\nAll prices are in dollars and include tax.\n"]
    for course, dishes in COURSES.items():
        menu.append(f"\n## {course}\n")
        for dish in dishes:
            price = rng.randint(3, 9) if course in ("Drinks", "Starters") else rng.randint(10, 29)
            menu.append(f"\nThe {dish} costs {price} dollars.\n")
            questions.append({"question": f"How much does the {dish} cost?", "answer": f"{price} dollars",
                              "source": "menu.md"})
    (folder / "menu.md").write_text("".join(menu))

    hours = ["# Opening hours\n"]
    for day in DAYS:
        if rng.random() < 0.15:
            hours.append(f"\nOn {day} we are closed.\n")
            questions.append({"question": f"Are you open on {day}?", "answer": "closed", "source": "hours.md"})
            continue
        opens, closes = rng.randint(7, 12), rng.randint(20, 23)
        hours.append(f"\nOn {day} the kitchen opens at {opens} and closes at {closes}.\n")
        questions.append({"question": f"When does the kitchen open on {day}?", "answer": f"opens at {opens}",
                          "source": "hours.md"})
    (folder / "hours.md").write_text("".join(hours))
    questions += write_promotion(folder, seed)

    guests, deposit, parking = rng.randint(4, 20), rng.randint(5, 50), rng.choice(["free", "paid", "no"])
    faq = [("reservations", "Do you take reservations?", f"Yes, we take reservations for up to {guests} guests.",
            f"up to {guests} guests"),
           ("deposit", "Is there a deposit for group bookings?", f"Group bookings need a deposit of {deposit} dollars.",
            f"{deposit} dollars"),
           ("parking", "Is there parking?", f"There is {parking} parking behind the restaurant.", f"{parking} parking"),
           ("pets", "Can I bring my dog?", "Dogs are welcome on the terrace but not inside.", "on the terrace")]
    (folder / "faq.jsonl").write_text("".join(json.dumps({"id": key, "title": title, "text": text}) + "\n"
                                              for key, title, text, _ in faq))
    questions += [{"question": title, "answer": answer, "source": f"faq.jsonl#{key}"} for key, title, _, answer in faq]

    year = rng.randint(1950, 2015)
    (folder / "about.html").write_text(
        f"<html><head><title>About {name}</title></head><body><h1>Our story</h1><p>{name} opened in {year} and "
        f"has served the neighbourhood ever since.</p><h2>Our kitchen</h2><p>Our head chef is {chef}, who "
        f"cooks everything from scratch.</p></body></html>")
    questions += [{"question": "Who is the head chef?", "answer": chef, "source": "about.html"},
                  {"question": f"When did {name} open?", "answer": str(year), "source": "about.html"}]

    dishes = [d for course in ("Starters", "Mains", "Desserts") for d in COURSES[course]]
    lines = [f"Allergen information for {name}."]
    for dish in dishes:
        found = rng.sample(ALLERGENS, rng.randint(1, 2))
        lines.append(f"The {dish} contains {' and '.join(found)}.")
    (folder / "allergens.pdf").write_bytes(_lines_pdf([lines[:10], lines[10:]]))
    questions.append({"question": f"What allergens does the {dishes[0]} contain?",
                      "answer": lines[1].split(" contains ")[1].rstrip("."), "source": "allergens.pdf"})
    return questions


def main(argv: list[str] | None = None) -> None:
    """`python -m posttrain.rag.sample OUT [--seed N]`: OUT/docs/ and OUT/questions.jsonl."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m posttrain.rag.sample", description=main.__doc__)
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    questions = write_restaurant_corpus(Path(args.out) / "docs", args.seed)
    Path(args.out, "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    print(f"wrote {args.out}/docs (6 files) and {len(questions)} questions to {args.out}/questions.jsonl")


if __name__ == "__main__":
    main()
