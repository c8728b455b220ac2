// Live transcription page: microphone → AudioWorklet → /v1/listen → transcript.
//
// Plain ES module, no build step. The protocol is DESIGN.md §2:
//   query: encoding, sample_rate, channels, interim_results, language, token,
//          session + after (resume after a dropped socket)
//   sends: binary pcm_s16le frames of ~100 ms, {"type": "close" | "keepalive"}
//   gets:  session, partial, final, warning, error, closed; then close 1000.
//
// A "segment" is one server session. A reconnect normally resumes the same
// session (same segment; results with seq <= the last one seen are dropped).
// If the server starts a new session instead, a new segment begins at the
// current audio position, and the old session's remaining finals are fetched
// from the viewer endpoint (/v1/sessions/{id}/results?after=seq) when it exists.

const FRAME_MS = 100;
const MAX_RATE = 48000;
const KEEPALIVE_MS = 5000;
const DRAIN_TIMEOUT_MS = 90000;
const RECONNECT_DELAYS_MS = [250, 500, 1000, 2000, 4000, 8000, 8000, 8000];
const MAX_PENDING_SECONDS = 45; // audio kept while the socket is down (the server takes a 60 s burst)
const SLOW_NETWORK_SECONDS = 2; // socket buffer above this much audio → warning
const AUDIO_START_TIMEOUT_MS = 6000; // the audio context must be running by then
const NO_AUDIO_OUTPUT =
  "Audio processing did not start. The browser needs a working sound output to process " +
  "the microphone (Firefox does not run audio without one): connect speakers or headphones, " +
  "or check the system's sound settings, then press Start again.";

const CLOSE_MESSAGES = {
  1003: "The server does not accept this audio format.",
  1007: "The server could not decode the audio or a message it received.",
  1008: "The server rejected the request.",
  1009: "A message was larger than the server allows.",
  1011: "The server hit an internal error.",
  1013: "The service is busy right now. Please try again in a little while.",
};
// Error codes (docs/protocol.md) in words for people. The server's own message is
// added for the codes whose details help (which parameter, which format).
const ERROR_TEXT = {
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
  too_slow: "This page fell behind reading results.",
  too_many_messages: "The page sent messages faster than the server allows.",
  rate_limited: "Too many requests from here in a short time. Please wait a moment and try again.",
};
const DETAIL_CODES = new Set(["bad_request", "unsupported_audio", "invalid_audio", "invalid_message", "message_too_big"]);
// Close codes after which reconnecting would fail the same way...
const FATAL_CODES = new Set([1003, 1007, 1008, 1009, 1011, 1013, 1015]);
// ...except these errors, after which a resume with `after` carries on.
const RESUMABLE_ERRORS = new Set(["too_slow", "storage_unavailable"]);
// A token usable as a WebSocket subprotocol ("bearer.<token>"), which keeps it out of URLs and logs.
const SUBPROTOCOL_SAFE = /^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$/;

function errorText(err, code) {
  if (!err) return CLOSE_MESSAGES[code] || `The connection closed unexpectedly (code ${code}).`;
  const known = ERROR_TEXT[err.code];
  if (!known) return `${CLOSE_MESSAGES[code] || "The server reported an error."}${err.message ? ` (${err.message})` : ""}`;
  return DETAIL_CODES.has(err.code) && err.message ? `${known} (${err.message})` : known;
}

const $ = (id) => document.getElementById(id);
const ui = {
  conn: $("conn"),
  connText: $("conn-text"),
  start: $("start"),
  stop: $("stop"),
  levelBox: $("level"),
  levelFill: $("level-fill"),
  levelPeak: $("level-peak"),
  options: $("options"),
  echo: $("opt-echo"),
  noise: $("opt-noise"),
  agc: $("opt-agc"),
  interim: $("opt-interim"),
  language: $("opt-language"),
  token: $("opt-token"),
  sessionId: $("session-id"),
  audioSent: $("audio-sent"),
  latency: $("latency"),
  partialLag: $("partial-lag"),
  captureInfo: $("capture-info"),
  error: $("error"),
  warnings: $("warnings"),
  transcript: $("transcript"),
  placeholder: $("placeholder"),
  jump: $("jump"),
  copy: $("copy"),
  dlTxt: $("dl-txt"),
  dlSrt: $("dl-srt"),
  dlVtt: $("dl-vtt"),
  clear: $("clear"),
  srNote: $("sr-note"),
};

// ------------------------------------------------------------------ state

const st = {
  phase: "idle", // idle | starting | connecting | live | reconnecting | closing | closed | error
  run: 0, // increments per Start, so late callbacks of an old run are ignored
  ws: null,
  wsOpened: false,
  everConnected: false,
  closeSent: false,
  gotClosed: false,
  stopping: false,
  lastError: null, // last {code, message} error message on the socket
  reconnectAttempt: 0,
  reconnectTimer: 0,
  drainTimer: 0,
  keepaliveTimer: 0,
  lastSendAt: 0,
  params: null, // query parameters of this run (encoding, rate, ...)
  // audio
  rate: 0,
  capture: null, // {stream, ctx, node, source}
  pending: [], // [ArrayBuffer] captured while no socket is open
  pendingSamples: 0,
  droppedSamples: 0,
  samplesSent: 0, // samples handed to sockets so far (at st.rate), all segments
  sendLog: [], // [{end, t}]: cumulative sample count after a send, performance.now() then
  // frames sent in this segment, [{start, pcm, samples}] (bounded): on a resume the server
  // says how much it stored (`stored_samples`), and what it lost is sent again from here
  sentRing: [],
  sentRingSamples: 0,
  // transcript
  segments: [], // [{index, sid, lastSeq, baseSample}]
  items: new Map(), // "seg:utt" → {seg, utt, start, end, text, stable, final, el}
  latencies: [],
  stick: true,
  sessionReady: false,
  segmentOffset: 0,
};

// ------------------------------------------------------------------ small helpers

function fmtClock(sec) {
  const s = Math.max(0, Math.floor(sec));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
}

function fmtStamp(sec, sep) {
  const ms = Math.max(0, Math.round(sec * 1000));
  const h = Math.floor(ms / 3600000);
  const m = Math.floor((ms % 3600000) / 60000);
  const s = Math.floor((ms % 60000) / 1000);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(h)}:${pad(m)}:${pad(s)}${sep}${pad(ms % 1000, 3)}`;
}

function fmtMs(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

function announce(text) {
  ui.srNote.textContent = "";
  // A fresh text node is what screen readers pick up.
  setTimeout(() => (ui.srNote.textContent = text), 50);
}

function setConn(state, text, extra = {}) {
  ui.conn.dataset.state = state;
  ui.connText.textContent = text;
  for (const [k, v] of Object.entries(extra)) ui.conn.dataset[k] = String(v);
}

function setPhase(phase) {
  st.phase = phase;
  document.body.dataset.phase = phase;
  const running = ["starting", "connecting", "live", "reconnecting"].includes(phase);
  ui.start.disabled = running || phase === "closing";
  ui.stop.disabled = !running;
  for (const el of [ui.echo, ui.noise, ui.agc, ui.interim, ui.language, ui.token]) {
    el.disabled = running || phase === "closing";
  }
}

function showError(text) {
  ui.error.textContent = text;
  ui.error.hidden = !text;
}

const warningsShown = new Map(); // code → {li, count}

/** Show (or refresh) a notice; `ttlMs` hides it that long after its last update. */
function showWarning(code, message, kind = "warning", ttlMs = 0) {
  let entry = warningsShown.get(code);
  if (!entry) {
    const li = document.createElement("li");
    li.className = `warning ${kind}`;
    li.dataset.code = code;
    li.dataset.testid = "warning";
    const text = document.createElement("span");
    text.className = "warning-text";
    const close = document.createElement("button");
    close.type = "button";
    close.className = "dismiss";
    close.setAttribute("aria-label", "Dismiss");
    close.textContent = "×";
    close.addEventListener("click", () => {
      li.remove();
      warningsShown.delete(code);
    });
    li.append(text, close);
    ui.warnings.append(li);
    entry = { li, text, count: 0 };
    warningsShown.set(code, entry);
    while (ui.warnings.children.length > 4) {
      const first = ui.warnings.firstElementChild;
      warningsShown.delete(first.dataset.code);
      first.remove();
    }
  }
  entry.count += 1;
  const text = message.charAt(0).toUpperCase() + message.slice(1);
  entry.text.textContent = entry.count > 1 ? `${text} (×${entry.count})` : text;
  clearTimeout(entry.timer);
  if (ttlMs) entry.timer = setTimeout(() => clearWarning(code), ttlMs);
}

function clearWarning(code) {
  const entry = warningsShown.get(code);
  if (entry) {
    clearTimeout(entry.timer);
    entry.li.remove();
    warningsShown.delete(code);
  }
}

// ------------------------------------------------------------------ audio capture

class UserFacingError extends Error {}

function micErrorMessage(err) {
  switch (err && err.name) {
    case "NotAllowedError":
    case "SecurityError":
    case "PermissionDeniedError":
      return (
        "Microphone access was denied. Allow the microphone for this site " +
        "(the icon at the left of the address bar), then press Start again."
      );
    case "NotFoundError":
    case "OverconstrainedError":
    case "DevicesNotFoundError":
      return "No microphone was found. Connect one and press Start again.";
    case "NotReadableError":
    case "AbortError":
    case "TrackStartError":
      return "The microphone could not be started. Another application may be using it.";
    default:
      return `The microphone could not be started (${(err && (err.message || err.name)) || err}).`;
  }
}

async function startCapture(runId) {
  if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new UserFacingError(
      "The microphone is only available on a secure page: open this page over HTTPS or on localhost.",
    );
  }
  if (typeof AudioWorkletNode === "undefined") {
    throw new UserFacingError("This browser does not support AudioWorklet; please use a current Chrome, Edge or Firefox.");
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: {
        echoCancellation: ui.echo.checked,
        noiseSuppression: ui.noise.checked,
        autoGainControl: ui.agc.checked,
        channelCount: { ideal: 1 },
      },
      video: false,
    });
  } catch (err) {
    throw new UserFacingError(micErrorMessage(err));
  }
  if (runId === st.run) setConn("connecting", "Starting audio…");
  // The context runs at the device's rate: Chrome may ignore a requested rate,
  // and older Firefox refuses to connect a mic to a context at another rate.
  let ctx = new AudioContext({ latencyHint: "interactive" });
  let source;
  try {
    source = ctx.createMediaStreamSource(stream);
  } catch (err) {
    // Older Firefox (NotSupportedError) when the mic's audio graph runs at another rate
    // than the default context (privacy.resistFingerprinting pins contexts to 44.1 kHz,
    // for one). Follow the mic. Firefox does not report its rate (getSettings() has no
    // sampleRate), so try the usual device rates.
    const failed = ctx.sampleRate;
    ctx.close().catch(() => {});
    const micRate = stream.getAudioTracks()[0]?.getSettings().sampleRate;
    const rates = [...new Set([micRate, 48000, 44100, 32000, 16000])].filter((r) => r && r !== failed);
    let lastErr = err;
    for (const rate of rates) {
      try {
        ctx = new AudioContext({ latencyHint: "interactive", sampleRate: rate });
      } catch (err2) {
        lastErr = err2;
        continue;
      }
      try {
        source = ctx.createMediaStreamSource(stream);
        break;
      } catch (err2) {
        lastErr = err2;
        ctx.close().catch(() => {});
      }
    }
    if (!source) {
      stream.getTracks().forEach((t) => t.stop());
      throw new UserFacingError(`Audio processing could not start (${lastErr.message || lastErr}).`);
    }
  }
  const cap = { stream, ctx, node: null, source };
  try {
    await ctx.audioWorklet.addModule(new URL("worklet.js", import.meta.url));
    const node = new AudioWorkletNode(ctx, "pcm-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { frameMs: FRAME_MS, maxRate: MAX_RATE },
    });
    node.port.onmessage = (ev) => onWorkletMessage(runId, ev.data);
    source.connect(node);
    node.connect(ctx.destination); // the node writes silence; this keeps it pulled
    cap.node = node;
    await whenRunning(ctx, AUDIO_START_TIMEOUT_MS);
  } catch (err) {
    stopTracks(cap);
    if (err instanceof UserFacingError) throw err;
    throw new UserFacingError(`Audio processing could not start (${err.message || err}).`);
  }
  stream.getAudioTracks().forEach((t) =>
    t.addEventListener("ended", () => {
      if (runId === st.run && ["live", "connecting", "reconnecting"].includes(st.phase)) {
        showWarning("mic_ended", "The microphone was disconnected; stopping.", "client");
        stop();
      }
    }),
  );
  return cap;
}

/** Resolves once `ctx` runs. Firefox keeps every AudioContext suspended, and resume()
 * pending forever, when it has no audio output device to run it on (no sound card, no
 * sound server): say so instead of waiting for good. */
function whenRunning(ctx, ms) {
  if (ctx.state === "running") return Promise.resolve();
  return new Promise((resolve, reject) => {
    const done = (fn, arg) => {
      clearTimeout(timer);
      ctx.removeEventListener("statechange", check);
      fn(arg);
    };
    const check = () => ctx.state === "running" && done(resolve);
    const timer = setTimeout(() => done(reject, new UserFacingError(NO_AUDIO_OUTPUT)), ms);
    ctx.addEventListener("statechange", check);
    ctx.resume().then(check, (err) => done(reject, err));
  });
}

function stopTracks(cap) {
  if (!cap) return;
  try {
    cap.source && cap.source.disconnect();
    cap.node && cap.node.disconnect();
  } catch (_) {
    /* already disconnected */
  }
  cap.stream.getTracks().forEach((t) => t.stop());
  cap.ctx.close().catch(() => {});
}

/** Ask the worklet for its buffered tail, then release the microphone. */
function flushCapture() {
  const cap = st.capture;
  if (!cap || !cap.node) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      st.capture = null;
      stopTracks(cap);
      resolve();
    };
    const timer = setTimeout(done, 500);
    cap.flushed = done;
    cap.node.port.postMessage({ type: "flush" });
  });
}

let level = 0;
let peakHold = 0;
let peakAt = 0;

function onWorkletMessage(runId, msg) {
  if (runId !== st.run) return;
  if (msg.type === "audio") {
    if (st.capture) sendAudio(msg.pcm, msg.samples);
  } else if (msg.type === "level") {
    // dBFS mapped onto 0..1 over -60..0 dB feels like a hardware meter.
    const db = 20 * Math.log10(Math.max(msg.rms, 1e-6));
    const v = Math.min(1, Math.max(0, (db + 60) / 60));
    level = Math.max(v, level * 0.6);
    const now = performance.now();
    const pk = Math.min(1, Math.max(0, (20 * Math.log10(Math.max(msg.peak, 1e-6)) + 60) / 60));
    if (pk >= peakHold || now - peakAt > 1200) {
      peakHold = pk;
      peakAt = now;
    }
    drawLevel();
  } else if (msg.type === "flushed") {
    st.capture && st.capture.flushed && st.capture.flushed();
  }
}

function drawLevel() {
  ui.levelFill.style.clipPath = `inset(0 ${(100 - level * 100).toFixed(1)}% 0 0)`;
  ui.levelPeak.style.left = `${(peakHold * 100).toFixed(1)}%`;
  ui.levelPeak.style.opacity = peakHold > 0.02 ? "1" : "0";
  ui.levelBox.setAttribute("aria-valuenow", String(Math.round(level * 100)));
  ui.levelBox.dataset.hot = level > 0.9 ? "true" : "false";
}

function resetLevel() {
  level = 0;
  peakHold = 0;
  drawLevel();
}

// ------------------------------------------------------------------ sending audio

function wsOpen() {
  return st.ws && st.ws.readyState === WebSocket.OPEN && st.wsOpened && st.segments.length > 0 && st.sessionReady;
}

function sendAudio(pcm, samples) {
  if (wsOpen() && !st.closeSent) {
    transmit(pcm, samples);
    return;
  }
  // No socket (yet): keep it, bounded, and send it once the session is back.
  st.pending.push({ pcm, samples });
  st.pendingSamples += samples;
  const max = MAX_PENDING_SECONDS * st.rate;
  while (st.pendingSamples > max && st.pending.length) {
    const dropped = st.pending.shift();
    st.pendingSamples -= dropped.samples;
    st.droppedSamples += dropped.samples;
  }
  if (st.droppedSamples) {
    showWarning(
      "audio_dropped",
      `${(st.droppedSamples / st.rate).toFixed(1)} s of audio could not be sent while offline.`,
      "client",
    );
  }
}

function transmit(pcm, samples) {
  st.ws.send(pcm);
  st.sentRing.push({ start: st.samplesSent, pcm, samples });
  st.sentRingSamples += samples;
  while (st.sentRingSamples > MAX_PENDING_SECONDS * st.rate && st.sentRing.length > 1) {
    st.sentRingSamples -= st.sentRing.shift().samples;
  }
  st.samplesSent += samples;
  st.lastSendAt = performance.now();
  st.sendLog.push({ end: st.samplesSent, t: st.lastSendAt });
  if (st.sendLog.length > 40000) st.sendLog.splice(0, 10000); // ~ an hour at 100 ms
  const sec = st.samplesSent / st.rate;
  ui.audioSent.textContent = `${sec.toFixed(1)} s`;
  ui.audioSent.dataset.seconds = sec.toFixed(2);
  const backlog = st.ws.bufferedAmount / (2 * st.rate);
  if (backlog > SLOW_NETWORK_SECONDS) {
    showWarning("network_slow", `The network is slow: ${backlog.toFixed(1)} s of audio waiting to be sent.`,
      "client", 10000);
  }
}

function flushPending() {
  while (st.pending.length && wsOpen() && !st.closeSent) {
    const f = st.pending.shift();
    st.pendingSamples -= f.samples;
    transmit(f.pcm, f.samples);
  }
}

/** A resumed session: audio handed to the old socket that the server never stored (lost
 * in the socket's buffer, or in a gateway that died) goes first in the queue again, and the
 * audio timeline steps back to what the server has. `storedSamples` counts 16 kHz samples
 * of this segment. */
function resendUnstored(seg, storedSamples) {
  if (typeof storedSamples !== "number" || !seg) return;
  const stored = seg.baseSample + Math.round((storedSamples * st.rate) / 16000);
  if (stored >= st.samplesSent) return;
  const again = [];
  while (st.sentRing.length && st.sentRing[st.sentRing.length - 1].start + st.sentRing[st.sentRing.length - 1].samples > stored) {
    const f = st.sentRing.pop();
    st.sentRingSamples -= f.samples;
    const skip = Math.max(0, stored - f.start);
    again.unshift(skip ? { pcm: f.pcm.slice(skip * 2), samples: f.samples - skip } : { pcm: f.pcm, samples: f.samples });
    if (skip) break;
  }
  st.samplesSent = stored; // the server's timeline: what is sent next lands here
  while (st.sendLog.length && st.sendLog[st.sendLog.length - 1].end > st.samplesSent) st.sendLog.pop();
  for (const f of again) st.pendingSamples += f.samples;
  st.pending.unshift(...again);
  st.resentSamples = (st.resentSamples || 0) + again.reduce((n, f) => n + f.samples, 0);
  ui.audioSent.dataset.resent = String(st.resentSamples);
}

/** When was the audio at `sample` (cumulative, st.rate) handed to the socket? */
function sentAt(sample) {
  const log = st.sendLog;
  let lo = 0;
  let hi = log.length - 1;
  if (hi < 0 || log[hi].end < sample) return null;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (log[mid].end >= sample) hi = mid;
    else lo = mid + 1;
  }
  return log[lo].t;
}

function sendControl(type) {
  if (st.ws && st.ws.readyState === WebSocket.OPEN) {
    st.ws.send(JSON.stringify({ type }));
    st.lastSendAt = performance.now();
  }
}

// ------------------------------------------------------------------ the socket

function listenUrl(resume) {
  const p = st.params;
  const q = new URLSearchParams({
    encoding: "pcm_s16le",
    sample_rate: String(st.rate),
    channels: "1",
    interim_results: p.interim ? "true" : "false",
  });
  if (p.language) q.set("language", p.language);
  if (p.token && !SUBPROTOCOL_SAFE.test(p.token)) q.set("token", p.token);
  if (resume) {
    q.set("session", resume.sid);
    q.set("after", String(resume.lastSeq));
  }
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/v1/listen?${q}`;
}

/** A socket carrying the token as a "bearer.<token>" subprotocol when it can (beside
 * "stt", which the server selects, so the credential is never echoed back). */
function openSocket(url) {
  const token = st.params && st.params.token;
  if (token && SUBPROTOCOL_SAFE.test(token)) return new WebSocket(url, ["stt", `bearer.${token}`]);
  return new WebSocket(url);
}

function currentSegment() {
  return st.segments[st.segments.length - 1] || null;
}

function connect(resume) {
  const runId = st.run;
  st.wsOpened = false;
  st.sessionReady = false;
  st.lastError = null;
  st.gotClosed = false;
  st.closeSent = false;
  const ws = openSocket(listenUrl(resume));
  ws.binaryType = "arraybuffer";
  st.ws = ws;
  ws.onopen = () => {
    if (ws !== st.ws) return;
    st.wsOpened = true;
  };
  ws.onmessage = (ev) => {
    if (ws !== st.ws || runId !== st.run) return;
    if (typeof ev.data !== "string") return;
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch (_) {
      return;
    }
    onServerMessage(msg, resume);
  };
  ws.onclose = (ev) => {
    if (ws !== st.ws || runId !== st.run) return;
    onSocketClosed(ev, resume);
  };
}

function onServerMessage(msg, resume) {
  switch (msg.type) {
    case "session":
      return onSession(msg, resume);
    case "partial":
    case "final":
    case "closed":
    case "warning": {
      const seg = currentSegment();
      if (seg) onResult(seg, msg, true);
      return;
    }
    case "error":
      st.lastError = { code: msg.code || "error", message: msg.message || "" };
      return;
    default:
      return; // unknown types are ignored, for forward compatibility
  }
}

function onSession(msg, resume) {
  const prev = currentSegment();
  if (!prev || prev.sid !== msg.session_id) {
    // A new server session: its timeline starts at the audio we send next. The
    // old session's open utterance gets no final here (maybe from recoverTail).
    if (prev) orphanPartials();
    // Indexes continue across runs, so a second recording appends below the first.
    const index = st.segmentOffset + st.segments.length;
    const seg = { index, sid: msg.session_id, lastSeq: 0, baseSample: st.samplesSent };
    st.segments.push(seg);
    st.sentRing = [];
    st.sentRingSamples = 0;
    if (prev) {
      showWarning(
        "new_session",
        "The connection dropped and the session could not be resumed; continuing in a new session.",
        "client",
      );
      recoverTail(prev);
    }
  } else if (resume) {
    resendUnstored(prev, msg.stored_samples);
    showWarning("resumed", "Reconnected; the session was resumed.", "info", 5000);
  }
  st.sessionReady = true;
  st.everConnected = true;
  st.reconnectAttempt = 0;
  ui.sessionId.textContent = msg.session_id;
  ui.sessionId.title = msg.session_id;
  const bits = [`${(st.rate / 1000).toFixed(st.rate % 1000 ? 1 : 0)} kHz mono`];
  if (msg.model) bits.push(msg.model);
  ui.captureInfo.textContent = bits.join(" · ");
  if (st.stopping) {
    // Stop was pressed while the socket was down: send the rest, then close.
    flushPending();
    sendClose();
  } else {
    setPhase("live");
    setConn("live", "Live");
    flushPending();
  }
}

/** The old session ended without us: fetch its remaining finals from the viewer endpoint. */
function recoverTail(seg) {
  const q = new URLSearchParams({ after: String(seg.lastSeq) });
  const token = st.params.token;
  if (token && !SUBPROTOCOL_SAFE.test(token)) q.set("token", token);
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  let ws;
  try {
    ws = openSocket(`${scheme}//${location.host}/v1/sessions/${encodeURIComponent(seg.sid)}/results?${q}`);
  } catch (_) {
    return;
  }
  const timer = setTimeout(() => ws.close(), 60000);
  ws.onmessage = (ev) => {
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch (_) {
      return;
    }
    if (msg.type === "final") onResult(seg, msg, false);
    if (msg.type === "final" || msg.type === "closed") {
      if (msg.type === "closed") ws.close(1000);
    }
  };
  ws.onclose = () => clearTimeout(timer);
  ws.onerror = () => {}; // no viewer endpoint on this server: nothing to recover
}

function onSocketClosed(ev, resume) {
  const code = ev.code;
  st.ws = null;
  const err = st.lastError;
  ui.conn.dataset.closeCode = String(code);

  if (st.gotClosed) {
    // Drained: every final is in. An error after `closed` (session_too_long,
    // idle_timeout) says why the server ended it.
    finishRun();
    setPhase("closed");
    setConn("closed", err ? "Ended by server" : "Closed", { closeCode: code });
    if (err) showError(errorText(err, code));
    announce("Transcription finished.");
    return;
  }
  if (code === 1000) {
    finishRun();
    setPhase(st.stopping ? "error" : "closed");
    setConn(st.stopping ? "error" : "closed", "Ended by server", { closeCode: code });
    showError(st.stopping ? "The server closed the session before sending all results." : "The server ended the session.");
    return;
  }
  // Resume refused (the session expired): carry on in a new session.
  if (resume && err && err.code === "session_not_found" && !st.stopping) {
    scheduleReconnect(null);
    return;
  }
  const resumable = err ? RESUMABLE_ERRORS.has(err.code) && st.everConnected : !FATAL_CODES.has(code);
  if (!resumable) {
    finishRun();
    setPhase("error");
    setConn("error", `Error (${code})`, { closeCode: code });
    showError(errorText(err, code));
    return;
  }
  if (!st.everConnected) {
    // The upgrade itself failed; browsers hide the HTTP status, so ask for it.
    finishRun();
    setPhase("error");
    setConn("error", "Could not connect", { closeCode: code });
    diagnoseConnectFailure().then((text) => showError(text));
    return;
  }
  // A dropped socket (1001, 1006, 1012, a network change…): reconnect and resume.
  const seg = currentSegment();
  scheduleReconnect(seg ? { sid: seg.sid, lastSeq: seg.lastSeq } : null);
}

function scheduleReconnect(resume) {
  const attempt = st.reconnectAttempt++;
  if (attempt >= RECONNECT_DELAYS_MS.length) {
    finishRun();
    setPhase("error");
    setConn("error", "Disconnected");
    showError("The connection to the server was lost and could not be re-established. The transcript so far is kept below.");
    diagnoseConnectFailure(true).then((text) => text && showError(text));
    return;
  }
  const delay = RECONNECT_DELAYS_MS[attempt] * (0.8 + Math.random() * 0.4);
  if (!st.stopping) setPhase("reconnecting");
  setConn("reconnecting", `Reconnecting${attempt ? ` (attempt ${attempt + 1})` : ""}…`);
  clearTimeout(st.reconnectTimer);
  const runId = st.run;
  st.reconnectTimer = setTimeout(() => {
    if (runId !== st.run) return;
    connect(resume);
  }, delay);
}

/** Ask for /v1/listen over plain HTTP: the server refuses it before the upgrade with
 * the same status (401, 403, 429) it gave the WebSocket, which browsers hide. This is
 * a dry run for the server: it does not use up a single-use token. With `onlyKnown`,
 * answers null unless the status explains the failure. */
async function diagnoseConnectFailure(onlyKnown = false) {
  const token = st.params && st.params.token;
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  try {
    const res = await fetch("/v1/listen", { cache: "no-store", headers });
    let body = {};
    try {
      body = await res.json();
    } catch (_) {
      /* not JSON */
    }
    const code = body && body.code;
    if (res.status === 401) {
      const why = body && body.message ? ` (${body.message})` : "";
      return `Authentication failed${why}: the access token is missing, wrong, expired or already used. Each recording needs a new token.`;
    }
    if (res.status === 403) return ERROR_TEXT[code] || ERROR_TEXT.origin_not_allowed;
    if (res.status === 429) return ERROR_TEXT[code] || ERROR_TEXT.too_many_sessions;
    if (res.status === 503) return ERROR_TEXT[code] || CLOSE_MESSAGES[1013];
    return onlyKnown ? null : "Could not open a connection to the transcription server. Please try again.";
  } catch (_) {
    return onlyKnown ? null : "The transcription server cannot be reached. Check your network connection and try again.";
  }
}

function sendClose() {
  if (st.closeSent) return;
  sendControl("close");
  st.closeSent = true;
  clearTimeout(st.drainTimer);
  const runId = st.run;
  st.drainTimer = setTimeout(() => {
    if (runId !== st.run || st.phase !== "closing") return;
    showError("The server did not finish the transcript in time; the last words may be missing.");
    if (st.ws) st.ws.close(1000);
  }, DRAIN_TIMEOUT_MS);
}

function finishRun() {
  clearTimeout(st.reconnectTimer);
  clearTimeout(st.drainTimer);
  clearInterval(st.keepaliveTimer);
  if (st.capture) {
    stopTracks(st.capture);
    st.capture = null;
  }
  resetLevel();
  st.pending = [];
  st.pendingSamples = 0;
  orphanPartials();
  if (st.ws) {
    const ws = st.ws;
    st.ws = null;
    try {
      ws.close(1000);
    } catch (_) {
      /* already closing */
    }
  }
}

// ------------------------------------------------------------------ results

function onResult(seg, msg, live) {
  if (typeof msg.seq === "number" && msg.seq > 0) {
    if (msg.seq <= seg.lastSeq) return; // already seen (replayed after a reconnect)
    seg.lastSeq = msg.seq;
  }
  switch (msg.type) {
    case "partial":
      return onPartial(seg, msg, live);
    case "final":
      return onFinal(seg, msg, live);
    case "warning":
      // Queue and lag notices are transient: they fade once the server stops repeating them.
      return showWarning(`server:${msg.code || "warning"}`, msg.message || msg.code || "Warning from the server",
        "warning", 15000);
    case "closed":
      if (!live) return;
      st.gotClosed = true;
      setConn("closing", "Finishing…");
      ui.conn.dataset.closed = "true";
      ui.conn.dataset.utterances = String(msg.utterances ?? "");
      return;
    default:
      return;
  }
}

function segBase(seg) {
  return seg.baseSample / (st.rate || 16000);
}

function itemKey(seg, utt) {
  return `${seg.index}:${utt}`;
}

function onPartial(seg, msg, live) {
  const key = itemKey(seg, msg.utterance);
  let item = st.items.get(key);
  if (item && item.final) return;
  if (!item) {
    item = { seg: seg.index, utt: msg.utterance, final: false, el: null };
    st.items.set(key, item);
  }
  item.start = segBase(seg) + (msg.start || 0);
  item.end = segBase(seg) + (msg.end || 0);
  item.text = msg.text || "";
  item.stable = msg.stable_text || "";
  if (!item.el) {
    item.el = renderItemShell(item, "partial");
    insertItem(item);
  }
  fillPartial(item);
  if (live) {
    const t = sentAt(seg.baseSample + Math.round((msg.end || 0) * st.rate));
    if (t !== null) {
      const lag = performance.now() - t;
      ui.partialLag.textContent = fmtMs(lag);
      ui.partialLag.dataset.ms = String(Math.round(lag));
    }
  }
  afterRender();
}

function onFinal(seg, msg, live) {
  const key = itemKey(seg, msg.utterance);
  let item = st.items.get(key);
  if (item && item.final) return; // exactly one final per utterance
  if (!item) {
    item = { seg: seg.index, utt: msg.utterance, el: null };
    st.items.set(key, item);
  }
  item.final = true;
  item.start = segBase(seg) + (msg.start || 0);
  item.end = segBase(seg) + (msg.end || 0);
  item.text = (msg.text || "").trim();
  item.words = msg.words || [];
  // Replace the partial with a new element so the live region announces it.
  const old = item.el;
  item.el = renderItemShell(item, "final");
  const text = item.el.querySelector(".text");
  text.textContent = item.text;
  if (!item.text) item.el.classList.add("empty");
  if (old) old.replaceWith(item.el);
  else insertItem(item);
  if (live) {
    const t = sentAt(seg.baseSample + Math.round((msg.end || 0) * st.rate));
    if (t !== null) {
      const ms = performance.now() - t;
      st.latencies.push(ms);
      if (st.latencies.length > 50) st.latencies.shift();
      const avg = st.latencies.reduce((a, b) => a + b, 0) / st.latencies.length;
      ui.latency.textContent = `${fmtMs(ms)} (avg ${fmtMs(avg)})`;
      ui.latency.dataset.ms = String(Math.round(ms));
    }
    // Audio before this final is settled; keep the log short.
    const keep = seg.baseSample + Math.floor((msg.end || 0) * st.rate) - 30 * st.rate;
    let drop = 0;
    while (drop < st.sendLog.length - 1 && st.sendLog[drop].end < keep) drop++;
    if (drop > 500) st.sendLog.splice(0, drop);
  }
  afterRender();
}

function renderItemShell(item, kind) {
  const el = document.createElement("p");
  el.className = `utt ${kind}`;
  el.dataset.testid = kind;
  el.dataset.key = itemKey({ index: item.seg }, item.utt);
  el.dataset.seg = String(item.seg);
  el.dataset.utt = String(item.utt);
  el.dataset.start = item.start.toFixed(2);
  el.dataset.end = item.end.toFixed(2);
  if (kind === "partial") el.setAttribute("aria-hidden", "true"); // only finals are announced
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = fmtClock(item.start);
  time.title = `${fmtClock(item.start)} – ${fmtClock(item.end)}`;
  const text = document.createElement("span");
  text.className = "text";
  el.append(time, text);
  return el;
}

function fillPartial(item) {
  const el = item.el;
  el.dataset.start = item.start.toFixed(2);
  el.dataset.end = item.end.toFixed(2);
  const time = el.querySelector(".time");
  time.textContent = fmtClock(item.start);
  time.title = `${fmtClock(item.start)} – ${fmtClock(item.end)}`;
  // stable_text is a prefix of text; show the rest as the unstable tail.
  let stable = item.stable;
  let rest = item.text;
  if (stable && item.text.startsWith(stable)) rest = item.text.slice(stable.length);
  else if (stable) rest = item.text.length > stable.length ? item.text.slice(stable.length) : "";
  const text = el.querySelector(".text");
  const s = document.createElement("span");
  s.className = "stable";
  s.dataset.testid = "stable";
  s.textContent = stable.trimStart();
  const u = document.createElement("span");
  u.className = "unstable";
  u.dataset.testid = "unstable";
  u.textContent = stable ? rest : rest.trimStart();
  text.replaceChildren(s, u);
}

function insertItem(item) {
  ui.placeholder.hidden = true;
  const box = ui.transcript;
  // Items arrive almost always in order: walk back from the end.
  let after = box.lastElementChild;
  while (after && after !== ui.placeholder) {
    const seg = Number(after.dataset.seg);
    const utt = Number(after.dataset.utt);
    if (seg < item.seg || (seg === item.seg && utt < item.utt)) break;
    after = after.previousElementSibling;
  }
  if (after) after.after(item.el);
  else box.prepend(item.el);
}

/** Partials that will get no final (the run ended abnormally) stay visible, marked. */
function orphanPartials() {
  for (const item of st.items.values()) {
    if (!item.final && item.el && !item.orphan) {
      item.orphan = true;
      item.el.classList.add("orphan");
      item.el.dataset.testid = "orphan";
      item.el.title = "Unfinished: the session ended before this was final";
    }
  }
}

function finals() {
  return [...st.items.values()]
    .filter((i) => i.final && i.text)
    .sort((a, b) => a.seg - b.seg || a.utt - b.utt);
}

// ------------------------------------------------------------------ scrolling

function nearBottom() {
  const b = ui.transcript;
  return b.scrollHeight - b.scrollTop - b.clientHeight < 32;
}

ui.transcript.addEventListener("scroll", () => {
  st.stick = nearBottom();
  if (st.stick) ui.jump.hidden = true;
});

function afterRender() {
  if (st.stick) {
    ui.transcript.scrollTop = ui.transcript.scrollHeight;
  } else {
    ui.jump.hidden = false;
  }
}

ui.jump.addEventListener("click", () => {
  st.stick = true;
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
  ui.jump.hidden = true;
  ui.transcript.focus();
});

// ------------------------------------------------------------------ start / stop

async function start() {
  if (!["idle", "closed", "error"].includes(st.phase)) return;
  st.run += 1;
  const runId = st.run;
  showError("");
  for (const code of [...warningsShown.keys()]) clearWarning(code);
  Object.assign(st, {
    ws: null,
    everConnected: false,
    stopping: false,
    closeSent: false,
    gotClosed: false,
    lastError: null,
    reconnectAttempt: 0,
    pending: [],
    pendingSamples: 0,
    droppedSamples: 0,
    samplesSent: 0,
    sendLog: [],
    latencies: [],
    params: {
      interim: ui.interim.checked,
      language: ui.language.value.trim(),
      token: ui.token.value.trim(),
    },
  });
  // A new run continues the transcript below the previous one.
  st.segments = [];
  st.segmentOffset = st.items.size ? Math.max(...[...st.items.values()].map((i) => i.seg)) + 1 : 0;
  delete ui.conn.dataset.closeCode;
  delete ui.conn.dataset.closed;
  ui.sessionId.textContent = "—";
  ui.latency.textContent = "—";
  ui.partialLag.textContent = "—";
  ui.audioSent.textContent = "0.0 s";
  ui.audioSent.dataset.seconds = "0";
  setPhase("starting");
  setConn("connecting", "Waiting for microphone…");
  try {
    const cap = await startCapture(runId);
    if (runId !== st.run || st.phase !== "starting") {
      stopTracks(cap);
      return;
    }
    st.capture = cap;
    st.rate = Math.min(cap.ctx.sampleRate, MAX_RATE);
  } catch (err) {
    if (runId !== st.run) return;
    setPhase("error");
    setConn("error", "Microphone unavailable");
    showError(err instanceof UserFacingError ? err.message : micErrorMessage(err));
    return;
  }
  setPhase("connecting");
  setConn("connecting", "Connecting…");
  st.keepaliveTimer = setInterval(() => {
    if (wsOpen() && !st.closeSent && performance.now() - st.lastSendAt > KEEPALIVE_MS) sendControl("keepalive");
  }, 1000);
  connect(null);
  announce("Recording started.");
}

async function stop() {
  if (!["starting", "connecting", "live", "reconnecting"].includes(st.phase)) return;
  const runId = st.run;
  if (st.phase === "starting") {
    st.run += 1; // abandon the pending microphone request
    finishRun();
    setPhase("idle");
    setConn("idle", "Idle");
    return;
  }
  st.stopping = true;
  setPhase("closing");
  setConn("closing", "Finishing…");
  await flushCapture();
  if (runId !== st.run) return;
  resetLevel();
  if (wsOpen()) {
    flushPending();
    sendClose();
  }
  // Otherwise the reconnect in progress sends the rest and the close (onSession).
}

ui.start.addEventListener("click", start);
ui.stop.addEventListener("click", stop);

// ------------------------------------------------------------------ copy & download

function asText() {
  return finals()
    .map((i) => i.text)
    .join("\n");
}

function asCues(sep) {
  return finals().map((i, n) => {
    const end = Math.max(i.end, i.start + 0.5);
    return `${n + 1}\n${fmtStamp(i.start, sep)} --> ${fmtStamp(end, sep)}\n${i.text}\n`;
  });
}

function asSrt() {
  return asCues(",").join("\n");
}

function asVtt() {
  return `WEBVTT\n\n${asCues(".").join("\n")}`;
}

function baseName() {
  const seg = currentSegment();
  const stamp = new Date().toISOString().slice(0, 16).replace(/[:T]/g, "-");
  return `transcript-${seg ? seg.sid.slice(0, 8) : stamp}`;
}

function download(text, ext, type) {
  if (!finals().length) {
    announce("The transcript is empty.");
    return;
  }
  const blob = new Blob([text], { type: `${type};charset=utf-8` });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `${baseName()}.${ext}`;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

async function copyText() {
  const text = asText();
  if (!text) {
    flashButton(ui.copy, "Nothing yet");
    return;
  }
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {
    // Older browsers or an insecure page: the selection fallback.
    const ta = document.createElement("textarea");
    ta.value = text;
    ta.setAttribute("readonly", "");
    ta.style.position = "fixed";
    ta.style.opacity = "0";
    document.body.append(ta);
    ta.select();
    document.execCommand("copy");
    ta.remove();
  }
  flashButton(ui.copy, "Copied ✓");
  announce("Transcript copied to the clipboard.");
}

function flashButton(btn, text) {
  const old = btn.dataset.label || btn.textContent;
  btn.dataset.label = old;
  btn.textContent = text;
  clearTimeout(btn._t);
  btn._t = setTimeout(() => (btn.textContent = old), 1500);
}

ui.copy.addEventListener("click", copyText);
ui.dlTxt.addEventListener("click", () => download(asText() + "\n", "txt", "text/plain"));
ui.dlSrt.addEventListener("click", () => download(asSrt(), "srt", "application/x-subrip"));
ui.dlVtt.addEventListener("click", () => download(asVtt(), "vtt", "text/vtt"));
ui.clear.addEventListener("click", () => {
  for (const item of st.items.values()) item.el && item.el.remove();
  st.items.clear();
  ui.placeholder.hidden = false;
  ui.jump.hidden = true;
  st.stick = true;
  announce("Transcript cleared.");
});

// ------------------------------------------------------------------ boot

(function boot() {
  // Checkbox and language choices persist; the token never does.
  const saved = ["opt-echo", "opt-noise", "opt-agc", "opt-interim", "opt-language"];
  for (const id of saved) {
    const el = $(id);
    let value = null;
    try {
      value = localStorage.getItem(`stt.${id}`);
    } catch (_) {
      /* storage disabled */
    }
    if (value !== null) {
      if (el.type === "checkbox") el.checked = value === "1";
      else el.value = value;
    }
    el.addEventListener("change", () => {
      try {
        localStorage.setItem(`stt.${id}`, el.type === "checkbox" ? (el.checked ? "1" : "0") : el.value);
      } catch (_) {
        /* storage disabled */
      }
    });
  }
  const q = new URLSearchParams(location.search);
  if (q.get("token")) ui.token.value = q.get("token");
  if (q.get("language")) ui.language.value = q.get("language");
  if (q.has("token")) {
    // Keep the credential out of the address bar, history and bookmarks.
    q.delete("token");
    const rest = q.toString();
    history.replaceState(null, "", `${location.pathname}${rest ? `?${rest}` : ""}${location.hash}`);
  }
  setPhase("idle");
  if (!window.isSecureContext) {
    showWarning(
      "insecure",
      "This page is not served over HTTPS, so browsers will not allow the microphone here (localhost is fine).",
      "client",
    );
  }
  // Leaving mid-session: say goodbye so the server ends the session promptly.
  window.addEventListener("pagehide", () => {
    if (st.ws && st.ws.readyState === WebSocket.OPEN && !st.closeSent) sendControl("close");
  });
  window.__stt = st; // for debugging in the console and for tests
})();
