// The page's protocol module (ingest/static/protocol.js) under Node's own test runner:
// URLs, messages, seq/resume, the resend ring, reconnect and close decisions, error texts.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import {
  AudioOutbox,
  CLOSE_MESSAGES,
  ERROR_TEXT,
  MAX_PENDING_SECONDS,
  RECONNECT_DELAYS_MS,
  ReconnectPolicy,
  Segments,
  TEXT,
  acceptSeq,
  diagnosisText,
  errorOf,
  errorText,
  OPUS_TYPES,
  listenUrl,
  onClose,
  opusType,
  parseMessage,
  sessionKind,
  socketProtocols,
  textFor,
  tokenAsSubprotocol,
  viewerUrl,
} from "../../ingest/static/protocol.js";

const HTTP = { protocol: "http:", host: "127.0.0.1:8000" };
const HTTPS = { protocol: "https:", host: "stt.example" };
const PARAMS = { interim: true, language: "", token: "" };

function query(url) {
  const u = new URL(url.replace(/^ws/, "http"));
  return Object.fromEntries(u.searchParams);
}

describe("listen URL", () => {
  it("declares the page's audio format and the partials choice", () => {
    const url = listenUrl(HTTP, PARAMS, 48000);
    assert.ok(url.startsWith("ws://127.0.0.1:8000/v1/listen?"), url);
    assert.deepEqual(query(url), {
      encoding: "pcm_s16le", sample_rate: "48000", channels: "1", interim_results: "true",
    });
    assert.equal(query(listenUrl(HTTP, { ...PARAMS, interim: false }, 44100)).interim_results, "false");
    assert.equal(query(listenUrl(HTTP, { ...PARAMS, diarize: true }, 48000)).diarize, "true");
  });

  it("asks for Opus, whose header names its rate, in the low-bandwidth mode", () => {
    assert.deepEqual(query(listenUrl(HTTP, { ...PARAMS, opus: true }, 48000)), {
      encoding: "opus", interim_results: "true",
    });
  });

  it("records Opus in WebM where it can, else in Ogg, else not at all", () => {
    assert.equal(opusType(() => true), "audio/webm;codecs=opus");
    assert.equal(opusType((t) => t.startsWith("audio/ogg")), "audio/ogg;codecs=opus");
    assert.equal(opusType(() => false), null);
    assert.equal(OPUS_TYPES.length, 2);
  });

  it("uses wss on an https page", () => {
    assert.ok(listenUrl(HTTPS, PARAMS, 16000).startsWith("wss://stt.example/v1/listen?"));
  });

  it("adds the language when one is set", () => {
    assert.equal(query(listenUrl(HTTP, { ...PARAMS, language: "de" }, 16000)).language, "de");
    assert.equal("language" in query(listenUrl(HTTP, PARAMS, 16000)), false);
  });

  it("keeps a subprotocol-safe token out of the URL, and carries any other one in it", () => {
    const safe = "abc.DEF-123_~";
    assert.equal(tokenAsSubprotocol(safe), true);
    assert.equal("token" in query(listenUrl(HTTP, { ...PARAMS, token: safe }, 16000)), false);
    assert.deepEqual(socketProtocols(safe), ["stt", `bearer.${safe}`]);
    const odd = "a b/c=";
    assert.equal(tokenAsSubprotocol(odd), false);
    assert.equal(query(listenUrl(HTTP, { ...PARAMS, token: odd }, 16000)).token, odd);
    assert.equal(socketProtocols(odd), undefined);
    assert.equal(socketProtocols(""), undefined);
  });

  it("resumes with session and after", () => {
    const q = query(listenUrl(HTTP, PARAMS, 48000, { sid: "s1", lastSeq: 4 }));
    assert.equal(q.session, "s1");
    assert.equal(q.after, "4");
    assert.equal(q.sample_rate, "48000");
    assert.equal(query(listenUrl(HTTP, PARAMS, 48000, { sid: "s1", lastSeq: 0 })).after, "0");
  });

  it("asks the viewer endpoint for a session's results after a seq", () => {
    const url = viewerUrl(HTTP, "a/b", 7, "");
    assert.ok(url.startsWith("ws://127.0.0.1:8000/v1/sessions/a%2Fb/results?"), url);
    assert.deepEqual(query(url), { after: "7" });
    assert.equal(query(viewerUrl(HTTP, "s", 0, "x y")).token, "x y");
    assert.equal("token" in query(viewerUrl(HTTP, "s", 0, "xy")), false);
  });
});

describe("server messages", () => {
  it("parses JSON objects with a type and nothing else", () => {
    assert.deepEqual(parseMessage('{"type":"final","seq":2}'), { type: "final", seq: 2 });
    assert.deepEqual(parseMessage('{"type":"future_kind"}'), { type: "future_kind" });
    for (const bad of ["not json", "[1]", "null", '"final"', '{"seq":1}', '{"type":3}']) {
      assert.equal(parseMessage(bad), null, bad);
    }
    assert.equal(parseMessage(new ArrayBuffer(4)), null);
  });

  it("reads an error's code and message", () => {
    assert.deepEqual(errorOf({ type: "error", code: "too_fast", message: "slow down" }),
      { code: "too_fast", message: "slow down" });
    assert.deepEqual(errorOf({ type: "error" }), { code: "error", message: "" });
  });
});

describe("seq and segments", () => {
  it("drops results at or below the last seq seen, and takes those without one", () => {
    const seg = { lastSeq: 0 };
    assert.equal(acceptSeq(seg, { seq: 1 }), true);
    assert.equal(acceptSeq(seg, { seq: 3 }), true);
    assert.equal(acceptSeq(seg, { seq: 3 }), false);
    assert.equal(acceptSeq(seg, { seq: 2 }), false);
    assert.equal(seg.lastSeq, 3);
    assert.equal(acceptSeq(seg, {}), true);
    assert.equal(acceptSeq(seg, { seq: 0 }), true);
    assert.equal(seg.lastSeq, 3);
  });

  it("numbers segments after the earlier recordings' and resumes the current one", () => {
    const segs = new Segments(2);
    assert.equal(segs.current, null);
    assert.equal(segs.resumePoint(), null);
    const a = segs.open("s1", 0);
    assert.deepEqual(a, { index: 2, sid: "s1", lastSeq: 0, baseSample: 0 });
    a.lastSeq = 4;
    assert.deepEqual(segs.resumePoint(), { sid: "s1", lastSeq: 4 });
    const b = segs.open("s2", 48000);
    assert.equal(b.index, 3);
    assert.equal(segs.current, b);
    assert.deepEqual(segs.resumePoint(), { sid: "s2", lastSeq: 0 });
  });

  it("tells a first, resumed, replaced or repeated session apart", () => {
    const prev = { sid: "s1" };
    assert.equal(sessionKind(null, { session_id: "s1" }, false), "first");
    assert.equal(sessionKind(prev, { session_id: "s1" }, true), "resumed");
    assert.equal(sessionKind(prev, { session_id: "s2" }, true), "replaced");
    assert.equal(sessionKind(prev, { session_id: "s2" }, false), "replaced");
    assert.equal(sessionKind(prev, { session_id: "s1" }, false), "same");
  });
});

describe("socket closed", () => {
  const base = { code: 1006, error: null, drained: false, stopping: false, resuming: false, everConnected: true };

  it("is finished once `closed` came, with the server's reason if it gave one", () => {
    assert.deepEqual(onClose({ ...base, code: 1000, drained: true }), { action: "finished", text: "" });
    const next = onClose({ ...base, code: 1008, drained: true, error: { code: "idle_timeout", message: "" } });
    assert.deepEqual(next, { action: "finished", text: ERROR_TEXT.idle_timeout });
  });

  it("is an early end on 1000 without `closed`", () => {
    assert.deepEqual(onClose({ ...base, code: 1000 }), { action: "ended", failed: false, text: TEXT.serverEnded });
    assert.deepEqual(onClose({ ...base, code: 1000, stopping: true }),
      { action: "ended", failed: true, text: TEXT.closedEarly });
  });

  it("resumes a dropped socket (1001, 1006, 1012)", () => {
    for (const code of [1001, 1006, 1012]) assert.deepEqual(onClose({ ...base, code }), { action: "resume" });
    // also while stopping: the reconnect sends the rest and the close
    assert.deepEqual(onClose({ ...base, stopping: true }), { action: "resume" });
  });

  it("resumes after too_slow, storage_unavailable and storage_full, once connected", () => {
    for (const code of ["too_slow", "storage_unavailable", "storage_full"]) {
      const error = { code, message: "" };
      assert.deepEqual(onClose({ ...base, code: 1013, error }), { action: "resume" });
      assert.deepEqual(onClose({ ...base, code: 1013, error, everConnected: false }),
        { action: "fatal", text: ERROR_TEXT[code] });
    }
  });

  it("gives up on fatal close codes and on other errors, with a text", () => {
    for (const code of [1003, 1007, 1008, 1009, 1011, 1013, 1015]) {
      assert.equal(onClose({ ...base, code }).action, "fatal", String(code));
    }
    const error = { code: "session_taken", message: "resumed elsewhere" };
    assert.deepEqual(onClose({ ...base, code: 1008, error }), { action: "fatal", text: ERROR_TEXT.session_taken });
  });

  it("starts a new session when a resume finds none", () => {
    const error = { code: "session_not_found", message: "" };
    assert.deepEqual(onClose({ ...base, code: 1008, error, resuming: true }), { action: "new_session" });
    assert.equal(onClose({ ...base, code: 1008, error, resuming: true, stopping: true }).action, "fatal");
    assert.equal(onClose({ ...base, code: 1008, error }).action, "fatal");
  });

  it("asks for the HTTP status when the first upgrade failed", () => {
    assert.deepEqual(onClose({ ...base, everConnected: false }), { action: "diagnose" });
  });
});

describe("reconnect policy", () => {
  it("waits 0.25 s doubling to 8 s, about 32 s in all, then gives up", () => {
    const policy = new ReconnectPolicy(RECONNECT_DELAYS_MS, () => 0.5);
    const delays = [];
    for (let next = policy.next(); next; next = policy.next()) {
      assert.equal(next.attempt, delays.length);
      delays.push(next.delay);
    }
    assert.deepEqual(delays, [250, 500, 1000, 2000, 4000, 8000, 8000, 8000]);
    const total = delays.reduce((a, b) => a + b, 0);
    assert.ok(total > 30000 && total < 35000, String(total)); // covers resume_grace_s = 30
    assert.equal(policy.next(), null);
  });

  it("jitters by ±20% and starts over after a session", () => {
    const low = new ReconnectPolicy(RECONNECT_DELAYS_MS, () => 0);
    const high = new ReconnectPolicy(RECONNECT_DELAYS_MS, () => 0.999999);
    assert.equal(low.next().delay, 200);
    assert.ok(Math.abs(high.next().delay - 300) < 1e-3);
    low.next();
    low.reset();
    assert.deepEqual(low.next(), { attempt: 0, delay: 200 });
  });
});

describe("error texts", () => {
  it("has a sentence for each known code, with the server's details where they help", () => {
    assert.equal(errorText({ code: "too_fast", message: "3.2x real time" }, 1008), ERROR_TEXT.too_fast);
    assert.equal(errorText({ code: "bad_request", message: "sample_rate must be 8000-48000" }, 1008),
      `${ERROR_TEXT.bad_request} (sample_rate must be 8000-48000)`);
    assert.equal(errorText({ code: "unsupported_audio", message: "" }, 1003), ERROR_TEXT.unsupported_audio);
  });

  it("falls back on the close code for unknown codes and for no error at all", () => {
    assert.equal(errorText({ code: "brand_new", message: "why" }, 1011), `${CLOSE_MESSAGES[1011]} (why)`);
    assert.equal(errorText({ code: "brand_new", message: "" }, 4000), "The server reported an error.");
    assert.equal(errorText({ code: "constructor", message: "" }, 1013), CLOSE_MESSAGES[1013]);
    assert.equal(errorText(null, 1009), CLOSE_MESSAGES[1009]);
    assert.equal(errorText(null, 4001), "The connection closed unexpectedly (code 4001).");
    assert.equal(textFor("toString"), null);
  });

  it("explains a refused upgrade by its HTTP status", () => {
    assert.equal(diagnosisText(401, { code: "unauthorized", message: "token already used" }),
      "Authentication failed (token already used): the access token is missing, wrong, expired or already used. Each recording needs a new token.");
    assert.ok(diagnosisText(401, {}).startsWith("Authentication failed: "));
    assert.equal(diagnosisText(403, { code: "forbidden" }), ERROR_TEXT.forbidden);
    assert.equal(diagnosisText(403, null), ERROR_TEXT.origin_not_allowed);
    assert.equal(diagnosisText(429, { code: "rate_limited" }), ERROR_TEXT.rate_limited);
    assert.equal(diagnosisText(429, {}), ERROR_TEXT.too_many_sessions);
    assert.equal(diagnosisText(503, { code: "overloaded" }), ERROR_TEXT.overloaded);
    assert.equal(diagnosisText(503, {}), CLOSE_MESSAGES[1013]);
    assert.equal(diagnosisText(426, {}), TEXT.cannotOpen);
    assert.equal(diagnosisText(426, {}, true), null);
  });
});

describe("audio outbox", () => {
  const frame = (samples, fill = 0) => new Int16Array(samples).fill(fill).buffer;

  it("holds frames while offline, dropping the oldest beyond the bound", () => {
    const box = new AudioOutbox(10, 3); // 10 Hz, 3 s: 30 samples
    assert.equal(box.maxSamples, 30);
    for (let i = 0; i < 3; i++) assert.equal(box.hold(frame(10, i), 10), 0);
    assert.equal(box.hold(frame(10, 3), 10), 10);
    assert.equal(box.pendingSamples, 30);
    assert.equal(new Int16Array(box.takePending().pcm)[0], 1);
    assert.equal(box.pendingSamples, 20);
    box.clearPending();
    assert.equal(box.takePending(), null);
    assert.equal(box.pendingSamples, 0);
    assert.equal(new AudioOutbox(48000).maxSamples, MAX_PENDING_SECONDS * 48000);
  });

  it("counts what was sent and keeps a bounded ring of it", () => {
    const box = new AudioOutbox(10, 3);
    for (let i = 0; i < 5; i++) assert.equal(box.sent(frame(10), 10), 10 * (i + 1));
    assert.equal(box.ringSamples, 30);
    assert.deepEqual(box.ring.map((f) => f.start), [20, 30, 40]);
  });

  it("sends again what a resumed session did not store, from the stored point", () => {
    // 48 kHz capture; five 100 ms frames sent; the server stored 0.25 s (4000 at 16 kHz).
    const box = new AudioOutbox(48000);
    for (let i = 0; i < 5; i++) box.sent(frame(4800, i + 1), 4800);
    box.hold(frame(4800, 9), 4800); // captured while the socket was down
    const n = box.resendFrom(0, 4000);
    const stored = 12000;
    assert.equal(n, 24000 - stored);
    assert.equal(box.samplesSent, stored);
    assert.equal(box.resentSamples, n);
    // First the rest of frame 3 (from sample 2400 of it), then frames 4 and 5, then the held one.
    const order = [];
    for (let f = box.takePending(); f; f = box.takePending()) order.push([new Int16Array(f.pcm)[0], f.samples]);
    assert.deepEqual(order, [[3, 2400], [4, 4800], [5, 4800], [9, 4800]]);
    assert.deepEqual(box.ring.map((f) => f.start), [0, 4800]);
  });

  it("places a segment's stored point after the audio of earlier segments", () => {
    const box = new AudioOutbox(16000);
    box.sent(frame(16000), 16000); // segment 1
    box.newSegment();
    const base = box.samplesSent;
    box.sent(frame(1600, 1), 1600);
    box.sent(frame(1600, 2), 1600);
    assert.equal(box.resendFrom(base, 1600), 1600);
    assert.equal(box.samplesSent, base + 1600);
    assert.equal(new Int16Array(box.takePending().pcm)[0], 2);
  });

  it("sends nothing again when the server has it all, or says nothing", () => {
    const box = new AudioOutbox(16000);
    box.sent(frame(1600), 1600);
    assert.equal(box.resendFrom(0, 1600), null);
    assert.equal(box.resendFrom(0, undefined), null);
    assert.equal(box.samplesSent, 1600);
    assert.equal(box.pending.length, 0);
  });

  it("cannot resend what a new segment left behind", () => {
    const box = new AudioOutbox(16000);
    box.sent(frame(1600), 1600);
    box.newSegment();
    assert.equal(box.resendFrom(0, 0), 0);
    assert.equal(box.samplesSent, 0);
  });
});
