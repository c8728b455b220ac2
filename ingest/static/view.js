// The page's DOM: connection state, buttons, settings, numbers, notices, the level meter
// and the transcript rows. It shows what it is told and reports clicks; it decides
// nothing about the protocol.
//
// Data attributes other code and the tests rely on (docs/browser.md):
//   body[data-phase]; #conn[data-state, data-close-code, data-closed, data-utterances];
//   #audio-sent[data-seconds, data-resent]; #latency[data-ms]; #partial-lag[data-ms];
//   #capture-info[data-rate]; rows [data-testid=partial|final|orphan][data-key, data-seg,
//   data-utt, data-start, data-end] with .stable / .unstable spans in partials;
//   notices [data-testid=warning][data-code].

import { splitPartial } from "./transcript.js";

const SETTINGS = ["opt-echo", "opt-noise", "opt-agc", "opt-interim", "opt-diarize", "opt-opus", "opt-language"]; // kept in localStorage
const MAX_NOTICES = 4;
const RUNNING = ["starting", "connecting", "live", "reconnecting"];

export function fmtClock(sec) {
  const s = Math.max(0, Math.floor(sec));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
}

export function fmtMs(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

function dbfsToUnit(x) {
  // dBFS mapped onto 0..1 over -60..0 dB feels like a hardware meter.
  return Math.min(1, Math.max(0, (20 * Math.log10(Math.max(x, 1e-6)) + 60) / 60));
}

export class View {
  constructor(doc = document) {
    this.doc = doc;
    const $ = (id) => doc.getElementById(id);
    this.ui = {
      conn: $("conn"),
      connText: $("conn-text"),
      start: $("start"),
      stop: $("stop"),
      levelBox: $("level"),
      levelFill: $("level-fill"),
      levelPeak: $("level-peak"),
      echo: $("opt-echo"),
      noise: $("opt-noise"),
      agc: $("opt-agc"),
      interim: $("opt-interim"),
      diarize: $("opt-diarize"),
      opus: $("opt-opus"),
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
    this.rows = new Map(); // item key → element
    this.notices = new Map(); // code → {li, text, count, timer}
    this.stick = true;
    this.level = 0;
    this.peakHold = 0;
    this.peakAt = 0;
    const ui = this.ui;
    ui.transcript.addEventListener("scroll", () => {
      this.stick = this.nearBottom();
      if (this.stick) ui.jump.hidden = true;
    });
    ui.jump.addEventListener("click", () => {
      this.stick = true;
      ui.transcript.scrollTop = ui.transcript.scrollHeight;
      ui.jump.hidden = true;
      ui.transcript.focus();
    });
  }

  /** Wires the buttons: handlers {start, stop, copy, download(kind), clear}. */
  bind(h) {
    const ui = this.ui;
    ui.start.addEventListener("click", h.start);
    ui.stop.addEventListener("click", h.stop);
    ui.copy.addEventListener("click", h.copy);
    ui.dlTxt.addEventListener("click", () => h.download("txt"));
    ui.dlSrt.addEventListener("click", () => h.download("srt"));
    ui.dlVtt.addEventListener("click", () => h.download("vtt"));
    ui.clear.addEventListener("click", h.clear);
    // a speaker's name in the transcript: click to rename it (page and downloads)
    ui.transcript.addEventListener("click", (e) => {
      const el = e.target.closest && e.target.closest(".speaker");
      if (el && h.rename) h.rename(Number(el.dataset.speaker));
    });
  }

  /** Checkbox and language choices persist in localStorage (the token never does);
   * ?token= and ?language= in the page URL fill them in, and the token leaves the URL. */
  restoreSettings(location, history) {
    for (const id of SETTINGS) {
      const el = this.doc.getElementById(id);
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
    if (q.get("token")) this.ui.token.value = q.get("token");
    if (q.get("language")) this.ui.language.value = q.get("language");
    if (q.has("token")) {
      // Keep the credential out of the address bar, history and bookmarks.
      q.delete("token");
      const rest = q.toString();
      history.replaceState(null, "", `${location.pathname}${rest ? `?${rest}` : ""}${location.hash}`);
    }
  }

  /** The settings of a new recording. */
  settings() {
    const ui = this.ui;
    return {
      echo: ui.echo.checked,
      noise: ui.noise.checked,
      agc: ui.agc.checked,
      interim: ui.interim.checked,
      diarize: ui.diarize.checked,
      opus: ui.opus.checked,
      language: ui.language.value.trim(),
      token: ui.token.value.trim(),
    };
  }

  // ---------------------------------------------------------------- state

  setPhase(phase) {
    const ui = this.ui;
    this.doc.body.dataset.phase = phase;
    const running = RUNNING.includes(phase);
    ui.start.disabled = running || phase === "closing";
    ui.stop.disabled = !running;
    for (const el of [ui.echo, ui.noise, ui.agc, ui.interim, ui.diarize, ui.opus, ui.language, ui.token]) {
      el.disabled = running || phase === "closing";
    }
  }

  setConn(state, text, extra = {}) {
    this.ui.conn.dataset.state = state;
    this.ui.connText.textContent = text;
    for (const [k, v] of Object.entries(extra)) this.ui.conn.dataset[k] = String(v);
  }

  closeCode(code) {
    this.ui.conn.dataset.closeCode = String(code);
  }

  /** `closed` arrived: every final is in. */
  drained(utterances) {
    this.setConn("closing", "Finishing…");
    this.ui.conn.dataset.closed = "true";
    this.ui.conn.dataset.utterances = String(utterances ?? "");
  }

  showError(text) {
    this.ui.error.textContent = text;
    this.ui.error.hidden = !text;
  }

  announce(text) {
    const note = this.ui.srNote;
    note.textContent = "";
    // A fresh text node is what screen readers pick up.
    setTimeout(() => (note.textContent = text), 50);
  }

  /** Show (or refresh) a notice; `ttlMs` hides it that long after its last update. */
  showWarning(code, message, kind = "warning", ttlMs = 0) {
    let entry = this.notices.get(code);
    if (!entry) {
      const li = this.doc.createElement("li");
      li.className = `warning ${kind}`;
      li.dataset.code = code;
      li.dataset.testid = "warning";
      const text = this.doc.createElement("span");
      text.className = "warning-text";
      const close = this.doc.createElement("button");
      close.type = "button";
      close.className = "dismiss";
      close.setAttribute("aria-label", "Dismiss");
      close.textContent = "×";
      close.addEventListener("click", () => this.clearWarning(code));
      li.append(text, close);
      this.ui.warnings.append(li);
      entry = { li, text, count: 0, timer: 0 };
      this.notices.set(code, entry);
      while (this.ui.warnings.children.length > MAX_NOTICES) {
        const first = this.ui.warnings.firstElementChild;
        this.clearWarning(first.dataset.code);
      }
    }
    entry.count += 1;
    const text = message.charAt(0).toUpperCase() + message.slice(1);
    entry.text.textContent = entry.count > 1 ? `${text} (×${entry.count})` : text;
    clearTimeout(entry.timer);
    if (ttlMs) entry.timer = setTimeout(() => this.clearWarning(code), ttlMs);
  }

  clearWarning(code) {
    const entry = this.notices.get(code);
    if (entry) {
      clearTimeout(entry.timer);
      entry.li.remove();
      this.notices.delete(code);
    }
  }

  clearWarnings() {
    for (const code of [...this.notices.keys()]) this.clearWarning(code);
  }

  // ---------------------------------------------------------------- numbers

  /** A new recording: no session, no numbers yet. */
  resetRun() {
    const ui = this.ui;
    delete ui.conn.dataset.closeCode;
    delete ui.conn.dataset.closed;
    delete ui.audioSent.dataset.resent;
    ui.sessionId.textContent = "—";
    ui.latency.textContent = "—";
    ui.partialLag.textContent = "—";
    this.audioSent(0);
  }

  session(sid, rate, model) {
    const ui = this.ui;
    ui.sessionId.textContent = sid;
    ui.sessionId.title = sid;
    const bits = [`${(rate / 1000).toFixed(rate % 1000 ? 1 : 0)} kHz mono`];
    if (model) bits.push(model);
    ui.captureInfo.textContent = bits.join(" · ");
    ui.captureInfo.dataset.rate = String(rate);
  }

  audioSent(seconds) {
    this.ui.audioSent.textContent = `${seconds.toFixed(1)} s`;
    this.ui.audioSent.dataset.seconds = seconds.toFixed(2);
  }

  /** Capture-rate samples sent again after resumes, in all. */
  resent(samples) {
    this.ui.audioSent.dataset.resent = String(samples);
  }

  partialLag(ms) {
    this.ui.partialLag.textContent = fmtMs(ms);
    this.ui.partialLag.dataset.ms = String(Math.round(ms));
  }

  timeToFinal(ms, avg) {
    this.ui.latency.textContent = `${fmtMs(ms)} (avg ${fmtMs(avg)})`;
    this.ui.latency.dataset.ms = String(Math.round(ms));
  }

  // ---------------------------------------------------------------- level meter

  showLevel(rms, peak) {
    this.level = Math.max(dbfsToUnit(rms), this.level * 0.6);
    const now = performance.now();
    const pk = dbfsToUnit(peak);
    if (pk >= this.peakHold || now - this.peakAt > 1200) {
      this.peakHold = pk;
      this.peakAt = now;
    }
    this.drawLevel();
  }

  resetLevel() {
    this.level = 0;
    this.peakHold = 0;
    this.drawLevel();
  }

  drawLevel() {
    const ui = this.ui;
    ui.levelFill.style.clipPath = `inset(0 ${(100 - this.level * 100).toFixed(1)}% 0 0)`;
    ui.levelPeak.style.left = `${(this.peakHold * 100).toFixed(1)}%`;
    ui.levelPeak.style.opacity = this.peakHold > 0.02 ? "1" : "0";
    ui.levelBox.setAttribute("aria-valuenow", String(Math.round(this.level * 100)));
    ui.levelBox.dataset.hot = this.level > 0.9 ? "true" : "false";
  }

  // ---------------------------------------------------------------- transcript

  /** Shows (or updates) a partial row of transcript item `item`. */
  partial(item) {
    let el = this.rows.get(item.key);
    if (!el) {
      el = this.row(item, "partial");
      this.rows.set(item.key, el);
      this.insert(item, el);
    }
    el.dataset.start = item.start.toFixed(2);
    el.dataset.end = item.end.toFixed(2);
    this.fillTime(el, item);
    const parts = splitPartial(item.stable, item.text);
    const s = this.doc.createElement("span");
    s.className = "stable";
    s.dataset.testid = "stable";
    s.textContent = parts.stable;
    const u = this.doc.createElement("span");
    u.className = "unstable";
    u.dataset.testid = "unstable";
    u.textContent = parts.rest;
    el.querySelector(".text").replaceChildren(s, u);
    this.afterRender();
  }

  /** Shows a final row; it replaces the partial with a new element, so the live region
   * announces it. */
  final(item, runs = null, nameOf = null) {
    const old = this.rows.get(item.key);
    const el = this.row(item, "final");
    const text = el.querySelector(".text");
    if (runs && nameOf && runs.some((r) => r.speaker !== null)) {
      // with speaker labels: each speaker's run after its (coloured, renamable) name
      const parts = [];
      for (const r of runs) {
        if (r.speaker !== null) parts.push(this.speakerTag(r.speaker, nameOf(r.speaker)));
        parts.push(this.doc.createTextNode(`${r.text} `));
      }
      text.replaceChildren(...parts);
      el.dataset.speaker = String(item.speaker);
    } else {
      text.textContent = item.text;
    }
    if (!item.text) el.classList.add("empty");
    this.rows.set(item.key, el);
    if (old) old.replaceWith(el);
    else this.insert(item, el);
    this.afterRender();
  }

  speakerTag(speaker, name) {
    const tag = this.doc.createElement("button");
    tag.type = "button";
    tag.className = `speaker s${speaker % 6}`;
    tag.dataset.speaker = String(speaker);
    tag.dataset.testid = "speaker";
    tag.textContent = name;
    tag.title = "Rename this speaker";
    return tag;
  }

  /** Every label of `speaker` now shows `name`. */
  renameSpeaker(speaker, name) {
    for (const tag of this.ui.transcript.querySelectorAll(`.speaker[data-speaker="${speaker}"]`)) {
      tag.textContent = name;
    }
  }

  /** Partials that will get no final stay visible, marked. */
  orphans(items) {
    for (const item of items) {
      const el = this.rows.get(item.key);
      if (!el) continue;
      el.classList.add("orphan");
      el.dataset.testid = "orphan";
      el.title = "Unfinished: the session ended before this was final";
    }
  }

  clearTranscript() {
    for (const el of this.rows.values()) el.remove();
    this.rows.clear();
    this.ui.placeholder.hidden = false;
    this.ui.jump.hidden = true;
    this.stick = true;
  }

  row(item, kind) {
    const el = this.doc.createElement("p");
    el.className = `utt ${kind}`;
    el.dataset.testid = kind;
    el.dataset.key = item.key;
    el.dataset.seg = String(item.seg);
    el.dataset.utt = String(item.utt);
    el.dataset.start = item.start.toFixed(2);
    el.dataset.end = item.end.toFixed(2);
    if (kind === "partial") el.setAttribute("aria-hidden", "true"); // only finals are announced
    const time = this.doc.createElement("span");
    time.className = "time";
    const text = this.doc.createElement("span");
    text.className = "text";
    el.append(time, text);
    this.fillTime(el, item);
    return el;
  }

  fillTime(el, item) {
    const time = el.querySelector(".time");
    time.textContent = fmtClock(item.start);
    time.title = `${fmtClock(item.start)} – ${fmtClock(item.end)}`;
  }

  insert(item, el) {
    const ui = this.ui;
    ui.placeholder.hidden = true;
    // Items arrive almost always in order: walk back from the end.
    let after = ui.transcript.lastElementChild;
    while (after && after !== ui.placeholder) {
      const seg = Number(after.dataset.seg);
      const utt = Number(after.dataset.utt);
      if (seg < item.seg || (seg === item.seg && utt < item.utt)) break;
      after = after.previousElementSibling;
    }
    if (after) after.after(el);
    else ui.transcript.prepend(el);
  }

  nearBottom() {
    const b = this.ui.transcript;
    return b.scrollHeight - b.scrollTop - b.clientHeight < 32;
  }

  afterRender() {
    if (this.stick) this.ui.transcript.scrollTop = this.ui.transcript.scrollHeight;
    else this.ui.jump.hidden = false;
  }

  // ---------------------------------------------------------------- copy & download

  /** Saves `text` as a file named `name`. */
  download(text, name, type) {
    const blob = new Blob([text], { type: `${type};charset=utf-8` });
    const a = this.doc.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = name;
    this.doc.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  }

  async copy(text) {
    if (!text) {
      this.flash(this.ui.copy, "Nothing yet");
      return;
    }
    try {
      await navigator.clipboard.writeText(text);
    } catch (_) {
      // Older browsers or an insecure page: the selection fallback.
      const ta = this.doc.createElement("textarea");
      ta.value = text;
      ta.setAttribute("readonly", "");
      ta.style.position = "fixed";
      ta.style.opacity = "0";
      this.doc.body.append(ta);
      ta.select();
      this.doc.execCommand("copy");
      ta.remove();
    }
    this.flash(this.ui.copy, "Copied ✓");
    this.announce("Transcript copied to the clipboard.");
  }

  flash(btn, text) {
    const old = btn.dataset.label || btn.textContent;
    btn.dataset.label = old;
    btn.textContent = text;
    clearTimeout(btn._t);
    btn._t = setTimeout(() => (btn.textContent = old), 1500);
  }
}
