"""A TCP proxy in front of redis-server that loses chosen replies, as a network does.

``drop_reply(pattern)``: the next request chunk containing ``pattern`` reaches Redis and
runs, but its reply never reaches the client: the proxy closes that connection instead, so
redis-py sees a connection error and (with its ``Retry``) sends the command again.
"""

from __future__ import annotations

import socket
import threading

from tests.procs import free_port


class LossyProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._rules: list[bytes] = []
        self.dropped: list[bytes] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def drop_reply(self, pattern: bytes) -> None:
        with self._lock:
            self._rules.append(pattern)

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            state = {"drop": False}
            threading.Thread(target=self._requests, args=(client, server, state),
                             daemon=True).start()
            threading.Thread(target=self._replies, args=(server, client, state),
                             daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket,
                  state: dict[str, bool]) -> None:
        try:
            while data := client.recv(65536):
                with self._lock:
                    rule = next((p for p in self._rules if p in data), None)
                    if rule is not None:
                        self._rules.remove(rule)
                        self.dropped.append(rule)
                        state["drop"] = True
                server.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, server):
                with_ignored(s.close)

    def _replies(self, server: socket.socket, client: socket.socket,
                 state: dict[str, bool]) -> None:
        try:
            while data := server.recv(65536):
                if state["drop"]:  # the command ran; its reply is lost with the connection
                    break
                client.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, server):
                with_ignored(s.shutdown, socket.SHUT_RDWR)
                with_ignored(s.close)


def with_ignored(fn: object, *args: object) -> None:
    try:
        fn(*args)  # type: ignore[operator]
    except OSError:
        pass
