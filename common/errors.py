"""One error hierarchy; each error knows its stable code and WebSocket close code."""

from __future__ import annotations

# WebSocket close codes (RFC 6455 + registered 1012/1013).
NORMAL = 1000
GOING_AWAY = 1001
UNSUPPORTED_DATA = 1003
INVALID_PAYLOAD = 1007
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
SERVICE_RESTART = 1012
TRY_AGAIN_LATER = 1013


class SttError(Exception):
    """Base error: ``code`` is machine-readable, the message is safe to show a client."""

    code = "internal_error"
    close_code = INTERNAL_ERROR
    fatal = True

    def __init__(self, message: str = "internal error") -> None:
        super().__init__(message)
        self.message = message


class BadRequest(SttError):
    """A query parameter or control message is malformed."""

    code = "bad_request"
    close_code = POLICY_VIOLATION


class UnsupportedAudio(SttError):
    """Audio format the service does not accept (encoding, rate, channels)."""

    code = "unsupported_audio"
    close_code = UNSUPPORTED_DATA


class InvalidAudio(SttError):
    """Audio bytes that cannot be decoded in the declared format."""

    code = "invalid_audio"
    close_code = INVALID_PAYLOAD


class InvalidMessage(SttError):
    """A text message that is not a valid control message."""

    code = "invalid_message"
    close_code = INVALID_PAYLOAD


class MessageTooBig(SttError):
    code = "message_too_big"
    close_code = MESSAGE_TOO_BIG


class SessionNotFound(SttError):
    code = "session_not_found"
    close_code = POLICY_VIOLATION


class Overloaded(SttError):
    code = "overloaded"
    close_code = TRY_AGAIN_LATER


class StaleLease(SttError):
    """This worker no longer owns the session; it must stop writing to it."""

    code = "stale_lease"


class SessionActive(SttError):
    """The operation needs a finished session (e.g. a replay of one still being recorded)."""

    code = "session_active"
    close_code = POLICY_VIOLATION


class TooSlow(SttError):
    """A viewer fell too far behind its session's results; it may reconnect with ``after``."""

    code = "too_slow"
    close_code = TRY_AGAIN_LATER


class TooLarge(SttError):
    """A response would exceed a configured size limit."""

    code = "too_large"
    close_code = MESSAGE_TOO_BIG


class StorageUnavailable(SttError):
    """Redis cannot be reached right now; the client may retry."""

    code = "storage_unavailable"
    close_code = TRY_AGAIN_LATER
