"""CallBatcher: a call goes out at once while its model has room; what waits merges into one
call when the model returns one, rows split back to each caller."""

from __future__ import annotations

import asyncio

import pytest
import torch

from asyncdiff.batching import CallBatcher, ModelCall, Slots
from asyncdiff.components import build_components
from asyncdiff.contract import Request
from asyncdiff.dataflow import denoise
from asyncdiff.generation import Generation
from asyncdiff.partition import partition_unet


class Model:
    """An executor that doubles its input, records each call's model and rows, and answers
    only when the test says so (``release``), as a busy model would."""

    def __init__(self, fail: str | None = None):
        self.calls: list[tuple[str, int]] = []
        self.waiting: list[tuple[asyncio.Future, dict]] = []
        self.fail = fail

    def __call__(self, model, inputs, outputs):
        x = inputs["x"]
        self.calls.append((model, x.shape[0]))
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((future, {"y": x * 2}))
        if model == self.fail:
            self.waiting[-1] = (future, RuntimeError(f"{model} failed"))
        return future

    async def release(self, n=None):
        """Answer the first ``n`` calls out (all), then let their callbacks run."""
        n = len(self.waiting) if n is None else n
        answered, self.waiting = self.waiting[:n], self.waiting[n:]
        for future, result in answered:
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
        for _ in range(3):
            await asyncio.sleep(0)


def batcher(model, **kw):
    return CallBatcher(model, rows=lambda t: t.shape[0], concat=lambda _, ts: torch.cat(ts),
                       split=lambda _, t, sizes: list(torch.split(t, sizes)), **kw)


def call(model, rows, value, width=1):
    return ModelCall(model, {"x": torch.full((rows, width), float(value))}, ["y"])


def test_a_call_goes_out_at_once_and_what_waited_goes_out_as_one_call():
    model = Model()

    async def main():
        b = batcher(model, depth=1)
        first = b.submit(call("c0", 2, 1))
        assert model.calls == [("c0", 2)]  # sent from inside submit: nothing to wait for
        later = [b.submit(call("c0", 2, v)) for v in (2, 3)] + [b.submit(call("c1", 2, 4))]
        assert model.calls == [("c0", 2), ("c1", 2)] and b.waiting("c0") == 2
        await model.release(1)  # c0's first call returns: the two that waited go as one
        assert model.calls[-1] == ("c0", 4) and b.waiting("c0") == 0
        await model.release()
        return [await f for f in [first] + later], b.stats

    outs, stats = asyncio.run(main())
    assert [float(o["y"][0]) for o in outs] == [2.0, 4.0, 6.0, 8.0]
    assert all(o["y"].shape == (2, 1) for o in outs)
    assert (stats.requested_calls, stats.model_calls, stats.rows) == (4, 3, 8)


def test_a_callers_next_call_queues_behind_its_last_unless_others_wait():
    model = Model()

    def own(owner, value):
        return ModelCall("c0", {"x": torch.full((2, 1), float(value))}, ["y"], owner)

    async def main():
        b = batcher(model)  # depth 2
        a = [b.submit(own("A", 0)), b.submit(own("A", 1))]
        assert model.calls == [("c0", 2), ("c0", 2)]  # A's second call queues in the model
        later = [b.submit(own("B", 2)), b.submit(own("A", 3))]  # B waits, so A's third does
        assert len(model.calls) == 2 and b.waiting("c0") == 2
        await model.release(1)
        assert len(model.calls) == 2  # A's second call is still out
        await model.release(1)
        assert model.calls[-1] == ("c0", 4)  # B and A's third as one call
        await model.release()
        return [float((await f)["y"][0]) for f in a + later]

    assert asyncio.run(main()) == [0.0, 2.0, 4.0, 6.0]


def test_calls_of_different_shapes_share_a_model_not_a_call():
    model = Model()

    async def main():
        b = batcher(model, depth=1, signature=lambda t: tuple(t.shape[1:]))
        busy = b.submit(call("c0", 2, 0))
        out = [b.submit(call("c0", 2, 1)), b.submit(call("c0", 2, 2, width=3)),
               b.submit(call("c0", 2, 3))]
        for _ in range(3):
            await model.release()
        await busy
        return [(await f)["y"].shape for f in out]

    assert asyncio.run(main()) == [(2, 1), (2, 3), (2, 1)]
    assert model.calls == [("c0", 2), ("c0", 4), ("c0", 2)]  # the two [2, 1] calls merged


def test_what_waited_is_cut_to_the_max_batch_and_instances_add_slots():
    model = Model()

    async def main():
        b = batcher(model, depth=1, max_rows={"c0": 4}, instances={"c1": 2})
        [b.submit(call("c0", 2, 0))] + [b.submit(call("c0", 2, v)) for v in range(3)]
        await model.release(1)
        c1 = [b.submit(call("c1", 2, v)) for v in range(6)]  # 2 go out, 4 wait
        assert model.calls[-2:] == [("c1", 2), ("c1", 2)]
        await model.release()
        await model.release()
        return c1

    asyncio.run(main())
    # 6 rows waited for c0, at most 4 per call (the second when the model has room again)
    assert [rows for m, rows in model.calls if m == "c0"] == [2, 4, 2]
    # two instances: two calls out at once; the 4 that waited go to the first one free
    assert [rows for m, rows in model.calls if m == "c1"] == [2, 2, 8]


def test_an_error_reaches_every_caller_of_that_call_only():
    model = Model(fail="bad")

    async def main():
        b = batcher(model, depth=1)
        calls = [b.submit(call("bad", 2, v)) for v in (1, 2)] + [b.submit(call("good", 2, 3))]
        await model.release()
        await model.release()
        return await asyncio.gather(*calls, return_exceptions=True)

    a, c, good = asyncio.run(main())
    assert isinstance(a, RuntimeError) and isinstance(c, RuntimeError)
    assert float(good["y"][0]) == 6.0


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



def test_generations_batched_together_equal_each_alone(small_unets):
    """Three generations with different steps, schedulers and seeds through one batcher
    (torch components, dataflow dispatch) give the latents each gives alone, to
    batched-kernel precision, in fewer model calls."""
    unet = small_unets["sd15"]
    part = partition_unet(unet, 2, model="sd15", height=16, width=16)
    comps = build_components(unet, part)
    config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
    reqs = [Request("x", seed=1, steps=4), Request("x", seed=2, steps=6, scheduler="euler"),
            Request("x", seed=3, steps=5, warmup=2, guidance_scale=5.0)]

    async def send(model, inputs, outputs):
        await asyncio.sleep(0.002)  # the model is busy a while: others' calls queue meanwhile
        k = int(model.rsplit("_", 1)[1])
        with torch.no_grad():
            return comps[k].run(dict(inputs))

    async def generate(b, req):
        gen = Generation(part, [req], {"encoder_hidden_states": text}, config)
        return await denoise(gen, lambda c: b.submit(ModelCall(c.model, c.inputs, c.output_names, gen)))

    async def main(together):
        b = CallBatcher(send, rows=lambda t: t.shape[0], concat=lambda _, ts: torch.cat(ts),
                        split=lambda _, t, sizes: list(torch.split(t, sizes)))
        if together:
            out = await asyncio.gather(*(generate(b, r) for r in reqs))
        else:
            out = [await generate(b, r) for r in reqs]
        return out, b.stats

    alone, alone_stats = asyncio.run(main(False))
    together, stats = asyncio.run(main(True))
    assert stats.model_calls < alone_stats.model_calls  # calls were merged
    for a, t in zip(alone, together):
        assert (a - t).abs().max().item() <= 1e-4
