"""Redis connections with timeouts, keepalive and bounded retries (see PITFALLS.md).

Blocking stream reads get their own client whose socket timeout is above the
block time, so an idle XREAD never trips the timeout. Who retries a failed command
(the client, or the loop around it, never both) is explained in ``common/backoff.py``.

**Redis Cluster.** ``REDIS_URL`` may name any node of a cluster: with ``REDIS_CLUSTER=auto``
(the default) each process asks that node once, at start, whether it runs in cluster mode
(``INFO cluster``) and then uses redis-py's cluster client, which sends each command to the
primary of its key's slot and follows the cluster through resharding and failovers
(``MOVED``/``ASK``, a new topology after a node fails). ``REDIS_CLUSTER=1`` or ``0`` skips
the question (a node that cannot be reached at start is taken for a plain Redis in ``auto``
mode: set it explicitly where the cluster may be down when the services start). Every
command and script touches one session's keys (one slot: ``{sid}``) or one global key, so
nothing needs a cross-slot operation (docs/storage.md lists the global keys).
"""

from __future__ import annotations

import logging
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.cluster import LoadBalancingStrategy
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, RedisClusterException, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.backoff import REDIS_DOWN, policy
from common.settings import RedisSettings

__all__ = ["REDIS_DOWN", "is_cluster", "make_redis", "uses_cluster"]

log = logging.getLogger(__name__)

#: Whether a URL names a cluster, as asked once per process (``uses_cluster``).
_CLUSTER: dict[str, bool] = {}


def uses_cluster(settings: RedisSettings) -> bool:
    """``REDIS_CLUSTER``: 1/0 as set; ``auto``: ask the node the URL names (once)."""
    mode = settings.redis_cluster.strip().lower()
    if settings.redis_sentinels.strip():
        return False  # Sentinel manages a primary/replica set, never a cluster
    if mode in ("1", "true", "yes", "on"):
        return True
    if mode in ("0", "false", "no", "off"):
        return False
    url = settings.redis_url
    if url not in _CLUSTER:
        try:
            node = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
            try:
                _CLUSTER[url] = bool(int(node.info("cluster").get("cluster_enabled", 0)))
                if _CLUSTER[url]:
                    _NODES[url] = _slot_nodes(node.execute_command("CLUSTER SLOTS"))
            finally:
                node.close()
        except RedisError as exc:
            log.warning("could not ask %s whether it is a cluster (%s): taking it for a "
                        "plain Redis; set REDIS_CLUSTER=1 for a cluster", _safe(url), exc)
            return False
        if _CLUSTER[url]:
            log.info("Redis at %s is a cluster: using the cluster client", _safe(url))
    return _CLUSTER[url]


class _Cluster(RedisCluster):
    """redis-py's cluster client, able to re-learn the cluster after its default node dies.

    redis-py 8.1 asks its *default node* (at first the node ``REDIS_URL`` names) where the
    keys of a command with "movable" keys are (``COMMAND GETKEYS``, one extra round trip
    per command: every XREAD and XREADGROUP), and for the command table when it re-reads
    the topology. When that node is the one that died, those questions fail before any
    node is asked the command itself, so the client never marks its topology stale and
    never learns that a replica took the dead node's slots over: 40 s of connection errors
    to the dead node were seen while the cluster had failed over in 4. Here the stream
    reads' keys are found locally (the names after ``STREAMS``), and a failure of the
    default node moves the default to another node and marks the topology stale."""

    async def _determine_slot(self, command: str, *args: Any) -> int:
        if command.upper() in _STREAM_READS:
            return _stream_read_slot(self.get_encoder(), command, args)
        try:
            return int(await super()._determine_slot(command, *args))
        except (RedisConnectionError, RedisTimeoutError):
            self._default_node_failed()
            raise

    async def initialize(self, *args: Any, **kwargs: Any) -> _Cluster:
        try:
            await super().initialize(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, ClusterDownError):
            self._default_node_failed()
            raise
        return self

    def _default_node_failed(self) -> None:
        self.replace_default_node()
        self._initialize = True


#: Stream reads whose keys redis-py would ask the default node for.
_STREAM_READS = frozenset({"XREAD", "XREADGROUP"})


def _stream_read_slot(encoder: Any, command: str, args: tuple[Any, ...]) -> int:
    """The one slot of an XREAD/XREADGROUP's streams (the first half of what follows
    ``STREAMS``); streams of several slots are a cross-slot error, as Redis would say."""
    words = [a.upper() if isinstance(a, str) else a.upper() if isinstance(a, bytes) else a
             for a in args]
    at = next((i for i, w in enumerate(words) if w in ("STREAMS", b"STREAMS")), None)
    if at is None:
        raise RedisClusterException(f"{command} without STREAMS")
    rest = args[at + 1:]
    slots = {key_slot(encoder.encode(k)) for k in rest[:len(rest) // 2]}
    if len(slots) != 1:
        raise RedisClusterException(f"{command} of streams in {len(slots)} slots")
    return slots.pop()


#: Every node of a cluster, as its first node answered at start (``uses_cluster``).
_NODES: dict[str, list[tuple[str, int]]] = {}


def _slot_nodes(slots: Any) -> list[tuple[str, int]]:
    """(host, port) of every node in a ``CLUSTER SLOTS`` answer."""
    out: list[tuple[str, int]] = []
    for entry in slots or ():
        for node in entry[2:]:
            host = node[0].decode() if isinstance(node[0], bytes) else str(node[0])
            if host and (host, int(node[1])) not in out:
                out.append((host, int(node[1])))
    return out


def _startup_nodes(url: str) -> list[ClusterNode]:
    """Every node the cluster had at start, so a client can reach the cluster whichever
    node dies (redis-py starts from the URL's node alone, and a client whose first command
    came after that node died could never connect)."""
    return [ClusterNode(host, port) for host, port in _NODES.get(url, [])]


def is_cluster(client: Any) -> bool:
    """Whether ``client`` (from ``make_redis``) talks to a Redis Cluster."""
    return isinstance(client, RedisCluster)


def _safe(url: str) -> str:
    """The URL without its password, for logs."""
    _head, sep, tail = url.rpartition("@")
    return f"{url.split('://')[0]}://…@{tail}" if sep else url


def make_redis(settings: RedisSettings, *, blocking: bool = False,
               max_connections: int | None = None, probe: bool = False,
               block_ms: int = 0, read_timeout: bool = True,
               retries: bool = True, replica_reads: bool = False) -> aioredis.Redis:
    """``retries=False``: for a caller that waits out outages itself (``common.backoff``);
    the client then only reconnects a stale pooled connection, once, at once.
    ``blocking``: for XREAD BLOCK (of ``redis_block_ms``, or ``block_ms`` if longer);
    ``probe``: health checks that must fail fast, no retry; ``read_timeout=False``: no
    timeout per reply, for a caller that bounds each whole round trip itself (redis-py
    arms a timer per reply: 7 us of 27 per script call in a pipeline of 256, measured).
    ``replica_reads``: on a cluster, reads go to the replicas of each slot (READONLY; the
    primary where a slot has none), so what is read has been replicated
    (``REDIS_REPLICA_ACKS``, common/replication.py); a plain Redis is read as it is.

    On a cluster (``uses_cluster``) the client is redis-py's ``RedisCluster``, typed here as
    ``Redis``: the commands the services use are the same (``max_connections`` is then per
    node)."""
    timeout = settings.redis_socket_timeout_s
    if blocking:
        timeout = max(timeout, max(settings.redis_block_ms, block_ms) / 1000.0 + 5.0)
    cluster = uses_cluster(settings)
    if probe:
        options: dict[str, Any] = dict(socket_timeout=2.0, socket_connect_timeout=2.0,
                                       max_connections=2)
        if settings.redis_sentinels.strip():
            return _sentinel_client(settings, False, retry=Retry(NoBackoff(), 0), **options)
        if cluster:
            return cast(aioredis.Redis, _Cluster.from_url(
                settings.redis_url, retry=Retry(NoBackoff(), 0),
                startup_nodes=_startup_nodes(settings.redis_url), **options))
        return aioredis.Redis.from_url(settings.redis_url, retry=None, **options)
    options = dict(
        socket_timeout=timeout if read_timeout else None,
        socket_connect_timeout=5.0,
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(policy(base=0.05), settings.redis_retries)
        if retries else Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        max_connections=max_connections or settings.redis_max_connections,
        decode_responses=False,
    )
    if settings.redis_sentinels.strip():
        return _sentinel_client(settings, replica_reads, **options)
    if cluster:
        if replica_reads:
            options["load_balancing_strategy"] = LoadBalancingStrategy.ROUND_ROBIN_REPLICAS
        return cast(aioredis.Redis, _Cluster.from_url(
            settings.redis_url, startup_nodes=_startup_nodes(settings.redis_url), **options))
    return aioredis.Redis.from_url(settings.redis_url, **options)


def sentinel_addresses(value: str) -> list[tuple[str, int]]:
    """``REDIS_SENTINELS`` ("host:port,host:port") as (host, port) pairs."""
    out = []
    for item in value.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"REDIS_SENTINELS: {item.strip()!r} is not host:port")
        out.append((host, int(port)))
    return out


def _sentinel_client(settings: RedisSettings, replica_reads: bool,
                     **options: Any) -> aioredis.Redis:
    """A client of the primary the Sentinels name (``replica_reads``: of its replicas, the
    primary when it has none), re-asked after a failover; REDIS_URL's user, password,
    database and TLS apply to the data nodes, the socket options to the Sentinels too."""
    from redis.asyncio.connection import parse_url
    from redis.asyncio.sentinel import Sentinel

    node = {k: v for k, v in parse_url(settings.redis_url).items() if k not in ("host", "port")}
    sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_")}
    sentinel = Sentinel(sentinel_addresses(settings.redis_sentinels),
                        sentinel_kwargs=sentinel_options)
    service = settings.redis_sentinel_master
    if replica_reads:
        return sentinel.slave_for(service, **node, **options)
    return sentinel.master_for(service, **node, **options)
