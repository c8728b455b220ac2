// The transcript model (ingest/static/transcript.js): partials, finals, stable text,
// orphans and the exports.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { Transcript, fmtStamp, itemKey, splitPartial } from "../../ingest/static/transcript.js";

const partial = (utterance, text, stable, start = 0, end = 1) =>
  ({ type: "partial", utterance, text, stable_text: stable, start, end });
const final = (utterance, text, start = 0, end = 1) => ({ type: "final", utterance, text, start, end, words: [] });

describe("transcript", () => {
  it("turns a partial into its final, once", () => {
    const t = new Transcript();
    const p = t.partial(0, 0, partial(0, " Hello wor", " Hello", 0.1, 0.9));
    assert.equal(p.key, itemKey(0, 0));
    assert.equal(p.final, false);
    assert.equal(p.stable, " Hello");
    const f = t.final(0, 0, final(0, " Hello world. ", 0.1, 1.0));
    assert.equal(f, p);
    assert.equal(f.final, true);
    assert.equal(f.text, "Hello world.");
    assert.equal(t.final(0, 0, final(0, " Something else.")), null);
    assert.equal(t.partial(0, 0, partial(0, " late", "")), null);
    assert.equal(t.items.get("0:0").text, "Hello world.");
  });

  it("places a segment's times after its start", () => {
    const t = new Transcript();
    const f = t.final(1, 2.5, final(0, "Carry on.", 0.1, 0.5));
    assert.equal(f.start, 2.6);
    assert.equal(f.end, 3.0);
    assert.equal(f.seg, 1);
  });

  it("lists finals with text in segment and utterance order", () => {
    const t = new Transcript();
    t.final(1, 0, final(0, "c"));
    t.final(0, 0, final(1, "b"));
    t.final(0, 0, final(0, "a"));
    t.final(0, 0, final(2, "  "));
    t.partial(0, 0, partial(3, "d", ""));
    assert.deepEqual(t.finals().map((i) => i.text), ["a", "b", "c"]);
    assert.equal(t.asText(), "a\nb\nc");
    assert.equal(t.nextSegment(), 2);
    t.clear();
    assert.equal(t.nextSegment(), 0);
    assert.equal(t.asText(), "");
  });

  it("marks partials without a final as orphans, once", () => {
    const t = new Transcript();
    t.partial(0, 0, partial(0, "a", ""));
    t.final(0, 0, final(1, "b"));
    assert.deepEqual(t.orphanPartials().map((i) => i.key), ["0:0"]);
    assert.deepEqual(t.orphanPartials(), []);
  });

  it("exports SRT and WebVTT cues of at least half a second", () => {
    const t = new Transcript();
    t.final(0, 0, final(0, "Hello world.", 0.1, 1.0));
    t.final(0, 0, final(1, "Short.", 3661.2, 3661.3));
    assert.equal(t.asSrt(),
      "1\n00:00:00,100 --> 00:00:01,000\nHello world.\n\n2\n01:01:01,200 --> 01:01:01,700\nShort.\n");
    assert.equal(t.asVtt(),
      "WEBVTT\n\n1\n00:00:00.100 --> 00:00:01.000\nHello world.\n\n2\n01:01:01.200 --> 01:01:01.700\nShort.\n");
  });
});

describe("partial display", () => {
  it("shows the stable prefix and the changing tail", () => {
    assert.deepEqual(splitPartial(" Hello", " Hello wor"), { stable: "Hello", rest: " wor" });
    assert.deepEqual(splitPartial("", " This is"), { stable: "", rest: "This is" });
    // stable_text that is not a prefix (should not happen): the tail past its length
    assert.deepEqual(splitPartial(" Of", " Xf resum"), { stable: "Of", rest: " resum" });
    assert.deepEqual(splitPartial(" Of resum", " Of"), { stable: "Of resum", rest: "" });
  });

  it("formats subtitle stamps", () => {
    assert.equal(fmtStamp(0, ","), "00:00:00,000");
    assert.equal(fmtStamp(-1, "."), "00:00:00.000");
    assert.equal(fmtStamp(59.9996, "."), "00:01:00.000");
  });

  it("labels speakers, splits a final where its words change speaker, and renames", () => {
    const t = new Transcript();
    const w = (word, start, end, speaker) => ({ word, start, end, probability: 0.9, speaker });
    t.final(0, 10, { type: "final", utterance: 0, text: "Hi there. Hello.", start: 0.5, end: 2.5, speaker: 0,
      words: [w(" Hi", 0.5, 0.8, 0), w(" there.", 0.9, 1.3, 0), w(" Hello.", 2.0, 2.5, 1)] });
    t.final(0, 10, { type: "final", utterance: 1, text: "A & B <ok>", start: 3, end: 4, speaker: 1,
      words: [w(" A", 3, 3.2, 1), w(" &", 3.3, 3.4, 1), w(" B", 3.5, 3.7, 1), w(" <ok>", 3.8, 4, 1)] });
    const runs = t.turns(t.items.get("0:0"));
    assert.deepEqual(runs.map((r) => [r.speaker, r.text, r.start, r.end]),
      [[0, "Hi there.", 10.5, 11.3], [1, "Hello.", 12, 12.5]]);
    assert.equal(t.asText(), "Speaker 1: Hi there.\nSpeaker 2: Hello.\nSpeaker 2: A & B <ok>");
    t.rename(1, "  Ann  ");
    assert.equal(t.speakerName(1), "Ann");
    assert.match(t.asVtt(), /<v Ann>Hello\.\n/);
    assert.match(t.asVtt(), /<v Ann>A &amp; B &lt;ok&gt;\n/);
    assert.match(t.asSrt(), /^1\n00:00:10,500 --> 00:00:11,300\nSpeaker 1: Hi there\.\n/);
    t.rename(1, "");
    assert.equal(t.speakerName(1), "Speaker 2");
  });

  it("has no speaker names without speaker labels", () => {
    const t = new Transcript();
    t.final(0, 0, final(0, "Plain text."));
    assert.equal(t.asText(), "Plain text.");
    assert.doesNotMatch(t.asVtt(), /<v /);
  });
});
