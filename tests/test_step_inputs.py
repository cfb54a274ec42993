"""Step inputs: a persistent block table and per-step arrays whose size depends on the batch and
the blocks that changed, never on the model's context length."""
from __future__ import annotations

import pytest
import torch

from workers.engine.attention import build_attention_metadata
from workers.engine.sampling_params import SamplingParams
from workers.engine.step_inputs import BlockTable, SeqSlot, StepInputs

BS = 4
GREEDY = SamplingParams(temperature=0.0)


def test_block_table_rows_are_written_once_and_reused():
    t = BlockTable(max_rows=2, max_cols=8, device=torch.device("cpu"))
    a = t.add([7, 3])
    b = t.add([5])
    t.append(a, [9])
    assert t.np[a, :3].tolist() == [7, 3, 9] and t.np[b, :1].tolist() == [5]
    t.remove(a)
    c = t.add([1, 2])                 # the freed row is reused
    assert c == a and t.np[c, :2].tolist() == [1, 2] and t.num_blocks[c] == 2


def test_block_table_grows_past_its_rows_and_keeps_contents():
    t = BlockTable(max_rows=1, max_cols=4, device=torch.device("cpu"), mirror=True)

    def sync():                                   # what StepInputs.prepare does on the device
        idx, val = t.take_updates()
        t.device_table.view(-1)[torch.from_numpy(idx)] = torch.from_numpy(val).to(torch.int32)

    r0 = t.add([4, 5])
    sync()
    r1 = t.add([6])                               # no free row: the table doubles
    sync()
    assert t.rows == 2 and t.generation == 1
    assert t.np[r0, :2].tolist() == [4, 5] and t.device_table[r0, :2].tolist() == [4, 5]
    assert t.np[r1, 0] == 6 and t.device_table[r1, 0] == 6


def test_block_table_refuses_a_row_longer_than_the_context():
    t = BlockTable(max_rows=1, max_cols=2, device=torch.device("cpu"))
    r = t.add([1, 2])
    with pytest.raises(ValueError, match="max_blocks_per_seq=2"):
        t.append(r, [3])


def test_mirror_updates_carry_only_the_entries_written():
    t = BlockTable(max_rows=4, max_cols=1024, device=torch.device("cpu"), mirror=True)
    r = t.add([10, 11, 12])
    idx, val = t.take_updates()
    assert val.tolist() == [10, 11, 12] and idx.tolist() == [r * 1024, r * 1024 + 1, r * 1024 + 2]
    t.append(r, [13])
    idx, val = t.take_updates()
    assert idx.tolist() == [r * 1024 + 3] and val.tolist() == [13]
    assert t.take_updates()[0].size == 0


def _seat(inputs: StepInputs, tokens: list[int], blocks: list[int], computed: int) -> SeqSlot:
    row = inputs.seat(blocks, GREEDY, seed=1)
    return SeqSlot(list(tokens), len(tokens), computed, row, GREEDY, 1)


@pytest.mark.parametrize("pack", [False, True])
def test_prepare_matches_the_reference_metadata(pack):
    """A mixed step (fresh prefill, prefill after a prefix hit, decodes) laid out by StepInputs gives
    the same slots, lengths and tables as build_attention_metadata on plain lists; pack=True is the
    CUDA layout (one staging buffer, a mirrored table patched with the changes) run on the CPU."""
    inputs = StepInputs(max_rows=8, max_blocks_per_seq=16, block_size=BS, device=torch.device("cpu"),
                        vocab_size=100, pack=pack)
    inputs.seat([0], GREEDY, 0)               # an occupied row, so rows and batch order differ
    a = _seat(inputs, list(range(1, 7)), [30, 3], 0)             # fresh prefill of 6
    b = _seat(inputs, list(range(1, 10)), [7, 12, 1], 5)         # 5 cached + a chunk of 4
    c = _seat(inputs, list(range(1, 10)), [20, 21, 22], 8)       # decode at context 9
    d = _seat(inputs, list(range(1, 4)), [4], 2)                 # decode at context 3
    step = inputs.prepare([("a", a, 6), ("b", b, 4), ("c", c, 1), ("d", d, 1)])
    want = build_attention_metadata([(6, 6, [30, 3]), (4, 9, [7, 12, 1])],
                                     [(9, [20, 21, 22]), (3, [4])], BS, "cpu")
    m = step.meta
    assert m.slot_mapping.tolist() == want.slot_mapping.tolist()
    assert step.positions.tolist() == [0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 8, 2]
    assert step.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 6, 7, 8, 9, 9, 3]
    assert m.prefill_query_lens == [6, 4] and m.prefill_context_lens == [6, 9]
    assert m.prefill_query_start_loc.tolist() == [0, 6, 10] and m.prefill_seq_lens.tolist() == [6, 9]
    assert m.decode_context_lens.tolist() == [9, 3] and m.max_decode_context_len == 9
    tables = m.decode_tables(BS)               # just the 3 columns the longest decode (9 tokens) needs
    assert tables.shape == (2, 3) and tables[0].tolist() == [20, 21, 22] and tables[1, 0] == 4
    for i, blocks in enumerate([[30, 3], [7, 12, 1]]):
        assert m.prefill_block_table(i)[:len(blocks)].tolist() == blocks
    assert step.sample_idx.tolist() == [5, 9, 10, 11]            # each segment reached its last token
    assert [rid for rid, _ in step.sample_seqs] == ["a", "b", "c", "d"]
    assert step.sampling.all_greedy and step.sampling.steps.tolist() == [0, 0, 0, 0]
    assert torch.equal(inputs.table.device_table[:, :4], inputs.table.host[:, :4])


def test_sampling_settings_come_from_the_rows():
    inputs = StepInputs(max_rows=4, max_blocks_per_seq=4, block_size=BS, device=torch.device("cpu"), vocab_size=50)
    hot = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, seed=3)
    r1 = inputs.seat([1], GREEDY, 11)
    r2 = inputs.seat([2], hot, 3)
    s1 = SeqSlot([1, 2, 3], 2, 2, r1, GREEDY, 11)
    s2 = SeqSlot([4, 5], 2, 1, r2, hot, 3)
    t = inputs.prepare([("x", s1, 1), ("y", s2, 1)]).sampling
    assert t.temperatures.tolist() == pytest.approx([0.0, 0.7]) and t.top_ks.tolist() == [0, 5]
    assert t.top_ps.tolist() == pytest.approx([1.0, 0.9]) and t.seeds.tolist() == [11, 3]
    assert t.steps.tolist() == [1, 0]                  # the index of the output token being sampled
    assert not t.all_greedy and t.any_top_k and t.candidates_only and t.sort_width == 5


def _decode_step_bytes(max_model_len: int, batch: int = 8) -> tuple[int, int]:
    """Seat `batch` requests holding 40 tokens each, prepare one decode step; return the bytes the
    step wrote and how many block-table columns exist."""
    max_cols = -(-max_model_len // 16)
    inputs = StepInputs(max_rows=batch, max_blocks_per_seq=max_cols, block_size=16, device=torch.device("cpu"),
                        vocab_size=1000, pack=True)
    work = []
    for i in range(batch):
        st = _seat(inputs, list(range(40)), [3 * i, 3 * i + 1, 3 * i + 2], 39)
        work.append((f"r{i}", st, 1))
    inputs.prepare(work)                                 # the admission step writes the new rows
    for _, st, _ in work:
        st.token_ids.append(7)
    step = inputs.prepare(work)
    assert step.num_tokens == batch
    return inputs.last_bytes, max_cols


def test_decode_step_writes_the_same_bytes_at_any_context_length():
    short, cols_short = _decode_step_bytes(2048)
    long, cols_long = _decode_step_bytes(131072)
    assert cols_long == 64 * cols_short                  # the table itself is 64x wider...
    assert long == short                                 # ...and a step writes exactly as much
    assert short < 8 * 8 * 20                            # O(batch): a few words per request


def test_engine_decode_step_bytes_do_not_depend_on_max_model_len():
    """The real runner on a tiny model: a decode step's input bytes at context 2,048 and 131,072."""
    from batcher.engine import Engine
    from workers.engine.config import EngineConfig
    from workers.engine.loader import load_model

    loaded = load_model("random", random_weights="tiny", seed=0)
    loaded.config.max_position_embeddings = 131072
    got = {}
    for L in (2048, 131072):
        eng = Engine(loaded, EngineConfig(num_kv_blocks=L // 16, max_model_len=L, use_cuda_graphs=False,
                                          max_num_seqs=4))
        for i in range(4):
            eng.add_request([5 + i] * 20, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        eng.step()                                       # prefill
        eng.step()                                       # a decode step
        got[L] = (eng.runner.last_step_input_bytes, eng.runner.inputs.table.max_cols)
    assert got[131072][1] == 64 * got[2048][1]
    assert got[131072][0] == got[2048][0]
