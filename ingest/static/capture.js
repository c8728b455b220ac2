// Microphone capture: getUserMedia → AudioContext at the device's rate → AudioWorklet
// (worklet.js), which downmixes to mono and posts 16-bit PCM frames and levels. No DOM:
// the page gets frames, levels and "ended" through callbacks.
//
// Browser traps (docs/browser.md): Chrome may ignore a requested context rate, older
// Firefox refuses to connect a mic to a context at another rate (and does not report the
// mic's rate), and Firefox runs no AudioContext at all without a sound output.

export const FRAME_MS = 100;
export const MAX_RATE = 48000; // the worklet averages faster contexts down to this
export const AUDIO_START_TIMEOUT_MS = 6000; // the audio context must be running by then
const FALLBACK_RATES = [48000, 44100, 32000, 16000];
const FLUSH_TIMEOUT_MS = 500;

export const NO_AUDIO_OUTPUT =
  "Audio processing did not start. The browser needs a working sound output to process " +
  "the microphone (Firefox does not run audio without one): connect speakers or headphones, " +
  "or check the system's sound settings, then press Start again.";

/** An error whose message is meant for the person at the page. */
export class UserFacingError extends Error {}

export function micErrorMessage(err) {
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

/** The context rates to try when the default one is refused: the mic's own (Chromium
 * reports it; Firefox does not), then the usual device rates, without `failed`. */
export function fallbackRates(micRate, failed) {
  return [...new Set([micRate, ...FALLBACK_RATES])].filter((r) => r && r !== failed);
}

/**
 * Opens the microphone with `opts` ({echo, noise, agc}) and starts the worklet.
 * Callbacks: `onMic()` once the browser gave the microphone, `onAudio(pcm, samples)`,
 * `onLevel(rms, peak)`, `onEnded()` when the device goes away. Resolves to a Capture;
 * throws UserFacingError.
 */
export async function startCapture(opts, { onMic, onAudio, onLevel, onEnded }) {
  if (!globalThis.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
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
        echoCancellation: opts.echo,
        noiseSuppression: opts.noise,
        autoGainControl: opts.agc,
        channelCount: { ideal: 1 },
      },
      video: false,
    });
  } catch (err) {
    throw new UserFacingError(micErrorMessage(err));
  }
  onMic();
  const { ctx, source } = connectSource(stream);
  const cap = new Capture(stream, ctx, source);
  try {
    await ctx.audioWorklet.addModule(new URL("worklet.js", import.meta.url));
    const node = new AudioWorkletNode(ctx, "pcm-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { frameMs: FRAME_MS, maxRate: MAX_RATE },
    });
    node.port.onmessage = (ev) => cap.onMessage(ev.data, onAudio, onLevel);
    source.connect(node);
    node.connect(ctx.destination); // the node writes silence; this keeps it pulled
    cap.node = node;
    await whenRunning(ctx, AUDIO_START_TIMEOUT_MS);
  } catch (err) {
    cap.stop();
    if (err instanceof UserFacingError) throw err;
    throw new UserFacingError(`Audio processing could not start (${err.message || err}).`);
  }
  stream.getAudioTracks().forEach((t) => t.addEventListener("ended", () => onEnded()));
  return cap;
}

/** An AudioContext at the device's rate with the mic connected to it; another rate when
 * the browser refuses that one (older Firefox: NotSupportedError, e.g. when
 * privacy.resistFingerprinting pins contexts to 44.1 kHz). */
function connectSource(stream) {
  let ctx = new AudioContext({ latencyHint: "interactive" });
  try {
    return { ctx, source: ctx.createMediaStreamSource(stream) };
  } catch (err) {
    const failed = ctx.sampleRate;
    ctx.close().catch(() => {});
    const micRate = stream.getAudioTracks()[0]?.getSettings().sampleRate;
    let lastErr = err;
    for (const rate of fallbackRates(micRate, failed)) {
      try {
        ctx = new AudioContext({ latencyHint: "interactive", sampleRate: rate });
      } catch (err2) {
        lastErr = err2;
        continue;
      }
      try {
        return { ctx, source: ctx.createMediaStreamSource(stream) };
      } catch (err2) {
        lastErr = err2;
        ctx.close().catch(() => {});
      }
    }
    stream.getTracks().forEach((t) => t.stop());
    throw new UserFacingError(`Audio processing could not start (${lastErr.message || lastErr}).`);
  }
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

/** A running capture: its stream, context, source and worklet node. */
export class Capture {
  constructor(stream, ctx, source) {
    this.stream = stream;
    this.ctx = ctx;
    this.source = source;
    this.node = null;
    this.flushed = null;
    this.stopped = false;
  }

  /** The rate of the frames the worklet posts. */
  get rate() {
    return Math.min(this.ctx.sampleRate, MAX_RATE);
  }

  onMessage(msg, onAudio, onLevel) {
    if (this.stopped) return;
    if (msg.type === "audio") onAudio(msg.pcm, msg.samples);
    else if (msg.type === "level") onLevel(msg.rms, msg.peak);
    else if (msg.type === "flushed" && this.flushed) this.flushed();
  }

  /** Asks the worklet for its buffered tail (posted as audio first), then releases the
   * microphone. */
  flush() {
    if (!this.node || this.stopped) {
      this.stop();
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.stop();
        resolve();
      };
      const timer = setTimeout(done, FLUSH_TIMEOUT_MS);
      this.flushed = done;
      this.node.port.postMessage({ type: "flush" });
    });
  }

  /** Releases the microphone and the audio context. */
  stop() {
    if (this.stopped) return;
    this.stopped = true;
    try {
      this.source && this.source.disconnect();
      this.node && this.node.disconnect();
    } catch (_) {
      /* already disconnected */
    }
    this.stream.getTracks().forEach((t) => t.stop());
    this.ctx.close().catch(() => {});
  }
}
