"""StepPlan / StepResult / SamplingParams <-> switchyard.v1 protobufs, both ways.

The plan dataclasses (workers/engine/plan.py) are the contract; these converters are the only
place that knows the wire form. Round-trips are exact (tests/e2e/test_step_codec.py).
"""
from __future__ import annotations

from protos.switchyard.v1 import common_pb2, worker_pb2
from workers.engine.plan import NewRequestPlan, RunningRequestPlan, StepPlan, StepResult
from workers.engine.sampling_params import SamplingParams

_DEFAULTS = SamplingParams()


# ---- sampling ----------------------------------------------------------------------------------
def sampling_to_proto(sp: SamplingParams, out: common_pb2.SamplingParams | None = None) -> common_pb2.SamplingParams:
    """Every field set explicitly (the receiver must not apply its own defaults)."""
    pb = out if out is not None else common_pb2.SamplingParams()
    pb.max_tokens = sp.max_tokens
    pb.temperature = sp.temperature
    pb.top_k = sp.top_k
    pb.top_p = sp.top_p
    pb.min_p = sp.min_p
    pb.repetition_penalty = sp.repetition_penalty
    pb.presence_penalty = sp.presence_penalty
    if sp.seed is not None:
        pb.seed = sp.seed
    pb.stop.extend(sp.stop)
    pb.stop_token_ids.extend(sp.stop_token_ids)
    pb.ignore_eos = sp.ignore_eos
    pb.logprobs = sp.logprobs
    return pb


def _f32(x: float) -> float:
    """Floats travel as float32: round 0.7 -> 0.699999988 back to the nearest short decimal."""
    return float(f"{x:.7g}")


def sampling_from_proto(pb: common_pb2.SamplingParams) -> SamplingParams:
    """Unset optional fields take SamplingParams' defaults. Does not validate."""
    d = _DEFAULTS
    return SamplingParams(
        max_tokens=pb.max_tokens if pb.HasField("max_tokens") else d.max_tokens,
        temperature=_f32(pb.temperature) if pb.HasField("temperature") else d.temperature,
        top_k=pb.top_k if pb.HasField("top_k") else d.top_k,
        top_p=_f32(pb.top_p) if pb.HasField("top_p") else d.top_p,
        min_p=_f32(pb.min_p) if pb.HasField("min_p") else d.min_p,
        repetition_penalty=_f32(pb.repetition_penalty) if pb.HasField("repetition_penalty") else d.repetition_penalty,
        presence_penalty=_f32(pb.presence_penalty) if pb.HasField("presence_penalty") else d.presence_penalty,
        seed=pb.seed if pb.HasField("seed") else None,
        stop=list(pb.stop),
        stop_token_ids=list(pb.stop_token_ids),
        ignore_eos=pb.ignore_eos,
        logprobs=pb.logprobs,
    )


# ---- plan --------------------------------------------------------------------------------------
def plan_to_proto(plan: StepPlan) -> worker_pb2.StepPlan:
    pb = worker_pb2.StepPlan(step_id=plan.step_id, finished_ids=plan.finished_ids)
    for r in plan.new_requests:
        n = pb.new_requests.add(
            request_id=r.request_id, token_ids=r.token_ids, num_prompt_tokens=r.num_prompt_tokens,
            num_computed_tokens=r.num_computed_tokens, num_new_tokens=r.num_new_tokens,
            block_ids=r.block_ids, seed=r.seed)
        sampling_to_proto(r.sampling, n.sampling)
        if r.adapter_id is not None:
            n.adapter_id = r.adapter_id
    add = pb.running.add
    for r in plan.running:
        if r.num_spec_tokens:
            add(request_id=r.request_id, num_new_tokens=r.num_new_tokens, new_block_ids=r.new_block_ids,
                num_spec_tokens=r.num_spec_tokens, draft_token_ids=r.draft_token_ids)
        else:
            add(request_id=r.request_id, num_new_tokens=r.num_new_tokens, new_block_ids=r.new_block_ids)
    return pb


def plan_from_proto(pb: worker_pb2.StepPlan) -> StepPlan:
    return StepPlan(
        step_id=pb.step_id,
        new_requests=[
            NewRequestPlan(
                request_id=n.request_id, token_ids=list(n.token_ids), num_prompt_tokens=n.num_prompt_tokens,
                num_computed_tokens=n.num_computed_tokens, num_new_tokens=n.num_new_tokens,
                block_ids=list(n.block_ids), sampling=sampling_from_proto(n.sampling), seed=n.seed,
                adapter_id=n.adapter_id if n.HasField("adapter_id") else None)
            for n in pb.new_requests],
        running=[RunningRequestPlan(r.request_id, r.num_new_tokens, list(r.new_block_ids), r.num_spec_tokens,
                                    list(r.draft_token_ids)) for r in pb.running],
        finished_ids=list(pb.finished_ids),
    )


# ---- result ------------------------------------------------------------------------------------
def result_to_proto(res: StepResult) -> worker_pb2.StepResult:
    pb = worker_pb2.StepResult(step_id=res.step_id, request_ids=res.request_ids, token_ids=res.token_ids,
                               execute_ms=res.execute_ms, num_emitted=res.num_emitted,
                               num_drafted=res.num_drafted, draft_ms=res.draft_ms)
    if res.logprobs is not None:
        pb.has_logprobs = True
        pb.logprobs.extend(res.logprobs)
    return pb


def result_from_proto(pb: worker_pb2.StepResult) -> StepResult:
    return StepResult(step_id=pb.step_id, request_ids=list(pb.request_ids), token_ids=list(pb.token_ids),
                      logprobs=list(pb.logprobs) if pb.has_logprobs else None, execute_ms=pb.execute_ms,
                      num_emitted=list(pb.num_emitted), num_drafted=list(pb.num_drafted), draft_ms=pb.draft_ms)
