"""`switchyard bench embed [--json PATH]`: all-MiniLM-L6-v2 texts/s, ours against sentence-transformers.

For batches of 1, 32 and 256 short texts (seeded, 4-40 words: lengths vary as real input does), on
this CPU with the same torch thread count for everyone:

* ours_in_process: tokenizer + our packed encoder (workers/engine/bert.py: no padding to the longest)
* reference: sentence-transformers `encode(batch_size=n)` on the same weights (one batch padded to
  its longest text), or plain transformers (`--reference transformers`: AutoModel + mean pooling +
  normalisation); above 32 texts also `reference_batch_32`, sentence-transformers' default batching
  (length-sorted batches of 32: less padding), for an honest second baseline
* stack: the same batches as Inference/Embed requests through a real stack (router -> NATS ->
  embedding batcher -> embedding worker), one request at a time; and `stack_concurrent_1`: the
  batch size's worth of 1-text requests at once, which the embedding batcher packs into shared
  forwards.

Prints texts/s and the ratios ours / reference (goal: >= 2x at 256). Ours is also checked against
the reference vectors (cosine). `--router HOST:PORT` uses a running stack; `--no-stack` skips it.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import zipfile

import numpy as np
import torch

from bench.common import local_stack, machine_info, stack_config, write_json
from workers.engine.embedding_loader import MINILM, load_embedding_model, model_zip_path

ST_DEFAULT_BATCH = 32   # sentence-transformers' encode() default batch size

WORDS = ("the a switchyard train track signal freight engine night morning station platform passenger ticket "
         "delayed arrives departs north south river bridge city quiet loud cargo coal grain container crane "
         "operator shift schedule weather rain snow wind because while after before every only never").split()


def make_texts(n: int, seed: int = 0, min_words: int = 4, max_words: int = 40) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(min_words, max_words + 1)))).capitalize() + "."
            for _ in range(n)]


def rate(fn, n_texts: int, min_seconds: float, min_repeats: int = 3) -> float:
    """texts/s of fn() (one call = n_texts texts), after one warm-up call."""
    fn()
    reps, t0 = 0, time.perf_counter()
    while reps < min_repeats or time.perf_counter() - t0 < min_seconds:
        fn()
        reps += 1
    return n_texts * reps / (time.perf_counter() - t0)


def reference_encoder(kind: str, folder: str, batch_size: int | None = None):
    """texts -> normalised float32 vectors with sentence-transformers (or plain transformers). batch_size
    None: all texts in one padded batch; else sentence-transformers' own batching (it sorts by length)."""
    if kind == "sentence-transformers":
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(folder, device="cpu")
        return lambda texts: st.encode(texts, batch_size=batch_size or len(texts), convert_to_numpy=True,
                                       normalize_embeddings=True)
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()

    def encode(texts):
        b = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            h = model(**b).last_hidden_state
        mask = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    return encode


async def _stack_rates(router: str, sizes: list[int], min_seconds: float) -> dict:
    import grpc

    from common.rpc import options
    from protos.switchyard.v1 import inference_pb2, inference_pb2_grpc
    out = {}
    async with grpc.aio.insecure_channel(router, options=options()) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)

        async def one(texts):
            r = await stub.Embed(inference_pb2.EmbedRequest(model=MINILM, texts=texts), timeout=300)
            assert len(r.data) == len(texts)

        async def timed(make_calls, n_texts):
            await make_calls()   # warm-up
            reps, t0 = 0, time.perf_counter()
            while reps < 3 or time.perf_counter() - t0 < min_seconds:
                await make_calls()
                reps += 1
            return n_texts * reps / (time.perf_counter() - t0)

        for n in sizes:
            texts = make_texts(n, seed=n)
            out[n] = {"stack": await timed(lambda: one(texts), n)}
            if n > 1:
                out[n]["stack_concurrent_1"] = await timed(lambda: asyncio.gather(*(one([t]) for t in texts)), n)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="switchyard bench embed", description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,32,256", help="texts per batch, comma separated")
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1),
                    help="torch threads for ours, the reference and the stack's embedding worker")
    ap.add_argument("--min-seconds", type=float, default=3.0, help="time each measurement at least this long")
    ap.add_argument("--reference", default="sentence-transformers", choices=("sentence-transformers", "transformers"))
    ap.add_argument("--no-stack", action="store_true", help="in process only (no Inference/Embed through a stack)")
    ap.add_argument("--router", default=None, help="a running stack's router (default: start one)")
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    torch.set_num_threads(args.threads)

    ours = load_embedding_model(MINILM, num_threads=args.threads)
    folder = tempfile.mkdtemp(prefix="minilm-")
    zipfile.ZipFile(model_zip_path()).extractall(folder)
    ref = reference_encoder(args.reference, folder)
    ref_default = reference_encoder(args.reference, folder, ST_DEFAULT_BATCH) \
        if args.reference == "sentence-transformers" else None

    rows: dict[int, dict] = {}
    for n in sizes:
        texts = make_texts(n, seed=n)
        ids = ours.tokenize(texts)
        cos = float((ours.embed(ids) * ref(texts)).sum(axis=1).min())
        rows[n] = {"texts": n, "tokens": sum(len(t) for t in ids), "min_cosine_vs_reference": cos,
                   "ours_in_process": rate(lambda: ours.embed(ours.tokenize(texts)), n, args.min_seconds),
                   "reference": rate(lambda: ref(texts), n, args.min_seconds)}
        if ref_default is not None and n > ST_DEFAULT_BATCH:   # its default: length-sorted batches of 32
            rows[n]["reference_batch_32"] = rate(lambda: ref_default(texts), n, args.min_seconds)
        print(f"batch {n:4d}: ours {rows[n]['ours_in_process']:9.1f} texts/s, {args.reference} "
              f"{rows[n]['reference']:9.1f} texts/s (x{rows[n]['ours_in_process'] / rows[n]['reference']:.2f}); "
              f"min cosine {cos:.5f}", flush=True)

    if not args.no_stack:
        async def through(router):
            return await _stack_rates(router, sizes, args.min_seconds)
        if args.router:
            stack_rows = asyncio.run(through(args.router))
        else:
            cfg = stack_config(workers=0, embedding_workers=1, embedding_num_threads=args.threads)
            with local_stack(cfg) as stack:
                stack_rows = asyncio.run(through(stack.router_address))
        for n, r in stack_rows.items():
            rows[n].update(r)
            print(f"batch {n:4d}: stack {r['stack']:9.1f} texts/s"
                  + (f", {n} concurrent 1-text requests {r['stack_concurrent_1']:9.1f} texts/s"
                     if "stack_concurrent_1" in r else ""), flush=True)

    for r in rows.values():
        r["ratio_ours_vs_reference"] = r["ours_in_process"] / r["reference"]
        if "reference_batch_32" in r:
            r["ratio_ours_vs_reference_batch_32"] = r["ours_in_process"] / r["reference_batch_32"]
        if "stack" in r:
            r["ratio_stack_vs_reference"] = r["stack"] / r["reference"]
    print("\ntexts  ours/ref  stack/ref  ours/ref(batches of 32)")
    for n, r in rows.items():
        stack_ratio = f"{r['ratio_stack_vs_reference']:9.2f}" if "stack" in r else "        -"
        b32 = f"{r['ratio_ours_vs_reference_batch_32']:8.2f}" if "reference_batch_32" in r else "       -"
        print(f"{n:5d}  {r['ratio_ours_vs_reference']:8.2f}  {stack_ratio}  {b32}")
    if args.json:
        write_json(args.json, {"benchmark": "embed", "model": MINILM, "reference": args.reference,
                               "threads": args.threads, "machine": machine_info("cpu"),
                               "results": [rows[n] for n in sizes]})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
