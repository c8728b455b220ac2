"""Writes that count as done only once replicas hold them (``REDIS_REPLICA_ACKS``).

Redis replicates asynchronously: a write its primary acknowledged in the last moments
before it died can be missing on the replica promoted in its place. Where that matters,
the write is followed by ``WAIT numreplicas timeout`` **on the same connection** (WAIT
counts the replicas that have every write that connection made) and is not done until
enough replicas answered:

* a transcriber's final (COMMIT) and close (CLOSE): not acknowledged, they are sent again
  (both scripts are idempotent: a final already stored is not stored twice), so the worker
  never moves past a final that a failover could lose. A retry may run on another pooled
  connection than the first attempt, so the scripts write even when they find their work
  done (the same value back): the retry's WAIT then covers the first attempt as well,
  the replication stream being in order;
* the gateway's audio appends (``common/streams.AudioAppender``): frames leave the
  gateway's buffer only once replicated, and are sent again otherwise (the seq makes that
  safe);
* what clients see: the gateway reads results from replicas (``make_redis(replica_reads=
  True)``), so a client is only ever sent a result that outlives a failover of its primary.

A write not acknowledged in time raises ``NotReplicated``, which the retry loops wait out
like an outage (``common.backoff``). A primary is asked for as many acknowledgements as it
has replicas connected, up to ``REDIS_REPLICA_ACKS`` (``ROLE``, sent after the ``WAIT``): a
replica that stalls keeps its link (until ``repl-timeout``) and holds writes back, while a
primary with no replica (one just promoted, until a replica joins it) has nothing a
failover could promote without the write, and its writes go on (docs/storage.md#failover).
``WAIT`` itself asks for no more than the replicas the node's last ``ROLE`` showed
(``ReplicaCounts``; the first write to a node asks it first): a primary without replicas
answers at once instead of after the timeout; a replica that joined since makes the next
write fail the check and be sent again, now waiting for it.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from common.backoff import NotReplicated
from common.redis_client import is_cluster


def check_acks(waited: Any, role: Any, acks: int, what: str,
               counts: ReplicaCounts | None = None, node: str = "") -> None:
    """Raise ``NotReplicated`` unless ``waited`` (WAIT's answer) reaches ``acks``, or every
    replica the node has (``role``: its ROLE answer, sent after the WAIT) when it has fewer:
    a primary without replicas (the one just promoted, until a replica joins it) has none
    that a failover could promote without the write. ``counts`` learns the node's
    replicas."""
    if counts is not None:
        counts.seen(node, role)
    for reply in (waited, role):
        if isinstance(reply, BaseException):
            raise reply
    need = min(acks, connected_replicas(role))
    if int(waited) < need:
        raise NotReplicated(f"{what}: {int(waited)} of {need} replicas acknowledged it")


class ReplicaCounts:
    """The replicas each node had connected at its last ``ROLE`` (unknown at first: then
    ``WAIT`` asks for the setting's count)."""

    def __init__(self) -> None:
        self._known: dict[str, int] = {}

    def wanted(self, node: str, acks: int) -> int:
        """The ``numreplicas`` to send ``WAIT`` to ``node`` with."""
        return min(acks, self._known.get(node, acks))

    def known(self, node: str) -> bool:
        return node in self._known

    async def learn(self, redis: Any, node: Any = None) -> None:
        """Ask ``node`` (a cluster node; None off a cluster) for its replicas, the first
        time (one round trip per node and client)."""
        name = "" if node is None else str(node.name)
        if name in self._known:
            return
        role = await (redis.execute_command("ROLE") if node is None
                      else redis.execute_command("ROLE", target_nodes=node))
        self.seen(name, role)

    def seen(self, node: str, role: Any) -> None:
        if not isinstance(role, BaseException):
            self._known[node] = connected_replicas(role)


_counts: weakref.WeakKeyDictionary[Any, ReplicaCounts] = weakref.WeakKeyDictionary()


def replica_counts(redis: Any) -> ReplicaCounts:
    """The counts a client has seen (one per client: each talks to its own nodes)."""
    counts = _counts.get(redis)
    if counts is None:
        counts = _counts[redis] = ReplicaCounts()
    return counts


def connected_replicas(role: Any) -> int:
    """The replicas in a primary's ROLE answer (``[b"master", offset, [[ip, port, offset],
    ...]]``); 0 for anything else."""
    if not isinstance(role, (list, tuple)) or len(role) < 3:
        return 0
    kind = role[0].decode() if isinstance(role[0], bytes) else str(role[0])
    return len(role[2]) if kind == "master" else 0


async def node_name(redis: aioredis.Redis, key: str) -> str:
    """On a cluster, the node that holds ``key``'s slot now (the client learns the
    cluster's layout first if it has not yet)."""
    await redis.initialize()  # at once when it has already
    return str(redis.get_node_from_key(key).name)


async def add_wait(pipe: Pipeline, redis: aioredis.Redis, key: str, acks: int,
                   timeout_ms: int) -> str:
    """Queue ``WAIT`` and ``ROLE`` (two replies, for ``check_acks``) on ``pipe`` after the
    commands for ``key``: on a cluster, sent to the node that holds ``key``'s slot, so that
    they run on the connection that carried them. The node's name ("" off a cluster)."""
    counts = replica_counts(redis)
    if is_cluster(redis):
        await redis.initialize()
        node = redis.get_node_from_key(key)
        await counts.learn(redis, node)
        pipe.execute_command("WAIT", counts.wanted(node.name, acks), timeout_ms,
                             target_nodes=node)
        pipe.execute_command("ROLE", target_nodes=node)
        return str(node.name)
    await counts.learn(redis)
    pipe.execute_command("WAIT", counts.wanted("", acks), timeout_ms)
    pipe.execute_command("ROLE")
    return ""


async def run_acked(redis: aioredis.Redis, script: AsyncScript, keys: Sequence[str],
                    args: Sequence[Any], acks: int, timeout_ms: int, what: str) -> Any:
    """``script(keys, args)`` and ``WAIT`` in one pipeline on one connection; the script's
    reply once ``acks`` replicas have its write (else ``NotReplicated``: send it again)."""
    for attempt in (1, 2):
        pipe = redis.pipeline(transaction=False)
        # the cluster pipeline refuses .evalsha() but routes the command by its keys
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        node = await add_wait(pipe, redis, keys[0], acks, timeout_ms)
        reply, waited, role = await pipe.execute(raise_on_error=False)
        if isinstance(reply, NoScriptError) and attempt == 1:
            # a restarted or newly promoted node has no script cache: load it, once
            await redis.script_load(script.script)
            continue
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, int) and reply < 0:
            return reply  # refused (a lost lease, a client back): nothing was written
        check_acks(waited, role, acks, what, replica_counts(redis), node)
        return reply
    raise AssertionError("unreachable")
