"""Generate the offline demo data: a corpus about invented people, cities and companies, with
single-hop and multi-hop questions. Deterministic (seeded), so the files in the repo can be
reproduced exactly; no pretrained model can know these answers.

    .venv/bin/python scripts/make_fictional_data.py [--out envs/data/fictional]

Writes ``corpus.jsonl`` ({"id", "contents"}: title on the first line, the Search-R1/FlashRAG
format) and ``train.jsonl`` / ``eval.jsonl`` ({"id", "question", "golden_answers", "hops",
"entity"}). Train and eval questions are about disjoint people.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr",
          "pl", "st", "tr", "th", "sh", "qu", "vel", "mor", "zan"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "y"]
CODAS = ["", "n", "r", "l", "s", "th", "x", "m", "nd", "rk", "ss"]
PROFESSIONS = ["glassblower", "cartographer", "astronomer", "beekeeper", "clockmaker", "violinist",
               "botanist", "shipwright", "weaver", "engineer", "poet", "architect", "chemist", "painter"]
INDUSTRIES = ["lanterns", "bicycles", "ink", "telescopes", "rope", "porcelain", "maps", "kites",
              "paper", "soap", "compasses", "umbrellas"]
RIVERS_AND_HILLS = ["river", "lake", "hill", "valley", "bay", "forest", "plain", "canyon"]


def invent_name(rng: random.Random, syllables: tuple[int, int] = (2, 2)) -> str:
    parts = [rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(rng.randint(*syllables))]
    return "".join(parts).capitalize()


def article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def unique_names(rng: random.Random, count: int, words: int, taken: set[str]) -> list[str]:
    names = []
    while len(names) < count:
        name = " ".join(invent_name(rng) for _ in range(words))
        if name not in taken and len(name) <= 18 and "sss" not in name.lower():
            taken.add(name)
            names.append(name)
    return names


def generate(seed: int = 7, people: int = 2400, cities: int = 300, companies: int = 500) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    taken: set[str] = set()
    city_names = unique_names(rng, cities, 1, taken)
    country_names = unique_names(rng, 40, 1, taken)
    person_names = unique_names(rng, people, 2, taken)
    company_names = [n + " " + rng.choice(["Works", "Company", "Guild", "House"]) for n in unique_names(rng, companies, 1, taken)]

    city_country = {c: rng.choice(country_names) for c in city_names}
    person = {}
    for name in person_names:
        person[name] = {
            "city": rng.choice(city_names),
            "profession": rng.choice(PROFESSIONS),
            "year": rng.randint(1610, 1890),
        }
    founder = {c: rng.choice(person_names) for c in company_names}
    industry = {c: rng.choice(INDUSTRIES) for c in company_names}

    corpus: list[dict] = []
    for name, facts in person.items():
        first = name.split()[0]
        corpus.append({"id": f"person-{len(corpus)}", "contents": (
            f"{name}\n{name} was {article(facts['profession'])} born in {facts['year']} in the city of {facts['city']}. "
            f"{first} is remembered for work near the {rng.choice(RIVERS_AND_HILLS)} of {rng.choice(city_names)}."
        )})
    for city in city_names:
        corpus.append({"id": f"city-{len(corpus)}", "contents": (
            f"{city}\n{city} is a city in the country of {city_country[city]}. "
            f"It lies beside a {rng.choice(RIVERS_AND_HILLS)} and is known for its {rng.choice(INDUSTRIES)}."
        )})
    for company in company_names:
        corpus.append({"id": f"company-{len(corpus)}", "contents": (
            f"{company}\n{company} is a maker of {industry[company]} founded by {founder[company]}. "
            f"Its workshops employ {rng.randint(12, 900)} people."
        )})

    questions: list[dict] = []
    templates = [
        ("In which city was {name} born?", "city"),
        ("What was the profession of {name}?", "profession"),
        ("In what year was {name} born?", "year"),
    ]
    for name, facts in person.items():
        template, key = templates[len(questions) % len(templates)]
        questions.append({"question": template.format(name=name), "golden_answers": [str(facts[key])],
                          "hops": 1, "entity": name})
    for company in company_names:
        boss = founder[company]
        questions.append({"question": f"In which country was the founder of {company} born?",
                          "golden_answers": [city_country[person[boss]["city"]]], "hops": 3, "entity": boss})
        questions.append({"question": f"In which city was the founder of {company} born?",
                          "golden_answers": [person[boss]["city"]], "hops": 2, "entity": boss})

    # Disjoint people between the splits: hold out a fixed set of people for evaluation.
    held_out = set(rng.sample(person_names, len(person_names) // 10))
    train = [q for q in questions if q["entity"] not in held_out]
    evaluation = [q for q in questions if q["entity"] in held_out]
    rng.shuffle(train)
    rng.shuffle(evaluation)
    for split, rows in (("train", train), ("eval", evaluation)):
        for index, row in enumerate(rows):
            row["id"] = f"{split}-{index}"
    return {"corpus": corpus, "train": train, "eval": evaluation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "envs" / "data" / "fictional"))
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in generate(args.seed).items():
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps({"id": row.pop("id"), **row} if "id" in row else row, ensure_ascii=False) + "\n")
        print(f"{out / name}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
