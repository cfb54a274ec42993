"""ModelRunner paths that matter on CUDA, checked on CPU: the padded static-buffer decode path
used for CUDA-graph replay must give the same hidden states as the eager path."""
from __future__ import annotations

import torch

from batcher.engine import Engine
from workers.engine.config import EngineConfig
from workers.engine.loader import load_model
from workers.engine.model_runner import DecodeGraphs, graph_batch_sizes
from workers.engine.sampling_params import SamplingParams


def test_graph_batch_sizes_cover_every_batch():
    sizes = graph_batch_sizes(64)
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 64
    assert all(any(s >= b for s in sizes) for b in range(1, 65))
    assert graph_batch_sizes(3) == [1, 2, 3]


def test_padded_static_decode_matches_eager():
    loaded = load_model("smollm2-135m", random_weights="tiny", seed=0)
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13], [21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37]]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    eager = Engine(loaded, EngineConfig(num_kv_blocks=64, use_cuda_graphs=False))
    want = [o.token_ids for o in eager.generate(prompts, greedy)]

    static = Engine(loaded, EngineConfig(num_kv_blocks=64, use_cuda_graphs=False))
    graphs = DecodeGraphs(static.runner, [1, 2, 4], capture_graphs=False)
    calls = []
    real_run = graphs.run
    graphs.run = lambda step: calls.append(step.num_tokens) or real_run(step)
    static.runner.decode_graphs = graphs
    got = [o.token_ids for o in static.generate(prompts, greedy)]
    assert got == want
    assert 3 in calls            # a batch of 3 ran padded to 4
    assert torch.all(graphs.slots[3:] == -1)
