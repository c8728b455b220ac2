// Live transcription page: microphone → AudioWorklet → /v1/listen → transcript.
//
// Plain ES modules, no build step (docs/browser.md). This one wires the others:
//   protocol.js    URLs, messages, seq/resume, resend, reconnect and close decisions, error texts
//   capture.js     microphone, AudioContext, worklet.js
//   transcript.js  partials/finals → utterances; text, SRT, WebVTT
//   latency.js     send log, time to final, partial lag
//   view.js        the DOM
// and owns what is left: the WebSocket, its timers, and the phase of the recording.

import { UserFacingError, micErrorMessage, startCapture } from "./capture.js";
import { LatencyLog } from "./latency.js";
import {
  AudioOutbox,
  DRAIN_TIMEOUT_MS,
  KEEPALIVE_MS,
  OPUS_BITS_PER_SECOND,
  OPUS_TIMESLICE_MS,
  ReconnectPolicy,
  SLOW_NETWORK_SECONDS,
  Segments,
  TEXT,
  acceptSeq,
  diagnosisText,
  errorOf,
  errorText,
  listenUrl,
  onClose,
  opusType,
  parseMessage,
  sessionKind,
  socketProtocols,
  viewerUrl,
} from "./protocol.js";
import { Transcript } from "./transcript.js";
import { View } from "./view.js";

const view = new View(document);
const transcript = new Transcript();

/** One recording (one press of Start): everything that a later Start starts afresh.
 * Callbacks of an older recording compare their `run` with `current` and do nothing. */
class Run {
  constructor(settings) {
    this.settings = settings; // {echo, noise, agc, interim, diarize, opus, language, token}
    this.capture = null;
    this.opusType = null; // the low-bandwidth mode's MediaRecorder type
    this.recorder = null; // its MediaRecorder, while a session takes its blobs
    this.rate = 0;
    this.outbox = null; // AudioOutbox, once the rate is known
    this.latency = new LatencyLog();
    this.segments = new Segments(transcript.nextSegment()); // a new run continues below the last
    this.reconnect = new ReconnectPolicy();
    this.stopping = false;
    this.everConnected = false;
    this.conn = null; // the current socket: {ws, resume, opened, ready, error, drained, closeSent}
    this.lastSendAt = 0;
    this.timers = { reconnect: 0, drain: 0, keepalive: 0 };
  }
}

let current = null; // the Run of the latest Start
let phase = "idle"; // idle | starting | connecting | live | reconnecting | closing | closed | error

function setPhase(p) {
  phase = p;
  view.setPhase(p);
}

// ------------------------------------------------------------------ start / stop

async function start() {
  if (!["idle", "closed", "error"].includes(phase)) return;
  const run = new Run(view.settings());
  current = run;
  view.showError("");
  view.clearWarnings();
  view.resetRun();
  if (run.settings.opus) {
    run.opusType = typeof MediaRecorder === "undefined" ? null : opusType((t) => MediaRecorder.isTypeSupported(t));
    if (!run.opusType) {
      setPhase("error");
      view.setConn("error", "Opus unavailable");
      view.showError(TEXT.noOpus);
      return;
    }
  }
  setPhase("starting");
  view.setConn("connecting", "Waiting for microphone…");
  let cap;
  try {
    cap = await startCapture(run.settings, {
      onMic: () => run === current && view.setConn("connecting", "Starting audio…"),
      onAudio: (pcm, samples) =>
        run === current && run.capture && (run.settings.opus ? countAudio(run, samples) : sendAudio(run, pcm, samples)),
      onLevel: (rms, peak) => run === current && view.showLevel(rms, peak),
      onEnded: () => {
        if (run === current && ["live", "connecting", "reconnecting"].includes(phase)) {
          view.showWarning("mic_ended", "The microphone was disconnected; stopping.", "client");
          stop();
        }
      },
    });
  } catch (err) {
    if (run !== current) return;
    setPhase("error");
    view.setConn("error", "Microphone unavailable");
    view.showError(err instanceof UserFacingError ? err.message : micErrorMessage(err));
    return;
  }
  if (run !== current || phase !== "starting") {
    cap.stop();
    return;
  }
  run.capture = cap;
  run.rate = cap.rate;
  run.outbox = new AudioOutbox(run.rate);
  setPhase("connecting");
  view.setConn("connecting", "Connecting…");
  run.timers.keepalive = setInterval(() => {
    if (socketReady(run) && !run.conn.closeSent && performance.now() - run.lastSendAt > KEEPALIVE_MS) {
      sendControl(run, "keepalive");
    }
  }, 1000);
  connect(run, null);
  view.announce("Recording started.");
}

async function stop() {
  const run = current;
  if (!run || !["starting", "connecting", "live", "reconnecting"].includes(phase)) return;
  if (phase === "starting") {
    current = null; // abandon the pending microphone request
    finishRun(run);
    setPhase("idle");
    view.setConn("idle", "Idle");
    return;
  }
  run.stopping = true;
  setPhase("closing");
  view.setConn("closing", "Finishing…");
  if (run.capture) {
    const cap = run.capture;
    if (run.settings.opus) await finishRecorder(run); // its last blob, before the mic goes
    await cap.flush(); // the worklet's buffered tail arrives as audio first
    run.capture = null;
  }
  if (run !== current) return;
  view.resetLevel();
  if (socketReady(run)) {
    flushPending(run);
    sendClose(run);
  }
  // Otherwise the reconnect in progress sends the rest and the close (onSession).
}

/** The recording is over: timers, microphone and socket go. */
function finishRun(run) {
  stopRecorder(run);
  clearTimeout(run.timers.reconnect);
  clearTimeout(run.timers.drain);
  clearInterval(run.timers.keepalive);
  if (run.capture) {
    run.capture.stop();
    run.capture = null;
  }
  view.resetLevel();
  if (run.outbox) run.outbox.clearPending();
  view.orphans(transcript.orphanPartials());
  if (run.conn) {
    const ws = run.conn.ws;
    run.conn = null;
    try {
      ws.close(1000);
    } catch (_) {
      /* already closing */
    }
  }
}

// ------------------------------------------------------------------ sending audio

/** A socket whose session message arrived: audio may go. */
function socketReady(run) {
  const c = run.conn;
  return Boolean(c && c.ws.readyState === WebSocket.OPEN && c.opened && c.ready);
}

function sendAudio(run, pcm, samples) {
  if (socketReady(run) && !run.conn.closeSent) {
    transmit(run, pcm, samples);
    return;
  }
  // No socket (yet): keep it, bounded, and send it once the session is back.
  const dropped = run.outbox.hold(pcm, samples);
  if (dropped) {
    view.showWarning(
      "audio_dropped",
      `${(dropped / run.rate).toFixed(1)} s of audio could not be sent while offline.`,
      "client",
    );
  }
}

function transmit(run, pcm, samples) {
  const ws = run.conn.ws;
  ws.send(pcm);
  const sent = run.outbox.sent(pcm, samples);
  run.lastSendAt = performance.now();
  run.latency.sent(sent, run.lastSendAt);
  view.audioSent(sent / run.rate);
  const backlog = ws.bufferedAmount / (2 * run.rate);
  if (backlog > SLOW_NETWORK_SECONDS) {
    view.showWarning("network_slow", `The network is slow: ${backlog.toFixed(1)} s of audio waiting to be sent.`,
      "client", 10000);
  }
}

// ------------------------------------------------------------------ low bandwidth: Opus

/** The low-bandwidth mode sends MediaRecorder's Opus, not the worklet's PCM; the worklet's
 * frames still measure the audio sent (the timeline, time to final, the meter). */
function countAudio(run, samples) {
  if (!run.recorder || !socketReady(run) || run.conn.closeSent) return;
  const sent = run.outbox.sent(null, samples);
  run.latency.sent(sent, performance.now());
  view.audioSent(sent / run.rate);
}

/** A new recorder for the session now ready: each socket gets a whole Opus stream, header
 * first (what a lost socket was sent cannot be continued on another). */
function startRecorder(run) {
  stopRecorder(run);
  const conn = run.conn;
  const rec = new MediaRecorder(run.capture.stream, {
    mimeType: run.opusType,
    audioBitsPerSecond: OPUS_BITS_PER_SECOND,
  });
  rec.ondataavailable = (ev) => {
    if (ev.data.size && run.conn === conn && conn.ws.readyState === WebSocket.OPEN && !conn.closeSent) {
      conn.ws.send(ev.data); // Blobs go out in order, cut wherever the recorder cut them
      run.lastSendAt = performance.now();
    }
  };
  rec.start(OPUS_TIMESLICE_MS);
  run.recorder = rec;
}

function stopRecorder(run) {
  const rec = run.recorder;
  run.recorder = null;
  if (rec && rec.state !== "inactive") {
    rec.ondataavailable = null;
    try {
      rec.stop();
    } catch (_) {
      /* already stopped */
    }
  }
}

/** Stop: the recorder's last blob goes out (before the close). */
function finishRecorder(run) {
  const rec = run.recorder;
  if (!rec || rec.state === "inactive") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      if (run.recorder === rec) run.recorder = null;
      resolve();
    };
    const timer = setTimeout(done, 2000);
    rec.addEventListener("stop", done, { once: true });
    rec.stop(); // a last dataavailable comes before stop
  });
}

function flushPending(run) {
  while (socketReady(run) && !run.conn.closeSent) {
    const f = run.outbox.takePending();
    if (!f) return;
    transmit(run, f.pcm, f.samples);
  }
}

function sendControl(run, type) {
  const c = run.conn;
  if (c && c.ws.readyState === WebSocket.OPEN) {
    c.ws.send(JSON.stringify({ type }));
    run.lastSendAt = performance.now();
  }
}

/** `close`: the server sends the remaining finals, `closed`, and closes 1000. */
function sendClose(run) {
  if (run.conn.closeSent) return;
  sendControl(run, "close");
  run.conn.closeSent = true;
  clearTimeout(run.timers.drain);
  run.timers.drain = setTimeout(() => {
    if (run !== current || phase !== "closing") return;
    view.showError(TEXT.drainTimeout);
    if (run.conn) run.conn.ws.close(1000);
  }, DRAIN_TIMEOUT_MS);
}

// ------------------------------------------------------------------ the socket

function connect(run, resume) {
  const ws = new WebSocket(listenUrl(location, run.settings, run.rate, resume), socketProtocols(run.settings.token));
  ws.binaryType = "arraybuffer";
  const conn = { ws, resume, opened: false, ready: false, error: null, drained: false, closeSent: false };
  run.conn = conn;
  const mine = () => run === current && run.conn === conn;
  ws.onopen = () => {
    if (run.conn === conn) conn.opened = true;
  };
  ws.onmessage = (ev) => {
    if (!mine()) return;
    const msg = parseMessage(ev.data);
    if (msg) onServerMessage(run, conn, msg);
  };
  ws.onclose = (ev) => {
    if (mine()) onSocketClosed(run, conn, ev.code);
  };
}

function onServerMessage(run, conn, msg) {
  switch (msg.type) {
    case "session":
      return onSession(run, conn, msg);
    case "partial":
    case "final":
    case "closed":
    case "warning": {
      const seg = run.segments.current;
      if (seg) onResult(run, seg, msg, true);
      return;
    }
    case "error":
      conn.error = errorOf(msg);
      return;
    default:
      return; // unknown types are ignored, for forward compatibility
  }
}

function onSession(run, conn, msg) {
  const prev = run.segments.current;
  const kind = sessionKind(prev, msg, Boolean(conn.resume));
  if (kind === "first" || kind === "replaced") {
    // A new server session: its timeline starts at the audio we send next. The old
    // session's open utterance gets no final here (maybe from recoverTail).
    if (prev) view.orphans(transcript.orphanPartials());
    run.segments.open(msg.session_id, run.outbox.samplesSent);
    run.outbox.newSegment();
    if (prev) {
      view.showWarning("new_session", TEXT.newSession, "client");
      recoverTail(run, prev);
    }
  } else if (kind === "resumed" && run.settings.opus) {
    // Opus is not resent: the timeline continues where the server's stored audio ends.
    if (typeof msg.stored_samples === "number") {
      run.outbox.samplesSent = prev.baseSample + Math.round((msg.stored_samples * run.rate) / 16000);
      run.latency.rewind(run.outbox.samplesSent);
    }
    view.showWarning("resumed", TEXT.resumed, "info", 5000);
  } else if (kind === "resumed") {
    if (run.outbox.resendFrom(prev.baseSample, msg.stored_samples) !== null) {
      run.latency.rewind(run.outbox.samplesSent);
      view.resent(run.outbox.resentSamples);
    }
    view.showWarning("resumed", TEXT.resumed, "info", 5000);
  }
  conn.ready = true;
  run.everConnected = true;
  run.reconnect.reset();
  view.session(msg.session_id, run.rate, msg.model);
  if (run.stopping) {
    // Stop was pressed while the socket was down: send the rest, then close.
    flushPending(run);
    sendClose(run);
  } else {
    setPhase("live");
    view.setConn("live", "Live");
    if (run.settings.opus && run.capture) startRecorder(run);
    flushPending(run);
  }
}

/** The old session ended without us: fetch its remaining finals from the viewer endpoint. */
function recoverTail(run, seg) {
  let ws;
  try {
    ws = new WebSocket(viewerUrl(location, seg.sid, seg.lastSeq, run.settings.token), socketProtocols(run.settings.token));
  } catch (_) {
    return;
  }
  const timer = setTimeout(() => ws.close(), 60000);
  ws.onmessage = (ev) => {
    const msg = parseMessage(ev.data);
    if (!msg) return;
    if (msg.type === "final") onResult(run, seg, msg, false);
    if (msg.type === "closed") ws.close(1000);
  };
  ws.onclose = () => clearTimeout(timer);
  ws.onerror = () => {}; // no viewer endpoint on this server: nothing to recover
}

function onSocketClosed(run, conn, code) {
  run.conn = null;
  stopRecorder(run); // a new socket gets a new Opus stream
  view.closeCode(code);
  const next = onClose({
    code,
    error: conn.error,
    drained: conn.drained,
    stopping: run.stopping,
    resuming: Boolean(conn.resume),
    everConnected: run.everConnected,
  });
  switch (next.action) {
    case "finished":
      finishRun(run);
      setPhase("closed");
      view.setConn("closed", conn.error ? "Ended by server" : "Closed", { closeCode: code });
      if (next.text) view.showError(next.text);
      view.announce("Transcription finished.");
      return;
    case "ended":
      finishRun(run);
      setPhase(next.failed ? "error" : "closed");
      view.setConn(next.failed ? "error" : "closed", "Ended by server", { closeCode: code });
      view.showError(next.text);
      return;
    case "new_session":
      scheduleReconnect(run, null);
      return;
    case "fatal":
      finishRun(run);
      setPhase("error");
      view.setConn("error", `Error (${code})`, { closeCode: code });
      view.showError(next.text);
      return;
    case "diagnose":
      // The upgrade itself failed; browsers hide the HTTP status, so ask for it.
      finishRun(run);
      setPhase("error");
      view.setConn("error", "Could not connect", { closeCode: code });
      diagnose(run.settings.token).then((text) => view.showError(text));
      return;
    default:
      // A dropped socket (1001, 1006, 1012, a network change…): reconnect and resume.
      scheduleReconnect(run, run.segments.resumePoint());
  }
}

function scheduleReconnect(run, resume) {
  const next = run.reconnect.next();
  if (!next) {
    finishRun(run);
    setPhase("error");
    view.setConn("error", "Disconnected");
    view.showError(TEXT.lost);
    diagnose(run.settings.token, true).then((text) => text && view.showError(text));
    return;
  }
  if (!run.stopping) setPhase("reconnecting");
  view.setConn("reconnecting", `Reconnecting${next.attempt ? ` (attempt ${next.attempt + 1})` : ""}…`);
  clearTimeout(run.timers.reconnect);
  run.timers.reconnect = setTimeout(() => {
    if (run === current) connect(run, resume);
  }, next.delay);
}

/** Ask for /v1/listen over plain HTTP: the server refuses it before the upgrade with
 * the same status (401, 403, 429) it gave the WebSocket, which browsers hide. This is
 * a dry run for the server: it does not use up a single-use token. */
async function diagnose(token, onlyKnown = false) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  try {
    const res = await fetch("/v1/listen", { cache: "no-store", headers });
    let body = {};
    try {
      body = await res.json();
    } catch (_) {
      /* not JSON */
    }
    return diagnosisText(res.status, body, onlyKnown);
  } catch (_) {
    return onlyKnown ? null : TEXT.unreachable;
  }
}

// ------------------------------------------------------------------ results

function onResult(run, seg, msg, live) {
  if (!acceptSeq(seg, msg)) return; // already seen (replayed after a reconnect)
  const base = seg.baseSample / (run.rate || 16000);
  const endSample = seg.baseSample + Math.round((msg.end || 0) * run.rate);
  switch (msg.type) {
    case "partial": {
      const item = transcript.partial(seg.index, base, msg);
      if (!item) return;
      view.partial(item);
      if (live) {
        const lag = run.latency.partialLag(endSample, performance.now());
        if (lag !== null) view.partialLag(lag);
      }
      return;
    }
    case "final": {
      const item = transcript.final(seg.index, base, msg);
      if (!item) return; // exactly one final per utterance
      view.final(item, transcript.turns(item), (n) => transcript.speakerName(n));
      if (live) {
        const t = run.latency.final(endSample, performance.now(), run.rate);
        if (t) view.timeToFinal(t.ms, t.avg);
      }
      return;
    }
    case "warning":
      // Queue and lag notices are transient: they fade once the server stops repeating them.
      view.showWarning(`server:${msg.code || "warning"}`, msg.message || msg.code || "Warning from the server",
        "warning", 15000);
      return;
    case "closed":
      if (!live || !run.conn) return;
      run.conn.drained = true;
      view.drained(msg.utterances);
      return;
    default:
      return;
  }
}

// ------------------------------------------------------------------ copy & download

const FORMATS = {
  txt: () => [`${transcript.asText()}\n`, "text/plain"],
  srt: () => [transcript.asSrt(), "application/x-subrip"],
  vtt: () => [transcript.asVtt(), "text/vtt"],
};

/** A person names a speaker: the page and the downloads use the name from now on. */
function rename(speaker) {
  const name = window.prompt(`Name for ${transcript.speakerName(speaker)}:`, transcript.speakerName(speaker));
  if (name === null) return;
  transcript.rename(speaker, name);
  view.renameSpeaker(speaker, transcript.speakerName(speaker));
}

function download(kind) {
  if (!transcript.finals().length) {
    view.announce("The transcript is empty.");
    return;
  }
  const [text, type] = FORMATS[kind]();
  const seg = current && current.segments.current;
  const stamp = new Date().toISOString().slice(0, 16).replace(/[:T]/g, "-");
  view.download(text, `transcript-${seg ? seg.sid.slice(0, 8) : stamp}.${kind}`, type);
}

// ------------------------------------------------------------------ boot

view.bind({
  start,
  stop,
  rename,
  copy: () => view.copy(transcript.asText()),
  download,
  clear: () => {
    transcript.clear();
    view.clearTranscript();
    view.announce("Transcript cleared.");
  },
});
view.restoreSettings(location, history);
setPhase("idle");
if (!window.isSecureContext) {
  view.showWarning(
    "insecure",
    "This page is not served over HTTPS, so browsers will not allow the microphone here (localhost is fine).",
    "client",
  );
}
// Leaving mid-session: say goodbye so the server ends the session promptly.
window.addEventListener("pagehide", () => {
  const run = current;
  if (run && run.conn && run.conn.ws.readyState === WebSocket.OPEN && !run.conn.closeSent) sendControl(run, "close");
});
