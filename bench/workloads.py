"""Seeded benchmark workloads: what each request asks for (arrival times live in loadgen.py).

- synthetic: prompts of set token-length distributions (text sliced from a varied corpus by
  tokens, so the router's tokenization gives the same length to within a token or two).
- shared-prefix: N system prompts x M questions, shuffled (the routing / prefix-cache workload).
- chat: bench/data/chat_prompts.jsonl, a small set of chat conversations with realistic lengths
  written for this repo; each carries the length of a typical answer as its output length.
- copy-heavy: code edits (a file before a small change; the answer is the file after it) and RAG
  answers that quote their context word for word: answers that copy spans of the prompt, where
  prompt-lookup speculation should shine. Built here from templates and seeded names (nothing is
  downloaded); completion-style prompts, so the answer starts with the copy.

Every request ignores EOS so it produces exactly max_tokens: runs compare equal work.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

CHAT_PROMPTS = Path(__file__).resolve().parent / "data" / "chat_prompts.jsonl"

CORPUS_SEEDS = [
    "The capital of France is Paris, a city on the Seine.", "def quicksort(xs): return sorted(xs)",
    "Water boils at one hundred degrees Celsius at sea level.", "Three tips for a good night's sleep:",
    "The history of the railway began with horse-drawn wagons on wooden rails.",
    "SELECT name, email FROM users WHERE created_at > now() - interval '7 days';",
    "In 1969, astronauts landed on the Moon and walked on its surface.",
]
QUESTIONS = [
    "Which track does the 9:15 freight use?", "Who is the dispatcher on duty tonight?",
    "How long is the delay on line 4?", "Can the express overtake the local at Junction B?",
    "What is the maximum axle load on siding 7?", "When does the next inspection start?",
    "Why was signal 12 held at red?", "Which crew relieves the night shift?",
    "How many wagons are waiting in the hump yard?", "Is the north switch heated in winter?",
    "What is the speed limit through the yard?", "Where is the nearest fuelling point?",
]


@dataclass
class RequestSpec:
    prompt: str = ""                     # exactly one of prompt / messages
    messages: list[dict] | None = None
    max_tokens: int = 16
    group: str = ""                      # e.g. the shared prefix it belongs to

    def engine_prompt(self):
        return self.messages if self.messages else self.prompt


def parse_range(s: str | int | tuple) -> tuple[int, int]:
    """'128' -> (128, 128); '32-256' -> (32, 256)."""
    if isinstance(s, tuple):
        return s
    if isinstance(s, int):
        return (s, s)
    lo, _, hi = str(s).partition("-")
    a, b = int(lo), int(hi or lo)
    if a < 1 or b < a:
        raise ValueError(f"bad length range {s!r}: want N or MIN-MAX with 1 <= MIN <= MAX")
    return (a, b)


def _token_pool(tokenizer) -> list[int]:
    corpus = " ".join(CORPUS_SEEDS * 4) + " " + " ".join(
        f"Item {i}: the train from station {i} leaves at {i % 24}:{(7 * i) % 60:02d} on track {i % 13}."
        for i in range(400))
    return tokenizer.encode(corpus)


def synthetic(tokenizer, n: int, input_len="32-128", output_len="16-64", seed: int = 0) -> list[RequestSpec]:
    rng = random.Random(seed)
    pool = _token_pool(tokenizer)
    ilo, ihi = parse_range(input_len)
    olo, ohi = parse_range(output_len)
    out = []
    for i in range(n):
        plen = rng.randint(ilo, ihi)
        start = rng.randrange(0, max(1, len(pool) - plen))
        out.append(RequestSpec(prompt=tokenizer.decode(pool[start:start + plen]), max_tokens=rng.randint(olo, ohi),
                               group=f"syn{i}"))
    return out


def shared_prefix(tokenizer, num_prefixes: int = 4, questions_per_prefix: int = 6, prefix_len: int = 256,
                  output_len="8", seed: int = 0) -> list[RequestSpec]:
    """num_prefixes distinct system prompts of ~prefix_len tokens, each asked questions_per_prefix
    questions; shuffled with the seed so the same prefix recurs at irregular intervals."""
    rng = random.Random(seed)
    pool = _token_pool(tokenizer)
    olo, ohi = parse_range(output_len)
    prefixes = []
    for p in range(num_prefixes):
        start = rng.randrange(0, max(1, len(pool) - prefix_len))
        body = tokenizer.decode(pool[start:start + prefix_len])
        prefixes.append(f"System prompt {p}: you are assistant number {p} of the yard. {body}\n\n")
    specs = [RequestSpec(prompt=prefixes[p] + "Question: " + QUESTIONS[(p + q) % len(QUESTIONS)] + f" (#{q})\nAnswer:",
                         max_tokens=rng.randint(olo, ohi), group=f"prefix{p}")
             for p in range(num_prefixes) for q in range(questions_per_prefix)]
    rng.shuffle(specs)
    return specs


def chat(n: int | None = None, output_scale: float = 1.0, max_output: int | None = None, seed: int = 0,
         path: Path = CHAT_PROMPTS) -> list[RequestSpec]:
    """The repo's chat prompt set, sampled with replacement to n requests (all once, shuffled, if n is None).

    output_scale / max_output shrink the answer lengths for slow machines (the prompts stay as written)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    picks = rng.sample(rows, len(rows)) if n is None else [rng.choice(rows) for _ in range(n)]
    out = []
    for i, r in enumerate(picks):
        o = max(1, round(r["output_tokens"] * output_scale))
        if max_output:
            o = min(o, max_output)
        out.append(RequestSpec(messages=r["messages"], max_tokens=o, group=f"chat{rows.index(r)}"))
    return out


# ---- copy-heavy: code edits and RAG quotes (bench spec / compare --speculative) -----------------
_CODE_TEMPLATES = [
    """def {fn}(lines):
    {var} = []
    for line in lines:
        name, track, departs = line.split(",")
        if not track.strip().isdigit():
            continue
        {var}.append({{"name": name.strip(), "track": int(track), "departs": departs.strip()}})
    {var}.sort(key=lambda t: t["departs"])
    return {var}
""",
    """class {cls}:
    def __init__(self, capacity={n}):
        self.capacity = capacity
        self.{var} = {{}}

    def add(self, wagon_id, weight):
        if len(self.{var}) >= self.capacity:
            raise ValueError("siding full")
        self.{var}[wagon_id] = weight

    def total_weight(self):
        return sum(self.{var}.values())
""",
    """def {fn}(signals, timeout={n}):
    {var} = {{}}
    for signal in signals:
        state = signal.read()
        if state == "red" and signal.held_for() > timeout:
            {var}[signal.id] = "stuck"
        elif state == "red":
            {var}[signal.id] = "held"
        else:
            {var}[signal.id] = "clear"
    return {var}
""",
    """SELECT {var}.name, {var}.track, count(*) AS wagons
FROM {tbl} AS {var}
JOIN wagons ON wagons.train_id = {var}.id
WHERE {var}.departs > now() - interval '{n} hours'
GROUP BY {var}.name, {var}.track
ORDER BY wagons DESC
LIMIT 10;
""",
]
_FN_NAMES = ["parse_schedule", "load_timetable", "check_signals", "read_manifest", "plan_departures", "scan_yard"]
_VAR_NAMES = ["trains", "entries", "rows", "state", "items", "records"]
_NEW_NAMES = ["schedule", "departures", "result", "table", "found", "report"]
_CLASSES = ["Siding", "Track", "Consist", "Platform"]
_TABLES = ["trains", "departures", "movements"]
_EDITS = ["renaming `{var}` to `{new}`", "adding a docstring", "adding type hints", "fixing the indentation"]

_PLACES = ["Northern Yard", "Harbour Junction", "Eastgate Depot", "Millbrook Sidings", "Ridge Terminal"]
_PEOPLE = ["Ellen Porter", "Tomas Reyes", "Aiko Tanaka", "Samir Haddad", "Greta Lind", "Owen Blake"]
_FACTS = [
    ("The {place} handles freight for the port and sorts about {n} wagons a day.",
     "How many wagons does the {place} sort a day?"),
    ("Trains arrive on tracks 1 to {m} and are pushed over the hump into {n} classification tracks.",
     "How are arriving trains sorted?"),
    ("The night shift starts at {h}:00 and is led by the yard master, {person}.",
     "Who leads the night shift, and when does it start?"),
    ("Wagons carrying hazardous goods must be placed on track {m}, which has its own drainage system.",
     "Where must wagons carrying hazardous goods be placed?"),
    ("The maximum speed over the hump is {m} km/h, and every wagon is weighed before it is released.",
     "What is the speed limit over the hump?"),
    ("Locomotives are refuelled at the east apron, which is open from {h}:00 until midnight.",
     "Where are locomotives refuelled?"),
    ("Inspections of the retarders take place every {m} days and last about {n} minutes.",
     "How often are the retarders inspected?"),
    ("In winter the north switches are heated, and the heaters are checked by {person} every morning.",
     "Who checks the switch heaters?"),
]


def _code_edit(rng: random.Random, i: int) -> str:
    t = i % len(_CODE_TEMPLATES)
    var = rng.choice(_VAR_NAMES)
    code = _CODE_TEMPLATES[t].format(fn=rng.choice(_FN_NAMES), var=var, cls=rng.choice(_CLASSES),
                                     tbl=rng.choice(_TABLES), n=rng.randint(2, 48))
    new = rng.choice([x for x in _NEW_NAMES if x != var])
    edit = rng.choice(_EDITS).format(var=var, new=new)
    path = f"yard/{['schedule', 'sidings', 'signals', 'reports'][t]}.{'sql' if t == 3 else 'py'}"
    return f"# {path}, before the change\n{code}\n# {path}, after {edit} (the whole file)\n"


def _rag_quote(rng: random.Random) -> str:
    place, person = rng.choice(_PLACES), rng.choice(_PEOPLE)
    facts = rng.sample(_FACTS, 5)
    fill = dict(place=place, person=person)
    sentences = [f.format(**fill, n=rng.randint(12, 400), m=rng.randint(3, 30), h=rng.randint(18, 23))
                 for f, _ in facts]
    question = rng.choice(facts)[1].format(**fill)
    return (f"Context:\n{' '.join(sentences)}\n\nQuestion: {question}\n"
            "Answer, quoting the context word for word: \"")


def copy_heavy(n: int, output_len="64-128", seed: int = 0) -> list[RequestSpec]:
    """n prompts, alternately a code edit and a RAG question whose answer quotes its context; each
    answer (EOS ignored, like every workload here) copies spans of the prompt."""
    rng = random.Random(seed)
    olo, ohi = parse_range(output_len)
    out = []
    for i in range(n):
        code = i % 2 == 0
        prompt = _code_edit(rng, i // 2) if code else _rag_quote(rng)
        out.append(RequestSpec(prompt=prompt, max_tokens=rng.randint(olo, ohi),
                               group=f"{'code' if code else 'rag'}{i}"))
    return out


def build(kind: str, tokenizer, n: int, *, input_len="32-128", output_len="16-64", num_prefixes: int = 4,
          questions_per_prefix: int = 6, prefix_len: int = 256, output_scale: float = 1.0,
          max_output: int | None = None, seed: int = 0) -> list[RequestSpec]:
    if kind == "synthetic":
        return synthetic(tokenizer, n, input_len, output_len, seed)
    if kind == "shared-prefix":
        return shared_prefix(tokenizer, num_prefixes, questions_per_prefix, prefix_len, output_len, seed)
    if kind == "chat":
        return chat(n, output_scale, max_output, seed)
    if kind == "copy-heavy":
        return copy_heavy(n, output_len, seed)
    raise ValueError(f"unknown workload {kind!r}: synthetic | shared-prefix | chat | copy-heavy")
