"""Search self-play data for the bundled fictional world: answers with hop counts, and scripted
demonstrations of both roles for the warm start.

Self-play reads a JSONL of ``{"answer": ..., "hops": n}`` rows and nothing else (the reference's
``train_answers_random_hop_50000_proposer.jsonl``, less its example questions). For the fictional
world :func:`generate_answers` derives them from ``corpus.jsonl`` alone, never from ``train.jsonl``
or ``eval.jsonl``; ``data/fictional/self_play_answers.jsonl`` is its output, committed and checked
equal to a fresh run by the tests. Regenerate with ``python -m agentrl.envs.self_play_data``
(``--demonstrations PATH --count N [--hops 2] [--rag N]`` also writes warm-start chats).

Hop count ``n``: the number of documents a solver must read, one search each, along a chain in which
every link is one document naming exactly one next entity, so the question has one answer:

- city ``C``, n = 2: organisation -> its founder (born in ``C``);
- country ``X``, n = 2: person -> birth city (in ``X``); n = 3: organisation -> founder -> city;
- profession, birth year, n = 2: organisation -> founder;
- organisation ``K``, n = 2: a person picked out by profession, year and birth city (a combination
  no one else shares), who founded ``K`` and nothing else.

People appear inside every chain but as answers only at n = 1 (``who founded K?``); the rule that a
proposer makes at least two distinct searches would reject every such question, so the default
``hops=(2, 3)`` leaves them out (``generate_answers(hops=(1, 2, 3))`` adds them).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentrl.envs.base import Env, Reward, Task, load_rows
from agentrl.envs.search_qa import SearchQAEnv

from agentrl.algos.self_play import proposer_messages, solver_messages
from agentrl.trajectory import Trajectory

DATA_DIR = Path(__file__).parent / "data" / "fictional"
CORPUS_PATH = DATA_DIR / "corpus.jsonl"
ANSWERS_PATH = DATA_DIR / "self_play_answers.jsonl"
ANSWER_KEYS = frozenset({"answer", "hops", "examples"})

PERSON = re.compile(r"^(?P<name>[^\n]+)\n(?P=name) was an? (?P<profession>\w+) born in (?P<year>\d+) in the city of (?P<city>\w+)\.")
CITY = re.compile(r"^(?P<name>[^\n]+)\n(?P=name) is a city in the country of (?P<country>\w+)\.")
COMPANY = re.compile(r"^(?P<name>[^\n]+)\n(?P=name) is a maker of \w+ founded by (?P<founder>[^.]+)\.")
TITLE = re.compile(r"Doc \d+\(Title: (.*?)\) ")


@dataclass
class World:
    """The facts of the fictional corpus, read from its documents."""

    people: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> profession, year, city
    country: dict[str, str] = field(default_factory=dict)  # city -> country
    founder: dict[str, str] = field(default_factory=dict)  # organisation -> person
    descriptions: Counter = field(default_factory=Counter)  # (profession, year, city) -> people

    @classmethod
    def from_corpus(cls, path: str | Path = CORPUS_PATH) -> World:
        world = cls()
        for row in load_rows(path):
            text = row["contents"]
            if match := PERSON.match(text):
                world.people[match["name"]] = {k: match[k] for k in ("profession", "year", "city")}
            elif match := CITY.match(text):
                world.country[match["name"]] = match["country"]
            elif match := COMPANY.match(text):
                world.founder[match["name"]] = match["founder"]
        if not (world.people and world.country and world.founder):
            raise ValueError(f"{path} has no people, cities or organisations in the fictional corpus's format")
        world.descriptions = Counter(world.describe(p) for p in world.people)
        return world

    def companies_of(self, person: str) -> list[str]:
        return sorted(k for k, p in self.founder.items() if p == person)

    def describe(self, person: str) -> tuple[str, str, str]:
        facts = self.people[person]
        return facts["profession"], facts["year"], facts["city"]

    def uniquely_described(self, person: str) -> bool:
        """No one else shares this person's profession, birth year and birth city."""
        return self.descriptions[self.describe(person)] == 1


ANSWER_KINDS = ("person", "city", "country", "profession", "year", "organisation")


def generate_answers(corpus: str | Path = CORPUS_PATH, hops: Sequence[int] = (2, 3), seed: int = 0,
                     kinds: Sequence[str] = ANSWER_KINDS) -> list[dict[str, Any]]:
    """``{"answer", "hops"}`` rows for every answer of the given ``kinds`` that ends a chain of ``n``
    links (module docstring), in a seeded shuffled order. Reads only the corpus."""
    unknown = set(kinds) - set(ANSWER_KINDS)
    if unknown:
        raise ValueError(f"unknown answer kinds {sorted(unknown)}; choose from {', '.join(ANSWER_KINDS)}")
    world = World.from_corpus(corpus)
    founders = {p for p in world.founder.values() if p in world.people}
    chains: dict[tuple[int, str], set[str]] = defaultdict(set)
    chains[1, "person"] |= founders
    chains[1, "country"] |= set(world.country.values())
    chains[1, "city"] |= {f["city"] for f in world.people.values()}
    chains[2, "city"] |= {world.people[p]["city"] for p in founders}
    chains[2, "country"] |= {world.country[f["city"]] for f in world.people.values() if f["city"] in world.country}
    for kind in ("profession", "year"):
        chains[2, kind] |= {world.people[p][kind] for p in founders}
    chains[2, "organisation"] |= {k for k, p in world.founder.items()
                                  if p in world.people and world.companies_of(p) == [k] and world.uniquely_described(p)}
    chains[3, "country"] |= {world.country[world.people[p]["city"]] for p in founders
                             if world.people[p]["city"] in world.country}
    rows = [{"answer": answer, "hops": n} for n in sorted(set(hops))
            for answer in sorted(set().union(*(chains.get((n, kind), set()) for kind in kinds)))]
    random.Random(seed).shuffle(rows)
    return rows


def load_answers(path: str | Path = ANSWERS_PATH) -> list[dict[str, Any]]:
    """Self-play's input rows; anything but ``answer``, ``hops`` and optional ``examples`` is refused,
    so a question-answer file (a training set) cannot be fed in by mistake."""
    rows = load_rows(path)
    for number, row in enumerate(rows, start=1):
        extra = set(row) - ANSWER_KEYS
        if extra:
            raise ValueError(f"{path}:{number}: self-play reads only answer, hops and examples; this row also has "
                             f"{sorted(extra)} (is it a question-answer file?)")
        if not isinstance(row.get("answer"), str) or not row["answer"].strip():
            raise ValueError(f"{path}:{number}: 'answer' must be a non-empty string")
        if not isinstance(row.get("hops"), int) or row["hops"] < 1:
            raise ValueError(f"{path}:{number}: 'hops' must be a positive integer")
    return rows


def write_answers(rows: Sequence[dict[str, Any]], path: str | Path = ANSWERS_PATH) -> None:
    with Path(path).open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


# -- the proposer role as an env -------------------------------------------------------------------


class SelfPlayProposerEnv(Env):
    """The proposer's rollouts: an answer row becomes :func:`proposer_messages`; the policy searches
    (search_qa's tags and observation format) and ends with ``<question>…</question>``, the answer
    tag here, so ``trajectory.answer`` is the question. Options: ``prompt`` (``full`` or ``short``).

    The reward is a stand-in 0: the proposer's reward needs the solver's attempts, which the
    ``self_play`` recipe scores after the solver stage (:func:`agentrl.algos.self_play.proposer_reward`).
    """

    name = "self_play_proposer"
    option_names = ("prompt",)
    tools = ("search",)
    action_format = "xml"
    tags = {"search": "search"}
    answer_tag = "question"
    observation_template = SearchQAEnv.observation_template
    final_turn_message = "\n\n<information>No more searches are allowed. Write your question now.</information>\n\n"

    def load(self, split: str, path: str | None = None) -> list[dict[str, Any]]:
        """The answers (``split="train"``); the proposer has no evaluation split."""
        return load_answers(path or ANSWERS_PATH) if split == "train" else []

    def make_task(self, row: dict[str, Any], index: int) -> Task:
        messages = proposer_messages(row["answer"], row["hops"], row.get("examples", ()),
                                     prompt=self.options.get("prompt", "full"))
        return Task(id=str(index), messages=messages, answer=row["answer"],
                    metadata={"answer": row["answer"], "hops": row["hops"]})

    def reward(self, task: Task, trajectory: Trajectory) -> Reward:
        return Reward(0.0, False, info={"asked": float(trajectory.answer is not None)})


# -- scripted demonstrations of both roles ------------------------------------------------------


def _titles(observation: str) -> list[str]:
    return TITLE.findall(observation)


class _Chat:
    """A demonstration chat built one search at a time with the real search tool."""

    def __init__(self, messages: list[dict[str, Any]], search) -> None:
        self.messages, self.search = list(messages), search

    async def ask(self, query: str, record: bool = True) -> list[str]:
        """The titles the search returns; ``record=False`` looks ahead without writing the turn."""
        observation = await self.search.call(query)
        if record:
            self.messages += [{"role": "assistant", "content": f"<search> {query} </search>"},
                              {"role": "tool", "content": observation}]
        return _titles(observation)

    def end(self, tag: str, text: str) -> list[dict[str, Any]]:
        return self.messages + [{"role": "assistant", "content": f"<{tag}> {text} </{tag}>"}]


async def _propose(world: World, answer: str, hops: int, search, prompt: str) -> tuple[list, str, list] | None:
    """A proposer chat working backwards from ``answer``, each step taking an entity the last search
    returned; ``None`` when the results do not reach a chain. Returns the chat, the question, and the
    solver's lookups: ``(query, the title its results must include)`` in order."""
    chat = _Chat(proposer_messages(answer, hops, prompt=prompt), search)

    async def founder_and_company(query: str, born: dict[str, str]) -> tuple[str, str] | None:
        for person in await chat.ask(query):
            facts, companies = world.people.get(person), world.companies_of(person)
            if facts and companies and all(facts[k] == v for k, v in born.items()):
                found = companies[0] in await chat.ask(f"founded by {person}")
                return (person, companies[0]) if found else None
        return None

    def done(question: str, lookups: list[str | tuple[str, str]]) -> tuple[list, str, list]:
        steps = [step if isinstance(step, tuple) else (step, step) for step in lookups]
        return chat.end("question", question), question, steps

    if answer in world.country.values():  # a country: one of its cities first
        cities = [c for c in await chat.ask(f"city in the country of {answer}") if world.country.get(c) == answer]
        if hops == 3:  # look ahead for a city whose results name a founder born there
            for city in cities:
                titles = await chat.ask(f"born in the city of {city}", record=False)
                if any(world.people.get(p, {}).get("city") == city and world.companies_of(p) for p in titles):
                    cities = [city]
                    break
        city = cities[0] if cities else None
        if city is None:
            return None
        if hops == 2:
            titles = await chat.ask(f"born in the city of {city}")
            person = next((p for p in titles if world.people.get(p, {}).get("city") == city), None)
            return None if person is None else done(f"In which country is the city where {person} was born?", [person, city])
        found = await founder_and_company(f"born in the city of {city}", {"city": city})
        return None if found is None else done(
            f"In which country is the city where the founder of {found[1]} was born?", [found[1], found[0], city])
    if answer in world.founder:  # an organisation: its founder, then the founder's description
        person = world.founder[answer]
        if answer not in await chat.ask(answer) or person not in await chat.ask(person):
            return None
        description = "{} born in {} in the city of {}".format(*world.describe(person))
        return done(f"Which company was founded by the {description}?", [(description, person), (f"founded by {person}", answer)])
    for key, query, template in (("city", "born in the city of {}", "In which city was the founder of {} born?"),
                                 ("profession", "{}", "What was the profession of the founder of {}?"),
                                 ("year", "born in {}", "In what year was the founder of {} born?")):
        if any(f[key] == answer for f in world.people.values()):
            found = await founder_and_company(query.format(answer), {key: answer})
            return None if found is None else done(template.format(found[1]), [found[1], found[0]])
    return None


async def _solve(question: str, answer: str, lookups: Sequence[tuple[str, str]], search, prompt: str) -> list | None:
    """A solver chat making ``lookups`` in order; ``None`` if a search misses the document it needs."""
    chat = _Chat(solver_messages(question, prompt=prompt), search)
    for query, title in lookups:
        if title not in await chat.ask(query):
            return None
    return chat.end("answer", answer)


async def self_play_demonstrations(rows: Sequence[dict[str, Any]], count: int, seed: int = 0,
                                   prompt: str = "short", corpus: str | Path = CORPUS_PATH,
                                   search_options: dict[str, Any] | None = None, rag: int = 0,
                                   distractors: int = 4) -> list[dict[str, Any]]:
    """Up to ``count`` proposer demonstrations (searches, then ``<question>``) and as many solver
    demonstrations (searches, then ``<answer>``) on the same questions, for answers drawn from
    ``rows`` in a seeded order. The searches run through the real search tool, so every observation
    is what a rollout would see; a chain the top results do not reach is skipped.

    With ``rag > 0``, the first ``rag`` questions also get a demonstration of the self-verified RAG
    check, the third thing the policy does in a step: :func:`rag_messages` over the proposer's
    retrieved blocks plus ``distractors`` blocks of the other proposer demonstrations, laid out by
    the check's own :func:`rag_documents`, answered ``<answer> a* </answer>``.

    Each item is ``{"role": "proposer" | "solver" | "rag", "answer", "hops", "messages"}``, a
    question's items together; written as JSONL, the SFT loader
    (``agentrl.trainer.sft.load_demonstrations``) reads its ``messages``.
    """
    from agentrl.tools.search import SearchTool

    from agentrl.algos.self_play import proposer_output_from_messages, rag_messages
    from agentrl.algos.self_play_check import rag_documents

    world, search = World.from_corpus(corpus), SearchTool(**(search_options or {}))
    order = list(rows)
    random.Random(seed).shuffle(order)
    # Round-robin over hop counts, so the rare 3-hop chains are demonstrated too.
    rank: Counter = Counter()
    keyed = []
    for row in order:
        keyed.append((rank[row["hops"]], row["hops"], row))
        rank[row["hops"]] += 1
    order = [row for _, _, row in sorted(keyed, key=lambda item: item[:2])]
    pairs: list[tuple[dict[str, Any], list, str, list]] = []
    for row in order:
        if len(pairs) >= count:
            break
        proposed = await _propose(world, row["answer"], row["hops"], search, prompt)
        if proposed is None:
            continue
        proposer_chat, question, lookups = proposed
        solver_chat = await _solve(question, row["answer"], lookups, search, prompt)
        if solver_chat is None:
            continue
        pairs.append((row, proposer_chat, question, solver_chat))
    blocks = [proposer_output_from_messages(chat).documents for _, chat, _, _ in pairs]
    demonstrations: list[dict[str, Any]] = []
    for index, (row, proposer_chat, question, solver_chat) in enumerate(pairs):
        chats = [("proposer", proposer_chat), ("solver", solver_chat)]
        if index < rag:
            others = [b for j, b in enumerate(blocks) if j != index]
            documents = rag_documents(blocks[index], others, distractors, row["answer"], random.Random(f"{seed}:rag:{index}"))
            chats.append(("rag", rag_messages(question, documents)
                          + [{"role": "assistant", "content": f"<answer> {row['answer']} </answer>"}]))
        for role, chat in chats:
            demonstrations.append({"role": role, "answer": row["answer"], "hops": row["hops"], "messages": chat})
    return demonstrations


def write_demonstrations(demonstrations: Sequence[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for item in demonstrations:
            handle.write(json.dumps(item, ensure_ascii=False) + "\n")
    return path


def main() -> None:
    import argparse
    import asyncio

    parser = argparse.ArgumentParser(description="Write the self-play answers (and, optionally, demonstrations).")
    parser.add_argument("--demonstrations", help="also write this many proposer and solver demonstrations ...")
    parser.add_argument("--count", type=int, default=16, help="... of each role (default 16)")
    parser.add_argument("--topk", type=int, default=3, help="search results per query (default 3)")
    parser.add_argument("--hops", type=int, nargs="*", default=None, help="demonstrate only these hop counts (default: all)")
    parser.add_argument("--rag", type=int, default=0, help="also this many RAG-check demonstrations (default 0)")
    parser.add_argument("--distractors", type=int, default=4, help="distractor blocks in each (self_play.distractors)")
    parser.add_argument("--kinds", nargs="*", default=list(ANSWER_KINDS), choices=ANSWER_KINDS,
                        help="answer kinds to write (default: all)")
    parser.add_argument("--answers", default=str(ANSWERS_PATH), help=f"where to write them (default {ANSWERS_PATH})")
    args = parser.parse_args()
    rows = generate_answers(kinds=args.kinds)
    write_answers(rows, args.answers)
    print(f"{args.answers}: {len(rows)} rows; {dict(sorted(Counter(r['hops'] for r in rows).items()))} by hops")
    if args.demonstrations:
        chosen = [r for r in rows if not args.hops or r["hops"] in args.hops]
        items = asyncio.run(self_play_demonstrations(chosen, args.count, search_options={"topk": args.topk},
                                                     rag=args.rag, distractors=args.distractors))
        roles = dict(Counter(item["role"] for item in items))
        print(f"{write_demonstrations(items, args.demonstrations)}: {len(items)} chats {roles}")


if __name__ == "__main__":
    main()
