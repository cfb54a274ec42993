"""The repository's own set-up: what `make install` / `make test` run, the ruff configuration, dead
code staying deleted, and the README's pointers for a newcomer."""
from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_recipe(target: str) -> list[str]:
    """The command lines of a Makefile target (the stamp file for `install`)."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{re.escape(target)}\s*:", line))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip().lstrip("@"))
    return recipe


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[\[<>=;! ]", line, maxsplit=1)[0].lower())
    return names


# ---- make install / make test -------------------------------------------------------------------

def test_make_install_shows_pip_progress_and_names_each_phase():
    recipe = make_recipe("$(STAMP)")
    dep_install = [c for c in recipe if "pip install" in c and "requirements" in c]
    assert dep_install == ["$(PY) -m pip install -r requirements-dev.txt"]   # no -q: pip shows progress
    phases = [c for c in recipe if c.startswith("echo \"==> [")]
    assert len(phases) >= 4


def test_make_test_runs_ruff_before_pytest():
    recipe = make_recipe("test")
    assert recipe[0] == "$(VENV)/bin/ruff check ." and "pytest" in recipe[1]


def test_runtime_and_dev_requirements_are_split():
    runtime = requirement_names(REPO / "requirements.txt")
    dev_text = (REPO / "requirements-dev.txt").read_text()
    dev = requirement_names(REPO / "requirements-dev.txt")
    only_tests_or_bench = {"pytest", "hypothesis", "ruff", "transformers", "peft", "matplotlib", "pyyaml"}
    assert not runtime & only_tests_or_bench
    assert only_tests_or_bench <= dev and "-r requirements.txt" in dev_text
    assert {"torch", "grpcio", "nats-py"} <= runtime


def test_ruff_is_configured_in_pyproject():
    ruff = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["ruff"]
    assert ruff["line-length"] == 120 and ruff["target-version"] == "py310"
    assert {"E", "F"} <= set(ruff["lint"]["select"])
    assert "*_pb2.py" in ruff["extend-exclude"] and "*_pb2_grpc.py" in ruff["extend-exclude"]


# ---- dead code ---------------------------------------------------------------------------------

DELETED = {"new_request_id", "_FINISH_NAMES", "BATCH_STREAM", "BATCH_SUBMIT", "dump_state", "all_children",
           "for_model", "with_capabilities", "exposition_names", "current_traceparent", "epoch_ns", "now_ns"}


def defined_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def test_dead_code_stays_deleted():
    found = {}
    for package in ("batcher", "bench", "common", "kv_manager", "protos", "router", "services", "telemetry", "workers"):
        for path in (REPO / package).rglob("*.py"):
            if "_pb2" not in path.name:
                for name in defined_names(path) & DELETED:
                    found.setdefault(name, []).append(str(path.relative_to(REPO)))
    assert found == {}


def test_router_uses_one_reroute_limit_and_one_finish_reason_table():
    import router.catalog_routing
    import router.service
    from common.bus_codec import FINISH_FROM_PB, FINISH_TO_PB
    from protos.switchyard.v1 import common_pb2
    assert not hasattr(router.catalog_routing, "MAX_REROUTES") and router.service.MAX_REROUTES == 3
    src = (REPO / "router" / "service.py").read_text()
    assert "reroutes < MAX_REROUTES" in src and "FINISH_FROM_PB.get(chunk.finish_reason)" in src
    for value in common_pb2.FinishReason.values():
        if value != common_pb2.FINISH_REASON_UNSPECIFIED:
            assert FINISH_TO_PB[FINISH_FROM_PB[value]] == value


# ---- README ------------------------------------------------------------------------------------

def test_readme_says_where_the_logs_are_and_how_to_move_ports():
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Logs and ports", 1)[1].split("\n## ", 1)[0]
    for flag in ("--workdir", "--port", "--nats-port", "--kv-index-port", "--worker-base-port"):
        assert flag in section, flag
    assert "router.log" in section and "status --json" in section
