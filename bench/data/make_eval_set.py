"""Writes bench/data/eval_set.jsonl, the fixed eval set of `switchyard eval` (bench/eval.py).

    .venv/bin/python bench/data/make_eval_set.py      # rewrites the file (same bytes every time)

Every item is a short few-shot completion prompt (plain text, so the router and the in-process engine
tokenize it alike) answered on one line: the run stops at the first newline, and the first line is
scored by exact match after normalisation (bench/eval.py `score`). The facts are written by hand; the
arithmetic, copying and format items are drawn from a seeded RNG. Nothing here was chosen by what the
model answers: after a change to this file, regenerate the baseline (`switchyard eval --write-baseline`).
"""
from __future__ import annotations

import json
import random
import string
from pathlib import Path

OUT = Path(__file__).with_name("eval_set.jsonl")

# ---- hand-written facts --------------------------------------------------------------------------
CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
    ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ("Norway", "Oslo"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("Chile", "Santiago"), ("Turkey", "Ankara"),
    ("Vietnam", "Hanoi"), ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"),
    ("Switzerland", "Bern"), ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"), ("Cuba", "Havana"),
    ("Colombia", "Bogota"), ("Venezuela", "Caracas"), ("Thailand", "Bangkok"), ("South Korea", "Seoul"),
    ("Indonesia", "Jakarta"), ("Philippines", "Manila"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Saudi Arabia", "Riyadh"), ("Pakistan", "Islamabad"), ("Afghanistan", "Kabul"), ("Nigeria", "Abuja"),
    ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"), ("Ghana", "Accra"), ("New Zealand", "Wellington"),
    ("Ukraine", "Kyiv"), ("Romania", "Bucharest"), ("Czech Republic", "Prague"), ("Iceland", "Reykjavik"),
    ("Kazakhstan", "Astana"), ("Malaysia", "Kuala Lumpur"), ("Syria", "Damascus"), ("Lebanon", "Beirut"),
    ("Jordan", "Amman"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"),
    ("Uruguay", "Montevideo"),
]
ALIASES = {"Kyiv": ["Kiev"], "Bogota": ["Bogotá"], "Reykjavik": ["Reykjavík"], "New Delhi": ["Delhi"],
           "Astana": ["Nur-Sultan"]}

FACTS = [   # (question, answers): one short answer each, aliases where two spellings are common
    ("How many legs does a spider have?", ["8", "eight"]),
    ("How many legs does an insect have?", ["6", "six"]),
    ("How many days are in a week?", ["7", "seven"]),
    ("How many months are in a year?", ["12", "twelve"]),
    ("How many hours are in a day?", ["24", "twenty-four"]),
    ("How many minutes are in an hour?", ["60", "sixty"]),
    ("How many sides does a triangle have?", ["3", "three"]),
    ("How many sides does a hexagon have?", ["6", "six"]),
    ("How many continents are there?", ["7", "seven"]),
    ("How many players are on a soccer team on the field?", ["11", "eleven"]),
    ("What is the largest planet in the solar system?", ["Jupiter"]),
    ("What planet is known as the Red Planet?", ["Mars"]),
    ("What planet do we live on?", ["Earth"]),
    ("What is the closest star to the Earth?", ["Sun", "the Sun"]),
    ("What is the chemical symbol for gold?", ["Au"]),
    ("What is the chemical symbol for iron?", ["Fe"]),
    ("What is the chemical symbol for oxygen?", ["O"]),
    ("What gas do plants absorb from the air?", ["carbon dioxide", "CO2"]),
    ("What is frozen water called?", ["ice"]),
    ("What color is the sky on a clear day?", ["blue"]),
    ("What color is grass?", ["green"]),
    ("What color do you get by mixing blue and yellow?", ["green"]),
    ("What color do you get by mixing red and white?", ["pink"]),
    ("What is the opposite of hot?", ["cold"]),
    ("What is the opposite of up?", ["down"]),
    ("What is the opposite of big?", ["small", "little"]),
    ("What is the opposite of day?", ["night"]),
    ("What is the largest ocean on Earth?", ["Pacific", "Pacific Ocean", "the Pacific Ocean"]),
    ("What is the longest river in the world?", ["Nile", "the Nile", "Nile River", "the Nile River"]),
    ("What is the tallest mountain in the world?", ["Mount Everest", "Everest"]),
    ("Who wrote Romeo and Juliet?", ["William Shakespeare", "Shakespeare"]),
    ("Who painted the Mona Lisa?", ["Leonardo da Vinci", "Da Vinci", "Leonardo"]),
    ("What language is spoken in Brazil?", ["Portuguese"]),
    ("What is the currency of Japan?", ["yen", "the yen", "Japanese yen"]),
    ("What animal is known as the king of the jungle?", ["lion", "the lion"]),
    ("What is the largest mammal?", ["blue whale", "the blue whale"]),
    ("What do bees make?", ["honey"]),
    ("At what temperature in Celsius does water boil?", ["100", "100 degrees", "100 Celsius", "100 degrees Celsius",
                                                         "100°C"]),
    ("In which country are the pyramids of Giza?", ["Egypt"]),
    ("What is the first letter of the English alphabet?", ["A"]),
]

WORDS = ("apple river stone cloud tiger lamp garden window silver orange pencil bridge candle forest"
         " rocket violin marble ocean thunder basket copper meadow lantern harbor falcon pepper velvet"
         " canyon maple cobalt").split()


def items() -> list[dict]:
    rng = random.Random(19)
    out: list[dict] = []

    def add(cat: str, prompt: str, answers: list[str], max_tokens: int, case_sensitive: bool = False):
        out.append({"id": f"{cat}-{sum(1 for i in out if i['category'] == cat):03d}", "category": cat,
                    "prompt": prompt, "answers": answers, "max_tokens": max_tokens,
                    "case_sensitive": case_sensitive})

    shots = "Q: What is the capital of Sweden?\nA: Stockholm\n\nQ: What is the capital of Brazil?\nA: Brasilia\n\n"
    for country, city in CAPITALS:
        add("capital", f"{shots}Q: What is the capital of {country}?\nA:", [city] + ALIASES.get(city, []), 8)

    shots = ("Q: How many wheels does a bicycle have?\nA: 2\n\nQ: What color is snow?\nA: white\n\n"
             "Q: Who wrote Hamlet?\nA: William Shakespeare\n\n")
    for q, answers in FACTS:
        add("fact", f"{shots}Q: {q}\nA:", answers, 8)

    # arithmetic as a list of equations to continue (the 135M model does far better on this form than on
    # "Q: 2 + 3 = ?" or a chat question)
    shots = "2 + 3 = 5\n10 + 7 = 17\n4 + 4 = 8\n"
    for k in range(50):   # one-digit operands, then two-digit ones
        a, b = (rng.randint(1, 9), rng.randint(1, 9)) if k < 25 else (rng.randint(10, 60), rng.randint(10, 40))
        add("add" if k < 25 else "add2", f"{shots}{a} + {b} =", [str(a + b)], 5)

    shots = "9 - 4 = 5\n15 - 6 = 9\n8 - 8 = 0\n"
    for _ in range(30):
        a = rng.randint(5, 50)
        b = rng.randint(1, a - 1)
        add("sub", f"{shots}{a} - {b} =", [str(a - b)], 5)

    shots = "2 * 3 = 6\n4 * 5 = 20\n3 * 3 = 9\n"
    for _ in range(30):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        add("mul", f"{shots}{a} * {b} =", [str(a * b)], 5)

    shots = "Copy the text exactly.\nText: red dog 7\nCopy: red dog 7\n\nText: one two three\nCopy: one two three\n\n"
    for i in range(40):
        n = rng.randint(3, 5)
        parts = rng.sample(WORDS, n)
        if i % 2:   # half of them carry a number or a code
            parts[rng.randrange(n)] = rng.choice([str(rng.randint(10, 999)),
                                                  rng.choice(string.ascii_lowercase) + str(rng.randint(1, 9))])
        text = " ".join(parts)
        add("copy", f"{shots}Text: {text}\nCopy:", [text], 16, case_sensitive=True)

    shots = "Write the word in capital letters.\nWord: house\nCaps: HOUSE\n\nWord: green\nCaps: GREEN\n\n"
    for w in rng.sample(WORDS, 25):
        add("upper", f"{shots}Word: {w}\nCaps:", [w.upper()], 6, case_sensitive=True)

    shots = "1, 2, 3, 4, 5\n10, 20, 30, 40, 50\n2, 4, 6, 8, 10\n"
    for _ in range(25):
        start, step = rng.randint(1, 30), rng.choice([1, 2, 3, 5, 10])
        seq = [start + k * step for k in range(4)]
        add("sequence", f"{shots}{', '.join(map(str, seq))},", [str(start + 4 * step)], 5)
    return out


def main() -> None:
    with OUT.open("w") as f:
        for it in items():
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
