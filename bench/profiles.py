"""`switchyard bench profiles`: online + offline deployment profiles of one model vs one shared deployment.

One mixed workload, run twice on the same machine:
* interactive: the repo's chat prompts at --chat-rate (Poisson), `service_class = "interactive"`;
* batch: long generations kept --batch-concurrency in flight for as long as the chat run lasts (at
  least --batch-requests), `service_class = "batch"`.
First against a pool with the catalogue's profiles (default examples/profiles.toml: `online`, few
seats and a small token budget; `offline`, many seats and a large budget; one replica each), then
against a pool serving the same model as ONE deployment with as many replicas as the profiles had
together and the catalogue model's own engine keys (the profiles' left out): same replicas, slots and
threads. Per class it reports TTFT, ITL (p50/p99, by output position), E2E and output tokens/s, and
the two ratios the issue sets goals for: online ITL p99 (shared / online, goal >= 2) and offline
throughput (offline / shared, goal >= 1.5). `--json` writes it all.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from bench import loadgen, metrics, workloads
from bench.common import machine_info, save_outputs

DEFAULT_CATALOG = Path(__file__).resolve().parents[1] / "examples" / "profiles.toml"
CLASSES = ("interactive", "batch")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="switchyard bench profiles", description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", default=str(DEFAULT_CATALOG), help="pool catalogue with the model's profiles")
    ap.add_argument("--model", default=None, help="the catalogue model (default: its default model)")
    ap.add_argument("--only", choices=["profiles", "shared"], default=None, help="run one deployment only")
    g = ap.add_argument_group("interactive load (chat)")
    g.add_argument("--chat-requests", type=int, default=30)
    g.add_argument("--chat-rate", type=float, default=0.5, help="requests/s, Poisson")
    g.add_argument("--chat-output-scale", type=float, default=1.0)
    g.add_argument("--chat-max-output", type=int, default=None)
    b = ap.add_argument_group("batch load (long generations)")
    b.add_argument("--batch-requests", type=int, default=16, help="at least this many (more while chat runs)")
    b.add_argument("--batch-concurrency", type=int, default=8)
    b.add_argument("--batch-input-len", default="64-256")
    b.add_argument("--batch-output-len", default="128-256")
    o = ap.add_argument_group("output")
    o.add_argument("--itl-slo-ms", type=float, default=100.0)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--timeout-s", type=float, default=900.0, help="per request")
    o.add_argument("--json", dest="json_path", default=None)
    return ap


# ---- catalogues ---------------------------------------------------------------------------------
def shared_catalog(data: dict, model: str) -> dict:
    """The same catalogue with `model` as one deployment: its profiles' replicas added together,
    the model's own engine keys (the profiles' left out)."""
    out = copy.deepcopy(data)
    for m in out["models"]:
        if m["name"] != model:
            continue
        profiles = m.pop("profiles", {})
        m.pop("default_profile", None)
        n_min = sum(p.get("min_replicas", m.get("min_replicas", 0)) for p in profiles.values())
        n_max = sum(p.get("max_replicas", m.get("max_replicas", 1)) for p in profiles.values())
        if profiles:
            m["min_replicas"], m["max_replicas"] = n_min, max(n_max, n_min, 1)
    return out


def to_toml(data: dict) -> str:
    """A catalogue dict as TOML (tables of tables and arrays of tables, as catalogues use)."""
    import json

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v) if isinstance(v, str) else repr(v)   # a JSON string is a TOML basic string
    lines: list[str] = []

    def table(d: dict, path: list[str], array: bool = False) -> None:
        if path:
            lines.append(("[[" if array else "[") + ".".join(path) + ("]]" if array else "]"))
        for k, v in d.items():
            if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict)):
                lines.append(f"{json.dumps(k)} = {value(v)}")
        for k, v in d.items():
            if isinstance(v, dict):
                table(v, [*path, k])
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    table(item, [*path, k], array=True)
    table(data, [])
    return "\n".join(lines) + "\n"


# ---- load -------------------------------------------------------------------------------------------
class ClassTarget:
    """Generate on a router with a service class (bench/targets.py StackTarget sends none)."""

    def __init__(self, router: str, model: str, service_class: str, timeout_s: float, run_id: str):
        from common.rpc import channel
        from protos.switchyard.v1 import inference_pb2_grpc
        self.model, self.service_class, self.timeout_s, self.run_id = model, service_class, timeout_s, run_id
        self._ch = channel(router)
        self._stub = inference_pb2_grpc.InferenceStub(self._ch)

    async def generate(self, spec: workloads.RequestSpec, rec: metrics.RequestRecord) -> None:
        import grpc

        from protos.switchyard.v1 import common_pb2, inference_pb2
        req = inference_pb2.GenerateRequest(
            model=self.model, request_id=f"bench-{self.run_id}-{self.service_class}-{rec.index}",
            service_class=self.service_class,
            sampling=common_pb2.SamplingParams(max_tokens=spec.max_tokens, temperature=0.0, ignore_eos=True))
        if spec.messages:
            for m in spec.messages:
                req.messages.add(role=m["role"], content=m["content"])
        else:
            req.prompt = spec.prompt
        rec.request_id = req.request_id
        counted = 0
        try:
            async for r in self._stub.Generate(req, timeout=self.timeout_s):
                rec.chunks.append((time.perf_counter(), len(r.token_ids)))
                counted += len(r.token_ids)
                rec.worker_id = rec.worker_id or r.worker_id
                if r.HasField("usage"):
                    u = r.usage
                    rec.prompt_tokens, rec.output_tokens = u.prompt_tokens, u.completion_tokens
                    rec.queue_ms, rec.prefill_ms, rec.decode_ms = u.queue_ms, u.prefill_ms, u.decode_ms
            rec.output_tokens = rec.output_tokens or counted
        except grpc.aio.AioRpcError as e:
            rec.error = e.code().name
        rec.done = time.perf_counter()

    async def close(self) -> None:
        await self._ch.close()


async def drive_while(target, specs: list, concurrency: int, min_requests: int,
                      running: asyncio.Event) -> list[metrics.RequestRecord]:
    """Closed loop: `concurrency` requests in flight, cycling through specs, until at least
    min_requests were sent and `running` is cleared."""
    records: list[metrics.RequestRecord] = []

    async def worker() -> None:
        while len(records) < min_requests or running.is_set():
            rec = metrics.RequestRecord(len(records), 0.0, group=specs[len(records) % len(specs)].group)
            spec = specs[rec.index % len(specs)]
            records.append(rec)
            rec.sent = time.perf_counter()
            try:
                await target.generate(spec, rec)
            except Exception as e:   # a target bug must not hang the run
                rec.error = rec.error or f"CLIENT_{type(e).__name__}"
            if rec.done is None:
                rec.done = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return records


def class_report(records: list[metrics.RequestRecord], args) -> dict:
    rep = metrics.run_report(records, itl_slo_ms=args.itl_slo_ms)
    keep = ("num_requests", "completed", "errors", "duration_s", "ttft_ms", "itl_ms", "tpot_ms", "e2e_ms",
            "output_tok_s", "request_per_s", "itl_by_position_ms", "perceived_tok_s")
    out = {k: rep[k] for k in keep if k in rep}
    out["by_worker"] = {}
    for r in records:
        if r.ok:
            out["by_worker"][r.worker_id] = out["by_worker"].get(r.worker_id, 0) + 1
    return out


async def mixed_run(router: str, model: str, args, tokenizer) -> dict:
    run_id = f"{time.time_ns():x}"
    chat = workloads.chat(args.chat_requests, args.chat_output_scale, args.chat_max_output, args.seed)
    batch = workloads.synthetic(tokenizer, max(args.batch_requests, args.batch_concurrency), args.batch_input_len,
                                args.batch_output_len, args.seed + 1)
    times = loadgen.poisson_times(len(chat), args.chat_rate, args.seed)
    it, bt = (ClassTarget(router, model, c, args.timeout_s, run_id) for c in CLASSES)
    try:
        warm = metrics.RequestRecord(-1, 0.0)
        await it.generate(workloads.RequestSpec(prompt="Warm up.", max_tokens=2), warm)
        await bt.generate(workloads.RequestSpec(prompt="Warm up.", max_tokens=2), metrics.RequestRecord(-1, 0.0))
        running = asyncio.Event()
        running.set()
        batch_task = asyncio.create_task(drive_while(bt, batch, args.batch_concurrency, args.batch_requests,
                                                     running))
        chat_result = await loadgen.drive(it, chat, times, 1)
        running.clear()
        batch_records = await batch_task
    finally:
        await it.close()
        await bt.close()
    return {"interactive": class_report(chat_result.records, args), "batch": class_report(batch_records, args)}


def run_deployment(catalog_path: str, model: str, args, tokenizer, label: str) -> dict:
    from bench.common import local_stack, stack_config
    cfg = stack_config("smollm2-135m", None, pool_config=catalog_path, drain_grace_s=5.0)
    print(f"== {label}: starting a pool from {catalog_path}", file=sys.stderr, flush=True)
    with local_stack(cfg) as stack:
        rep = asyncio.run(mixed_run(stack.router_address, model, args, tokenizer))
    rep["catalog"] = Path(catalog_path).read_text()
    return rep


def ratios(profiles: dict, shared: dict) -> dict:
    def get(rep, cls, key, q=None):
        v = rep[cls][key]
        return v.get(q) if q else v
    on, sh_i = get(profiles, "interactive", "itl_ms", "p99"), get(shared, "interactive", "itl_ms", "p99")
    off, sh_b = get(profiles, "batch", "output_tok_s"), get(shared, "batch", "output_tok_s")
    return {"online_itl_p99_shared_over_online": (sh_i / on) if on and sh_i else None,
            "offline_tok_s_over_shared": (off / sh_b) if off and sh_b else None,
            "goals": {"online_itl_p99_shared_over_online": 2.0, "offline_tok_s_over_shared": 1.5}}


def print_report(out: dict, f=sys.stdout) -> None:
    for label in ("profiles", "shared"):
        rep = out.get(label)
        if rep is None:
            continue
        print(f"== {label}", file=f)
        print(f"   {'class':12} {'ok':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} "
              f"{'E2E p50':>8} {'out tok/s':>9}  workers", file=f)
        for cls in CLASSES:
            r = rep[cls]

            def ms(k, q):
                v = r[k].get(q)
                return f"{v:>8.1f}" if v is not None else f"{'-':>8}"
            print(f"   {cls:12} {r['completed']:>3}/{r['num_requests']:<3} {ms('ttft_ms', 'p50'):>9} "
                  f"{ms('ttft_ms', 'p99'):>9} {ms('itl_ms', 'p50')} {ms('itl_ms', 'p99')} {ms('e2e_ms', 'p50')} "
                  f"{r['output_tok_s']:>9.1f}  {r['by_worker']}", file=f)
            over = r.get("itl_by_position_ms", {}).get("over_slo")
            if over:
                print(f"   {'':12} ITL p99 over {out['itl_slo_ms']:g} ms at positions {', '.join(over)}", file=f)
    rt = out.get("ratios")
    if rt:
        def x(v):
            return f"{v:.2f}x" if v is not None else "n/a"
        print(f"online ITL p99: shared / online = {x(rt['online_itl_p99_shared_over_online'])} (goal >= 2x); "
              f"offline output tok/s: offline / shared = {x(rt['offline_tok_s_over_shared'])} (goal >= 1.5x)", file=f)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from common.catalog import load_catalog
    from common.tokenizers import load_tokenizer
    cat = load_catalog(args.catalog)
    model = args.model or cat.default_model
    spec = cat.get(model)
    if spec is None or not spec.profiles:
        print(f"switchyard bench profiles: model {model!r} in {args.catalog} has no [models.profiles]", file=sys.stderr)
        return 2
    data = tomllib.loads(Path(args.catalog).read_text())
    tokenizer = load_tokenizer(spec.source)
    out = {"benchmark": "profiles", "machine": machine_info(None), "model": model, "itl_slo_ms": args.itl_slo_ms,
           "workload": {k: getattr(args, k) for k in ("chat_requests", "chat_rate", "chat_output_scale",
                                                      "chat_max_output", "batch_requests", "batch_concurrency",
                                                      "batch_input_len", "batch_output_len", "seed")}}
    with tempfile.TemporaryDirectory(prefix="switchyard-bench-profiles-") as tmp:
        if args.only in (None, "profiles"):
            out["profiles"] = run_deployment(str(Path(args.catalog).resolve()), model, args, tokenizer, "profiles")
        if args.only in (None, "shared"):
            shared = Path(tmp) / "shared.toml"
            shared.write_text(to_toml(shared_catalog(data, model)))
            load_catalog(shared)   # the rewritten catalogue must parse as the original did
            out["shared"] = run_deployment(str(shared), model, args, tokenizer, "shared")
    if "profiles" in out and "shared" in out:
        out["ratios"] = ratios(out["profiles"], out["shared"])
    print_report(out)
    save_outputs(out, args.json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
