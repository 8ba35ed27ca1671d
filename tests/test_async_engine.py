"""AsyncEngine's replica bookkeeping, with stand-in engines (no workers): a replica that gives up hands every
request it holds to a running replica, including requests sent while its last step ran."""

import asyncio
import threading

import pytest

from shardlm.engine import arg_utils
from shardlm.engine.executor import WorkerError
from shardlm.engine.recovery import Recovery
from shardlm.engine.sampling_params import SamplingParams
from shardlm.engine.sequence import CompletionOutput, RequestOutput
from shardlm.server import async_engine


class FakeEngine:
    """Finishes each request with one token per step; replica 0's first step blocks until `fail` is set,
    then raises what a crash loop raises."""

    fail = threading.Event()
    stepping = threading.Event()

    def __init__(self, args):
        self.index = args.first_device
        self.recovery = Recovery(0)
        self.max_model_len = 64
        self.requests: dict[str, list[int]] = {}

    def validate_prompt(self, ids):
        pass

    def validate_sampling(self, params):
        pass

    def add_request(self, rid, prompt, ids, params):
        self.requests[rid] = list(ids)

    def adopt_request(self, rid, prompt, metrics, ids):
        self.requests[rid] = ids

    def take_requests(self):
        taken = [(rid, None, None, ids) for rid, ids in self.requests.items()]
        self.requests = {}
        return taken

    def abort_request(self, rid):
        self.requests.pop(rid, None)

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        if self.index == 0:
            self.stepping.set()
            self.fail.wait(10)
            raise WorkerError("gave up replacing the worker group (test)")
        outputs = [RequestOutput(rid, None, ids, [CompletionOutput(0, f"from replica {self.index}", [1], None, None, "length")], True)
                   for rid, ids in self.requests.items()]
        self.requests = {}
        return outputs

    def shutdown(self):
        pass


@pytest.fixture
def engine(monkeypatch):
    monkeypatch.setattr(async_engine, "LLMEngine", FakeEngine)
    FakeEngine.fail.clear()
    FakeEngine.stepping.clear()
    eng = async_engine.AsyncEngine(arg_utils.EngineArgs(model="random:tiny-llama"), data_parallel_size=2)
    yield eng
    FakeEngine.fail.set()
    eng.shutdown()


async def _text(eng, prompt_ids):
    async for out in eng.generate(None, prompt_ids, SamplingParams(max_tokens=1)):
        if out.finished:
            return out.outputs[0].text


def test_requests_held_and_queued_by_a_failed_replica_move_to_the_other(engine):
    async def main():
        first = asyncio.create_task(_text(engine, [1]))  # replica 0 (both idle): its step blocks
        await asyncio.to_thread(FakeEngine.stepping.wait, 10)
        engine.replicas[1].pending["busy"] = None  # replica 1 looks busier: the next request goes to replica 0
        second = asyncio.create_task(_text(engine, [2]))  # queued in replica 0's inbox while its step runs
        await asyncio.sleep(0.1)
        assert engine._owner[next(iter(engine.replicas[0].pending))] is engine.replicas[0]
        assert len(engine.replicas[0].inbox) == 1
        del engine.replicas[1].pending["busy"]
        FakeEngine.fail.set()
        return await asyncio.wait_for(asyncio.gather(first, second), 10)

    assert asyncio.run(main()) == ["from replica 1", "from replica 1"]
    assert not engine.replicas[0].alive and engine.replicas[1].alive


def test_with_no_replica_left_the_requests_end_with_the_error(engine):
    engine.replicas[1].error = async_engine.EngineDead("gone")

    async def main():
        task = asyncio.create_task(_text(engine, [1]))
        await asyncio.to_thread(FakeEngine.stepping.wait, 10)
        FakeEngine.fail.set()
        with pytest.raises(async_engine.EngineDead, match="replica 0 failed: gave up"):
            await asyncio.wait_for(task, 10)

    asyncio.run(main())


class CountingEngine(FakeEngine):
    """Ten steps per request, one token each; steps as fast as it is asked."""

    def step(self):
        outputs = []
        for rid, ids in list(self.requests.items()):
            ids.append(len(ids))
            done = len(ids) == 10
            text = "".join(chr(97 + t) for t in ids)
            outputs.append(RequestOutput(rid, None, [], [CompletionOutput(0, text, list(ids), None, None,
                                                                          "length" if done else None)], done))
            if done:
                del self.requests[rid]
        return outputs


def test_a_slow_consumer_gets_the_newest_output_not_every_step(monkeypatch):
    """Outputs are snapshots: one that waited behind a newer one is skipped, so a stream that falls behind
    catches up in one event (and the engine thread wakes the event loop once per step, not per request)."""
    monkeypatch.setattr(async_engine, "LLMEngine", CountingEngine)
    eng = async_engine.AsyncEngine(arg_utils.EngineArgs(model="random:tiny-llama"), data_parallel_size=1)

    async def main():
        seen = []
        async for out in eng.generate(None, [], SamplingParams(max_tokens=10)):
            seen.append(out.outputs[0].token_ids)
            await asyncio.sleep(0.05)  # the engine runs all ten steps meanwhile
        return seen

    try:
        seen = asyncio.run(main())
    finally:
        eng.shutdown()
    assert seen[-1] == list(range(10)) and len(seen) < 10
    assert all(len(a) < len(b) for a, b in zip(seen, seen[1:]))
