"""Continuous batching of model calls across concurrent generations (asyncio, no Triton).

Every request runs its own ``Generation`` under the dataflow driver
(``asyncdiff.dataflow``) and submits each component call the moment it is ready.
The ``CallBatcher`` keeps, per model, the calls out and a queue of the calls that
wait.  A call goes out at once when its model has an instance with nothing out.
Beyond that, a call may still go out behind another (``depth`` calls per instance) if it
comes from a caller (``ModelCall.owner``, the generation) that has a call out there
already and nobody else waits: that is a generation's next call, queued in the
model so the model goes from one to the next without a round trip.  Everything else
waits, and when an instance is free, everything that waited goes out as ONE
call on the concatenated rows, whose outputs are split back per caller.  So a lone
request never waits for company, and under load each model call carries the rows
that gathered while the model was busy. Requests join and leave at any call.

Timeline, one model with one instance, requests A..C::

    model     A0 ======|B0+C0 ======|A1+B1+C1 ======|
    queue     B0 C0 (wait: A0 is out)  A1 (waits: B0+C0 are out) B1 C1 ...
    alone     A0 ======|A1 ======|A2 ...   (A1 waited in the model's queue behind A0)

Values are the executor's (Triton tensors in the BLS, torch in-process); the
executor passes ``rows``, ``concat`` and ``split`` for them. Rows are kept in
submission order. A call that would exceed the model's maximum batch is cut into
several, each within the limit. Calls are merged only when their inputs agree in
every dim but the rows (``signature``): requests of different image sizes share a
model, not a call.  A model with several instances (the stride copy's) takes a call
per instance before anything waits; whichever frees first takes what waits.

``send(model, inputs, output_names)`` starts the call and returns its future (or a
coroutine, which starts at the loop's next turn); sending from inside ``submit``
is what lets a component's call leave before the pipeline's next piece of work.

``Slots`` bounds the rows in flight: a request of k images takes k slots, in
arrival order.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# send(model, inputs by name, output names) -> the outputs by name, on their way
Send = Callable[[str, Mapping[str, Any], Sequence[str]], Awaitable[Mapping[str, Any]]]


@dataclass(frozen=True)
class ModelCall:
    """One call a generation wants: ``model`` on ``inputs`` (each with a leading batch dim)."""

    model: str
    inputs: Mapping[str, Any]
    output_names: Sequence[str]
    owner: Any = None  # the caller (a generation): its next call may queue behind its last


@dataclass(eq=False)  # found by identity in a model's queue
class _Pending:
    call: ModelCall
    future: asyncio.Future


@dataclass
class BatchStats:
    """What the batcher did: calls asked for, model calls made and their rows."""

    requested_calls: int = 0
    model_calls: int = 0
    rows: int = 0


class CallBatcher:
    def __init__(self, send: Send, rows: Callable[[Any], int],
                 concat: Callable[[str, list[Any]], Any],
                 split: Callable[[str, Any, list[int]], list[Any]],
                 max_rows: Mapping[str, int] | None = None,
                 instances: Mapping[str, int] | None = None, depth: int = 2,
                 signature: Callable[[Any], Any] | None = None):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._send, self._rows, self._concat, self._split = send, rows, concat, split
        self._signature = signature or (lambda value: None)
        self._max_rows = dict(max_rows or {})
        self._instances = dict(instances or {})
        self._depth = depth
        self._queues: dict[str, collections.deque[_Pending]] = collections.defaultdict(
            collections.deque)
        self._out: collections.Counter[str] = collections.Counter()  # calls out per model
        # per model: how many calls out each owner has rows in
        self._owners: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.stats = BatchStats()

    def submit(self, call: ModelCall) -> asyncio.Future:
        """The outputs of ``call`` (a mapping by name), sent now if its model has room."""
        pending = _Pending(call, asyncio.get_running_loop().create_future())
        self.stats.requested_calls += 1
        self._queues[call.model].append(pending)
        self._flush(call.model)
        return pending.future

    async def run(self, calls: Sequence[ModelCall]) -> list[Mapping]:
        """The outputs of several calls, one mapping each."""
        return list(await asyncio.gather(*(self.submit(c) for c in calls)))

    def waiting(self, model: str) -> int:
        """Calls queued for ``model`` (not sent yet)."""
        return len(self._queues[model])

    # -- dispatch --------------------------------------------------------------
    def _slots(self, model: str) -> int:
        """Calls a model may have out: ``depth`` per instance."""
        return self._depth * self._instances.get(model, 1)

    def _flush(self, model: str) -> None:
        queue, owners = self._queues[model], self._owners[model]
        while queue and self._out[model] < self._slots(model):
            if self._out[model] >= self._instances.get(model, 1) and not all(
                    p.call.owner is not None and owners[p.call.owner] for p in queue):
                return  # someone else waits: the next call goes when an instance is free
            key = self._key(queue[0].call)
            chunk = self._within_limit(model, [p for p in queue if self._key(p.call) == key])[0]
            for p in chunk:
                queue.remove(p)
            self._dispatch(model, chunk)

    def _key(self, call: ModelCall):
        return tuple((n, self._signature(v)) for n, v in call.inputs.items())

    def _within_limit(self, model: str, group: list[_Pending]) -> list[list[_Pending]]:
        limit = self._max_rows.get(model)
        chunks, rows = [[]], 0
        for p in group:
            n = self._call_rows(p.call)
            if chunks[-1] and limit is not None and rows + n > limit:
                chunks.append([])
                rows = 0
            chunks[-1].append(p)
            rows += n
        return chunks

    def _call_rows(self, call: ModelCall) -> int:
        return self._rows(next(iter(call.inputs.values())))

    def _dispatch(self, model: str, chunk: list[_Pending]) -> None:
        first = chunk[0].call
        sizes = [self._call_rows(p.call) for p in chunk]
        self.stats.model_calls += 1
        self.stats.rows += sum(sizes)
        self._out[model] += 1
        self._owners[model].update(p.call.owner for p in chunk if p.call.owner is not None)
        try:
            if len(chunk) == 1:  # nothing to merge: the values go as they are
                inputs = first.inputs
            else:
                inputs = {name: self._concat(name, [p.call.inputs[name] for p in chunk])
                          for name in first.inputs}
            future = asyncio.ensure_future(self._send(model, inputs, first.output_names))
        except Exception as exc:  # noqa: BLE001 -- every caller of this call gets the error
            future = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
        future.add_done_callback(lambda f: self._returned(model, chunk, sizes, f))

    def _returned(self, model: str, chunk: list[_Pending], sizes: list[int],
                  future: asyncio.Future) -> None:
        self._out[model] -= 1
        self._owners[model].subtract(p.call.owner for p in chunk if p.call.owner is not None)
        try:
            merged = future.result()
            if len(chunk) == 1:
                outputs = [merged]
            else:
                names = chunk[0].call.output_names
                parts = {name: self._split(name, merged[name], sizes) for name in names}
                outputs = [{name: parts[name][i] for name in names} for i in range(len(chunk))]
        except BaseException as exc:  # noqa: BLE001 -- every caller of this call gets the error
            for p in chunk:
                if not p.future.done():
                    p.future.set_exception(exc)
        else:
            for p, out in zip(chunk, outputs):
                if not p.future.done():
                    p.future.set_result(out)
        self._flush(model)


class Slots:
    """``capacity`` slots taken k at a time, first come first served (a request of k images
    holds k; a large request is not overtaken by smaller ones behind it)."""

    def __init__(self, capacity: int):
        self.capacity, self.free = capacity, capacity
        self._queue: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def available(self, k: int) -> bool:
        """Whether ``acquire(k)`` would not wait."""
        return not self._queue and self.free >= k

    async def acquire(self, k: int) -> None:
        if not 1 <= k <= self.capacity:
            raise ValueError(f"{k} slots asked of {self.capacity}")
        if self.available(k):
            self.free -= k
            return
        future = asyncio.get_running_loop().create_future()
        self._queue.append((k, future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(k)  # granted while being cancelled: give them back
            else:
                self._queue.remove((k, future))
                self._grant()
            raise

    def release(self, k: int) -> None:
        self.free += k
        self._grant()

    def _grant(self) -> None:
        while self._queue and self._queue[0][0] <= self.free:
            k, future = self._queue.popleft()
            self.free -= k
            future.set_result(None)
