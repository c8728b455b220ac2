// Latency bookkeeping (ingest/static/latency.js) and capture's pure helpers.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { fallbackRates, micErrorMessage } from "../../ingest/static/capture.js";
import { LatencyLog } from "../../ingest/static/latency.js";

describe("latency log", () => {
  it("finds when the audio at a sample was sent", () => {
    const log = new LatencyLog();
    assert.equal(log.sentAt(1), null);
    log.sent(100, 1000);
    log.sent(200, 1100);
    log.sent(300, 1200);
    assert.equal(log.sentAt(0), 1000);
    assert.equal(log.sentAt(100), 1000);
    assert.equal(log.sentAt(101), 1100);
    assert.equal(log.sentAt(300), 1200);
    assert.equal(log.sentAt(301), null); // not sent yet
    assert.equal(log.partialLag(150, 1500), 400);
    assert.equal(log.partialLag(999, 1500), null);
  });

  it("measures time to final and its average over the last 50", () => {
    const log = new LatencyLog();
    for (let i = 1; i <= 60; i++) log.sent(i * 100, i * 100);
    assert.deepEqual(log.final(100, 300, 10), { ms: 200, avg: 200 });
    assert.deepEqual(log.final(200, 600, 10), { ms: 400, avg: 300 });
    assert.equal(log.final(99999, 700, 10), null);
    for (let i = 0; i < 60; i++) log.final(100, 1100, 10);
    assert.deepEqual(log.final(100, 1100, 10), { ms: 1000, avg: 1000 });
  });

  it("steps back with a resume and trims settled audio in large steps", () => {
    const log = new LatencyLog();
    for (let i = 1; i <= 2000; i++) log.sent(i * 10, i);
    log.rewind(15005);
    assert.equal(log.log.length, 1500);
    assert.equal(log.sentAt(15001), null);
    // a final at sample 15000 at 10 Hz keeps 30 s (300 samples) before it
    log.final(15000, 2000, 10);
    assert.equal(log.log[0].end, 14700);
    assert.equal(log.sentAt(14700), 1470);
    const small = new LatencyLog();
    for (let i = 1; i <= 100; i++) small.sent(i * 10, i);
    small.final(1000, 200, 10);
    assert.equal(small.log.length, 100); // fewer than 500 to drop: kept
  });

  it("stays bounded", () => {
    const log = new LatencyLog();
    for (let i = 1; i <= 40001; i++) log.sent(i, i);
    assert.equal(log.log.length, 30001);
  });
});

describe("capture helpers", () => {
  it("explains microphone errors", () => {
    assert.match(micErrorMessage({ name: "NotAllowedError" }), /^Microphone access was denied/);
    assert.match(micErrorMessage({ name: "NotFoundError" }), /^No microphone was found/);
    assert.match(micErrorMessage({ name: "NotReadableError" }), /Another application/);
    assert.equal(micErrorMessage({ name: "Weird", message: "boom" }), "The microphone could not be started (boom).");
  });

  it("tries the mic's rate, then the usual ones, never the refused one", () => {
    assert.deepEqual(fallbackRates(undefined, 48000), [44100, 32000, 16000]);
    assert.deepEqual(fallbackRates(22050, 44100), [22050, 48000, 32000, 16000]);
    assert.deepEqual(fallbackRates(32000, 48000), [32000, 44100, 16000]);
  });
});
