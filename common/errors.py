"""One error hierarchy; each error knows its stable code, WebSocket close code and HTTP status.

Messages are written for clients: they never carry exception text or other internals.
"""

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
    http_status = 500
    fatal = True
    #: The session's audio so far is transcribed and its finals delivered before the error
    #: and the close (limits a well-behaved client can reach: duration, idle).
    drain = False
    #: The message when none is given: the one wording of this error.
    default_message = "internal error"

    def __init__(self, message: str | None = None) -> None:
        message = message or self.default_message
        super().__init__(message)
        self.message = message


class BadRequest(SttError):
    """A query parameter or control message is malformed."""

    code = "bad_request"
    close_code = POLICY_VIOLATION
    http_status = 400


class UnsupportedAudio(SttError):
    """Audio format the service does not accept (encoding, rate, channels)."""

    code = "unsupported_audio"
    close_code = UNSUPPORTED_DATA
    http_status = 400


class InvalidAudio(SttError):
    """Audio bytes that cannot be decoded in the declared format."""

    code = "invalid_audio"
    close_code = INVALID_PAYLOAD
    http_status = 400


class InvalidMessage(SttError):
    """A text message that is not a valid control message."""

    code = "invalid_message"
    close_code = INVALID_PAYLOAD
    http_status = 400


class MessageTooBig(SttError):
    """A message over ``max_message_bytes``, or carrying more than ``max_frame_seconds`` of
    audio."""

    code = "message_too_big"
    close_code = MESSAGE_TOO_BIG
    http_status = 413


class SessionNotFound(SttError):
    code = "session_not_found"
    close_code = POLICY_VIOLATION
    http_status = 404
    default_message = "no such session (it may have expired)"


class NotFound(SttError):
    """A path no endpoint serves."""

    code = "not_found"
    http_status = 404
    default_message = "no such endpoint"


class MethodNotAllowed(SttError):
    """A method the endpoint does not serve; ``allow`` lists those it does (the ``Allow``
    header of the 405)."""

    code = "method_not_allowed"
    http_status = 405

    def __init__(self, message: str | None = None, allow: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.allow = allow


class WebSocketRequired(SttError):
    """A WebSocket endpoint asked for with plain HTTP."""

    code = "websocket_required"
    http_status = 426


class Overloaded(SttError):
    code = "overloaded"
    close_code = TRY_AGAIN_LATER
    http_status = 503


class StaleLease(SttError):
    """This worker no longer owns the session; it must stop writing to it."""

    code = "stale_lease"


class SessionTaken(SttError):
    """The session was resumed on another connection; this one may no longer send audio."""

    code = "session_taken"
    close_code = POLICY_VIOLATION


class SessionClosed(SttError):
    """The session has ended (closed by its transcriber); it takes no more audio."""

    code = "session_closed"
    close_code = POLICY_VIOLATION


class SessionActive(SttError):
    """The operation needs a finished session (e.g. a replay of one still being recorded)."""

    code = "session_active"
    close_code = POLICY_VIOLATION
    http_status = 409


class TooSlow(SttError):
    """A viewer fell too far behind its session's results; it may reconnect with ``after``."""

    code = "too_slow"
    close_code = TRY_AGAIN_LATER
    http_status = 503


class StorageUnavailable(SttError):
    """Redis cannot be reached right now; the client may retry."""

    code = "storage_unavailable"
    close_code = TRY_AGAIN_LATER
    http_status = 503
    default_message = "storage unavailable; try again later"


class StorageFull(StorageUnavailable):
    """Redis is at its memory watermark (or refused a write for lack of memory): new
    sessions are refused, with ``Retry-After``; a live session whose audio cannot be
    stored any more ends with this error and may resume when there is room."""

    code = "storage_full"
    default_message = "storage is full; try again later"

    def __init__(self, message: str | None = None, retry_after_s: float = 30.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# --------------------------------------------------------------------------- access and limits


class Unauthorized(SttError):
    """No credentials, or credentials that are wrong, expired or already used (HTTP 401)."""

    code = "unauthorized"
    close_code = POLICY_VIOLATION
    http_status = 401


class Forbidden(SttError):
    """Authenticated, but not allowed to do this (another principal's session; HTTP 403)."""

    code = "forbidden"
    close_code = POLICY_VIOLATION
    http_status = 403


class OriginNotAllowed(SttError):
    code = "origin_not_allowed"
    close_code = POLICY_VIOLATION
    http_status = 403


class TooManySessions(SttError):
    """A client address or an API key already has its maximum of concurrent sessions."""

    code = "too_many_sessions"
    close_code = POLICY_VIOLATION
    http_status = 429


class QuotaExceeded(SttError):
    """The tenant has reached one of its quotas (concurrent sessions, audio per day): a new
    session gets HTTP 429 with ``Retry-After``; a live session that reaches its audio quota
    gets its finals, then this error and close 1008."""

    code = "quota_exceeded"
    close_code = POLICY_VIOLATION
    http_status = 429
    drain = True

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooManyViewers(SttError):
    """A client address or an API key already holds its maximum of viewer sockets in this
    process."""

    code = "too_many_viewers"
    close_code = POLICY_VIOLATION
    http_status = 429


class TooFast(SttError):
    """Audio arrives faster than the allowed multiple of real time, beyond the burst."""

    code = "too_fast"
    close_code = POLICY_VIOLATION
    http_status = 429


class TooManyMessages(SttError):
    """More WebSocket messages per second than ``max_messages_per_s`` allows after the burst
    (thousands of tiny messages cost CPU even within the audio speed limit)."""

    code = "too_many_messages"
    close_code = POLICY_VIOLATION
    http_status = 429


class RateLimited(SttError):
    """Too many requests (or failed authentications) from one address or for one API key;
    answered with HTTP 429 and ``Retry-After``."""

    code = "rate_limited"
    close_code = POLICY_VIOLATION
    http_status = 429

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TokenUsed(SttError):
    """A session token that already opened its session cannot be revoked any more."""

    code = "token_used"
    close_code = POLICY_VIOLATION
    http_status = 409


class SessionTooLong(SttError):
    """The session reached its maximum duration; what was received is still transcribed."""

    code = "session_too_long"
    close_code = POLICY_VIOLATION
    http_status = 403
    drain = True


class IdleTimeout(SttError):
    """No message from the client for too long; what was received is still transcribed."""

    code = "idle_timeout"
    close_code = POLICY_VIOLATION
    http_status = 408
    drain = True


class NotConfigured(SttError):
    """The feature is switched off in this deployment (e.g. session tokens without a secret)."""

    code = "not_configured"
    close_code = POLICY_VIOLATION
    http_status = 501


class ModelUnavailable(SttError):
    """A model no worker of this deployment serves: a name it does not know, or one no
    worker has served for ``model_grace_s`` (common/models.py)."""

    code = "model_unavailable"
    close_code = TRY_AGAIN_LATER
    http_status = 503
    default_message = "no transcriber serves this model"
