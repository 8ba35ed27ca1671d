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
                 SeqPlan(4, [9], 17, [2, 3], False)], finished=[1, 2], return_logits=True)
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
