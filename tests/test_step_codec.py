from kv_manager.event_codec import kv_events_from_proto, kv_events_to_proto
from kv_manager.events import CLEARED, REMOVED, STORED, KvEvent
from protos.switchyard.v1 import common_pb2, worker_pb2
from workers.engine.plan import NewRequestPlan, RunningRequestPlan, StepPlan, StepResult
from workers.engine.sampling_params import SamplingParams
from workers.step_codec import (
    plan_from_proto,
    plan_to_proto,
    result_from_proto,
    result_to_proto,
    sampling_from_proto,
    sampling_to_proto,
)


def _plan() -> StepPlan:
    sp = SamplingParams(max_tokens=7, temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                        presence_penalty=-0.5, seed=2**62 + 3, stop=["\n\n", "END"], stop_token_ids=[2, 3],
                        ignore_eos=True, logprobs=True)
    return StepPlan(
        step_id=41,
        new_requests=[NewRequestPlan("a", [1, 2, 3, 4, 5], 4, 0, 5, [7, 8], sp, seed=99, adapter_id="lora-x"),
                      NewRequestPlan("b", [9] * 40, 40, 32, 8, [1, 2, 3], SamplingParams(temperature=0.0), seed=0)],
        running=[RunningRequestPlan("c", 1, []), RunningRequestPlan("d", 16, [11, 12])],
        finished_ids=["e", "f"])


def test_plan_round_trip_is_exact():
    plan = _plan()
    wire = plan_to_proto(plan).SerializeToString()
    assert plan_from_proto(worker_pb2.StepPlan.FromString(wire)) == plan


def test_empty_plan_round_trip():
    assert plan_from_proto(plan_to_proto(StepPlan(step_id=0))) == StepPlan(step_id=0)


def test_result_round_trip():
    res = StepResult(step_id=3, request_ids=["a", "b"], token_ids=[5, 49151], logprobs=[-0.5, -2.25], execute_ms=1.5)
    assert result_from_proto(worker_pb2.StepResult.FromString(result_to_proto(res).SerializeToString())) == res
    res2 = StepResult(step_id=4, request_ids=["a"], token_ids=[1], logprobs=None)
    assert result_from_proto(result_to_proto(res2)) == res2
    res3 = StepResult(step_id=5, logprobs=[])   # asked for, none sampled: stays [] not None
    assert result_from_proto(result_to_proto(res3)).logprobs == []


def test_unset_sampling_fields_take_defaults_and_explicit_zero_survives():
    assert sampling_from_proto(common_pb2.SamplingParams()) == SamplingParams()
    sp = sampling_from_proto(common_pb2.SamplingParams(max_tokens=0, temperature=0.0))
    assert sp.max_tokens == 0 and sp.temperature == 0.0
    assert sampling_from_proto(sampling_to_proto(SamplingParams(seed=None))).seed is None


def test_kv_event_batch_round_trip():
    events = [KvEvent(STORED, [1, 2**64 - 1], parent_hash=5, token_ids=list(range(32)), adapter_id=None, block_size=16),
              KvEvent(STORED, [3], parent_hash=None, token_ids=[1] * 16, adapter_id="a", block_size=16),
              KvEvent(REMOVED, [1, 2], block_size=16), KvEvent(CLEARED, [], block_size=16)]
    batch = kv_events_to_proto("w0", 7, events)
    assert batch.seq == 7 and batch.worker_id == "w0"
    assert kv_events_from_proto(type(batch).FromString(batch.SerializeToString())) == events
