"""Gangs: one function run as N ranks at once (``@engine.task(nodes=N, offload=TARGET)``).

A gang is one attempt of one action, run by N processes (*ranks*) that
start together and can talk to each other, for distributed training or
any SPMD step.  Inside the function :func:`cluster` says which rank this
is and where the others are; the same values are in the environment under
the names ``torch.distributed`` reads (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``),
so ``init_process_group("gloo")`` works unchanged.

The engine only asks a backend for a gang (``submit_gang``, see
:mod:`engine._backend`); the backend places the ranks, picks the master
port on rank 0's host and sends each rank its :class:`Cluster` in the
attempt's payload.  What a gang's result is: rank 0's return value; an
exception in any rank fails the attempt with that rank's exception, with a
note naming the rank (see :func:`engine._placement.rebuild_error`).
"""

# No `from __future__ import annotations`: msgspec reads these annotations
# (and the class is claimed by the `engine` module, where strings would not resolve).
import contextvars
import socket

import msgspec

__all__ = ["Cluster", "Gang", "cluster", "cluster_var"]


class Cluster(msgspec.Struct, frozen=True):
    """Where this rank of a gang stands: returned by :func:`engine.cluster`.

    ``rank`` runs from 0 to ``world_size - 1``; ``local_rank`` counts the
    ranks on this rank's host (``local_world_size`` of them).  Rank 0
    listens on ``master_addr:master_port``, an address every rank can
    reach.  ``hosts[i]`` is the host of rank ``i``.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    #: A free port on rank 0's host (0 outside a gang: nothing listens).
    master_port: int = 0
    hosts: tuple[str, ...] = ()

    def env(self) -> dict[str, str]:
        """The variables ``torch.distributed`` reads, for this rank."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }

    @classmethod
    def layout(cls, hosts: list[str], master_addr: str, master_port: int) -> "list[Cluster]":
        """Every rank's view of a gang whose rank ``i`` runs on ``hosts[i]``.

        Local ranks are numbered in rank order within each host, so ranks
        placed on one host get 0, 1, ... there (the usual device index).
        """
        seen: dict[str, int] = {}
        local: list[int] = []
        for host in hosts:
            local.append(seen.get(host, 0))
            seen[host] = local[-1] + 1
        placed = tuple(hosts)
        return [
            cls(
                rank=rank,
                world_size=len(hosts),
                local_rank=local[rank],
                local_world_size=seen[host],
                master_addr=master_addr,
                master_port=master_port,
                hosts=placed,
            )
            for rank, host in enumerate(hosts)
        ]


class Gang(msgspec.Struct, frozen=True):
    """What the engine asks of a backend for a gang: ``nodes`` ranks, at most ``ranks_per_host`` per host.

    ``ranks_per_host`` is None when neither the task nor the target set it
    (the backend's own default: one rank per host on SSH).
    """

    nodes: int
    ranks_per_host: int | None = None


#: This rank's place, inside an attempt of a gang (set by the worker).
cluster_var: contextvars.ContextVar[Cluster | None] = contextvars.ContextVar("shoal_cluster", default=None)


def cluster() -> "Cluster":
    """Where this rank of a gang stands (``rank``, ``world_size``, ``master_addr``, ...).

    Inside an action of a task declared with ``nodes=N``, on each of its N
    ranks; anywhere else rank 0 of 1, with ``master_addr="127.0.0.1"``,
    ``master_port=0`` and ``hosts=(this host,)`` (and no variable set in
    the environment), so that code written for a gang also runs alone.
    """
    found = cluster_var.get()
    if found is not None:
        return found
    return Cluster(hosts=(socket.gethostname(),))
