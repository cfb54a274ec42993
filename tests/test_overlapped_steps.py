"""Overlapped steps in one process (ModelRunner.launch / InFlightStep.result, EngineCore.step).

On CUDA the engine launches step N+1 - scheduled, laid out and queued on the device - before it
reads step N's sampled tokens; a decode whose input is one of those tokens reads it on the
device. That must change nothing but timing: the same tokens, finish reasons and text as steps
run one at a time, through chunked prefill, stop conditions, seeded sampling and penalties (which
need the host history, so the runner resolves the step in flight first). Checked on the CPU with
the overlap turned on.
"""
from __future__ import annotations

from batcher.engine import Engine
from workers.engine import EngineConfig, SamplingParams
from workers.engine.plan import NewRequestPlan, RunningRequestPlan, StepPlan

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,",
           "List three primary colors:", "1, 2, 3, 4, 5,", "Q: What is the boiling point of water?\nA:",
           "Write a haiku about trains:"]


def params() -> list[SamplingParams]:
    return [SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[30]),
            SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
            SamplingParams(max_tokens=24, temperature=0.0, stop=["wizard"]),
            SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
            SamplingParams(max_tokens=12, temperature=0.8, top_k=40, seed=7, ignore_eos=True),
            SamplingParams(max_tokens=4, temperature=0.0, repetition_penalty=1.3, ignore_eos=True),
            SamplingParams(max_tokens=1, temperature=0.0)]


def generate(smollm2, overlap: bool, **kw):
    eng = Engine(smollm2, EngineConfig(**{"num_kv_blocks": 256, "max_num_batched_tokens": 24, **kw}))
    eng.runner.overlap_steps = overlap
    prepare, eng.late_inputs = eng.runner.inputs.prepare, 0

    def counting_prepare(work, **kw):          # how many inputs were still on the device
        eng.late_inputs += sum(st.pending for _, st, _ in work)
        return prepare(work, **kw)
    eng.runner.inputs.prepare = counting_prepare
    outs = eng.generate(PROMPTS, params())
    return [(o.token_ids, o.finish_reason, o.text) for o in outs], eng


def test_overlapped_steps_give_the_same_outputs(smollm2):
    want, _ = generate(smollm2, overlap=False)
    got, eng = generate(smollm2, overlap=True)
    assert got == want
    assert eng.late_inputs >= 15                 # the overlapped path really ran (20 here)
    assert [len(t) for t, _, _ in got][1] == 3 and got[6][1] == "length"


def test_a_decode_reads_the_token_still_on_the_device(smollm2):
    """launch(N+1) before N's result: the decode's input is N's sample, read through pending_src."""
    eng = Engine(smollm2, EngineConfig(num_kv_blocks=64))
    runner = eng.runner
    ids = eng.tokenizer.encode("The capital of France is")
    sp = SamplingParams(max_tokens=4, temperature=0.0)
    first = runner.launch(StepPlan(1, new_requests=[NewRequestPlan("a", ids, len(ids), 0, len(ids), [0, 1], sp, 0)]))
    second = runner.launch(StepPlan(2, running=[RunningRequestPlan("a", 1)]))
    assert runner.seqs["a"].pending == 2          # two tokens sampled, none read yet
    t1, t2 = first.result().token_ids, second.result().token_ids
    assert runner.seqs["a"].token_ids[len(ids):] == t1 + t2 and runner.seqs["a"].pending == 0

    ref = Engine(smollm2, EngineConfig(num_kv_blocks=64))
    out = ref.generate([ids], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))[0]
    assert t1 + t2 == out.token_ids
