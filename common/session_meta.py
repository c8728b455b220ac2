"""The session record (``stt:{sid}:meta``) as every reader sees it: one typed decode.

The hash is written by the Lua scripts in ``common/scripts.py`` (creation, lease, commit,
close) and by ``HSET``s of a few fields; its field names are this dataclass's field names,
and docs/architecture.md says who writes each one. Readers decode it here instead of
picking fields out of a dict of bytes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, get_type_hints

#: Values of ``state``.
ACTIVE, CLOSED = "active", "closed"
#: Values of ``endpointing`` besides milliseconds: the worker's own endpoints; none (false).
ENDPOINTING_DEFAULT, ENDPOINTING_OFF = -1, 0


@dataclasses.dataclass(frozen=True)
class SessionMeta:
    """One session's record. Defaults stand for fields not (yet) written."""

    state: str = ACTIVE  # active | closed
    created: float = 0.0  # Redis time, unix seconds
    heartbeat: float = 0.0  # the client's last sign of life, Redis time
    # what the client asked for
    encoding: str = ""
    sample_rate: int = 0
    channels: int = 1
    multichannel: bool = False  # each channel transcribed apart (the audio is interleaved)
    language: str = ""
    interim: bool = True
    diarize: bool = False  # speaker labels on finals and words
    endpointing: int = ENDPOINTING_DEFAULT  # ms of silence that end an utterance (endpointing=)
    model: str = ""
    keyterms: str = ""  # JSON list: words decoding should expect (keyterm=)
    user_prompt: str = ""  # the client's context for decoding (prompt=)
    deadline: float = 0.0  # unix time (gateway clock) the session must end by; 0 = none
    replay_of: str = ""
    # who created it
    principal: str = ""  # "key:NAME", "token:NONCE", "" without authentication
    account: str = ""  # the API key's name (a token's minting key)
    tenant: str = ""  # the key's tenant ("" before tenants: the default tenant)
    address: str = ""  # the client's address bucket
    # the writing connection
    attach: int = 0  # its generation; appends are fenced by it
    audio_seq: int = 0
    # the owning worker
    epoch: int = 0
    owner: str = ""
    lease_entry: str = ""
    lease_at: int = 0  # ms, Redis time
    # what has been transcribed
    seq: int = 0
    commit_sample: int = 0
    next_utterance: int = 0
    prompt: str = ""
    resume_id: str = ""
    stable: bytes = b""  # the open utterance's promised words (msgpack)
    speakers: bytes = b""  # with diarize: the session's speakers (msgpack centroids)
    processed_sample: int = 0
    duration: float = 0.0  # audio seconds, once closed

    @property
    def closed(self) -> bool:
        return self.state == CLOSED

    @property
    def keyterm_list(self) -> list[str]:
        try:
            terms = json.loads(self.keyterms) if self.keyterms else []
        except ValueError:
            return []
        return [str(t) for t in terms] if isinstance(terms, list) else []

    @classmethod
    def decode(cls, raw: Mapping[bytes, bytes | None] | Mapping[str, Any]) -> SessionMeta:
        """From ``HGETALL`` (or ``HMGET`` zipped with its field names); unknown fields are
        ignored, missing ones take their defaults."""
        values: dict[str, Any] = {}
        for key, value in raw.items():
            name = key.decode() if isinstance(key, bytes) else key
            kind = _KINDS.get(name)
            if kind is None or value is None:
                continue
            values[name] = _convert(kind, value)
        return cls(**values)


def _convert(kind: type, value: bytes | str) -> Any:
    if kind is bytes:
        return value if isinstance(value, bytes) else value.encode()
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    if kind is bool:
        return text == "1"
    if kind is int:
        return int(float(text)) if text else 0
    if kind is float:
        return float(text) if text else 0.0
    return text


_KINDS: dict[str, type] = get_type_hints(SessionMeta)
FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SessionMeta))


@dataclasses.dataclass(frozen=True)
class ChannelPoint:
    """Where one channel of a multichannel session stands (its record's ``*.N`` fields,
    written by the COMMIT and PUBLISH scripts): its commit point, next utterance, prompt
    and the open utterance's promised words."""

    commit_sample: int = 0
    next_utterance: int = 0
    prompt: str = ""
    stable: bytes = b""


def channel_points(raw: Mapping[bytes, bytes | None] | Mapping[str, Any],
                   channels: int) -> list[ChannelPoint]:
    """Each channel's point from the record (``HGETALL``); defaults before its first final."""
    text = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    kinds = get_type_hints(ChannelPoint)
    out = []
    for channel in range(channels):
        values = {name: _convert(kinds[name], value) for name in kinds
                  if (value := text.get(f"{name}.{channel}")) is not None}
        out.append(ChannelPoint(**values))
    return out
