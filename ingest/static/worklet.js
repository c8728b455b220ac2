// AudioWorklet processor: mono 16-bit PCM frames of ~100 ms for the WebSocket.
//
// Runs on the audio rendering thread. Captures at the context's own rate (the
// device rate; browsers differ on whether they honour a requested rate, see
// docs/browser.md), downmixes to mono, resamples only when the context runs
// faster than the protocol allows (> 48 kHz), and posts:
//   {type: "audio", pcm: ArrayBuffer (Int16 LE), samples, rate}  every frameMs
//   {type: "level", rms, peak}                                   every ~50 ms
// A {type: "flush"} message from the page posts whatever is buffered, then
// {type: "flushed"}, so "stop" loses none of the last words.

const MAX_RATE = 48000;

class PcmCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.inRate = sampleRate; // global in AudioWorkletGlobalScope
    this.outRate = Math.min(this.inRate, opts.maxRate || MAX_RATE);
    this.step = this.inRate / this.outRate; // input samples per output sample
    this.phase = 0; // resampler state (used only when inRate > maxRate)
    this.acc = 0;
    this.cnt = 0;
    const frameMs = opts.frameMs || 100;
    this.frameLen = Math.max(128, Math.round((this.outRate * frameMs) / 1000));
    this.buf = new Int16Array(this.frameLen);
    this.fill = 0;
    this.levelEvery = Math.round(this.inRate / 20); // ~50 ms
    this.levelCount = 0;
    this.sumSq = 0;
    this.peak = 0;
    this.mono = new Float32Array(128);
    this.port.onmessage = (ev) => {
      if (ev.data && ev.data.type === "flush") {
        this.emit();
        this.port.postMessage({ type: "flushed" });
      }
    };
  }

  emit() {
    if (this.fill === 0) return;
    const pcm = this.buf.slice(0, this.fill).buffer;
    this.port.postMessage({ type: "audio", pcm, samples: this.fill, rate: this.outRate }, [pcm]);
    this.fill = 0;
  }

  push(x) {
    const s = x < -1 ? -1 : x > 1 ? 1 : x;
    this.buf[this.fill++] = s < 0 ? s * 0x8000 : s * 0x7fff;
    if (this.fill === this.frameLen) this.emit();
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0 || !input[0]) return true;
    const n = input[0].length;
    if (this.mono.length !== n) this.mono = new Float32Array(n);
    const mono = this.mono;
    const chans = input.length;
    for (let i = 0; i < n; i++) {
      let v = 0;
      for (let c = 0; c < chans; c++) v += input[c][i];
      v /= chans;
      mono[i] = v;
      this.sumSq += v * v;
      const a = v < 0 ? -v : v;
      if (a > this.peak) this.peak = a;
    }
    this.levelCount += n;
    if (this.levelCount >= this.levelEvery) {
      this.port.postMessage({
        type: "level",
        rms: Math.sqrt(this.sumSq / this.levelCount),
        peak: this.peak,
      });
      this.levelCount = 0;
      this.sumSq = 0;
      this.peak = 0;
    }

    if (this.step === 1) {
      for (let i = 0; i < n; i++) this.push(mono[i]);
      return true;
    }
    // Downsample (only above 48 kHz): average the input samples of each
    // output period, a box low-pass that keeps the output rate exact on average.
    for (let i = 0; i < n; i++) {
      this.acc += mono[i];
      this.cnt++;
      this.phase += 1;
      if (this.phase >= this.step) {
        this.push(this.acc / this.cnt);
        this.phase -= this.step;
        this.acc = 0;
        this.cnt = 0;
      }
    }
    return true;
  }
}

registerProcessor("pcm-capture", PcmCapture);
