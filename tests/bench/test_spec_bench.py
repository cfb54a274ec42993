"""`bench compare --speculative` (bench/spec_bench.py) arithmetic and the copy-heavy workload, without a model:
per-chunk gaps beside per-token ITL, the eval guard's verdicts, the best configuration, the goal ratios."""
from __future__ import annotations

import pytest

from bench import spec_bench as S, workloads
from bench.eval import Answer
from bench.metrics import itls_from_chunks


def test_copy_heavy_is_seeded_and_alternates_code_edits_and_rag_quotes():
    a = workloads.copy_heavy(6, "40-50", seed=3)
    again = workloads.copy_heavy(6, "40-50", seed=3)
    assert [(r.prompt, r.max_tokens) for r in a] == [(r.prompt, r.max_tokens) for r in again]
    assert [r.prompt for r in a] != [r.prompt for r in workloads.copy_heavy(6, "40-50", seed=4)]
    assert [r.group[:3] for r in a] == ["cod", "rag"] * 3
    assert all(40 <= r.max_tokens <= 50 for r in a)
    # completion-style: the answer starts where the copy starts
    assert all(r.prompt.endswith("(the whole file)\n") for r in a[0::2])
    assert all(r.prompt.endswith('word for word: "') for r in a[1::2])
    assert workloads.build("copy-heavy", None, 2, output_len="8", seed=0)[0].max_tokens == 8


def test_chunk_gaps_are_per_chunk_where_itl_is_per_token():
    chunks = [(1.00, 1), (1.10, 4), (1.14, 1), (1.30, 0)]     # a 4-token verification step, then one token
    assert S.chunk_gaps(chunks) == pytest.approx([0.10, 0.04])
    assert itls_from_chunks(chunks) == pytest.approx([0.025] * 4 + [0.04])


def test_eval_guard_verdicts_follow_bench_eval_rules():
    items = [{"id": f"i{k}", "category": "c", "answers": ["x"]} for k in range(4)]
    ref = [Answer("x", [1]), Answer("x", [2]), Answer("y", [3]), Answer("y", [4])]
    assert S.eval_guard(items, ref, None)["verdict"] == "reference"
    assert S.eval_guard(items, list(ref), ref)["verdict"] == "identical tokens"
    same_score = [Answer("x", [1]), Answer("x", [2, 9]), Answer("y", [3]), Answer("y", [4])]
    g = S.eval_guard(items, same_score, ref)
    assert g["verdict"] == "within tolerance" and g["changed"] == 1 and g["changed_ids"] == ["i1"]
    worse = [Answer("y", [7]), Answer("x", [2]), Answer("y", [3]), Answer("y", [4])]
    assert S.eval_guard(items, worse, ref)["verdict"] == "FAIL: accuracy"


def _cell(itl=10.0, gap=10.0, tok_s=100.0):
    return {"itl_ms": {"p50": itl}, "chunk_gap_ms": {"p50": gap}, "output_tok_s": tok_s}


def test_goal_ratios_and_the_best_configuration():
    rep = {"workloads": ["copy-heavy", "chat"], "cells": {
        "cb": {"copy-heavy": {"low": _cell(20.0, 20.0, 50.0), "saturation": _cell(tok_s=200.0)},
               "chat": {"low": _cell(tok_s=50.0), "saturation": _cell(tok_s=200.0)}},
        "cb+prompt_lookup": {"copy-heavy": {"low": _cell(8.0, 30.0, 120.0), "saturation": _cell(tok_s=150.0)},
                             "chat": {"low": _cell(tok_s=50.0), "saturation": _cell(tok_s=150.0)}},
        "cb+adaptive": {"copy-heavy": {"low": _cell(9.0, 28.0, 110.0), "saturation": _cell(tok_s=210.0)},
                        "chat": {"low": _cell(tok_s=50.0), "saturation": _cell(tok_s=192.0)}}}}
    g = S.goals(rep)
    assert g["low_copy_itl_p50_cb_over_prompt_lookup"] == 2.5 and g["low_copy_itl_goal_met"]
    assert g["low_copy_chunk_gap_p50_cb_over_prompt_lookup"] == 20.0 / 30.0
    assert g["saturation_tok_s_adaptive_over_off"] == {"copy-heavy": 1.05, "chat": 0.96}
    assert g["saturation_tok_s_ratio_min"] == 0.96 and g["saturation_goal_met"]
    rep["cells"]["cb+adaptive"]["chat"]["saturation"] = _cell(tok_s=180.0)
    assert not S.goals(rep)["saturation_goal_met"]
    # geometric mean of tok/s over cb across the cells: adaptive keeps saturation, prompt lookup loses it
    assert S.best_spec_config(rep, ["cb+prompt_lookup", "cb+adaptive"]) == "cb+adaptive"


def test_every_configuration_of_the_study():
    names = [c.name for c in S.base_configs(["prompt_lookup", "suffix", "self_draft"], "ngram")]
    assert names == ["cb", "cb+pc", "cb+prompt_lookup", "cb+suffix", "cb+self_draft", "cb+adaptive"]
    over = {c.name: c.engine_overrides() for c in S.base_configs(["suffix"], "ngram")}
    assert over["cb"] == {"enable_prefix_caching": False, "speculative_method": "off", "speculative_adaptive": True}
    assert over["cb+suffix"]["speculative_adaptive"] is False and over["cb+adaptive"]["speculative_method"] == "ngram"
