"""The layer order of docs/architecture.md ("Layers"): every module imports only its own layer or lower
ones, and no modules or packages import each other in a cycle.

Imports are read with `ast` from every .py file of the code's packages, including imports inside
functions and `if TYPE_CHECKING:` blocks: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Bottom to top. A module belongs to the layer with the longest matching prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("protos", ("protos",)),                       # the wire contract and its generated code
    ("telemetry", ("telemetry",)),                 # tracing, propagation, metric names
    ("engine", ("workers.engine",)),               # the PyTorch engine library (EngineConfig, loader, runner)
    ("common", ("common",)),                       # shared plumbing: config, subjects, rpc, codecs, replicas
    ("kv_manager", ("kv_manager",)),               # block allocator, hashing, KV events, the KV index service
    ("workers", ("workers",)),                     # step codec, external backends, the Worker service
    ("batcher", ("batcher",)),                     # scheduler, EngineCore, the batcher services, Engine
    ("router", ("router",)),                       # validation, routing, the Inference/Admin servicer
    ("services", ("services",)),                   # launcher, model pool, Triton front door, client
    ("bench", ("bench",)),                         # benchmarks: start stacks and engines
    ("cli", ("services.cli", "services.pool_cli", "services.adapter_cli")),   # the `switchyard` command
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}
NOT_CODE = {"tests", "docs", "deploy", "examples", "benchmarks"}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every package at the top of the repository (a folder with an
    __init__.py), tests excluded."""
    mods: dict[str, Path] = {}
    for top in sorted(REPO.iterdir()):
        if top.name in NOT_CODE or top.name.startswith(".") or not (top / "__init__.py").exists():
            continue
        for path in top.rglob("*.py"):
            rel = path.relative_to(REPO).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            mods[".".join(parts)] = path
    return mods


def layer_of(module: str) -> str | None:
    best, best_len = None, -1
    for name, prefixes in LAYERS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = name, len(p)
    return best


def imports(module: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module of ours, line) for every import statement in the file, at any depth."""
    def ours(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: from .x import y
                parts = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` the module mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for t in targets:
            m = ours(t)
            if m is not None and m != module and (m, node.lineno) not in found:
                found.append((m, node.lineno))
    return found


def graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    mods = module_files()
    return mods, {m: imports(m, p, mods) for m, p in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_every_module_has_a_layer():
    mods, _ = graph()
    missing = sorted(m for m in mods if layer_of(m) is None)
    assert not missing, f"modules in no layer (add their package to LAYERS here and to docs/architecture.md): {missing}"


def test_no_module_imports_a_higher_layer():
    mods, g = graph()
    bad = []
    for m, targets in sorted(g.items()):
        for t, line in targets:
            lm, lt = layer_of(m), layer_of(t)
            if lm and lt and RANK[lt] > RANK[lm]:
                bad.append(f"{mods[m].relative_to(REPO)}:{line}: {m} ({lm}) imports {t} ({lt}), a higher layer")
    assert not bad, "imports that point up the layer order (docs/architecture.md, Layers):\n" + "\n".join(bad)


def test_no_import_cycles_between_modules():
    mods, g = graph()
    edges = {m: {t for t, _ in ts} for m, ts in g.items()}
    found = cycles(edges)
    lines = []
    for comp in found:
        members = set(comp)
        for m in comp:
            for t, line in g[m]:
                if t in members:
                    lines.append(f"{mods[m].relative_to(REPO)}:{line}: {m} imports {t}")
    assert not found, "import cycles (move the shared piece down):\n" + "\n".join(lines)


def test_no_import_cycles_between_packages():
    """A package here is a folder within one layer (services/ holds two: the roof and the command line)."""
    mods, g = graph()

    def pkg(m: str) -> str:
        folder = m if mods[m].name == "__init__.py" else m.rpartition(".")[0]
        return f"{folder} [{layer_of(m)}]"

    edges: dict[str, set[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for m, ts in g.items():
        for t, line in ts:
            a, b = pkg(m), pkg(t)
            if a != b:
                edges.setdefault(a, set()).add(b)
                where.setdefault((a, b), f"{mods[m].relative_to(REPO)}:{line}: {m} imports {t}")
    found = cycles(edges)
    lines = [where[(a, b)] for comp in found for a in comp for b in comp if (a, b) in where]
    assert not found, f"package import cycles {found}:\n" + "\n".join(lines)


def test_the_checker_sees_imports_inside_functions_and_relative_ones(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text("from .events import KvEvent\n\ndef f():\n"
                   "    from router import routing\n    import common.config\n")
    mods = {"kv_manager.mod": src, "kv_manager.events": src, "router.routing": src, "router": src,
            "common.config": src}
    assert sorted(imports("kv_manager.mod", src, mods)) == [("common.config", 5), ("kv_manager.events", 1),
                                                            ("router.routing", 4)]
    assert layer_of("services.cli") == "cli" and layer_of("services.pool") == "services"
    assert layer_of("workers.engine.llama") == "engine" and layer_of("workers.service") == "workers"
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
