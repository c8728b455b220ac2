// Latency bookkeeping, no DOM. The page logs the cumulative sample count and the time
// of every send; a result's `end` (on its segment's timeline) then says when the audio
// it covers was handed to the socket:
//   time to final = now − send time of the audio at final.end
//   partial lag   = now − send time of the audio at partial.end

const MAX_ENTRIES = 40000; // ~ an hour of 100 ms frames
const SETTLED_KEEP_SECONDS = 30; // entries this far before a final's end are kept
const AVERAGE_OVER = 50; // finals

export class LatencyLog {
  constructor() {
    this.log = []; // [{end, t}]: cumulative samples after a send, and its time
    this.finals = []; // the last AVERAGE_OVER times to final, ms
  }

  /** A send ending at cumulative sample `end`, at time `t` (ms). */
  sent(end, t) {
    this.log.push({ end, t });
    if (this.log.length > MAX_ENTRIES) this.log.splice(0, MAX_ENTRIES / 4);
  }

  /** The timeline stepped back to `samplesSent` (a resume resends from there). */
  rewind(samplesSent) {
    while (this.log.length && this.log[this.log.length - 1].end > samplesSent) this.log.pop();
  }

  /** When was the audio at cumulative `sample` handed to the socket? null if not yet. */
  sentAt(sample) {
    const log = this.log;
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

  /** Partial lag (ms) of a partial ending at `sample`, at time `now`; null if unknown. */
  partialLag(sample, now) {
    const t = this.sentAt(sample);
    return t === null ? null : now - t;
  }

  /** Time to final of a final ending at `sample`, at `now`: {ms, avg} or null. Audio
   * long before it is settled, so the log is trimmed (in large steps) behind it. */
  final(sample, now, rate) {
    const t = this.sentAt(sample);
    let out = null;
    if (t !== null) {
      const ms = now - t;
      this.finals.push(ms);
      if (this.finals.length > AVERAGE_OVER) this.finals.shift();
      out = { ms, avg: this.finals.reduce((a, b) => a + b, 0) / this.finals.length };
    }
    const keep = sample - SETTLED_KEEP_SECONDS * rate;
    let drop = 0;
    while (drop < this.log.length - 1 && this.log[drop].end < keep) drop++;
    if (drop > 500) this.log.splice(0, drop);
    return out;
  }
}
