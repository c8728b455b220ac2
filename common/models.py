"""Which models the deployment serves: the worker registry, its one reader and writer.

Every worker announces what it serves (``WorkerInfo``: model name, device, device index,
capacity, free slots) in one Redis hash, ``keys.WORKERS``, a field per worker, renewed every
``ANNOUNCE_INTERVAL_S`` and valid for ``ANNOUNCE_TTL_INTERVALS`` of them (Redis time, set by
the ANNOUNCE_WORKER script). A session asks for a model by name and queues on that model's
work queue (``keys.work_queue``), which only workers serving it read: the registry is what
gateways read to tell a client, before it waits, whether anyone serves its model
(``ServedModels.check``), to warn a waiting one that nobody does, to list ``GET /v1/models``
and to export the autoscaling gauges. A model is *known* while a worker serves it and for
``model_grace_s`` after the last one went (a restart, a scale-down), and always when it is
the deployment's default or listed in ``MODELS``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from typing import Any

import redis.asyncio as aioredis

from common import keys
from common.errors import BadRequest, ModelUnavailable
from common.scripts import ANNOUNCE_WORKER

#: A model name: what a client writes in ``model=`` and a worker serves (``STT_MODEL``). It
#: becomes part of a Redis key (``keys.work_queue``) and is never a path.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,99}")
#: A worker's record stays valid for this many announce intervals (a missed beat or two).
ANNOUNCE_TTL_INTERVALS = 3
#: How long one reading of the registry serves a gateway (monitor ticks, /v1/models, gauges).
SNAPSHOT_TTL_S = 1.0


def model_name_ok(name: str) -> bool:
    return MODEL_NAME.fullmatch(name) is not None


def check_model_name(name: str) -> str:
    """``name``, or BadRequest for one that cannot be a model name (a path, a blank)."""
    if not model_name_ok(name):
        raise BadRequest("model must be a model name: letters, digits and . _ : + - "
                         "(at most 100), never a path")
    return name


def parse_names(config: str) -> set[str]:
    """The model names in a comma-separated setting (entries that are not names dropped)."""
    return {m.strip() for m in config.split(",") if model_name_ok(m.strip())}


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """One worker's record in the registry."""

    name: str  # its consumer name in the work queue's group
    model: str  # the model name it serves (its queue)
    device: str  # cpu | cuda
    device_index: int
    capacity: int  # sessions it transcribes at once
    free: int  # of those, slots free now
    host: str = ""
    metrics_port: int = 0  # where its /metrics is (METRICS_PORT=0: a free port, told here)
    expires_ms: int = 0  # Redis time the record stops counting

    def encode(self) -> str:
        body = dataclasses.asdict(self)
        del body["name"], body["expires_ms"]
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def decode(cls, name: str, raw: bytes | str) -> WorkerInfo | None:
        """None for a record that is not one (a newer or broken writer): it is ignored."""
        try:
            body = json.loads(raw)
            return cls(name=name, model=str(body["model"]), device=str(body["device"]),
                       device_index=int(body["device_index"]), capacity=int(body["capacity"]),
                       free=int(body["free"]), host=str(body.get("host", "")),
                       metrics_port=int(body.get("metrics_port", 0)),
                       expires_ms=int(body["expires_ms"]))
        except (ValueError, KeyError, TypeError):
            return None


async def announce(redis: aioredis.Redis, info: WorkerInfo, ttl_ms: int) -> None:
    """Write (or renew) ``info``, valid for ``ttl_ms`` on the Redis clock."""
    await redis.register_script(ANNOUNCE_WORKER)(
        keys=[keys.WORKERS], args=[info.name, info.encode(), ttl_ms])


async def withdraw(redis: aioredis.Redis, name: str) -> None:
    """A stopping worker leaves the registry at once."""
    await redis.hdel(keys.WORKERS, name)


@dataclasses.dataclass(frozen=True)
class ModelStatus:
    """One served model, summed over its live workers (``GET /v1/models``)."""

    name: str
    workers: int
    capacity: int
    free_slots: int
    devices: tuple[str, ...]  # "cpu", "cuda:0", ... each once

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["devices"] = list(self.devices)
        return out


@dataclasses.dataclass(frozen=True)
class Registry:
    """One reading of the registry: every record left, live or not, and the Redis time."""

    now_ms: int
    records: tuple[WorkerInfo, ...]

    @property
    def live(self) -> list[WorkerInfo]:
        return [w for w in self.records if w.expires_ms > self.now_ms]

    def served(self) -> dict[str, ModelStatus]:
        """Each model with at least one live worker."""
        by_model: dict[str, list[WorkerInfo]] = {}
        for w in self.live:
            by_model.setdefault(w.model, []).append(w)
        return {model: ModelStatus(
            model, len(ws), sum(w.capacity for w in ws), sum(max(0, w.free) for w in ws),
            tuple(sorted({w.device if w.device == "cpu" else f"{w.device}:{w.device_index}"
                          for w in ws})))
            for model, ws in sorted(by_model.items())}

    def seen(self) -> set[str]:
        """Models a worker serves, or served within the grace (records are deleted after
        it: ``read_registry``)."""
        return {w.model for w in self.records}


async def read_registry(redis: aioredis.Redis, grace_s: float, purge: bool = True) -> Registry:
    """The registry as it is now, less records expired more than ``grace_s`` ago, which are
    deleted when ``purge`` (a worker that crashed: a stopping one deletes its own; fanout,
    which only reads Redis, leaves that to the gateways)."""
    seconds, micros = await redis.time()
    now_ms = seconds * 1000 + micros // 1000
    raw = await redis.hgetall(keys.WORKERS)
    records: list[WorkerInfo] = []
    stale: list[bytes | str] = []
    for field, value in raw.items():
        name = field.decode(errors="replace") if isinstance(field, bytes) else field
        info = WorkerInfo.decode(name, value)
        if info is None or info.expires_ms + grace_s * 1000 < now_ms:
            stale.append(field)
        else:
            records.append(info)
    if stale and purge:
        await redis.hdel(keys.WORKERS, *stale)
    return Registry(now_ms, tuple(sorted(records, key=lambda w: w.name)))


class ServedModels:
    """A gateway's (or fanout's) view of the registry, read at most once a
    ``SNAPSHOT_TTL_S`` for all its users.

    ``default``: the deployment's default model (``STT_MODEL``), None where the process does
    not know it (fanout, which also never deletes: ``purge``); ``accepted``: names always
    accepted (``MODELS``).
    """

    def __init__(self, redis: aioredis.Redis, default: str | None = None,
                 accepted: str = "", grace_s: float = 300.0, purge: bool = True) -> None:
        self.redis = redis
        self.purge = purge
        self.default = default
        self.accepted = parse_names(accepted) | ({default} if default else set())
        self.grace_s = grace_s
        self._registry: Registry | None = None
        self._at = -SNAPSHOT_TTL_S
        self._lock = asyncio.Lock()

    async def registry(self) -> Registry:
        async with self._lock:
            if self._registry is None or time.monotonic() - self._at >= SNAPSHOT_TTL_S:
                self._registry = await read_registry(self.redis, self.grace_s, self.purge)
                self._at = time.monotonic()
            return self._registry

    async def known(self) -> set[str]:
        """Every model name a session may ask for now."""
        return self.accepted | (await self.registry()).seen()

    async def check(self, name: str) -> None:
        """BadRequest for what cannot be a model name; ModelUnavailable unless a session may
        ask for ``name``: a worker serves it, or did within the grace, or the deployment
        names it (default, ``MODELS``). Such a session may still wait for a worker (with a
        ``model_unavailable`` warning)."""
        check_model_name(name)
        if name in self.accepted:
            return
        if name not in (await self.registry()).seen():
            raise ModelUnavailable(f"no transcriber serves the model {name!r}"
                                   + (f"; the default is {self.default!r}"
                                      if self.default else ""))

    async def listing(self) -> dict[str, Any]:
        """``GET /v1/models``: what is served now, and the default."""
        served = (await self.registry()).served()
        body: dict[str, Any] = {"models": [m.to_dict() for m in served.values()]}
        if self.default:
            body["default"] = self.default
        return body
