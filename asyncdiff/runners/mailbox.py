"""Moving a rank's messages: one ``batch_isend_irecv`` per phase.

Why one batch per phase: a lone NCCL send/recv creates its two-rank communicator
on first use and blocks until both ranks arrive.  Posted one by one in compute
order, those first uses formed a wait cycle at N >= 3 (rank 0 sends to 2, rank 1
receives from 0, rank 2 receives from 1).  A batch goes through the group's
communicator, its sends and receives progress together in any order, and every
rank visits the phases in plan order with each message in the same phase on both
ends -- so the earliest unfinished phase always completes.  Gloo takes the same
path (it runs a batch as separate operations) and gives the same bytes.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from asyncdiff.runners.routing import Msg, Phase, Routes


class Stats:
    def __init__(self):
        self.compute_s = self.recv_wait_s = self.send_wait_s = self.sched_s = 0.0
        self.calls = self.batched_calls = self.bytes_sent = self.bytes_recv = 0
        self.msgs_sent = self.msgs_recv = 0


class Mailbox:
    """This rank's batches; received tensors wait in ``inbox`` until a call takes them."""

    def __init__(self, rank: int, routes: Routes, shapes: dict[str, list[int]], device, stats: Stats):
        self.batches = routes.exchanges(rank)
        self.shapes, self.device, self.stats = shapes, torch.device(device), stats
        self.inbox: dict[Msg, torch.Tensor] = {}

    def exchange(self, phase: Phase, produced: dict[Msg, torch.Tensor]) -> None:
        """Send what this rank produced in ``phase`` and receive what it is sent, as one batch."""
        ops = self.batches.pop(phase, None)
        if not ops:
            return
        p2p, received = [], []
        for op in ops:
            if op.kind == "send":
                tensor = produced[op.msg].contiguous()
                p2p.append(dist.P2POp(dist.isend, tensor, op.peer))
                self.stats.msgs_sent += 1
                self.stats.bytes_sent += tensor.numel() * tensor.element_size()
            else:
                buf = torch.empty(self.shapes[op.msg.name], dtype=torch.float32, device=self.device)
                p2p.append(dist.P2POp(dist.irecv, buf, op.peer))
                received.append((op.msg, buf))
        t0 = time.perf_counter()
        for work in dist.batch_isend_irecv(p2p):
            work.wait()
        sync(self.device)
        waited = time.perf_counter() - t0
        if received:
            self.stats.recv_wait_s += waited
        else:
            self.stats.send_wait_s += waited
        for msg, buf in received:
            self.stats.msgs_recv += 1
            self.stats.bytes_recv += buf.numel() * buf.element_size()
            self.inbox[msg] = buf

    def take(self, msg: Msg) -> torch.Tensor:
        return self.inbox.pop(msg)

    def close(self) -> None:
        """Every batch posted and every received tensor used: the routes and the run agree."""
        assert not self.batches, f"phases never reached: {sorted(self.batches)}"
        assert not self.inbox, f"received but unused: {list(self.inbox)}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
