"""What the load generator drives: the router over gRPC, our engine in-process (continuous or
static batching), or HF transformers `generate` (static batches).

Each target has `async generate(spec, rec)`, filling the RequestRecord with one (time, n tokens)
chunk per streamed response / engine step, usage, and the gRPC status name on failure;
`async queue_depth() -> (waiting, running)` and `close()`.
In-process targets run the model on one dedicated thread and timestamp each step as it returns.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque

from bench.metrics import RequestRecord
from bench.workloads import RequestSpec


# ---- the real stack ---------------------------------------------------------------------------
class StackTarget:
    name = "stack"

    def __init__(self, router: str, model: str, timeout_s: float = 600.0, run_id: str | None = None):
        from common.rpc import channel
        from protos.switchyard.v1 import inference_pb2_grpc
        self.router, self.model, self.timeout_s = router, model, timeout_s
        self.run_id = run_id or f"{time.time_ns():x}"
        self._ch = channel(router)
        self._stub = inference_pb2_grpc.InferenceStub(self._ch)
        self._admin = inference_pb2_grpc.AdminStub(self._ch)

    async def generate(self, spec: RequestSpec, rec: RequestRecord) -> None:
        import grpc

        from protos.switchyard.v1 import common_pb2, inference_pb2
        req = inference_pb2.GenerateRequest(
            model=self.model, request_id=f"bench-{self.run_id}-{rec.index}",
            sampling=common_pb2.SamplingParams(max_tokens=spec.max_tokens, temperature=0.0, ignore_eos=True))
        if spec.messages:
            for m in spec.messages:
                req.messages.add(role=m["role"], content=m["content"])
        else:
            req.prompt = spec.prompt
        counted = 0
        rec.request_id = req.request_id
        try:
            async for r in self._stub.Generate(req, timeout=self.timeout_s):
                now = time.perf_counter()
                rec.chunks.append((now, len(r.token_ids)))
                counted += len(r.token_ids)
                if r.worker_id:
                    rec.worker_id = r.worker_id
                if r.HasField("usage"):
                    u = r.usage
                    rec.prompt_tokens, rec.output_tokens = u.prompt_tokens, u.completion_tokens
                    rec.cached_tokens = u.cached_tokens
                    rec.queue_ms, rec.prefill_ms, rec.decode_ms = u.queue_ms, u.prefill_ms, u.decode_ms
                    rec.worker_id = u.worker_id or rec.worker_id
            rec.output_tokens = rec.output_tokens or counted
        except grpc.aio.AioRpcError as e:
            rec.error = e.code().name
        rec.done = time.perf_counter()

    async def queue_depth(self) -> tuple[int, int]:
        from protos.switchyard.v1 import kv_index_pb2
        st = await self._admin.Status(kv_index_pb2.StatusRequest(), timeout=2.0)
        return sum(w.num_waiting for w in st.workers), sum(w.num_running for w in st.workers)

    async def worker_stats(self) -> dict:
        from protos.switchyard.v1 import kv_index_pb2
        st = await self._admin.Status(kv_index_pb2.StatusRequest(), timeout=2.0)
        return {w.worker_id: {"prefix_cache_hit_rate": w.prefix_cache_hit_rate, "num_preemptions": w.num_preemptions}
                for w in st.workers}

    async def close(self) -> None:
        await self._ch.close()


# ---- in-process targets -----------------------------------------------------------------------
class _ThreadTarget:
    """A model loop on its own thread; requests handed over through a locked deque."""

    def __init__(self, name: str):
        self.name = name
        self._cv = threading.Condition()
        self._pending: deque = deque()
        self._stop = False
        self._depth = (0, 0)
        self._thread = threading.Thread(target=self._run, name=f"bench-{name}", daemon=True)
        self._thread.start()

    async def generate(self, spec: RequestSpec, rec: RequestRecord) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cv:
            self._pending.append((spec, rec, loop, fut))
            self._cv.notify()
        await fut

    async def queue_depth(self) -> tuple[int, int]:
        return self._depth

    @staticmethod
    def _finish(item, when: float) -> None:
        _, rec, loop, fut = item
        rec.done = when
        loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))

    def _run(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(30)


class EngineTarget(_ThreadTarget):
    """Our Engine. static_batch=None: continuous batching (every arrival joins the running batch at
    the next step). static_batch=B: when nothing runs, admit up to B waiting requests and step until
    all of them finish before admitting more (classic static batching, same engine, same kernels)."""

    def __init__(self, engine, static_batch: int | None = None):
        self.eng = engine
        self.static_batch = static_batch
        self._live: dict[str, tuple] = {}
        self._ids = itertools.count()
        super().__init__("continuous" if static_batch is None else f"static{static_batch}")

    def _admit(self, item) -> None:
        from batcher.engine_core import QueueFullError
        from workers.engine.errors import InvalidRequestError
        from workers.engine.sampling_params import SamplingParams
        spec, rec, _, _ = item
        rid = f"b{next(self._ids)}"
        try:
            self.eng.add_request(spec.engine_prompt(), SamplingParams(max_tokens=spec.max_tokens, temperature=0.0,
                                                                      ignore_eos=True), request_id=rid)
        except QueueFullError:
            rec.error = "RESOURCE_EXHAUSTED"
            self._finish(item, time.perf_counter())
        except (InvalidRequestError, ValueError):
            rec.error = "INVALID_ARGUMENT"
            self._finish(item, time.perf_counter())
        else:
            self._live[rid] = item

    def _run(self) -> None:
        import torch
        eng = self.eng
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stop and not self._pending and not eng.has_unfinished():
                        self._cv.wait(0.1)
                    if self._stop:
                        return
                    if self.static_batch is None:
                        batch = list(self._pending)
                        self._pending.clear()
                    elif not eng.has_unfinished():
                        batch = [self._pending.popleft() for _ in range(min(self.static_batch, len(self._pending)))]
                    else:
                        batch = []
                for item in batch:
                    self._admit(item)
                if not eng.has_unfinished():
                    continue
                outs = eng.step()
                now = time.perf_counter()
                for o in outs:
                    item = self._live.get(o.request_id)
                    if item is None:
                        continue
                    rec = item[1]
                    if o.new_token_ids:
                        rec.chunks.append((now, len(o.new_token_ids)))
                    if o.finished:
                        rec.prompt_tokens, rec.output_tokens = o.num_prompt_tokens, o.num_output_tokens
                        rec.cached_tokens = o.num_cached_tokens
                        rec.queue_ms, rec.prefill_ms, rec.decode_ms = o.queue_ms, o.prefill_ms, o.decode_ms
                        if o.finish_reason == "abort":
                            rec.error = "CANCELLED"
                        del self._live[o.request_id]
                        self._finish(item, now)
                st = eng.stats()
                self._depth = (len(self._pending) + st.num_waiting, st.num_running)


class _StepStreamer:
    """transformers streamer: the first put() is the prompt; each later one is a decode step."""

    def __init__(self, on_step):
        self.on_step = on_step
        self.first = True

    def put(self, value) -> None:
        if self.first:
            self.first = False
            return
        self.on_step()

    def end(self) -> None:
        pass


class HFTarget(_ThreadTarget):
    """HF transformers `generate` serving the same arrivals: static batches of up to B (left-padded,
    run to the batch's longest output); each request's tokens are timestamped as generate streams them."""

    def __init__(self, model, encode, pad_id: int, batch_size: int = 8, device: str = "cpu"):
        self.model, self.encode, self.pad_id = model, encode, pad_id
        self.batch_size, self.device = batch_size, device
        model.generation_config.pad_token_id = pad_id
        super().__init__(f"hf{batch_size}")

    def _run(self) -> None:
        import torch
        while True:
            with self._cv:
                while not self._stop and not self._pending:
                    self._cv.wait(0.1)
                if self._stop:
                    return
                batch = [self._pending.popleft() for _ in range(min(self.batch_size, len(self._pending)))]
                self._depth = (len(self._pending), len(batch))
            prompts = [self.encode(item[0].engine_prompt()) for item in batch]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, p in enumerate(prompts):
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            want = [item[0].max_tokens for item in batch]
            step = [0]

            def on_step() -> None:
                now = time.perf_counter()
                k = step[0]
                for j, item in enumerate(batch):
                    if k < want[j]:
                        item[1].chunks.append((now, 1))
                        if k + 1 == want[j]:
                            item[1].prompt_tokens, item[1].output_tokens = len(prompts[j]), want[j]
                            self._finish(item, now)
                step[0] += 1
            new = max(want)
            with torch.inference_mode():
                self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                    do_sample=False, max_new_tokens=new, min_new_tokens=new,
                                    streamer=_StepStreamer(on_step))
            with self._cv:
                self._depth = (len(self._pending), 0)
