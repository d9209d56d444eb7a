"""Dataflow dispatch (asyncdiff.dataflow) equals the wave driver bit for bit, whatever order
the calls finish in, and sends the calls that need no scheduler step before it runs."""

import asyncio
import random

import pytest
import torch

from asyncdiff.contract import Request
from asyncdiff.dataflow import denoise
from asyncdiff.pipeline import AsyncDiffPipeline

REQUEST = Request("a handwritten digit 3", seed=5, steps=7, guidance_scale=3.0)


@pytest.fixture(scope="module")
def sd():
    from asyncdiff.tiny import load_pipeline

    torch.manual_seed(0)
    return load_pipeline()


def run_dataflow(gen, runner, seed=None, events=None, depth=2):
    """Dataflow on an executor that computes each call at once but finishes the calls out in
    a shuffled order (``seed``) or in the order they went out (None)."""
    rng = random.Random(seed)

    async def main():
        out = []  # (future, call) not finished yet

        def submit(call):
            if events is not None:
                events.append(("call", call.component, call.step, call.lane))
            future = asyncio.get_running_loop().create_future()
            out.append((future, runner.run_wave([call])[0]))
            asyncio.get_running_loop().call_soon(finish_one)
            return future

        def finish_one():
            if out:
                future, outputs = out.pop(rng.randrange(len(out)) if seed is not None else 0)
                future.set_result(outputs)

        def on_step(i):
            if events is not None:
                events.append(("advance", i))

        return await denoise(gen, submit, on_step, depth=depth)

    return asyncio.run(main())


CASES = {  # id -> AsyncDiffPipeline keywords, request overrides
    "n1": (dict(components=1), {}),
    "n2s1": (dict(components=2), {}),
    "n3s1-w2": (dict(components=3), dict(warmup=2)),
    "n4s1": (dict(components=4), {}),
    "n2s2": (dict(components=2, stride=2), {}),
    "n3s2-w2": (dict(components=3, stride=2), dict(warmup=2)),
    "n2s2-batched": (dict(components=2, stride=2, batched_stride=True), {}),
    "n3s1-ring": (dict(components=3, layout="outer-ring"), {}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("order", [None, 1, 2])
def test_dataflow_equals_waves_bit_for_bit(sd, case, order):
    kwargs, overrides = CASES[case]
    pipe = AsyncDiffPipeline(sd, **kwargs)
    req = Request(**{**REQUEST.__dict__, **overrides})
    waves = pipe.generation(req).run(pipe.runner.run_wave)
    gen = pipe.generation(req)
    dataflow = run_dataflow(gen, pipe.runner, seed=order)
    assert gen.done
    assert torch.equal(dataflow, waves)


@pytest.mark.parametrize("components, order", [(3, None), (3, 4), (4, 5)])
def test_calls_that_need_no_scheduler_step_go_out_before_it(sd, components, order):
    """Whenever a scheduler step runs, every lane but component 0's has its next call out
    already, unless that call still waits for an activation or for its own lane."""
    pipe = AsyncDiffPipeline(sd, components=components)
    gen = pipe.generation(REQUEST)
    checked = []
    advance = gen.advance

    def checking_advance(step):
        for (component, lane), units in gen._lanes.items():
            if component == 0 or gen._issued[(component, lane)] == len(units):
                continue
            step_next, positions = units[gen._issued[(component, lane)]]
            call = gen.plan.steps[step_next].calls[positions[0]]
            assert not gen.cache.has_inputs(call) or gen._in_flight[(component, lane)] == 2
        checked.append(step)
        advance(step)

    gen.advance = checking_advance
    run_dataflow(gen, pipe.runner, seed=order)
    assert checked == list(range(REQUEST.steps))


def test_stride_copies_take_their_own_lane(sd):
    pipe = AsyncDiffPipeline(sd, components=2, stride=2)
    events = []
    run_dataflow(pipe.generation(REQUEST), pipe.runner, events=events)
    copies = [e for e in events if e[0] == "call" and e[3] == 1]
    rounds = [st.step for st in pipe.generation(REQUEST).plan.steps if st.stride_copy]
    assert [e[2] for e in copies] == rounds and all(e[1] == 1 for e in copies)


def test_depth_one_waits_for_the_components_own_call(sd):
    """depth=1: no lane ever has two calls out (the result is the same)."""
    pipe = AsyncDiffPipeline(sd, components=2)
    gen = pipe.generation(REQUEST)
    seen = []
    original = gen.ready_calls

    def spy(depth=2):
        calls = original(depth)
        seen.append(max(gen._in_flight.values()))
        return calls

    gen.ready_calls = spy
    latents = run_dataflow(gen, pipe.runner, seed=3, depth=1)
    assert max(seen) == 1
    assert torch.equal(latents, pipe.generation(REQUEST).run(pipe.runner.run_wave))


def test_an_error_ends_the_generation_and_late_outputs_are_dropped(sd):
    pipe = AsyncDiffPipeline(sd, components=2)
    gen = pipe.generation(REQUEST)

    async def main():
        loop = asyncio.get_running_loop()

        def submit(call):
            future = loop.create_future()
            if call.step == 2 and call.component == 1:
                loop.call_soon(future.set_exception, RuntimeError("unet_part_1 failed"))
            else:
                loop.call_later(0.01, future.set_result, pipe.runner.run_wave([call])[0])
            return future

        with pytest.raises(RuntimeError, match="unet_part_1 failed"):
            await denoise(gen, submit)
        await asyncio.sleep(0.05)  # the calls still out finish; nothing is recorded or raised

    asyncio.run(main())
    assert not gen.done
