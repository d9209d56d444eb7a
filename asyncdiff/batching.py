"""Continuous batching of model calls across concurrent generations (asyncio, no Triton).

Every request runs its own ``Generation`` in its own coroutine and hands each
wave of component calls to the ``CallBatcher``. Members (generations between
their first and their last wave) are dealt into ``cohorts`` groups as they join
(to the smallest). A cohort fires a *tick* once every one of its members has a
wave waiting; the tick's calls are grouped by model and each group becomes ONE
call on the concatenated rows, whose outputs are split back per caller. So
each model gets one call per cohort and step, however many requests are in
flight. A request joins at its next wave (step granularity) and leaves after
its last one. Calls from outside a membership (the text encoder before the
first step, the VAE after the last) ride with the next tick, or go at once
when there is no member.

Timeline, one cohort, N=2 and one warm-up step: B joins while A is at step 3::

    tick        1            2              3
    A           s3: c0 c1    s4: c0 c1      s5: c0 c1
    B           (encoding)   s0: c0         s0: c1       (warm-up: one call per wave)
    calls       c0[A] c1[A]  c0[A+B] c1[A]  c0[A] c1[A+B]

Why two cohorts (the served default): with one, every model waits while the
pipeline turns a tick's outputs into the next wave (guidance, the scheduler
step, splitting and concatenating), and the faster component waits for the
slower one. With two, cohort 1's calls run during cohort 0's pipeline work and
fill those gaps, for calls half as large. Requests A..D, N=2::

    cohort 0 (A, C)   c0 c1 | pipeline | c0 c1 | pipeline | ...
    cohort 1 (B, D)         | c0 c1    | pipeline | c0 c1 | ...

Values are the executor's (Triton tensors in the BLS, torch in-process); the
executor passes ``rows``, ``concat`` and ``split`` for them. Rows are kept in
submission order. A model whose group would exceed its maximum batch is called
several times, each within the limit. Two calls of one caller to one model in
one tick (the stride pair of the last component with S=2) are merged too,
which is batched stride; with ``separate_repeats`` they stay two calls (lanes),
each batched across callers, so plain S=2 keeps its two instances busy.

Calls are merged only when their inputs agree in every dim but the rows
(``signature``): requests of different image sizes share ticks, not calls.

Rule for members: inside ``member()`` await nothing but ``Member.run`` (a
member awaiting anything else would hold its cohort's ticks back).

``Slots`` bounds the rows in flight: a request of k images takes k slots, in
arrival order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# execute(model, inputs by name, output names) -> outputs by name
Execute = Callable[[str, Mapping[str, Any], Sequence[str]], Awaitable[Mapping[str, Any]]]


@dataclass(frozen=True)
class ModelCall:
    """One call a generation wants: ``model`` on ``inputs`` (each with a leading batch dim)."""

    model: str
    inputs: Mapping[str, Any]
    output_names: Sequence[str]


@dataclass
class _Pending:
    call: ModelCall
    future: asyncio.Future
    member: object | None
    lane: int = 0


@dataclass
class TickStats:
    """What the batcher did: ticks fired, calls asked for, model calls made and their rows."""

    ticks: int = 0
    requested_calls: int = 0
    model_calls: int = 0
    rows: int = 0


class CallBatcher:
    def __init__(self, execute: Execute, rows: Callable[[Any], int],
                 concat: Callable[[str, list[Any]], Any],
                 split: Callable[[str, Any, list[int]], list[Any]],
                 max_rows: Mapping[str, int] | None = None, separate_repeats: bool = False,
                 signature: Callable[[Any], Any] | None = None, cohorts: int = 1):
        if cohorts < 1:
            raise ValueError(f"cohorts must be >= 1, got {cohorts}")
        self._execute, self._rows, self._concat, self._split = execute, rows, concat, split
        self._signature = signature or (lambda value: None)
        self._max_rows = dict(max_rows or {})
        self._separate_repeats = separate_repeats
        self._cohorts = cohorts
        self._pending: list[_Pending] = []
        self._members: dict[int, int] = {}  # member id -> its cohort
        self._firing: set[int] = set()  # cohorts whose tick is in flight
        self._ticks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.stats = TickStats()

    # -- the callers' side -----------------------------------------------------
    @contextlib.asynccontextmanager
    async def member(self):
        """A generation's membership: ticks wait for its waves until it leaves."""
        m = Member(self)
        sizes = collections.Counter(self._members.values())
        self._members[id(m)] = min(range(self._cohorts), key=lambda c: sizes[c])  # the smallest
        try:
            yield m
        finally:
            del self._members[id(m)]
            self._wake.set()

    async def run(self, calls: Sequence[ModelCall], member: "Member | None" = None) -> list[Mapping]:
        """Outputs of ``calls`` (one mapping each), made in the next tick."""
        self._ensure_dispatcher()
        loop = asyncio.get_running_loop()
        seen: dict[str, int] = {}
        pending = []
        for c in calls:
            lane = seen.get(c.model, 0) if self._separate_repeats else 0
            seen[c.model] = seen.get(c.model, 0) + 1
            pending.append(_Pending(c, loop.create_future(), None if member is None else id(member),
                                    lane))
        self._pending.extend(pending)
        self._wake.set()
        return list(await asyncio.gather(*(p.future for p in pending)))

    async def close(self) -> None:
        for tick in list(self._ticks):
            await tick
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- the dispatcher --------------------------------------------------------
    def _ensure_dispatcher(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._dispatch())

    def _ready_cohorts(self) -> list[int]:
        """Cohorts not in a tick whose every member has its wave in; with no member at all,
        a pseudo-cohort -1 for the calls from outside (text encoders, the VAE)."""
        if not self._pending:
            return []
        if not self._members:
            return [] if -1 in self._firing else [-1]
        waiting = {p.member for p in self._pending if p.member is not None}
        cohorts: dict[int, set[int]] = {}
        for m, c in self._members.items():
            cohorts.setdefault(c, set()).add(m)
        return [c for c, ms in sorted(cohorts.items())
                if c not in self._firing and ms <= waiting]

    async def _dispatch(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            for c in self._ready_cohorts():
                # the cohort's waves, and every call from outside a membership waiting now
                tick = [p for p in self._pending
                        if p.member is None or self._members.get(p.member) == c]
                if not tick:
                    continue
                taken = {id(p) for p in tick}
                self._pending = [p for p in self._pending if id(p) not in taken]
                self._firing.add(c)
                task = asyncio.ensure_future(self._fire(c, tick))
                self._ticks.add(task)
                task.add_done_callback(self._ticks.discard)

    async def _fire(self, cohort: int, tick: list[_Pending]) -> None:
        try:
            self.stats.ticks += 1
            self.stats.requested_calls += len(tick)
            groups: dict[tuple, list[_Pending]] = {}
            for p in tick:
                shapes = tuple((n, self._signature(v)) for n, v in p.call.inputs.items())
                groups.setdefault((p.call.model, p.lane, shapes), []).append(p)
            chunks = [chunk for group in groups.values() for chunk in self._chunks(group)]
            await asyncio.gather(*(self._call(chunk) for chunk in chunks))
        finally:
            self._firing.discard(cohort)
            self._wake.set()

    def _chunks(self, group: list[_Pending]) -> list[list[_Pending]]:
        limit = self._max_rows.get(group[0].call.model)
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

    async def _call(self, chunk: list[_Pending]) -> None:
        first = chunk[0].call
        sizes = [self._call_rows(p.call) for p in chunk]
        self.stats.model_calls += 1
        self.stats.rows += sum(sizes)
        try:
            if len(chunk) == 1:  # nothing to merge: the values go as they are
                outputs = [await self._execute(first.model, first.inputs, first.output_names)]
            else:
                inputs = {name: self._concat(name, [p.call.inputs[name] for p in chunk])
                          for name in first.inputs}
                merged = await self._execute(first.model, inputs, first.output_names)
                parts = {name: self._split(name, merged[name], sizes) for name in first.output_names}
                outputs = [{name: parts[name][i] for name in first.output_names}
                           for i in range(len(chunk))]
        except Exception as exc:  # every caller of this call gets the error
            for p in chunk:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        for p, out in zip(chunk, outputs):
            if not p.future.done():
                p.future.set_result(out)


class Member:
    """A membership handle: ``await m.run(calls)`` for each wave."""

    def __init__(self, batcher: CallBatcher):
        self._batcher = batcher

    async def run(self, calls: Sequence[ModelCall]) -> list[Mapping]:
        return await self._batcher.run(calls, member=self)


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
