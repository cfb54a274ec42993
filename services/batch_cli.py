"""`switchyard batch ...`: durable bulk jobs on the router's switchyard.v1.Batch service.

    switchyard batch submit FILE.jsonl [--model M] [--endpoint /v1/chat/completions] [--no-wait]
    switchyard batch status ID [--json]
    switchyard batch list [--json]
    switchyard batch cancel ID
    switchyard batch results ID [--which all|output|errors] [-o FILE]

FILE is OpenAI's batch input format: one JSON object per line with custom_id, method, url, body.
`submit` prints the job id, the lines refused (each with its line number), then a progress bar until the
job ends (Ctrl-C leaves the job running: it is durable). A token: --token or $SWITCHYARD_TOKEN.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

TERMINAL = ("completed", "cancelled", "failed")


def _connect(args):
    from common.rpc import sync_channel
    from protos.switchyard.v1 import batch_pb2_grpc
    ch = sync_channel(args.router)
    token = args.token or os.environ.get("SWITCHYARD_TOKEN", "")
    return ch, batch_pb2_grpc.BatchStub(ch), ((("authorization", f"Bearer {token}"),) if token else ())


def progress_line(j) -> str:
    """One line of progress: bar, counts by state, rate, ETA, tokens and cost."""
    c = j.counts
    done = c.completed + c.failed + c.cancelled
    width = 30
    filled = int(width * done / c.total) if c.total else width
    eta = f"ETA {j.eta_s:.0f}s" if j.eta_s > 0 else ("" if j.eta_s == 0 else "ETA ?")
    return (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{c.total} {j.status}: {c.completed} ok, "
            f"{c.failed} failed ({c.dead_letter} dead-letter), {c.cancelled} cancelled, {c.pending} pending; "
            f"{j.items_per_s:.1f} items/s {eta}; {j.completion_tokens} output tokens, ${j.cost_usd:.4f}")


def describe(j) -> str:
    lines = [f"job {j.id}: {j.status} ({j.endpoint}{', model ' + j.model if j.model else ''})", progress_line(j)]
    if j.message:
        lines.append(f"  {j.message}")
    for e in j.input_errors:
        lines.append(f"  line {e.line}: {e.code}: {e.message}")
    if j.counts.invalid_lines > len(j.input_errors):
        lines.append(f"  ... {j.counts.invalid_lines - len(j.input_errors)} more refused lines")
    return "\n".join(lines)


def _as_json(j) -> str:
    from google.protobuf.json_format import MessageToDict
    return json.dumps(MessageToDict(j, preserving_proto_field_name=True), indent=1)


def cmd_submit(args, stub, md) -> int:
    from protos.switchyard.v1 import batch_pb2
    data = open(args.file, "rb").read()   # noqa: SIM115 - read whole; the router checks the size
    j = stub.CreateJob(batch_pb2.BatchCreateJobRequest(jsonl=data, endpoint=args.endpoint, model=args.model or ""),
                       metadata=md, timeout=120)
    print(j.id, flush=True)
    for e in j.input_errors:
        print(f"line {e.line}: {e.code}: {e.message}", file=sys.stderr)
    if args.no_wait or j.status in TERMINAL:
        print(describe(j), file=sys.stderr)
        return 0 if j.status != "failed" else 1
    tty = sys.stderr.isatty()
    try:
        while j.status not in TERMINAL:
            time.sleep(args.interval)
            j = stub.GetJob(batch_pb2.BatchGetJobRequest(job_id=j.id), metadata=md, timeout=30)
            print(("\r" if tty else "") + progress_line(j), end="" if tty else "\n", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print(f"\nthe job goes on: `switchyard batch status {j.id}`", file=sys.stderr)
        return 130
    if tty:
        print(file=sys.stderr)
    print(f"results: switchyard batch results {j.id}", file=sys.stderr)
    return 0 if j.status == "completed" else 1


def main(argv: list[str] | None = None) -> int:
    import grpc

    from common.config import DEFAULT_ROUTER_PORT
    from protos.switchyard.v1 import batch_pb2
    default_router = os.environ.get("SWITCHYARD_ROUTER") or f"localhost:{DEFAULT_ROUTER_PORT}"
    ap = argparse.ArgumentParser(prog="switchyard batch", description="durable bulk jobs (JetStream)")
    ap.add_argument("--router", default=default_router, help="router HOST:PORT (default $SWITCHYARD_ROUTER "
                                                             "or localhost:50051)")
    ap.add_argument("--token", default=None, help="bearer token (default $SWITCHYARD_TOKEN)")
    sub = ap.add_subparsers(dest="batch_cmd", required=True)
    s = sub.add_parser("submit", help="create a job from an OpenAI batch JSONL file and follow its progress")
    s.add_argument("file")
    s.add_argument("--model", default=None, help="model for lines whose body names none")
    s.add_argument("--endpoint", default="/v1/chat/completions",
                   help="the lines' url: /v1/chat/completions, /v1/completions or /v1/embeddings")
    s.add_argument("--no-wait", action="store_true", help="print the job id and return")
    s.add_argument("--interval", type=float, default=1.0, help="seconds between progress updates")
    for name in ("status", "cancel"):
        p = sub.add_parser(name, help=f"{name} of a job")
        p.add_argument("job_id")
        p.add_argument("--json", action="store_true")
    p = sub.add_parser("list", help="jobs, newest first")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("results", help="the results as JSONL (custom_id, response, error), each item once")
    p.add_argument("job_id")
    p.add_argument("--which", choices=["all", "output", "errors"], default="all")
    p.add_argument("-o", "--output", default="-", help="file to write (default stdout)")
    args = ap.parse_args(argv)
    ch, stub, md = _connect(args)
    try:
        if args.batch_cmd == "submit":
            return cmd_submit(args, stub, md)
        if args.batch_cmd in ("status", "cancel"):
            call = stub.GetJob if args.batch_cmd == "status" else stub.CancelJob
            req = batch_pb2.BatchGetJobRequest if args.batch_cmd == "status" else batch_pb2.BatchCancelJobRequest
            j = call(req(job_id=args.job_id), metadata=md, timeout=30)
            print(_as_json(j) if args.json else describe(j))
            return 0
        if args.batch_cmd == "list":
            resp = stub.ListJobs(batch_pb2.BatchListJobsRequest(limit=args.limit), metadata=md, timeout=30)
            for j in resp.jobs:
                print(_as_json(j) if args.json else f"{j.id}  {j.status:11} {progress_line(j)}")
            return 0
        out = sys.stdout if args.output == "-" else open(args.output, "w")   # noqa: SIM115
        n = 0
        try:
            for chunk in stub.GetResults(batch_pb2.BatchGetResultsRequest(job_id=args.job_id, which=args.which),
                                         metadata=md, timeout=300):
                for line in chunk.lines:
                    out.write(line + "\n")
                    n += 1
        finally:
            if out is not sys.stdout:
                out.close()
        print(f"{n} result(s)", file=sys.stderr)
        return 0
    except grpc.RpcError as e:
        print(f"switchyard batch {args.batch_cmd}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"switchyard batch {args.batch_cmd}: {e}", file=sys.stderr)
        return 2
    finally:
        ch.close()


if __name__ == "__main__":
    sys.exit(main())
