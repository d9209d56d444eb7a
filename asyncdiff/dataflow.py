"""Dataflow dispatch: every component call goes out as soon as its inputs exist.

The wave driver (``Generation.run``) waits for a whole step before the next one,
so guidance, the scheduler step and the conversions sit between every two rounds
on the path of every component.  Only component 0 needs the new latents: component
k >= 1 reads the previous round's activations, which are there as soon as component
k-1 finished them.  ``denoise`` therefore issues each call when
``Generation.ready_calls`` has it, records each output as it arrives, and runs the
scheduler step once a step's noise prediction is in, after first sending the calls
that do not wait for it.  N=2, stride 1 (``|`` a call's end, ``s`` the scheduler)::

    waves       c0  ======|     s c0  ======|     s c0 ...
                c1  ====|       s c1  ====|       s c1 ...
    dataflow    c0  ======|s c0 ======|s c0 ...          (c0 is the slower one)
                c1  ====| c1 ====|  c1 ====| ...         (c1 of round t+1 needs only c0 of t)

With ``depth`` 2 a component's next call may wait in its model's queue while the
current one runs (``Generation.ready_calls``), so a model that is the bottleneck
goes from one call to the next without a round trip through the executor.

Each call's outputs are the versions its readers name (``ActivationCache``), so the
latents equal the wave driver's: the same calls on the same inputs, only sooner.
asyncio only; ``submit`` is the executor's (the Triton BLS sends a model call and
returns its future; in-process executors may compute at once).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from asyncdiff.generation import ComponentCall, Generation

Submit = Callable[[ComponentCall], Awaitable[Mapping[str, Any]]]


async def denoise(gen: Generation, submit: Submit,
                  on_step: Callable[[int], None] | None = None, depth: int = 2):
    """Run ``gen`` to its end; returns its final latents.

    ``submit(call)``: start the call now and return an awaitable of its outputs (name ->
    value).  ``on_step(i)``: after the scheduler step of step i (progress, cancellation: an
    exception it raises ends the generation).  The first error ends the generation;
    calls still out are left to finish and their outputs are dropped.
    """
    loop = asyncio.get_running_loop()
    finished = loop.create_future()

    def issue() -> None:
        for call in gen.ready_calls(depth):
            future = asyncio.ensure_future(submit(call))
            future.add_done_callback(lambda f, call=call: arrived(call, f))

    def arrived(call: ComponentCall, future: asyncio.Future) -> None:
        if finished.done():  # an earlier error ended the generation
            if not future.cancelled():
                future.exception()  # retrieved: asyncio would log it as never retrieved
            return
        try:
            gen.complete(call, future.result())
            issue()  # the calls that need no scheduler step go out before it runs
            for step in gen.advance_ready():
                if on_step is not None:
                    on_step(step)
                issue()
            if gen.done:
                finished.set_result(gen.latents)
        except BaseException as exc:  # noqa: BLE001 -- handed to the awaiting caller
            finished.set_exception(exc)

    if gen.done:
        return gen.latents
    issue()
    return await finished
