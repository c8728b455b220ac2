"""``stt``: the command-line client of a live-stt server (HTTP and WebSocket only).

    stt sessions                       list recorded sessions, newest first
    stt show ID                        one session's details
    stt export ID --format srt -o F    audio (wav) or transcript (txt, json, srt, vtt)
    stt replay ID [--speed max]        re-transcribe a recording as a new session
    stt results ID [--original-timing] watch a session's results (live or recorded)
    stt stream FILE [--realtime]       transcribe a local audio file
    stt stream --mic                   transcribe the microphone (needs sounddevice)

``--url`` (or ``STT_URL``) names the server, default http://localhost:8765.
``--api-key`` (or ``STT_API_KEY``) authenticates, as ``Authorization: Bearer``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
import wave
from collections.abc import Callable, Sequence
from typing import IO, Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from common.client import listen_url, stream
from common.messages import Final, Word
from fanout.formats import speaker_name, turns

DEFAULT_URL = "http://localhost:8765"
FRAME_S = 0.1  # audio per message when streaming a file or the microphone
#: A file up to this long is sent at once; a longer one at AUTO_PACE times real time, inside
#: the gateway's default speed limit (AUDIO_BURST_S 60 s ahead, then MAX_AUDIO_SPEED 3x).
AT_ONCE_S = 50.0
AUTO_PACE = 2.5


class CliError(Exception):
    """A failure to report in one line and exit 1."""


# --------------------------------------------------------------------------- server access


def ws_base(url: str) -> str:
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def http_base(url: str) -> str:
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _query(params: dict[str, Any]) -> str:
    clean = {k: (str(v).lower() if isinstance(v, bool) else v)
             for k, v in params.items() if v is not None}
    return f"?{urlencode(clean)}" if clean else ""


def auth_headers(args: argparse.Namespace) -> dict[str, str]:
    key = getattr(args, "api_key", None)
    return {"Authorization": f"Bearer {key}"} if key else {}


def http_get(url: str, timeout: float = 60.0, headers: dict[str, str] | None = None,
             method: str = "GET") -> Any:
    """Open a request (GET unless ``method``); HTTP errors become CliError with the
    server's message."""
    try:
        return urllib.request.urlopen(
            urllib.request.Request(url, headers=headers or {}, method=method), timeout=timeout)
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read())
            message = f"{body['message']} ({body['code']})"
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code} {exc.reason}"
        raise CliError(message) from None
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"cannot reach {http_base(url)}: {getattr(exc, 'reason', exc)}") from None


def get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    with http_get(url, headers=headers) as resp:
        return json.loads(resp.read())


def session_url(base: str, sid: str, leaf: str = "") -> str:
    """``base`` is already an http(s) or ws(s) URL."""
    return f"{base}/v1/sessions/{quote(sid, safe='')}" + (f"/{leaf}" if leaf else "")


# --------------------------------------------------------------------------- output


def _clock(seconds: float) -> str:
    minutes, secs = divmod(max(0.0, float(seconds)), 60.0)
    return f"{int(minutes):02d}:{secs:04.1f}"


class Printer:
    """Prints server messages as they come: finals as lines, partials overwritten on a tty."""

    def __init__(self, as_json: bool = False, out: IO[str] | None = None) -> None:
        self.as_json = as_json
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self._partial_shown = False
        self.failed: str | None = None

    def _clear_partial(self) -> None:
        if self._partial_shown:
            self.out.write("\r\033[K")
            self._partial_shown = False

    def __call__(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "error":
            self.failed = f"{msg.get('message')} ({msg.get('code')})"
        elif kind == "session" and msg.get("resumed"):
            self.failed = None  # the error that dropped the socket was got over
        if self.as_json:
            self.out.write(json.dumps(msg, ensure_ascii=False) + "\n")
            self.out.flush()
            return
        who = f"[channel {msg['channel']}] " if msg.get("channel") is not None else ""
        if kind == "partial":
            text = f"… {who}{msg['text']}"
            if msg.get("speaker") is not None:  # provisional
                text = f"{speaker_name(msg['speaker'])}? {text}"
            if self.tty:
                width = shutil.get_terminal_size().columns - 1
                self.out.write("\r\033[K" + text[-width:])
                self._partial_shown = True
            else:
                self.out.write(f"  [{_clock(msg['start'])}] {text}\n")
        elif kind == "final":
            self._clear_partial()
            if msg.get("text"):
                self.out.write(f"[{_clock(msg['start'])} - {_clock(msg['end'])}] "
                               f"{who}{said(msg)}\n")
        elif kind == "session":
            line = f"session {msg['session_id']}"
            if msg.get("replay_of"):
                line += f" (replay of {msg['replay_of']}, {msg.get('speed')})"
            if msg.get("model"):
                line += f", model {msg['model']}"
            if msg.get("resumed"):
                line += f", resumed at {msg.get('stored_samples', 0) / 16000:.1f} s"
            print(line, file=sys.stderr)
        elif kind == "warning":
            self._clear_partial()
            print(f"warning: {msg['message']} ({msg['code']})", file=sys.stderr)
        elif kind == "closed":
            self._clear_partial()
            print(f"closed: {msg['utterances']} utterances, {msg['duration']:.1f} s of audio",
                  file=sys.stderr)
        elif kind == "error":
            self._clear_partial()
        self.out.flush()


def said(final: dict[str, Any]) -> str:
    """A final's text; with speaker labels, each speaker's run of words after its name."""
    if final.get("speaker") is None:
        return str(final["text"])
    runs = turns(Final(final.get("session_id", ""), final.get("utterance", 0), final["text"],
                       final.get("start", 0.0), final.get("end", 0.0),
                       tuple(Word.from_obj(w) for w in final.get("words", ())),
                       speaker=final["speaker"]))
    return " ".join(f"{speaker_name(s)}: {t}" if s is not None else t for s, t in runs)


async def watch(url: str, printer: Printer, on_open: Callable[[Any], Any] | None = None,
                headers: dict[str, str] | None = None) -> None:
    """Read a results socket to its end, printing every message."""
    try:
        async with connect(url, max_size=None, compression=None,
                           additional_headers=headers or {}) as ws:
            if on_open is not None:
                on_open(ws)
            try:
                async for raw in ws:
                    printer(json.loads(raw))
            except ConnectionClosed:
                pass
            code = ws.close_code
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise CliError(f"cannot connect to {url.split('?')[0]}: {exc}") from None
    if printer.failed:
        raise CliError(printer.failed)
    if code != 1000:
        raise CliError(f"connection closed with code {code}")


# --------------------------------------------------------------------------- commands


def cmd_sessions(args: argparse.Namespace) -> None:
    body = get_json(f"{http_base(args.url)}/v1/sessions"
                    + _query({"limit": args.limit, "state": args.state}), auth_headers(args))
    if args.json:
        print(json.dumps(body, indent=1))
        return
    rows = [("ID", "STATE", "CREATED", "DURATION", "MODEL", "FINALS", "RESULTS", "REPLAY OF")]
    for s in body["sessions"]:
        rows.append((s["session_id"], s["state"],
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["created"])),
                     f"{s['duration']:.1f}s", s["model"] or "-", str(s["finals"]),
                     str(s["results"]), s["replay_of"] or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_show(args: argparse.Namespace) -> None:
    info = get_json(session_url(http_base(args.url), args.id), auth_headers(args))
    if args.json:
        print(json.dumps(info, indent=1))
        return
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        print(f"{key + ':':<17} {value if value not in (None, '') else '-'}")


def cmd_models(args: argparse.Namespace) -> None:
    """What the workers serve now (``GET /v1/models``)."""
    body = get_json(f"{http_base(args.url)}/v1/models", auth_headers(args))
    if args.json:
        print(json.dumps(body, indent=1))
        return
    rows = [("MODEL", "WORKERS", "CAPACITY", "FREE", "DEVICES")]
    for m in body["models"]:
        name = m["name"] + (" (default)" if m["name"] == body.get("default") else "")
        rows.append((name, str(m["workers"]), str(m["capacity"]), str(m["free_slots"]),
                     ",".join(m["devices"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_usage(args: argparse.Namespace) -> None:
    """Audio seconds received and transcribed by tenant, model and day (``GET /v1/usage``:
    the key's tenant; an admin key's, every tenant's or ``--tenant``'s)."""
    body = get_json(f"{http_base(args.url)}/v1/usage" + _query(
        {"from": args.start, "to": args.end, "tenant": args.tenant}), auth_headers(args))
    if args.json:
        print(json.dumps(body, indent=1))
        return
    rows = [("DAY", "TENANT", "MODEL", "RECEIVED", "TRANSCRIBED")]
    for u in body["usage"]:
        rows.append((u["day"], u["tenant"], u["model"], f"{u['received_s']:.1f}s",
                     f"{u['transcribed_s']:.1f}s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_delete(args: argparse.Namespace) -> None:
    """Remove a session: its audio, results, record and listing entry (a live one ends)."""
    with http_get(session_url(http_base(args.url), args.id), headers=auth_headers(args),
                  method="DELETE"):
        pass
    print(f"deleted {args.id}")


def cmd_export(args: argparse.Namespace) -> None:
    if args.format == "wav":
        url = session_url(http_base(args.url), args.id, "audio.wav") + _query(
            {"start": args.start, "end": args.end})
    else:
        url = session_url(http_base(args.url), args.id, f"transcript.{args.format}")
    binary_to_tty = args.format == "wav" and args.output in (None, "-") and sys.stdout.isatty()
    if binary_to_tty:
        raise CliError("refusing to write WAV audio to a terminal; use -o FILE")
    with http_get(url, timeout=300, headers=auth_headers(args)) as resp:
        if args.output in (None, "-"):
            shutil.copyfileobj(resp, sys.stdout.buffer)
            sys.stdout.buffer.flush()
        else:
            with open(args.output, "wb") as fh:
                shutil.copyfileobj(resp, fh)
            print(f"wrote {args.output}", file=sys.stderr)


def cmd_replay(args: argparse.Namespace) -> None:
    url = session_url(ws_base(args.url), args.id, "replay") + _query({
        "speed": args.speed, "model": args.model, "language": args.language,
        "interim_results": args.partials})
    asyncio.run(watch(url, Printer(args.json), headers=auth_headers(args)))


def cmd_results(args: argparse.Namespace) -> None:
    url = session_url(ws_base(args.url), args.id, "results") + _query({
        "after": args.after or None, "partials": args.partials or None,
        "original_timing": args.original_timing or None,
        "speed": args.speed if args.original_timing else None})
    asyncio.run(watch(url, Printer(args.json), headers=auth_headers(args)))


def read_audio(path: str) -> tuple[np.ndarray, int]:
    """Any file soundfile can read (WAV only without it) → int16 frames x channels, rate."""
    try:
        import soundfile
    except ImportError:
        soundfile = None
    try:
        if soundfile is not None:
            data, rate = soundfile.read(path, dtype="int16", always_2d=True)
            return data, int(rate)
        with wave.open(path, "rb") as w:
            if w.getsampwidth() != 2:
                raise CliError("without the soundfile package only 16-bit WAV files are "
                               "supported (pip install soundfile)")
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
            return pcm.reshape(-1, w.getnchannels()), w.getframerate()
    except (OSError, RuntimeError, wave.Error) as exc:
        raise CliError(f"cannot read {path}: {exc}") from None


def audio_messages(pcm: np.ndarray, rate: int, keep_channels: bool = False,
                   ) -> tuple[list[tuple[bytes, float]], int, int]:
    """int16 frames x channels → (payload, seconds) messages, the rate and channels to declare
    (more than two are mixed to one unless ``keep_channels``: multichannel)."""
    if pcm.shape[1] > 2 and not keep_channels:
        pcm = pcm.mean(axis=1, dtype=np.float32).round().astype(np.int16)[:, None]
    if not 8000 <= rate <= 48000:
        import soxr

        pcm = np.clip(soxr.resample(pcm.astype(np.float32), rate, 16000).round(),
                      -32768, 32767).astype(np.int16).reshape(-1, pcm.shape[1])
        rate = 16000
    step = int(rate * FRAME_S)
    msgs = [(pcm[i:i + step].astype("<i2").tobytes(), len(pcm[i:i + step]) / rate)
            for i in range(0, len(pcm), step)]
    return msgs, rate, pcm.shape[1]


def cmd_stream(args: argparse.Namespace) -> None:
    if args.mic:
        asyncio.run(stream_mic(args))
        return
    if not args.file:
        raise CliError("name an audio FILE, or use --mic")
    pcm, rate = read_audio(args.file)
    msgs, rate, channels = audio_messages(pcm, rate, args.multichannel)
    if args.multichannel and channels < 2:
        raise CliError(f"--multichannel needs a file of 2 or more channels; {args.file} has 1")
    url = listen_url(ws_base(args.url), sample_rate=rate, channels=channels,
                     language=args.language, interim_results=not args.no_partials,
                     model=args.model, multichannel=True if args.multichannel else None,
                     keyterm=args.keyterm or None, prompt=args.prompt,
                     diarize=args.diarize or None)
    printer = Printer(args.json)
    try:
        res = asyncio.run(stream(url, msgs, pace=file_pace(args, msgs),
                                 on_message=printer, headers=auth_headers(args),
                                 reconnects=args.reconnects))
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise CliError(f"cannot connect to {url.split('?')[0]}: {exc}") from None
    if printer.failed:
        raise CliError(printer.failed)
    if res.close_code != 1000:
        raise CliError(f"connection closed with code {res.close_code}")


def file_pace(args: argparse.Namespace, msgs: list[tuple[bytes, float]]) -> float | None:
    """--realtime: 1; --pace: as given; else at once when short, AUTO_PACE when long."""
    if args.realtime:
        return 1.0
    if args.pace is not None:
        return float(args.pace) if args.pace > 0 else None
    return None if sum(s for _, s in msgs) <= AT_ONCE_S else AUTO_PACE


async def stream_mic(args: argparse.Namespace) -> None:
    """Microphone → /v1/listen until Ctrl-C, then the last finals."""
    try:
        import sounddevice as sd
    except (ImportError, OSError) as exc:
        raise CliError("microphone input needs the 'sounddevice' package and the PortAudio "
                       f"library (pip install sounddevice; apt-get install libportaudio2): "
                       f"{exc}") from None
    if args.device is not None and args.device.isdigit():
        args.device = int(args.device)
    try:
        device = sd.query_devices(args.device, "input")
    except (ValueError, sd.PortAudioError) as exc:
        raise CliError(f"no usable audio input device: {exc}") from None
    rate = int(device["default_samplerate"])
    rate = rate if 8000 <= rate <= 48000 else 16000
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes] = asyncio.Queue(maxsize=100)
    stop = asyncio.Event()

    def on_audio(data: Any, _frames: int, _time: Any, status: Any) -> None:
        if status:
            print(f"audio: {status}", file=sys.stderr)
        with contextlib.suppress(asyncio.QueueFull, RuntimeError):
            loop.call_soon_threadsafe(chunks.put_nowait, bytes(data))

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    printer = Printer(args.json)
    url = listen_url(ws_base(args.url), sample_rate=rate, channels=1, language=args.language,
                     interim_results=not args.no_partials, model=args.model,
                     keyterm=args.keyterm or None, prompt=args.prompt,
                     diarize=args.diarize or None)

    async def send_audio(ws: Any) -> None:
        with sd.RawInputStream(samplerate=rate, channels=1, dtype="int16", device=args.device,
                               blocksize=int(rate * FRAME_S), callback=on_audio):
            print("listening; Ctrl-C to stop", file=sys.stderr)
            while not stop.is_set():
                getter = asyncio.ensure_future(chunks.get())
                stopper = asyncio.ensure_future(stop.wait())
                done, _ = await asyncio.wait({getter, stopper},
                                             return_when=asyncio.FIRST_COMPLETED)
                for fut in (getter, stopper):
                    if fut not in done:
                        fut.cancel()
                if getter in done:
                    await ws.send(getter.result())
        await ws.send(json.dumps({"type": "close"}))

    sender: list[asyncio.Task[None]] = []
    try:
        await watch(url, printer, lambda ws: sender.append(asyncio.create_task(send_audio(ws))),
                    headers=auth_headers(args))
    except sd.PortAudioError as exc:
        raise CliError(f"microphone failed: {exc}") from None
    finally:
        for task in sender:
            task.cancel()


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    url_default = os.environ.get("STT_URL", DEFAULT_URL)
    key_help = "API key, sent as Authorization: Bearer (env STT_API_KEY)"
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS,
                        help=f"server URL (env STT_URL, default {DEFAULT_URL})")
    common.add_argument("--api-key", default=argparse.SUPPRESS, help=key_help)
    parser = argparse.ArgumentParser(prog="stt", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", default=url_default,
                        help=f"server URL (env STT_URL, default {DEFAULT_URL})")
    parser.add_argument("--api-key", default=os.environ.get("STT_API_KEY") or None,
                        help=key_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sessions", parents=[common], help="list recorded sessions")
    p.add_argument("--limit", type=int, default=None, help="at most this many (server default 50)")
    p.add_argument("--state", choices=("active", "closed"), default=None)
    p.add_argument("--json", action="store_true", help="print the server's JSON")
    p.set_defaults(func=cmd_sessions)

    p = sub.add_parser("show", parents=[common], help="one session's details")
    p.add_argument("id")
    p.add_argument("--json", action="store_true", help="print the server's JSON")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("models", parents=[common], help="the models workers serve now")
    p.add_argument("--json", action="store_true", help="print the server's JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("usage", parents=[common],
                       help="audio received and transcribed by tenant, model and day")
    p.add_argument("--from", dest="start", default=None, help="first day, YYYY-MM-DD (today)")
    p.add_argument("--to", dest="end", default=None, help="last day, YYYY-MM-DD (--from)")
    p.add_argument("--tenant", default=None, help="one tenant's (admin keys)")
    p.add_argument("--json", action="store_true", help="print the server's JSON")
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("delete", parents=[common],
                       help="delete a session: its audio, results and record")
    p.add_argument("id")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("export", parents=[common], help="export audio or transcript")
    p.add_argument("id")
    p.add_argument("--format", "-f", required=True, choices=("wav", "txt", "json", "srt", "vtt"))
    p.add_argument("--output", "-o", default=None, help="file to write (default stdout)")
    p.add_argument("--start", type=float, default=None, help="wav: from this second")
    p.add_argument("--end", type=float, default=None, help="wav: to this second")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("replay", parents=[common],
                       help="re-transcribe a recorded session as a new session")
    p.add_argument("id")
    p.add_argument("--speed", choices=("realtime", "max"), default="max")
    p.add_argument("--model", default=None, help="another model (default: the original's)")
    p.add_argument("--language", default=None, help="another language (default: the original's)")
    p.add_argument("--partials", action=argparse.BooleanOptionalAction, default=None,
                   help="ask for partials (default: as the original session)")
    p.add_argument("--json", action="store_true", help="print raw JSON messages")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("results", parents=[common], help="watch a session's results")
    p.add_argument("id")
    p.add_argument("--after", type=int, default=0, help="only results with a greater seq")
    p.add_argument("--partials", action="store_true", help="include partials")
    p.add_argument("--original-timing", action="store_true",
                   help="play stored results back with their original timing")
    p.add_argument("--speed", type=float, default=1.0,
                   help="with --original-timing: playback speed factor")
    p.add_argument("--json", action="store_true", help="print raw JSON messages")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("stream", parents=[common],
                       help="transcribe an audio file or the microphone")
    p.add_argument("file", nargs="?", help="audio file (WAV, FLAC, OGG, ... via soundfile)")
    p.add_argument("--mic", action="store_true", help="stream the microphone (sounddevice)")
    p.add_argument("--device", default=None, help="--mic: input device name or index")
    p.add_argument("--realtime", action="store_true",
                   help="send the file at real-time pace (default: at once up to "
                   f"{AT_ONCE_S:g} s of audio, {AUTO_PACE:g}x real time beyond: the server "
                   "refuses audio much faster than real time)")
    p.add_argument("--pace", type=float, default=None,
                   help="send at this multiple of real time (0 = at once)")
    p.add_argument("--language", default=None)
    p.add_argument("--model", default=None,
                   help="a model the workers serve (stt models; default: the server's)")
    p.add_argument("--no-partials", action="store_true", help="finals only")
    p.add_argument("--keyterm", action="append", default=[],
                   help="a name or word decoding should expect (repeatable)")
    p.add_argument("--prompt", default=None,
                   help="context for decoding (a topic, a list of attendees)")
    p.add_argument("--multichannel", action="store_true",
                   help="a file of several channels: each transcribed apart (results "
                        "marked [channel N]), instead of mixed to one")
    p.add_argument("--diarize", action="store_true",
                   help="label speakers (diarize=true): each line says who spoke")
    p.add_argument("--json", action="store_true", help="print raw JSON messages")
    p.add_argument("--reconnects", type=int, default=8,
                   help="a file: resume a dropped session this many times, sending again the "
                   "audio the server says it has not stored (0 = give up at once)")
    p.set_defaults(func=cmd_stream)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CliError as exc:
        print(f"stt: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
