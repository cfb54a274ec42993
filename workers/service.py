"""The Worker gRPC servicer: executes StepPlans on the engine's ModelRunner.

The worker owns the KV tensors and nothing else: it never decides who runs (the batcher does).
`execute` runs on a one-thread executor so the event loop keeps answering health checks while
a step is computing, and so steps never overlap. Plans are queued on it as they arrive, so a
pipelined next step starts the moment the current one ends.

LoadAdapter / UnloadAdapter change the LoRA registry at run time (the batcher calls them on a
ModelControl; it stops admitting an adapter's requests and waits for them before unloading).

Errors: an EngineError (workers/engine/errors.py) is the caller's and carries its status
(`code`: INVALID_ARGUMENT for an adapter that cannot be served or read, ALREADY_EXISTS, NOT_FOUND)
and message; anything else is a bug in this process: logged, and INTERNAL.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from protos.switchyard.v1 import worker_pb2, worker_pb2_grpc
from telemetry import propagation, tracing
from workers.engine.errors import EngineError
from workers.engine.plan import NewRequestPlan, StepPlan
from workers.engine.sampling_params import SamplingParams
from workers.step_codec import plan_from_proto, result_to_proto

log = logging.getLogger("switchyard.worker")


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, runner, model_name: str, device: str = "cpu", metrics=None):
        self.metrics = metrics      # telemetry.metrics.WorkerMetrics, or None
        self.runner = runner          # None until the model is loaded (Health says ready=False)
        self.model_name = model_name
        self.device = device
        self.ready = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-step")
        self._stream_lock = asyncio.Lock()
        self._adapter_lock = threading.Lock()   # one load/unload at a time: check-then-register must not interleave

    def _execute_pb(self, pb: worker_pb2.StepPlan) -> worker_pb2.StepResult:
        # Decode, run and encode on the executor thread: the loop only moves bytes.
        return self._finish_pb(self._launch_pb(pb))

    def _launch_pb(self, pb: worker_pb2.StepPlan):
        """Start a step (on a CUDA runner this only enqueues it: the next plan, if it is already
        here, is launched before this one's tokens are read, so the device never waits for the host)."""
        plan = plan_from_proto(pb)
        t0 = time.perf_counter()
        span = None
        if tracing.ENABLED and pb.traceparent:
            span = self._start_span(pb, plan)
        launch = getattr(self.runner, "launch", None)
        handle = launch(plan) if launch is not None else self.runner.execute(plan)
        return plan, t0, span, handle

    def _finish_pb(self, launched) -> worker_pb2.StepResult:
        plan, t0, span, handle = launched
        try:
            result = handle.result() if hasattr(handle, "result") else handle
        finally:
            if span is not None:
                span.end()
        if self.metrics is not None:
            self.metrics.step(time.perf_counter() - t0, len(plan.new_requests) + len(plan.running), plan.num_tokens)
        return result_to_proto(result)

    def _start_span(self, pb: worker_pb2.StepPlan, plan: StepPlan):
        """One `worker.step` span per engine step (launch to tokens read): a child of one request
        in it, linked to all."""
        from opentelemetry.trace import Link, SpanKind
        links = [Link(sc) for sc in map(propagation.parse_traceparent, pb.links) if sc is not None]
        attrs = {"switchyard.step_id": plan.step_id,
                 "switchyard.batch_size": len(plan.new_requests) + len(plan.running),
                 "switchyard.num_new_requests": len(plan.new_requests), "switchyard.num_tokens": plan.num_tokens}
        return tracing.tracer.start_span(tracing.WORKER_STEP, kind=SpanKind.INTERNAL, attributes=attrs,
                                         context=propagation.context_from_traceparent(pb.traceparent),
                                         links=links)

    def _reset(self) -> None:
        """A new Step stream means a new batcher session: forget the previous one's requests."""
        reset = getattr(self.runner, "reset", None)
        if reset is not None:
            reset()

    def warmup(self) -> None:
        """One tiny prefill + forget, so the first real request does not pay first-call costs.

        Writes KV into block 0 only; the batcher has not allocated anything yet, and a block's KV
        is always written before it is read.
        """
        sp = SamplingParams(max_tokens=1, temperature=0.0)
        self.runner.execute(StepPlan(step_id=0, new_requests=[NewRequestPlan(
            request_id="__warmup__", token_ids=[1, 2, 3], num_prompt_tokens=3, num_computed_tokens=0,
            num_new_tokens=3, block_ids=[0], sampling=sp, seed=0)]))
        self.runner.execute(StepPlan(step_id=0, finished_ids=["__warmup__"]))

    async def Step(self, request_iterator, context: grpc.aio.ServicerContext):
        if not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the worker is still loading its model")
        if self._stream_lock.locked():
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this worker is already driven by a batcher (one Step stream at a time)")
        async with self._stream_lock:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._reset)
            steps: asyncio.Queue = asyncio.Queue()   # (plan, its step's future) in plan order; None: no more
            overlap = bool(getattr(self.runner, "overlaps", False))

            async def read_plans() -> None:
                # Each plan goes to the step thread the moment it arrives. A pipelining batcher sends
                # step N+1 before N ends, so the thread starts it as soon as N is done instead of
                # waiting for this loop to write N's result and read the next plan (measured: the
                # worker idled 1.7 ms between decode steps that way).
                # On a CUDA runner a step is launched and finished in two executor jobs: a plan that
                # arrives while step N runs is launched (queued on the device) before N's tokens are
                # read. On the CPU a launch is the whole computation, so one job per step.
                stage = self._launch_pb if overlap else self._execute_pb
                try:
                    async for pb in request_iterator:
                        steps.put_nowait((pb, loop.run_in_executor(self._executor, stage, pb)))
                except grpc.aio.AioRpcError as e:   # the batcher went away mid-read: end the stream
                    log.debug("Step stream read ended: %s", e.code())
                finally:
                    steps.put_nowait(None)

            reader = asyncio.create_task(read_plans())
            try:
                while (item := await steps.get()) is not None:
                    pb, fut = item
                    try:
                        res = await fut
                        if overlap:
                            res = await loop.run_in_executor(self._executor, self._finish_pb, res)
                    except Exception as e:  # a bad plan or an engine bug: fail the stream loudly
                        log.exception("step %s failed", pb.step_id)
                        await context.abort(grpc.StatusCode.INTERNAL, f"worker step {pb.step_id} failed: {e}")
                    yield res
            finally:
                # The stream ended or broke: plans not started yet are dropped (the next stream resets).
                reader.cancel()
                while not steps.empty():
                    item = steps.get_nowait()
                    if item is not None:
                        item[1].cancel()

    async def Health(self, request: worker_pb2.HealthRequest, context) -> worker_pb2.WorkerInfo:
        r = self.runner
        if r is None:
            return worker_pb2.WorkerInfo(model=self.model_name, ready=False, device=self.device)
        names = r.adapter_names() if hasattr(r, "adapter_names") else []
        return worker_pb2.WorkerInfo(model=self.model_name, num_blocks=r.num_blocks, block_size=r.block_size,
                                     max_model_len=r.max_model_len, ready=self.ready, device=self.device,
                                     adapters=names)

    # ---- LoRA adapters at run time -------------------------------------------------------------
    async def LoadAdapter(self, request: worker_pb2.WorkerAdapterRequest, context) -> worker_pb2.WorkerAdapterReply:
        lora = await self._lora(context)
        if not request.name or not request.path:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "LoadAdapter needs a name and a path")
        try:
            # Validation reads the whole file: off the event loop, and off the step thread so steps
            # keep running (AdapterManager is thread-safe).
            nbytes = await asyncio.get_running_loop().run_in_executor(
                None, self._load_adapter, lora, request.name, request.path)
        except EngineError as e:   # InvalidAdapterError (bad or unreadable files), AdapterConflictError
            await context.abort(status_of(e), e.message)
        except Exception as e:  # noqa: BLE001 - not the caller's doing: a bug here, logged and INTERNAL
            log.exception("LoadAdapter %r from %s failed", request.name, request.path)
            await context.abort(grpc.StatusCode.INTERNAL, f"worker error loading adapter {request.name!r}: "
                                                          f"{type(e).__name__}: {e}")
        log.info("adapter %s loaded from %s (%.1f MB)", request.name, request.path, nbytes / 2**20)
        return worker_pb2.WorkerAdapterReply(adapters=lora.names(), host_bytes=nbytes)

    async def UnloadAdapter(self, request: worker_pb2.WorkerAdapterRequest, context) -> worker_pb2.WorkerAdapterReply:
        lora = await self._lora(context)
        # On the step executor: runner.seqs (which slots are pinned) changes only there, between steps.
        removed = await asyncio.get_running_loop().run_in_executor(self._executor, self._unload_adapter,
                                                                   request.name)
        if not removed:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"adapter {request.name!r} is not loaded on this worker; "
                                                           f"known adapters: {', '.join(lora.names()) or 'none'}")
        log.info("adapter %s unloaded", request.name)
        return worker_pb2.WorkerAdapterReply(adapters=lora.names())

    async def _lora(self, context):
        lora = getattr(self.runner, "lora", None) if self.ready else None
        if lora is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this worker serves no adapters (not ready, or max_loras = 0)" if self.ready
                                else "the worker is still loading its model")
        return lora

    def _load_adapter(self, lora, name: str, path: str) -> int:
        """Register + validate into host memory; returns its bytes. An invalid adapter is forgotten again."""
        with self._adapter_lock:
            old = lora.registry.get(name)
            if old is not None and old != path:
                # Re-registering would swap the weights under requests running on it.
                raise AdapterConflictError(f"adapter {name!r} is already loaded from {old}; unload it first")
            if old is None:
                lora.register(name, path)
            loaded = False
            try:
                nbytes = lora.prefetch(name).nbytes
                loaded = True
                return nbytes
            finally:
                if old is None and not loaded:
                    lora.unregister(name)

    def _unload_adapter(self, name: str) -> bool:
        # No _adapter_lock here: this runs on the step thread, which must not wait for a file read.
        # The batcher runs no request of this adapter any more, but the worker may still hold a
        # finished one it has not been told to forget: only other adapters' slots are pinned, so the
        # slot is freed now (a later load under the same name must not find stale weights in it).
        pinned = {st.slot for st in self.runner.seqs.values() if st.slot and st.adapter_id != name}
        return self.runner.lora.unregister(name, pinned=pinned)


class AdapterConflictError(EngineError):
    """LoadAdapter of a name that is loaded from another path."""
    code = "ALREADY_EXISTS"


def status_of(e: EngineError) -> grpc.StatusCode:
    """The gRPC status an EngineError names (INTERNAL for a code gRPC does not have)."""
    return getattr(grpc.StatusCode, e.code, grpc.StatusCode.INTERNAL)
