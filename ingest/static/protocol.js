// The /v1/listen protocol as the page speaks it (DESIGN.md §2, docs/protocol.md), with
// no DOM, no sockets and no timers: functions and small classes that take what happened
// and return what to do, so that tests/js/*.test.mjs can run them under Node.
//
//   query:  encoding, sample_rate, channels, interim_results, language, token,
//           session + after (resume after a dropped socket)
//   sends:  binary pcm_s16le frames, {"type": "close" | "keepalive"}
//   gets:   session, partial, final, warning, error, closed; then close 1000
//
// A "segment" is one server session. A reconnect normally resumes the same session
// (same segment; results with seq <= the last one seen are dropped). If the server
// starts a new session instead, a new segment begins at the current audio position.

export const KEEPALIVE_MS = 5000;
export const DRAIN_TIMEOUT_MS = 90000;
/** Delays before reconnect attempts, about 32 s in all: the server's resume_grace_s is 30. */
export const RECONNECT_DELAYS_MS = [250, 500, 1000, 2000, 4000, 8000, 8000, 8000];
/** Audio kept while the socket is down, and kept for resending (the server takes a 60 s burst). */
export const MAX_PENDING_SECONDS = 45;
/** Socket buffer above this much audio → a "slow network" notice. */
export const SLOW_NETWORK_SECONDS = 2;
/** The server's audio timeline (`stored_samples`, result times) runs at 16 kHz. */
export const SERVER_RATE = 16000;

export const CLOSE_MESSAGES = Object.freeze({
  1003: "The server does not accept this audio format.",
  1007: "The server could not decode the audio or a message it received.",
  1008: "The server rejected the request.",
  1009: "A message was larger than the server allows.",
  1011: "The server hit an internal error.",
  1013: "The service is busy right now. Please try again in a little while.",
});

/** Error codes (common/errors.py, docs/protocol.md) in words for people: every code a
 * /v1/listen client can receive, and no other (tests/test_page_modules.py checks both). */
export const ERROR_TEXT = Object.freeze({
  unauthorized: "Authentication failed: the access token is missing, wrong, expired or already used. Each recording needs a new token.",
  origin_not_allowed: "The server does not accept connections from this page's address.",
  too_many_sessions: "Too many recordings are open from here already. Stop one, or try again shortly.",
  unsupported_audio: "The server does not accept this audio format.",
  invalid_audio: "The server could not decode the audio.",
  invalid_message: "The server could not understand a message from this page.",
  bad_request: "The server rejected the settings.",
  session_not_found: "The session no longer exists on the server.",
  forbidden: "This session belongs to someone else, or the access token does not allow it.",
  session_taken: "This session was continued from another tab or device, so it stopped here.",
  session_closed: "The session had already ended on the server. Start a new recording to go on.",
  too_fast: "The server refused audio that arrived faster than real time.",
  session_too_long: "The session reached its maximum length. Everything said until then is below.",
  idle_timeout: "The session ended because no audio arrived for too long.",
  message_too_big: "A message was larger than the server allows.",
  internal_error: "The server hit an internal error. The transcript so far is kept below.",
  overloaded: "All transcribers are busy right now. Please try again in a little while.",
  storage_unavailable: "The server's storage is unavailable. Please try again in a little while.",
  storage_full: "The server's storage is full. Please try again in a little while.",
  quota_exceeded: "This account has used its transcription allowance for now. Please try again later.",
  model_unavailable: "The requested speech model is not available on this server.",
  too_slow: "This page fell behind reading results.",
  too_many_messages: "The page sent messages faster than the server allows.",
  rate_limited: "Too many requests from here in a short time. Please wait a moment and try again.",
});

/** Codes whose server message is added to the text (which parameter, which format). */
export const DETAIL_CODES = new Set(["bad_request", "unsupported_audio", "invalid_audio", "invalid_message", "message_too_big"]);
/** Close codes after which reconnecting would fail the same way... */
export const FATAL_CLOSE_CODES = new Set([1003, 1007, 1008, 1009, 1011, 1013, 1015]);
/** ...except after these errors, when a resume with `after` carries on. */
export const RESUMABLE_ERRORS = new Set(["too_slow", "storage_unavailable", "storage_full"]);
/** A token usable as a WebSocket subprotocol ("bearer.<token>"): kept out of URLs and logs. */
export const SUBPROTOCOL_SAFE = /^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$/;

// ------------------------------------------------------------------ user texts

/** The page's text for error `code`, or null. */
export function textFor(code) {
  return Object.prototype.hasOwnProperty.call(ERROR_TEXT, code) ? ERROR_TEXT[code] : null;
}

/** The text for an `error` message `err` ({code, message} or null) and the close code. */
export function errorText(err, closeCode) {
  if (!err) return CLOSE_MESSAGES[closeCode] || `The connection closed unexpectedly (code ${closeCode}).`;
  const known = textFor(err.code);
  if (!known) {
    const base = CLOSE_MESSAGES[closeCode] || "The server reported an error.";
    return `${base}${err.message ? ` (${err.message})` : ""}`;
  }
  return DETAIL_CODES.has(err.code) && err.message ? `${known} (${err.message})` : known;
}

export const TEXT = Object.freeze({
  drainTimeout: "The server did not finish the transcript in time; the last words may be missing.",
  closedEarly: "The server closed the session before sending all results.",
  serverEnded: "The server ended the session.",
  lost: "The connection to the server was lost and could not be re-established. The transcript so far is kept below.",
  cannotOpen: "Could not open a connection to the transcription server. Please try again.",
  unreachable: "The transcription server cannot be reached. Check your network connection and try again.",
  newSession: "The connection dropped and the session could not be resumed; continuing in a new session.",
  resumed: "Reconnected; the session was resumed.",
  noOpus: "This browser cannot record Opus (MediaRecorder); turn off low bandwidth to send plain audio.",
});

/** Browsers hide the HTTP status of a refused WebSocket upgrade, so the page asks for
 * /v1/listen once more as a plain GET (a dry run that does not use up a token): the text
 * for its `status` and JSON `body`. With `onlyKnown`, null unless the status explains the
 * failure. */
export function diagnosisText(status, body, onlyKnown = false) {
  const code = body && typeof body.code === "string" ? body.code : "";
  const known = textFor(code);
  if (status === 401) {
    const why = body && body.message ? ` (${body.message})` : "";
    return `Authentication failed${why}: the access token is missing, wrong, expired or already used. Each recording needs a new token.`;
  }
  if (status === 403) return known || ERROR_TEXT.origin_not_allowed;
  if (status === 429) return known || ERROR_TEXT.too_many_sessions;
  if (status === 503) return known || CLOSE_MESSAGES[1013];
  return onlyKnown ? null : TEXT.cannotOpen;
}

// ------------------------------------------------------------------ URLs

/** Whether `token` travels as a "bearer.<token>" subprotocol (else as ?token=). */
export function tokenAsSubprotocol(token) {
  return Boolean(token) && SUBPROTOCOL_SAFE.test(token);
}

/** The subprotocols to offer: "stt", which the server selects, so the credential beside
 * it is never echoed back; undefined without a token that fits. */
export function socketProtocols(token) {
  return tokenAsSubprotocol(token) ? ["stt", `bearer.${token}`] : undefined;
}

function wsBase(loc) {
  return `${loc.protocol === "https:" ? "wss:" : "ws:"}//${loc.host}`;
}

/** The /v1/listen URL for `params` ({interim, diarize, language, token, opus}) at capture `rate`;
 * `resume` ({sid, lastSeq}) asks for that session's results after lastSeq. With `opus`
 * (the low-bandwidth mode) the audio is MediaRecorder's Opus, whose header says its rate. */
export function listenUrl(loc, params, rate, resume = null) {
  const q = new URLSearchParams(
    params.opus
      ? { encoding: "opus" }
      : { encoding: "pcm_s16le", sample_rate: String(rate), channels: "1" },
  );
  q.set("interim_results", params.interim ? "true" : "false");
  if (params.diarize) q.set("diarize", "true");
  if (params.language) q.set("language", params.language);
  if (params.token && !tokenAsSubprotocol(params.token)) q.set("token", params.token);
  if (resume) {
    q.set("session", resume.sid);
    q.set("after", String(resume.lastSeq));
  }
  return `${wsBase(loc)}/v1/listen?${q}`;
}

/** Container types MediaRecorder may record Opus in, in order of preference (the server
 * reads both). */
export const OPUS_TYPES = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus"];

/** The first of OPUS_TYPES that `isSupported` (MediaRecorder.isTypeSupported) accepts. */
export function opusType(isSupported) {
  return OPUS_TYPES.find((t) => isSupported(t)) || null;
}

/** MediaRecorder's timeslice in the low-bandwidth mode: a blob of Opus this often. */
export const OPUS_TIMESLICE_MS = 250;
/** Its bit rate: speech at 24 kb/s instead of 256 kb/s of 16-bit PCM at 16 kHz. */
export const OPUS_BITS_PER_SECOND = 24000;

/** The viewer endpoint of session `sid`, from results after `after`. */
export function viewerUrl(loc, sid, after, token) {
  const q = new URLSearchParams({ after: String(after) });
  if (token && !tokenAsSubprotocol(token)) q.set("token", token);
  return `${wsBase(loc)}/v1/sessions/${encodeURIComponent(sid)}/results?${q}`;
}

// ------------------------------------------------------------------ messages

/** A server text message as an object with a string `type`, or null (binary, not JSON,
 * not an object). Unknown types pass: callers ignore them, for forward compatibility. */
export function parseMessage(data) {
  if (typeof data !== "string") return null;
  let msg;
  try {
    msg = JSON.parse(data);
  } catch (_) {
    return null;
  }
  if (!msg || typeof msg !== "object" || Array.isArray(msg) || typeof msg.type !== "string") return null;
  return msg;
}

/** The error a message carries, as {code, message}. */
export function errorOf(msg) {
  return { code: msg.code || "error", message: msg.message || "" };
}

// ------------------------------------------------------------------ segments and seq

/** The server sessions of one recording, in order; indexes continue after `offset` (the
 * segments of earlier recordings on the page). */
export class Segments {
  constructor(offset = 0) {
    this.offset = offset;
    this.list = [];
  }

  get current() {
    return this.list[this.list.length - 1] || null;
  }

  /** A new server session whose timeline starts at `baseSample` (capture rate). */
  open(sid, baseSample) {
    const seg = { index: this.offset + this.list.length, sid, lastSeq: 0, baseSample };
    this.list.push(seg);
    return seg;
  }

  /** Where a reconnect resumes: {sid, lastSeq} of the current session, or null. */
  resumePoint() {
    const seg = this.current;
    return seg ? { sid: seg.sid, lastSeq: seg.lastSeq } : null;
  }
}

/** Records `msg.seq` on `seg`; false for a result already seen (replayed after a resume). */
export function acceptSeq(seg, msg) {
  if (typeof msg.seq === "number" && msg.seq > 0) {
    if (msg.seq <= seg.lastSeq) return false;
    seg.lastSeq = msg.seq;
  }
  return true;
}

/** What a `session` message means, given the current segment `prev` and whether the
 * socket asked to resume: "first" (the recording's first session), "replaced" (the
 * server could not resume and started another one), "resumed", or "same". */
export function sessionKind(prev, msg, resuming) {
  if (!prev) return "first";
  if (prev.sid !== msg.session_id) return "replaced";
  return resuming ? "resumed" : "same";
}

// ------------------------------------------------------------------ socket closed

/** What to do when the socket closed with `code`, given the last `error` message on it
 * ({code, message} or null), whether `closed` came (`drained`), whether Stop was pressed
 * (`stopping`), whether the socket was a resume (`resuming`) and whether any socket of
 * this recording got its session (`everConnected`). One of:
 *   {action: "finished", text}  drained: every final is in (text: why the server ended it)
 *   {action: "ended", failed, text}  closed 1000 without `closed`
 *   {action: "new_session"}  the resume was refused: carry on in a new session
 *   {action: "fatal", text}  reconnecting would fail the same way
 *   {action: "diagnose"}  the upgrade itself failed: ask for the HTTP status
 *   {action: "resume"}  a dropped socket: reconnect and resume */
export function onClose({ code, error, drained, stopping, resuming, everConnected }) {
  if (drained) return { action: "finished", text: error ? errorText(error, code) : "" };
  if (code === 1000) return { action: "ended", failed: stopping, text: stopping ? TEXT.closedEarly : TEXT.serverEnded };
  if (resuming && error && error.code === "session_not_found" && !stopping) return { action: "new_session" };
  const resumable = error ? RESUMABLE_ERRORS.has(error.code) && everConnected : !FATAL_CLOSE_CODES.has(code);
  if (!resumable) return { action: "fatal", text: errorText(error, code) };
  if (!everConnected) return { action: "diagnose" };
  return { action: "resume" };
}

/** Reconnect delays with ±20% jitter; `next()` is null once they are used up. A session
 * message resets it. */
export class ReconnectPolicy {
  constructor(delays = RECONNECT_DELAYS_MS, random = Math.random) {
    this.delays = delays;
    this.random = random;
    this.attempt = 0;
  }

  /** {attempt (0-based), delay (ms)} of the next try, or null: give up. */
  next() {
    const attempt = this.attempt++;
    if (attempt >= this.delays.length) return null;
    return { attempt, delay: this.delays[attempt] * (0.8 + this.random() * 0.4) };
  }

  reset() {
    this.attempt = 0;
  }
}

// ------------------------------------------------------------------ audio to send

/** Audio frames ({pcm: ArrayBuffer of int16 LE, samples}) on their way to the server, at
 * the capture `rate`: those waiting while no socket is open (bounded: the oldest go
 * first), and those sent in this segment (bounded), which a resume sends again from the
 * point the server says it stored. `samplesSent` is the position on the audio timeline of
 * the recording (all segments) where the next frame lands. */
export class AudioOutbox {
  constructor(rate, maxSeconds = MAX_PENDING_SECONDS) {
    this.rate = rate;
    this.maxSamples = maxSeconds * rate;
    this.pending = [];
    this.pendingSamples = 0;
    this.droppedSamples = 0;
    this.ring = [];
    this.ringSamples = 0;
    this.samplesSent = 0;
    this.resentSamples = 0;
  }

  /** Keeps a frame until a socket is open; drops the oldest beyond the bound. Returns
   * the samples dropped so far. */
  hold(pcm, samples) {
    this.pending.push({ pcm, samples });
    this.pendingSamples += samples;
    while (this.pendingSamples > this.maxSamples && this.pending.length) {
      const dropped = this.pending.shift();
      this.pendingSamples -= dropped.samples;
      this.droppedSamples += dropped.samples;
    }
    return this.droppedSamples;
  }

  /** The oldest waiting frame, taken off the queue, or null. */
  takePending() {
    const f = this.pending.shift();
    if (!f) return null;
    this.pendingSamples -= f.samples;
    return f;
  }

  clearPending() {
    this.pending = [];
    this.pendingSamples = 0;
  }

  /** Records a frame handed to the socket; returns the new `samplesSent`. */
  sent(pcm, samples) {
    this.ring.push({ start: this.samplesSent, pcm, samples });
    this.ringSamples += samples;
    while (this.ringSamples > this.maxSamples && this.ring.length > 1) this.ringSamples -= this.ring.shift().samples;
    this.samplesSent += samples;
    return this.samplesSent;
  }

  /** A new server session: nothing sent before it can be sent to it again. */
  newSegment() {
    this.ring = [];
    this.ringSamples = 0;
  }

  /** A resumed session that stored `storedSamples` (16 kHz) of the segment starting at
   * `baseSample`: audio handed to the old socket that the server never stored (lost in the
   * socket's buffer, or in a gateway that died) goes first in the queue again, and the
   * timeline steps back to what the server has. Returns the samples queued again, or null
   * when the server has everything sent (or `storedSamples` is not a number). */
  resendFrom(baseSample, storedSamples) {
    if (typeof storedSamples !== "number") return null;
    const stored = baseSample + Math.round((storedSamples * this.rate) / SERVER_RATE);
    if (stored >= this.samplesSent) return null;
    const again = [];
    while (this.ring.length) {
      const last = this.ring[this.ring.length - 1];
      if (last.start + last.samples <= stored) break;
      const f = this.ring.pop();
      this.ringSamples -= f.samples;
      const skip = Math.max(0, stored - f.start);
      again.unshift(skip ? { pcm: f.pcm.slice(skip * 2), samples: f.samples - skip } : { pcm: f.pcm, samples: f.samples });
      if (skip) break;
    }
    this.samplesSent = stored; // the server's timeline: what is sent next lands here
    let n = 0;
    for (const f of again) n += f.samples;
    this.pendingSamples += n;
    this.pending.unshift(...again);
    this.resentSamples += n;
    return n;
  }
}
