"""CallBatcher: one call per model per tick across a cohort's callers, rows split back to each."""

from __future__ import annotations

import asyncio

import pytest
import torch

from asyncdiff.batching import CallBatcher, ModelCall, Slots
from asyncdiff.generation import Generation
from asyncdiff.contract import Request
from asyncdiff.partition import partition_unet
from asyncdiff.components import build_components


class Recorder:
    """An executor that doubles its input and records each call's model and rows."""

    def __init__(self, fail: str | None = None):
        self.calls: list[tuple[str, int]] = []
        self.fail = fail

    async def __call__(self, model, inputs, outputs):
        x = inputs["x"]
        self.calls.append((model, x.shape[0]))
        await asyncio.sleep(0)
        if model == self.fail:
            raise RuntimeError(f"{model} failed")
        return {"y": x * 2}


def batcher(executor, **kw):
    return CallBatcher(executor, rows=lambda t: t.shape[0], concat=lambda _, ts: torch.cat(ts),
                       split=lambda _, t, sizes: list(torch.split(t, sizes)), **kw)


def call(model, rows, value):
    return ModelCall(model, {"x": torch.full((rows, 1), float(value))}, ["y"])


async def member_loop(b, waves):
    """A generation-like caller: its waves one after another, inside a membership."""
    out = []
    async with b.member() as m:
        for wave in waves:
            out.append(await m.run(wave))
    return out


def test_members_waves_are_merged_per_model_and_split_back():
    rec = Recorder()

    async def main():
        b = batcher(rec)
        a = member_loop(b, [[call("c0", 2, 1), call("c1", 2, 10)], [call("c0", 2, 2)]])
        c = member_loop(b, [[call("c0", 2, 3)], [call("c0", 2, 4), call("c1", 2, 40)]])
        results = await asyncio.gather(a, c)
        await b.close()
        return b, results

    b, (ra, rc) = asyncio.run(main())
    # Tick 1: c0 [a, c] and c1 [a]; tick 2: c0 [a, c] and c1 [c].
    assert sorted(rec.calls) == sorted([("c0", 4), ("c1", 2), ("c0", 4), ("c1", 2)])
    assert [float(o["y"][0]) for o in ra[0]] == [2.0, 20.0] and float(ra[1][0]["y"][0]) == 4.0
    assert float(rc[0][0]["y"][0]) == 6.0 and [float(o["y"][0]) for o in rc[1]] == [8.0, 80.0]
    assert all(o["y"].shape == (2, 1) for wave in ra + rc for o in wave)
    assert (b.stats.ticks, b.stats.requested_calls, b.stats.model_calls, b.stats.rows) == (2, 6, 4, 12)


def test_calls_of_different_shapes_share_a_tick_not_a_call():
    rec = Recorder()

    async def main():
        b = batcher(rec, signature=lambda t: tuple(t.shape[1:]))
        small = ModelCall("c0", {"x": torch.ones(2, 1)}, ["y"])
        wide = ModelCall("c0", {"x": torch.ones(2, 3)}, ["y"])
        out = await asyncio.gather(b.run([small]), b.run([wide]), b.run([small]))
        await b.close()
        return out

    out = asyncio.run(main())
    assert sorted(rec.calls) == [("c0", 2), ("c0", 4)]  # the two [2, 1] calls merged
    assert [o[0]["y"].shape for o in out] == [(2, 1), (2, 3), (2, 1)]


def test_slots_are_taken_k_at_a_time_in_arrival_order():
    async def main():
        slots, order = Slots(4), []

        async def request(name, k, hold):
            await slots.acquire(k)
            order.append(name)
            await asyncio.sleep(hold)
            slots.release(k)

        # a holds 3; b (2) must wait, and c (1) arrives after b: it may not overtake b.
        tasks = [asyncio.ensure_future(request("a", 3, 0.02))]
        await asyncio.sleep(0)
        tasks.append(asyncio.ensure_future(request("b", 2, 0.01)))
        await asyncio.sleep(0)
        tasks.append(asyncio.ensure_future(request("c", 1, 0.01)))
        await asyncio.sleep(0)
        assert (slots.free, slots.waiting) == (1, 2)
        await asyncio.gather(*tasks)
        # a waiter cancelled in the queue leaves it; the next one is granted
        await slots.acquire(4)
        waiter = asyncio.ensure_future(slots.acquire(1))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        slots.release(4)
        with pytest.raises(ValueError):
            await slots.acquire(5)
        return order, slots.free, slots.waiting

    assert asyncio.run(main()) == (["a", "b", "c"], 4, 0)


def test_a_tick_waits_for_every_member():
    """A member still computing holds the tick back, so its call joins the others."""
    rec = Recorder()

    async def slow_member(b):
        async with b.member() as m:
            for _ in range(3):  # "CPU work" between joining and its first wave
                await asyncio.sleep(0)
            return await m.run([call("c0", 2, 5)])

    async def main():
        b = batcher(rec)
        await asyncio.gather(member_loop(b, [[call("c0", 2, 1)]]), slow_member(b))
        await b.close()

    asyncio.run(main())
    assert rec.calls == [("c0", 4)]


def test_cohorts_step_apart_and_a_cohort_does_not_wait_for_the_other():
    """Four members in two cohorts (joined alternately): while member 1 (cohort 1) is still
    computing, cohort 0's tick goes out without it; one cohort's tick is in flight while the
    other fires. With one cohort, the same members make one call."""

    def run(cohorts):
        in_flight, most, calls = 0, 0, []

        async def execute(model, inputs, outputs):
            nonlocal in_flight, most
            calls.append((model, inputs["x"][:, 0].tolist()))
            in_flight += 1
            most = max(most, in_flight)
            await asyncio.sleep(0.01)
            in_flight -= 1
            return {"y": inputs["x"] * 2}

        async def member(b, value, delay):
            async with b.member() as m:
                await asyncio.sleep(delay)  # "CPU work" before its wave
                return (await m.run([call("c0", 1, value)]))[0]["y"].item()

        async def main():
            b = batcher(execute, cohorts=cohorts)
            out = await asyncio.gather(*(member(b, v, 0.005 if v == 1 else 0) for v in range(4)))
            await b.close()
            return out

        return asyncio.run(main()), calls, most

    out, calls, most = run(2)
    assert out == [0.0, 2.0, 4.0, 6.0]
    assert calls == [("c0", [0.0, 2.0]), ("c0", [3.0, 1.0])] and most == 2  # rows as submitted
    out, calls, most = run(1)
    assert out == [0.0, 2.0, 4.0, 6.0] and calls == [("c0", [0.0, 2.0, 3.0, 1.0])] and most == 1
    with pytest.raises(ValueError, match="cohorts"):
        batcher(Recorder(), cohorts=0)


def test_groups_over_the_models_max_batch_are_split_and_repeats_can_stay_lanes():
    rec = Recorder()

    async def main():
        b = batcher(rec, max_rows={"c0": 4})
        await asyncio.gather(*(member_loop(b, [[call("c0", 2, i)]]) for i in range(3)))
        lanes = batcher(rec, separate_repeats=True)
        await asyncio.gather(member_loop(lanes, [[call("c1", 2, 1), call("c1", 2, 2)]]),
                             member_loop(lanes, [[call("c1", 2, 3), call("c1", 2, 4)]]))
        merged = batcher(rec)
        await member_loop(merged, [[call("c1", 2, 1), call("c1", 2, 2)]])
        for x in (b, lanes, merged):
            await x.close()

    asyncio.run(main())
    assert rec.calls[:2] == [("c0", 4), ("c0", 2)]  # 6 rows, at most 4 per call
    assert rec.calls[2:4] == [("c1", 4), ("c1", 4)]  # lane 0 and lane 1, each across callers
    assert rec.calls[4:] == [("c1", 4)]  # batched stride: the pair as one call


def test_an_error_reaches_every_caller_of_that_call_only():
    rec = Recorder(fail="bad")

    async def main():
        b = batcher(rec)
        results = await asyncio.gather(member_loop(b, [[call("bad", 2, 1)]]),
                                       member_loop(b, [[call("bad", 2, 2)]]),
                                       member_loop(b, [[call("good", 2, 3)]]),
                                       return_exceptions=True)
        await b.close()
        return results

    a, c, good = asyncio.run(main())
    assert isinstance(a, RuntimeError) and isinstance(c, RuntimeError)
    assert float(good[0][0]["y"][0]) == 6.0


@pytest.mark.parametrize("cohorts", [1, 2])
def test_generations_batched_together_equal_each_alone(small_unets, cohorts):
    """Three generations with different steps, schedulers and seeds through one batcher
    (torch components; one or two cohorts) give the latents each gives alone, to
    batched-kernel precision."""
    unet = small_unets["sd15"]
    part = partition_unet(unet, 2, model="sd15", height=16, width=16)
    comps = build_components(unet, part)
    config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
    reqs = [Request("x", seed=1, steps=4), Request("x", seed=2, steps=6, scheduler="euler"),
            Request("x", seed=3, steps=5, warmup=2, guidance_scale=5.0)]

    async def execute(model, inputs, outputs):
        k = int(model.rsplit("_", 1)[1])
        with torch.no_grad():
            return comps[k].run(dict(inputs))

    async def generate(b, req):
        gen = Generation(part, [req], {"encoder_hidden_states": text}, config)
        async with b.member() as m:
            for i in range(gen.steps):
                for wave in gen.waves(i):
                    gen.record(wave, await m.run(wave))
                gen.advance(i)
        return gen.latents

    async def main(together):
        b = CallBatcher(execute, rows=lambda t: t.shape[0], concat=lambda _, ts: torch.cat(ts),
                        split=lambda _, t, sizes: list(torch.split(t, sizes)), cohorts=cohorts)
        if together:
            out = await asyncio.gather(*(generate(b, r) for r in reqs))
        else:
            out = [await generate(b, r) for r in reqs]
        await b.close()
        return out, b.stats

    alone, alone_stats = asyncio.run(main(False))
    together, stats = asyncio.run(main(True))
    assert stats.model_calls < alone_stats.model_calls  # calls were merged
    for a, t in zip(alone, together):
        assert (a - t).abs().max().item() <= 1e-4
