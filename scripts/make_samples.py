"""Write the small sample datasets shipped in recipes/data/ (deterministic; written for lowvram).

Run: python scripts/make_samples.py
The samples let every recipe run offline. They are synthetic question/answer pairs over simple
facts, with preference pairs whose chosen answer is correct and concise and whose rejected answer
is either wrong or padded with filler: the two things a preference stage should learn to avoid.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "recipes" / "data"

CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Poland", "Warsaw"),
    ("Greece", "Athens"),
    ("Turkey", "Ankara"),
    ("Russia", "Moscow"),
    ("Ireland", "Dublin"),
    ("Austria", "Vienna"),
    ("Hungary", "Budapest"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("Australia", "Canberra"),
    ("Morocco", "Rabat"),
    ("Ghana", "Accra"),
    ("Cuba", "Havana"),
]
OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("up", "down"),
    ("light", "dark"),
    ("early", "late"),
    ("happy", "sad"),
    ("open", "closed"),
    ("full", "empty"),
    ("strong", "weak"),
    ("young", "old"),
    ("wet", "dry"),
    ("loud", "quiet"),
    ("rich", "poor"),
    ("hard", "soft"),
    ("near", "far"),
    ("first", "last"),
    ("high", "low"),
]
SOUNDS = [
    ("dog", "barks"),
    ("cat", "meows"),
    ("cow", "moos"),
    ("duck", "quacks"),
    ("sheep", "bleats"),
    ("lion", "roars"),
    ("horse", "neighs"),
    ("owl", "hoots"),
    ("snake", "hisses"),
    ("pig", "oinks"),
]
COLORS = [
    ("grass", "green"),
    ("the sky", "blue"),
    ("snow", "white"),
    ("coal", "black"),
    ("a banana", "yellow"),
    ("a ripe tomato", "red"),
    ("an orange", "orange"),
    ("a plum", "purple"),
]
NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]
OPENERS = [
    "Great question!",
    "What a wonderful question!",
    "Thank you so much for asking.",
    "Sure, I would be happy to help.",
    "That is a really interesting thing to ask about.",
    "Absolutely, let me explain.",
]
CLOSERS = [
    "I hope this helps!",
    "Let me know if you have any other questions.",
    "Feel free to ask me anything else.",
    "I am always glad to help with questions like this.",
    "Have a wonderful day!",
]


def facts(rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, correct answer, wrong answer) triples."""
    out = []
    caps = [c for _, c in CAPITALS]
    for country, cap in CAPITALS:
        wrong = rng.choice([c for c in caps if c != cap])
        out.append(
            (
                f"What is the capital of {country}?",
                f"The capital of {country} is {cap}.",
                f"The capital of {country} is {wrong}.",
            )
        )
    for a, b in OPPOSITES:
        wrong = rng.choice([x for _, x in OPPOSITES if x != b])
        out.append(
            (f"What is the opposite of {a}?", f"The opposite of {a} is {b}.", f"The opposite of {a} is {wrong}.")
        )
    for animal, sound in SOUNDS:
        wrong = rng.choice([s for _, s in SOUNDS if s != sound])
        out.append((f"What sound does a {animal} make?", f"A {animal} {sound}.", f"A {animal} {wrong}."))
    for thing, color in COLORS:
        wrong = rng.choice([c for _, c in COLORS if c != color])
        out.append(
            (
                f"What color is {thing}?",
                f"{thing[0].upper() + thing[1:]} is {color}.",
                f"{thing[0].upper() + thing[1:]} is {wrong}.",
            )
        )
    for a in range(1, 11):
        for b in range(1, 11):
            if a + b <= 20 and rng.random() < 0.5:
                wrong = a + b + rng.choice([-2, -1, 1, 2])
                wrong = wrong if 0 <= wrong <= 20 and wrong != a + b else a + b - 1
                out.append(
                    (
                        f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?",
                        f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}.",
                        f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[min(max(wrong, 0), 20)]}.",
                    )
                )
    rng.shuffle(out)
    return out


def verbose(rng: random.Random, answer: str) -> str:
    return f"{rng.choice(OPENERS)} {answer} {rng.choice(CLOSERS)}"


def write_jsonl(name: str, rows: list[dict]) -> None:
    path = OUT / name
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {path}")


def main() -> None:
    rng = random.Random(1234)
    OUT.mkdir(parents=True, exist_ok=True)
    triples = facts(rng)
    system = "You are a helpful assistant. Answer in one short sentence."

    sft = []
    for i, (q, good, _) in enumerate(triples):
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": good}]
        if i % 4 == 0:
            msgs.insert(0, {"role": "system", "content": system})
        if i % 5 == 0:
            q2, good2, _ = triples[(i + 7) % len(triples)]
            msgs += [{"role": "user", "content": q2}, {"role": "assistant", "content": good2}]
        sft.append({"messages": msgs})
    write_jsonl("chat_sft.jsonl", sft)

    chat_prefs = []
    for i, (q, good, bad) in enumerate(triples):
        rejected = bad if i % 2 == 0 else verbose(rng, good)
        chat_prefs.append(
            {
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    write_jsonl("chat_prefs.jsonl", chat_prefs)

    concise = [{"prompt": q, "chosen": good, "rejected": verbose(rng, good)} for q, good, _ in triples]
    write_jsonl("concise_prefs.jsonl", concise)


if __name__ == "__main__":
    main()
