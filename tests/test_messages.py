"""The typed driver <-> worker messages survive the wire (JSON header + raw arrays) unchanged."""

import socket

import numpy as np
import pytest

from shardlm.common import wire
from shardlm.common.messages import (
    DRIVER_MESSAGES,
    AllocateKV,
    Probe,
    ProfileStep,
    SampledToken,
    SamplingSpec,
    SeqPlan,
    Shutdown,
    Stats,
    StepPlan,
    StepResult,
    WorkerInit,
    WorkerOptions,
    WorkerReady,
)
from shardlm.common.model_source import resolve_model

PLAN = StepPlan([SeqPlan(3, [5, 6, 7], 0, [0, 1], True, SamplingSpec(0.7, 0.9, 40, 12345, 2)),
                 SeqPlan(4, [9], 17, [2, 3], False, blocks_from=5)], finished=[1, 2], return_logits=True)
OPTIONS = WorkerOptions(dtype="float32", device="cpu", max_model_len=64, block_size=16, gpu_memory_utilization=0.9,
                        cpu_kv_cache_bytes=1 << 20, profile_tokens=64, cpu_threads=1, stage_layers=[(0, 2)],
                        max_num_seqs=8, max_seq_len_to_capture=64, cuda_graphs=False, expert_placement=[None, None])


def _through_wire(msg, table):
    a, b = socket.socketpair()
    with a, b:
        wire.send_message(a, msg)
        return wire.recv_message(b, table)


@pytest.mark.parametrize("msg", [PLAN, AllocateKV(12), Stats(events=True), Probe([1024, 4096], 5, True),
                                 ProfileStep(PLAN), Shutdown(),
                                 WorkerInit({"tp": 2, "pp": 1, "dp": 1, "ep": 1}, resolve_model("random:tiny-llama"),
                                            OPTIONS, "tcp://127.0.0.1:1")])
def test_driver_messages_round_trip(msg):
    assert _through_wire(msg, DRIVER_MESSAGES) == msg


def test_worker_replies_round_trip():
    ready = WorkerReady(rank=1, load_s=0.5, blocks=100, block_bytes=4096, activation_bytes=7)
    assert _through_wire(ready, {WorkerReady.name: WorkerReady}) == ready
    logits = np.arange(6, dtype=np.float32).reshape(2, 3)
    result = StepResult([SampledToken(3, 8, -0.25, 2, [(1, -0.1), (8, -0.25)]), SampledToken(4, 0, -1.0, 1)],
                        exec_s=0.01, logits=logits)
    back = _through_wire(result, {StepResult.name: StepResult})
    assert back.tokens == result.tokens and back.exec_s == result.exec_s
    np.testing.assert_array_equal(back.logits, logits)


def test_an_unknown_message_is_refused_by_name():
    with pytest.raises(ValueError, match="unexpected message 'step'"):
        _through_wire(PLAN, {AllocateKV.name: AllocateKV})


def test_plan_properties():
    assert PLAN.num_tokens == 4 and not PLAN.is_decode
    assert PLAN.seqs[1].context_len == 18
    assert StepPlan([SeqPlan(1, [2], 5, [0], True)]).is_decode


def test_block_tables_travel_once_then_only_their_new_entries():
    """The driver sends a sequence's table whole, then the blocks it gained; a table that changed otherwise
    (preempted and given other blocks, or a new worker group) goes whole again; the worker rebuilds it."""
    from types import SimpleNamespace

    from shardlm.engine.llm_engine import LLMEngine
    from shardlm.engine.sampling_params import SamplingParams
    from shardlm.engine.sequence import Sequence
    from shardlm.worker.model_runner import ModelRunner

    seq = Sequence(7, "r", 0, [1, 2, 3], SamplingParams())
    worker = SimpleNamespace(block_tables={})

    def step(finished=()):
        blocks, start = LLMEngine._new_blocks(seq)
        plan = StepPlan([SeqPlan(seq.seq_id, [0], 0, blocks, True, blocks_from=start)], list(finished))
        plan = _through_wire(plan, DRIVER_MESSAGES)
        sent = (list(plan.seqs[0].blocks), plan.seqs[0].blocks_from)
        ModelRunner._complete_block_tables(worker, plan)
        assert plan.seqs[0].blocks == seq.blocks and plan.seqs[0].blocks_from == 0
        return sent

    seq.blocks = [4, 5]
    assert step() == ([4, 5], 0)
    assert step() == ([], 2)
    seq.blocks.append(9)
    assert step() == ([9], 2)
    seq.blocks = [8]  # preempted, then other blocks
    assert step() == ([8], 0)
    seq.reset_for_recompute()  # e.g. a new worker group: whole again even if the same blocks come back
    seq.blocks = [8, 3]
    assert step() == ([8, 3], 0)
    bad = StepPlan([SeqPlan(7, [0], 0, [1], True, blocks_from=5)])
    with pytest.raises(RuntimeError, match="continues its block table at entry 5, but this worker holds 2"):
        ModelRunner._complete_block_tables(worker, bad)
    ModelRunner._complete_block_tables(worker, StepPlan([], finished=[7]))
    assert worker.block_tables == {}
