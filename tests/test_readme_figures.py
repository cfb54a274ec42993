"""Every benchmark figure the README shows comes from a JSON report under benchmarks/results/.

Each row of the README's performance table names the JSON file(s) it was read from; every file
either README links exists; and every number in a row's result cell is in one of that row's files
(at the precision shown; a value in seconds may be shown in ms and the other way round, a fraction
as a percentage) - unless it stands inside a "(not recorded: ...)" note, which says so plainly."""
from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
NOT_RECORDED = re.compile(r"\(not recorded:[^()]*\)")
IDENTIFIER = re.compile(r"\b[A-Za-z_]+\d[\w]*")              # Q4_1, fp32, p99: names, not figures
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?")
SCALES = (1.0, 100.0, 1000.0, 0.001)                            # as is, %, s -> ms, ms -> s


def _performance_rows() -> list[tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Performance"):]
    section = section[:section.index("\n\n")]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]     # header, rule
    assert rows, "no performance table in README.md"
    return [tuple(cell.strip() for cell in row.strip("|").split(" | ", 1)) for row in rows]


def _json_links(markdown: str, base: Path) -> list[Path]:
    return [(base / m).resolve() for m in re.findall(r"\]\(([^)\s]+\.json)\)", markdown)]


def _numbers(obj) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [float(obj)]
    return []


def _found(shown: str, values: list[float]) -> bool:
    x = float(shown)
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    return any(round(v * s, decimals) == x for v in values for s in SCALES)


def test_every_json_file_a_readme_names_exists():
    named = _json_links((REPO / "README.md").read_text(), REPO)
    named += _json_links((RESULTS / "README.md").read_text(), RESULTS)
    assert named, "the READMEs name no result files"
    missing = [str(p.relative_to(REPO)) for p in named if not p.is_file()]
    assert not missing, f"README links to result files that do not exist: {missing}"


def test_every_performance_figure_is_in_the_json_its_row_names():
    unrecorded = []
    for what, result in _performance_rows():
        files = _json_links(what + " " + result, REPO)
        assert files, f"row names no JSON under benchmarks/results/: {what[:80]!r}"
        assert all(RESULTS in p.parents and p.is_file() for p in files), files
        values = [x for p in files for x in _numbers(json.loads(p.read_text()))]
        shown = IDENTIFIER.sub(" ", NOT_RECORDED.sub(" ", re.sub(r"\[[^\]]*\]\([^)]*\)", " ", result)))
        for n in NUMBER.findall(shown):
            if not _found(n, values):
                unrecorded.append((what[:60], n))
    assert not unrecorded, ("figures in the README's performance table that no JSON of their row holds "
                            f"(point the row at the file, or mark them '(not recorded: ...)'): {unrecorded}")
