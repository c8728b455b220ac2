"""A small synchronous WebDriver BiDi client for driving stock Firefox in tests.

Firefox (Debian's ``firefox-esr``) speaks WebDriver BiDi natively: started with
``--remote-debugging-port``, it serves a WebSocket at ``ws://127.0.0.1:PORT/session``
where ``session.new`` opens a session; no geckodriver, nothing downloaded. Playwright
can only drive its own patched Firefox builds, so the tests use this instead.

Commands are ``{"id", "method", "params"}``; replies are ``{"type": "success", "id",
"result"}`` or ``{"type": "error", "id", "error", "message"}``; events are
``{"type": "event", "method", "params"}``. See https://w3c.github.io/webdriver-bidi/.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

FIREFOX = shutil.which("firefox-esr") or shutil.which("firefox") or "/usr/bin/firefox-esr"

#: Preferences for an unattended test profile: BiDi only, no first-run pages, no
#: update or safe-browsing traffic. (Firefox's remote agent adds its own recommended
#: automation prefs on top.)
TEST_PREFS: dict[str, Any] = {
    "remote.active-protocols": 1,  # WebDriver BiDi only (no CDP)
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.startup.page": 0,
    "browser.aboutwelcome.enabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "datareporting.healthreport.uploadEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "app.update.auto": False,
    "app.update.enabled": False,
    "app.normandy.enabled": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.downloads.enabled": False,
    "extensions.update.enabled": False,
    "extensions.getAddons.cache.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "browser.newtabpage.enabled": False,
    "browser.tabs.warnOnClose": False,
    "dom.disable_open_during_load": False,
    # No microphone prompt (a person would answer "Allow"). Autoplay keeps Firefox's
    # default policy: the page starts audio after a real (trusted) click on Start.
    "media.navigator.permission.disabled": True,
}


class BiDiError(RuntimeError):
    """An ``error`` reply to a command."""

    def __init__(self, method: str, reply: Mapping[str, Any]) -> None:
        self.error = str(reply.get("error", ""))
        super().__init__(f"{method}: {self.error}: {reply.get('message', '')}")


class BiDi:
    """One WebSocket to a BiDi endpoint: ``send()`` waits for the reply; events go to
    callbacks registered with ``on()`` (run on the reader thread, so keep them short)."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self._exit = contextlib.ExitStack()  # `with connect(...)`, for the object's life
        self.ws: ClientConnection = self._exit.enter_context(
            connect(url, max_size=None, compression=None, open_timeout=timeout))
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._waiting: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._handlers: dict[str, list[Callable[[dict[str, Any]], None]]] = {}
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for raw in self.ws:
                msg = json.loads(raw)
                if msg.get("type") == "event":
                    for handler in list(self._handlers.get(msg.get("method", ""), ())):
                        handler(msg.get("params", {}))
                    continue
                with self._lock:
                    waiter = self._waiting.pop(msg.get("id"), None)
                if waiter is not None:
                    waiter.put(msg)
        except ConnectionClosed:
            pass
        finally:
            self._closed.set()
            with self._lock:
                waiters, self._waiting = list(self._waiting.values()), {}
            for waiter in waiters:
                waiter.put({"type": "error", "error": "connection closed", "message": ""})

    def on(self, event: str, handler: Callable[[dict[str, Any]], None]) -> None:
        self._handlers.setdefault(event, []).append(handler)

    def off(self, event: str, handler: Callable[[dict[str, Any]], None]) -> None:
        handlers = self._handlers.get(event, [])
        if handler in handlers:
            handlers.remove(handler)

    def send(self, method: str, params: Mapping[str, Any] | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        cmd_id = next(self._ids)
        waiter: queue.Queue[dict[str, Any]] = queue.Queue(1)
        with self._lock:
            if self._closed.is_set():
                raise BiDiError(method, {"error": "connection closed"})
            self._waiting[cmd_id] = waiter
        self.ws.send(json.dumps({"id": cmd_id, "method": method, "params": dict(params or {})}))
        try:
            reply = waiter.get(timeout=timeout or self.timeout)
        except queue.Empty:
            with self._lock:
                self._waiting.pop(cmd_id, None)
            raise TimeoutError(f"{method}: no reply in {timeout or self.timeout} s") from None
        if reply.get("type") != "success":
            raise BiDiError(method, reply)
        result: dict[str, Any] = reply.get("result", {})
        return result

    def close(self) -> None:
        self._exit.close()
        self._reader.join(5)


class JSError(AssertionError):
    """A script that threw, with the exception's text and the page's stack."""


def _remote_value(value: Mapping[str, Any]) -> Any:
    """A BiDi RemoteValue as plain Python (objects with string keys become dicts)."""
    kind = value.get("type")
    if kind in ("undefined", "null"):
        return None
    if kind in ("string", "boolean"):
        return value["value"]
    if kind == "number":
        v = value["value"]
        return float(v) if isinstance(v, str) else v  # "NaN", "Infinity", "-0"
    if kind == "bigint":
        return int(value["value"])
    if kind in ("array", "set"):
        return [_remote_value(v) for v in value.get("value", [])]
    if kind in ("object", "map"):
        return {(k if isinstance(k, str) else json.dumps(k)): _remote_value(v)
                for k, v in value.get("value", [])}
    return value  # nodes, windows, functions...: the RemoteValue itself (with sharedId)


def _local_value(value: Any) -> dict[str, Any]:
    """A JSON-like Python value as a BiDi LocalValue."""
    if value is None:
        return {"type": "null"}
    if isinstance(value, bool):
        return {"type": "boolean", "value": value}
    if isinstance(value, int | float):
        return {"type": "number", "value": value}
    if isinstance(value, str):
        return {"type": "string", "value": value}
    if isinstance(value, list | tuple):
        return {"type": "array", "value": [_local_value(v) for v in value]}
    if isinstance(value, Mapping):
        return {"type": "object", "value": [[str(k), _local_value(v)] for k, v in value.items()]}
    raise TypeError(f"cannot pass {type(value).__name__} to the page")


class Page:
    """One top-level browsing context (a tab)."""

    def __init__(self, bidi: BiDi, context: str) -> None:
        self.bidi = bidi
        self.context = context

    def _result(self, reply: dict[str, Any]) -> Any:
        if reply.get("type") == "exception":
            details = reply.get("exceptionDetails", {})
            raise JSError(f"{details.get('text')}\n{json.dumps(details.get('stackTrace'))}")
        return _remote_value(reply["result"])

    def evaluate(self, expression: str, timeout: float | None = None) -> Any:
        """The value of ``expression`` (awaited when it is a promise), as Python."""
        reply = self.bidi.send("script.evaluate", {
            "expression": expression, "target": {"context": self.context},
            "awaitPromise": True, "resultOwnership": "none",
            "serializationOptions": {"maxObjectDepth": 4},
        }, timeout)
        return self._result(reply)

    def call(self, function: str, *args: Any, timeout: float | None = None) -> Any:
        """``function(...args)`` in the page (awaited when it returns a promise)."""
        reply = self.bidi.send("script.callFunction", {
            "functionDeclaration": function, "target": {"context": self.context},
            "awaitPromise": True, "resultOwnership": "none",
            "serializationOptions": {"maxObjectDepth": 4},
            "arguments": [_local_value(a) for a in args],
        }, timeout)
        return self._result(reply)

    def navigate(self, url: str) -> None:
        self.bidi.send("browsingContext.navigate",
                       {"context": self.context, "url": url, "wait": "complete"}, 60)

    def set_viewport(self, width: int, height: int) -> None:
        self.bidi.send("browsingContext.setViewport",
                       {"context": self.context, "viewport": {"width": width, "height": height}})

    def wait_for(self, expression: str, timeout: float = 30.0, interval: float = 0.1) -> Any:
        """Poll ``expression`` until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"not true after {timeout} s: {expression}")
            time.sleep(interval)

    def click(self, selector: str) -> None:
        """A trusted click (user activation, as a person's) in the middle of the element."""
        reply = self.bidi.send("script.evaluate", {
            "expression": f"document.querySelector({json.dumps(selector)})",
            "target": {"context": self.context}, "awaitPromise": False,
            "resultOwnership": "root",
        })
        node = reply.get("result", {})
        if node.get("type") != "node":
            raise AssertionError(f"no element {selector!r}")
        ref = {"sharedId": node["sharedId"]}
        self.bidi.send("input.performActions", {"context": self.context, "actions": [{
            "type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
            "actions": [
                {"type": "pointerMove", "x": 0, "y": 0,
                 "origin": {"type": "element", "element": ref}},
                {"type": "pointerDown", "button": 0},
                {"type": "pointerUp", "button": 0},
            ]}]})

    def screenshot(self, path: Path) -> None:
        data = self.bidi.send("browsingContext.captureScreenshot",
                              {"context": self.context, "origin": "viewport"})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))


class PulseAudio:
    """A private PulseAudio server whose only device is a null sink (it discards what it
    plays, in real time).

    Firefox runs an AudioContext only on a real audio output: without one (a headless
    box has no sound card) it falls back to a system-clock driver and keeps every
    AudioContext ``suspended``, so ``resume()`` never settles and an AudioWorklet never
    runs. Chromium's headless mode has a fake output; Firefox needs this.
    """

    def __init__(self, rate: int = 48000, timeout: float = 20.0) -> None:
        exe = shutil.which("pulseaudio")
        if exe is None:
            raise FileNotFoundError("pulseaudio is not installed (.ci/run installs it)")
        self.dir = tempfile.mkdtemp(prefix="stt-pulse-")
        self.socket = os.path.join(self.dir, "native")
        env = {**os.environ, "HOME": self.dir, "XDG_RUNTIME_DIR": self.dir,
               "XDG_CONFIG_HOME": self.dir, "PULSE_RUNTIME_PATH": self.dir}
        self.proc = subprocess.Popen(
            [exe, "-n", "--daemonize=no", "--exit-idle-time=-1", "--use-pid-file=no",
             "--disable-shm=yes", "--log-target=stderr",
             "-L", f"module-null-sink sink_name=speakers rate={rate}",
             "-L", f"module-native-protocol-unix socket={self.socket} auth-anonymous=1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
            start_new_session=True)
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("pulseaudio did not start:\n" + "\n".join(self.log[-20:]))
            time.sleep(0.05)

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip())

    def _ready(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            return s.connect_ex(self.socket) == 0

    @property
    def env(self) -> dict[str, str]:
        """Environment for a client (Firefox) of this server only."""
        return {"PULSE_SERVER": f"unix:{self.socket}"}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Firefox:
    """Headless stock Firefox with a throwaway profile and a BiDi session."""

    def __init__(self, prefs: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None,
                 executable: str = FIREFOX, timeout: float = 60.0) -> None:
        self.profile = tempfile.mkdtemp(prefix="stt-firefox-")
        all_prefs = {**TEST_PREFS, **(prefs or {})}
        Path(self.profile, "user.js").write_text("".join(
            f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in all_prefs.items()))
        full_env = {**os.environ, "MOZ_HEADLESS": "1", "MOZ_CRASHREPORTER_DISABLE": "1",
                    **(env or {})}
        self.proc = subprocess.Popen(
            [executable, "--headless", "--no-remote", "--profile", self.profile,
             "--remote-debugging-port", "0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=full_env,
            start_new_session=True)
        self.log: list[str] = []
        listening: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(listening,), daemon=True).start()
        try:
            url = listening.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise TimeoutError("Firefox did not start WebDriver BiDi:\n"
                               + "\n".join(self.log[-30:])) from None
        try:
            self.bidi = BiDi(url.rstrip("/") + "/session")
            self.capabilities = self.bidi.send("session.new",
                                               {"capabilities": {}})["capabilities"]
        except BaseException:
            self.close()
            raise
        self.version = str(self.capabilities.get("browserVersion", ""))

    def _pump(self, listening: queue.Queue[str]) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip())
            m = re.search(r"WebDriver BiDi listening on (ws://\S+)", line)
            if m:
                listening.put(m.group(1))

    def new_page(self) -> Page:
        context = self.bidi.send("browsingContext.create", {"type": "tab"})["context"]
        return Page(self.bidi, context)

    def close_page(self, page: Page) -> None:
        self.bidi.send("browsingContext.close", {"context": page.context})

    def close(self) -> None:
        if hasattr(self, "bidi"):
            try:
                self.bidi.send("browser.close", timeout=10)
            except (BiDiError, TimeoutError, ConnectionClosed):
                pass
            self.bidi.close()
        elif self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # Firefox's own child processes too
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)
