// The transcript model, no DOM: one item per utterance of each segment (server session),
// built from partials and finals, and the plain text, SRT and WebVTT made from its finals.
// Times are seconds on the recording's timeline: the segment's start plus the result's.
//
// Rules (DESIGN.md §2): exactly one final per utterance, never revised; a partial after
// the final is ignored; a partial's `stable_text` is the prefix that will not change.

export function itemKey(seg, utt) {
  return `${seg}:${utt}`;
}

export class Transcript {
  constructor() {
    this.items = new Map(); // key → {key, seg, utt, base, start, end, text, stable, final, words, speaker, orphan}
    this.names = new Map(); // speaker number → the name a person gave it (for the page and exports)
  }

  /** How a speaker is called: the name given with `rename`, else "Speaker 1" for speaker 0. */
  speakerName(speaker) {
    return this.names.get(speaker) || `Speaker ${speaker + 1}`;
  }

  /** Names speaker `speaker` (an empty name goes back to "Speaker N"). */
  rename(speaker, name) {
    const clean = (name || "").replace(/\s+/g, " ").trim().slice(0, 40);
    if (clean) this.names.set(speaker, clean);
    else this.names.delete(speaker);
  }

  /** An item's text as runs of one speaker: [{speaker, text, start, end}] (one run, speaker
   * null, without speaker labels). */
  turns(item) {
    const words = (item.words || []).filter((w) => (w.word || "").trim());
    if (item.speaker === null || item.speaker === undefined || !words.length ||
        words.every((w) => w.speaker === words[0].speaker)) {
      const speaker = words.length && Number.isInteger(words[0].speaker) ? words[0].speaker : (item.speaker ?? null);
      return [{ speaker, text: item.text, start: item.start, end: item.end }];
    }
    const runs = [];
    for (const w of words) {
      const last = runs[runs.length - 1];
      if (last && last.speaker === w.speaker) {
        last.text += w.word;
        last.end = item.base + w.end;
      } else {
        runs.push({ speaker: w.speaker, text: w.word, start: item.base + w.start, end: item.base + w.end });
      }
    }
    return runs.map((r) => ({ ...r, text: r.text.trim() }));
  }

  /** The segment index the next recording starts at (after every item shown). */
  nextSegment() {
    let next = 0;
    for (const item of this.items.values()) next = Math.max(next, item.seg + 1);
    return next;
  }

  /** The item of utterance `utt` of segment `seg` (made when new), or null when it
   * already has its final. */
  open(seg, utt) {
    const key = itemKey(seg, utt);
    let item = this.items.get(key);
    if (item && item.final) return null;
    if (!item) {
      item = { key, seg, utt, final: false, orphan: false, words: [] };
      this.items.set(key, item);
    }
    return item;
  }

  /** Applies a partial of segment `seg` (starting at `base` s); the item, or null when
   * the utterance already has its final. */
  partial(seg, base, msg) {
    const item = this.open(seg, msg.utterance);
    if (!item) return null;
    item.start = base + (msg.start || 0);
    item.end = base + (msg.end || 0);
    item.text = msg.text || "";
    item.stable = msg.stable_text || "";
    item.speaker = Number.isInteger(msg.speaker) ? msg.speaker : null; // provisional
    return item;
  }

  /** Applies a final; the item, or null for a second final of the same utterance. */
  final(seg, base, msg) {
    const item = this.open(seg, msg.utterance);
    if (!item) return null;
    item.final = true;
    item.start = base + (msg.start || 0);
    item.end = base + (msg.end || 0);
    item.text = (msg.text || "").trim();
    item.stable = item.text;
    item.words = msg.words || [];
    item.base = base;
    item.speaker = Number.isInteger(msg.speaker) ? msg.speaker : null;
    return item;
  }

  /** Partials that will get no final (their session ended without us): marked, and
   * returned, once each. */
  orphanPartials() {
    const out = [];
    for (const item of this.items.values()) {
      if (!item.final && !item.orphan) {
        item.orphan = true;
        out.push(item);
      }
    }
    return out;
  }

  /** Finals with text, in order. */
  finals() {
    return [...this.items.values()].filter((i) => i.final && i.text).sort((a, b) => a.seg - b.seg || a.utt - b.utt);
  }

  clear() {
    this.items.clear();
  }

  /** One final a line (with speaker labels: one line per speaker's run, after its name). */
  asText() {
    return this.runs()
      .map((r) => this.said(r))
      .join("\n");
  }

  /** Every final's runs of one speaker, in order. */
  runs() {
    return this.finals().flatMap((i) => this.turns(i));
  }

  said(run) {
    return run.speaker === null ? run.text : `${this.speakerName(run.speaker)}: ${run.text}`;
  }

  asSrt() {
    return this.cues(",").join("\n");
  }

  asVtt() {
    return `WEBVTT\n\n${this.cues(".").join("\n")}`;
  }

  /** A cue per final (per speaker's run with speaker labels: SRT prefixed "Name: ",
   * WebVTT a voice span <v Name>). */
  cues(sep) {
    return this.runs().map((r, n) => {
      const end = Math.max(r.end, r.start + 0.5);
      let text = r.text;
      if (r.speaker !== null) {
        text = sep === "." ? `<v ${vttEscape(this.speakerName(r.speaker))}>${vttEscape(r.text)}` : this.said(r);
      }
      return `${n + 1}\n${fmtStamp(r.start, sep)} --> ${fmtStamp(end, sep)}\n${text}\n`;
    });
  }
}

function vttEscape(text) {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

/** How a partial shows: `stable` in normal type, `rest` as the unstable tail. */
export function splitPartial(stable, text) {
  let rest = text;
  if (stable && text.startsWith(stable)) rest = text.slice(stable.length);
  else if (stable) rest = text.length > stable.length ? text.slice(stable.length) : "";
  return { stable: stable.trimStart(), rest: stable ? rest : rest.trimStart() };
}

/** 00:00:01,250 (SRT, `sep` ",") or 00:00:01.250 (WebVTT, "."). */
export function fmtStamp(sec, sep) {
  const ms = Math.max(0, Math.round(sec * 1000));
  const h = Math.floor(ms / 3600000);
  const m = Math.floor((ms % 3600000) / 60000);
  const s = Math.floor((ms % 60000) / 1000);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(h)}:${pad(m)}:${pad(s)}${sep}${pad(ms % 1000, 3)}`;
}
