"""Per-session streaming state: VAD endpointing, partials, finals, max-length cuts. No I/O.

The interface follows whisper_streaming's good idea: audio in (``feed``),
results out, ``finalize``/``finish`` at the edges. The model and the VAD are
injected, so the whole decision logic is tested with arrays and fakes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from common.messages import Final, Partial, Word
from transcriber.agreement import LocalAgreement, common_prefix, norm_word
from transcriber.endpointing import WINDOW, EndpointConfig, Endpointer
from transcriber.speakers import SpeakerLabeler, SpeakerTracker

RATE = 16000


class Decoder(Protocol):
    def decode(self, audio: np.ndarray, prompt: str, final: bool,
               shown: Sequence[str] = (), speculative: bool = False,
               prefix: str = "", context: int = 0) -> list[Word]:
        """Words of ``audio`` (float32, 16 kHz) with times relative to its first sample;
        ``shown``, for a final: the words the last partial of this audio showed;
        ``speculative``: a final decoded ahead, at a pause that may not end the utterance
        (a worker runs the finals somebody waits for first); ``context`` > 0: the first
        ``context`` samples are audio before the utterance, in which ``prefix`` was said
        (only the utterance's words are returned)."""


#: Speech probability of each 512-sample window, with state kept per stream.
SpeechProbs = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    endpoint: EndpointConfig = dataclasses.field(default_factory=EndpointConfig)
    pad_samples: int = 3200  # 0.2 s kept before and after speech
    partial_interval_samples: int = 8000  # 0.5 s
    max_utterance_samples: int = 25 * RATE
    cut_guard_samples: int = RATE  # words ending in the last second are not cut after
    stable_guard_samples: int = RATE  # words ending in the last second are not made stable
    # Words Whisper gave less probability than this need a longer guard (0 = off): a low
    # one often means a word before it was missed, which a longer decode then hears.
    stable_min_probability: float = 0.5
    unsure_guard_samples: int = 3 * RATE
    prompt_chars: int = 200
    interim_results: bool = True
    # Speculative finals: decode the final at the first short pause, so it is ready when the
    # endpoint is confirmed; 0 disables.
    speculative_samples: int = 800  # 0.05 s
    # A pause this long already ends the utterance when the speculative text ends a
    # sentence (. ? !); 0 disables. Other pauses wait for the endpoint's min_silence.
    short_silence_samples: int = 3200  # 0.2 s
    # A final is decoded with up to this much of the audio before the utterance, with the
    # words said in it (the previous finals' end) given as what Whisper starts with; 0 = off.
    final_context_samples: int = 0


@dataclasses.dataclass
class _Speculation:
    speech_end: int  # the silence start it was decoded for
    end: int
    words: list[Word]
    decode_s: float


@dataclasses.dataclass(frozen=True)
class Committed:
    """A final and the commit point that goes with it: audio before ``commit_sample`` is done."""

    final: Final
    commit_sample: int
    next_utterance: int
    decode_s: float = 0.0  # time spent decoding this final (for latency breakdowns)
    prompt: str = ""  # the prompt after this final (the next utterance's context)
    #: with speaker labels: the session's speakers after this final, committed with it
    speakers: bytes | None = None


@dataclasses.dataclass(frozen=True)
class PartialJob:
    """A partial's decode taken out of the session's core call (``feed(detach=True)``).

    ``run`` reads only its own copy of the audio, so it may run on any thread while the
    core goes on hearing audio; its words go back through ``partial_done``.
    """

    utterance: int
    start: int  # the utterance's first sample
    position: int  # samples received when the partial was asked for
    audio: np.ndarray
    prompt: str
    decoder: Decoder
    channel: int | None = None
    #: with speaker labels: the labeller and a snapshot of the session's speakers, for the
    #: partial's provisional speaker
    speakers: tuple[SpeakerLabeler, SpeakerTracker] | None = None

    def run(self) -> list[Word]:
        """The partial's words; with speaker labels each carries the provisional speaker."""
        offset = self.start / RATE
        speaker = self.speakers[0].provisional(self.audio, self.speakers[1]) \
            if self.speakers is not None else None
        return [Word(w.word, round(w.start + offset, 3), round(w.end + offset, 3), w.probability,
                     speaker)
                for w in self.decoder.decode(self.audio, self.prompt, False)]


Event = Partial | Committed | PartialJob


def ends_sentence(words: Sequence[Word]) -> bool:
    if not words:
        return False
    last = words[-1].word.strip()
    return last.endswith((".", "?", "!")) and not last.endswith("...")


def join_words(words: Sequence[Word]) -> str:
    return "".join(w.word for w in words).strip()


def merge_stable(stable: Sequence[Word], hypothesis: Sequence[Word]) -> list[Word]:
    """Keep the promised stable words in front, then the hypothesis after them.

    Where the hypothesis differs inside the stable prefix ("as what you can do" against
    the stable "Ask what you can"), the stable words stand for the start of the hypothesis
    that is closest to them word by word (fewest words changed, left out or put in; of
    equals, the longest) and the hypothesis continues after it. Word times shift between
    decodes, so aligning by time dropped words ("do") or repeated them; matching single
    words anywhere matched a stable "the" to a "the" ten words on ("I have the cold"
    against "I have a cold so this probably sounds a lot different than the acoustic
    corpus") and dropped everything between.
    """
    if not stable:
        return list(hypothesis)
    a = [norm_word(w.word) for w in stable]
    b = [norm_word(w.word) for w in hypothesis]
    agreed = common_prefix(a, b)
    if agreed == len(stable):
        return list(stable) + list(hypothesis[agreed:])
    if not set(a) & set(b):  # nothing in common: splice by time
        last_end = stable[-1].end
        return list(stable) + [w for w in hypothesis if w.start >= last_end - 0.02]
    return list(stable) + list(hypothesis[aligned_prefix(a, b):])


def aligned_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    """How many leading words of ``b`` the words ``a`` stand for: the prefix of ``b`` with
    the fewest edits (substitutions, insertions, deletions) from ``a``; of equals, the
    longest."""
    row = list(range(len(b) + 1))  # edits from a[:0] to each b[:j]
    for i, x in enumerate(a, 1):
        prev, row = row, [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            row[j] = min(prev[j - 1] + (x != y), prev[j] + 1, row[j - 1] + 1)
    best = min(row)
    return max(j for j, d in enumerate(row) if d == best)


class StreamingTranscriber:
    """One session's decisions: when an utterance starts and ends, what to decode, what to emit."""

    def __init__(
        self,
        session_id: str,
        decoder: Decoder,
        vad: SpeechProbs,
        config: StreamConfig = StreamConfig(),
        *,
        start_sample: int = 0,
        next_utterance: int = 0,
        prompt: str = "",
        stable: Sequence[Word] = (),
        channel: int | None = None,
        speakers: SpeakerLabeler | None = None,
    ) -> None:
        """``start_sample``, ``next_utterance``, ``prompt`` and ``stable`` continue a session
        another worker began: its commit point, and the words it promised (``stable_text``)
        of the utterance it left open, which the final of that utterance keeps. ``channel``:
        the channel of a multichannel session this core hears (set on its results).
        ``speakers`` (``diarize=true``) labels each final's words with session-stable
        speakers."""
        self.session_id = session_id
        self.channel = channel
        self.speakers = speakers
        self.decoder = decoder
        self.vad = vad
        self.config = config
        self.position = start_sample  # absolute samples received
        self.utterance = next_utterance
        self.commit_sample = start_sample
        self._prompt = prompt
        self._audio = np.zeros(0, dtype=np.float32)
        self._audio_start = start_sample  # absolute sample of _audio[0]
        self._vad_pos = start_sample
        self._endpointer = Endpointer(config.endpoint, origin=start_sample)
        self._utt_start: int | None = None
        self._agreement = LocalAgreement()
        self._stable: list[Word] = []
        self._last_partial_at = 0
        self._last_partial_text = ""
        self._shown: list[str] = []  # the last partial's words
        self._partial_sent = False
        self._spec: _Speculation | None = None
        self._cut_after = 0  # a length cap that found nothing to cut waited until here
        self._inherited = list(stable)  # promised by the previous owner; kept when it opens
        self._said: list[Word] = []  # the last finals' words, for the next final's context

    # ------------------------------------------------------------------ public

    @property
    def stable_words(self) -> tuple[Word, ...]:
        """The open utterance's promised words (the last partial's ``stable_text``)."""
        return tuple(self._stable)

    def _inherit(self) -> None:
        """The first utterance after a takeover starts with what the previous owner promised
        (and is finalised even if short: its words were shown)."""
        if self._inherited:
            self._stable = self._inherited
            self._agreement.stable = len(self._inherited)
            self._partial_sent = True
            self._inherited = []

    @property
    def open_utterance_start(self) -> int | None:
        return self._utt_start

    @property
    def idle_point(self) -> int | None:
        """Where a core could start over with nothing lost while no utterance is open (the
        audio before it is silence the VAD has heard: the next utterance starts after it);
        None while one is open or a takeover's promised words wait for theirs."""
        if self._utt_start is not None or self._inherited:
            return None
        return max(self.commit_sample, min(self._vad_pos, self.position) -
                   self.config.pad_samples)

    def feed(self, pcm: np.ndarray, *, partials: bool = True,
             speculate: bool = True, detach: bool = False) -> list[Event]:
        """Append audio (int16 or float32, 16 kHz mono) and return what it completes.

        Under load the caller turns ``partials`` and ``speculate`` off, so the decoding
        lanes' time goes to finals first: partials degrade before finals do. With
        ``detach`` a due partial comes back as a ``PartialJob`` to decode elsewhere, so the
        audio after it (a pause that ends the utterance) is not held up by its decode.
        """
        samples = pcm.astype(np.float32) / 32768.0 if pcm.dtype == np.int16 else pcm
        self._audio = np.concatenate([self._audio, samples.astype(np.float32, copy=False)])
        self.position += len(samples)
        events: list[Event] = []
        group = 4 * WINDOW  # VAD windows per call
        while self.position - self._vad_pos >= WINDOW:
            n = min((self.position - self._vad_pos) // WINDOW, group // WINDOW)
            lo = self._vad_pos - self._audio_start
            windows = self._audio[lo:lo + n * WINDOW].reshape(n, WINDOW)
            # Decisions after every window, not every group: where a group ends depends on
            # how the audio arrived, and a 0.3 s pause ending inside a group was missed.
            for p in self.vad(windows):
                self._vad_pos += WINDOW
                for ev in self._endpointer.feed([float(p)]):
                    if ev.kind == "start":
                        floor = max(self._audio_start, self.commit_sample)
                        self._utt_start = max(ev.sample - self.config.pad_samples, floor)
                        self._inherit()
                    else:
                        end = min(ev.sample + self.config.pad_samples, self._vad_pos)
                        events += self._close_utterance(end, ev.sample, ev.voiced, "pause")
                if self._utt_start is not None:
                    events += self._speculate() if speculate else []
                if self._utt_start is not None and self._vad_pos >= self._cut_after and \
                        self._vad_pos - self._utt_start >= self.config.max_utterance_samples:
                    events += self._cut_utterance()
        # No partial while a pause is in progress: the words have not changed, and the
        # decoding lanes are better spent on the speculative final.
        if partials and self._utt_start is not None and self.config.interim_results and \
                self._endpointer.silence_start is None and \
                self._endpointer.voiced >= self.config.endpoint.min_speech_samples and \
                self.position - self._utt_start >= self.config.partial_interval_samples and \
                self.position - self._last_partial_at >= self.config.partial_interval_samples:
            if detach:
                events.append(self._partial_job())
            else:
                partial = self._partial()
                if partial is not None:
                    events.append(partial)
        self._trim()
        return events

    def partial_done(self, job: PartialJob, words: list[Word]) -> Partial | None:
        """The partial from a detached decode's words; None when its utterance has ended (or
        been cut) since, or the text is unchanged."""
        if job.utterance != self.utterance or job.start != self._utt_start:
            return None
        return self._apply_partial(words, job.position)

    def finalize(self, ended_by: str = "finalize") -> list[Event]:
        """End the open utterance now (client ``finalize``, or ``end`` of the stream)."""
        events: list[Event] = []
        if self._utt_start is not None:
            events = self._close_utterance(self.position, self.position,
                                           self._endpointer.voiced, ended_by)
        self._endpointer.force_end()
        self._trim()
        return events

    def finish(self) -> list[Event]:
        return self.finalize("end")

    @property
    def prompt(self) -> str:
        return self._prompt

    # ------------------------------------------------------------------ decisions

    def _decode(self, start: int, end: int, final: bool,
                heard_until: int | None = None) -> list[Word]:
        """Words of the audio from ``start`` to ``end``; after ``heard_until`` (and after
        what has arrived) the audio is decoded as zeros."""
        shown = self._shown if final else ()
        real = min(end, self.position, end if heard_until is None else heard_until)
        audio = self._audio[start - self._audio_start:real - self._audio_start]
        if end > real:  # a speculative final's pad
            audio = np.concatenate([audio, np.zeros(end - real, np.float32)])
        context, prefix, prompt = self._context(start) if final else (0, "", self._prompt)
        if context:
            audio = np.concatenate([self._audio[start - context - self._audio_start:
                                                start - self._audio_start], audio])
            words = self.decoder.decode(audio, prompt, final, shown,
                                        speculative=heard_until is not None,
                                        prefix=prefix, context=context)
        else:
            words = self.decoder.decode(audio, prompt, final, shown,
                                        speculative=heard_until is not None)
        offset = (start - context) / RATE
        return [Word(w.word, round(w.start + offset, 3), round(w.end + offset, 3), w.probability)
                for w in words if not context or w.start + offset >= start / RATE - 0.1]

    def _context(self, start: int) -> tuple[int, str, str]:
        """Samples of audio before ``start`` a final is decoded with, what was said in them,
        and the prompt before that: the previous finals' words from the first that starts
        within ``final_context_samples`` of ``start`` (none when no such audio is held)."""
        limit = self.config.final_context_samples
        if not limit or not self._said:
            return 0, "", self._prompt
        floor = max(start - limit, self._audio_start)
        said = [w for w in self._said if w.start * RATE >= floor + WINDOW // 4 and
                w.end * RATE <= start]
        if not said:
            return 0, "", self._prompt
        begin = max(floor, round(said[0].start * RATE) - WINDOW // 4)
        prefix = join_words(said)
        prompt = self._prompt
        if prompt.endswith(prefix):
            prompt = prompt[:-len(prefix)].rstrip()
        return start - begin, prefix, prompt

    def _speculate(self) -> list[Event]:
        """At a short pause, decode the final ahead of time; end early after a full sentence."""
        cfg = self.config
        sil = self._endpointer.silence_start
        if sil is None or not cfg.speculative_samples or self._utt_start is None:
            return []
        silent = self._vad_pos - sil
        if silent < cfg.speculative_samples or \
                self._endpointer.voiced < cfg.endpoint.min_speech_samples:
            return []
        if self._spec is None or self._spec.speech_end != sil:
            # The pad after the speech is silence (the VAD says so): past the pause heard so
            # far it is decoded as zeros, so a pause shorter than the pad can already
            # speculate and the endpoint, which closes at the same pad, reuses the words.
            # Zeros even where more audio has arrived: the words must not depend on how
            # the audio was chunked on its way here (a replay at 4x gave other words).
            end = sil + cfg.pad_samples
            began = time.perf_counter()
            heard = sil + cfg.speculative_samples
            words = self._final_words(self._utt_start, end, sil, heard_until=heard)
            self._spec = _Speculation(sil, end, words, time.perf_counter() - began)
            if self.speakers is not None:  # its speakers' embeddings too (the same audio)
                self.speakers.prepare(
                    self._audio[self._utt_start - self._audio_start:heard - self._audio_start],
                    self._utt_start / RATE, merge_stable(self._stable, words))
        if cfg.short_silence_samples and silent >= cfg.short_silence_samples and \
                ends_sentence(self._spec.words):
            voiced = self._endpointer.voiced
            self._endpointer.force_end()
            # The commit point stops where the VAD has listened (the pad may reach past it):
            # speech resuming there belongs to the next utterance.
            return self._close_utterance(min(self._spec.end, self._vad_pos), sil, voiced,
                                         "pause")
        return []

    def _final_words(self, start: int, end: int, speech_end: int,
                     heard_until: int | None = None) -> list[Word]:
        # Words that start after the speech ended are Whisper inventing text on the pad.
        latest = (speech_end + self.config.pad_samples // 2) / RATE
        return [w for w in self._decode(start, end, True, heard_until) if w.start <= latest]

    def _partial(self) -> Partial | None:
        assert self._utt_start is not None
        self._last_partial_at = self.position
        words = self._decode(self._utt_start, self.position, False)
        if self.speakers is not None:
            audio = self._audio[self._utt_start - self._audio_start:
                                self.position - self._audio_start]
            speaker = self.speakers.provisional(audio, self.speakers.tracker)
            words = [dataclasses.replace(w, speaker=speaker) for w in words]
        return self._apply_partial(words, self.position)

    def _partial_job(self) -> PartialJob:
        assert self._utt_start is not None
        self._last_partial_at = self.position
        lo = self._utt_start - self._audio_start
        return PartialJob(self.utterance, self._utt_start, self.position,
                          self._audio[lo:self.position - self._audio_start].copy(),
                          self._prompt, self.decoder, self.channel,
                          None if self.speakers is None else
                          (self.speakers, self.speakers.tracker.copy()))

    def _apply_partial(self, hypothesis: list[Word], position: int) -> Partial | None:
        words = merge_stable(self._stable, hypothesis)
        cfg = self.config
        settled = (position - cfg.stable_guard_samples) / RATE
        unsure_settled = (position - cfg.unsure_guard_samples) / RATE
        limit = len(self._stable)
        for w in words[limit:]:
            sure = w.probability >= cfg.stable_min_probability
            if w.end > (settled if sure else unsure_settled):
                break
            limit += 1
        stable = self._agreement.update([w.word for w in words], limit)
        self._stable = words[:stable]
        text = join_words(words)
        if not text or text == self._last_partial_text:
            return None
        self._last_partial_text = text
        self._shown = [w.word for w in words]
        self._partial_sent = True
        return Partial(
            session_id=self.session_id,
            utterance=self.utterance,
            text=text,
            stable_text=join_words(self._stable),
            start=words[0].start,
            end=position / RATE,
            channel=self.channel,
            speaker=hypothesis[-1].speaker if hypothesis else None,
        )

    def _close_utterance(self, end: int, speech_end: int, voiced: int,
                         ended_by: str) -> list[Event]:
        assert self._utt_start is not None
        start = self._utt_start
        self._utt_start = None
        too_short = voiced < self.config.endpoint.min_speech_samples
        words: list[Word] = []
        began = time.perf_counter()
        spec = self._spec
        if too_short and not self._partial_sent:
            pass  # a blip nobody saw: no final, no utterance index
        elif spec is not None and spec.speech_end == speech_end and spec.end >= end:
            words = merge_stable(self._stable, spec.words)  # decoded during the pause
        else:
            words = merge_stable(self._stable, self._final_words(start, end, speech_end))
        decode_s = time.perf_counter() - began
        return self._emit_final(words, start, end, commit=end, decode_s=decode_s,
                                ended_by=ended_by)

    def _cut_utterance(self) -> list[Event]:
        """The utterance hit the length cap: emit a final up to a word boundary, keep the rest."""
        assert self._utt_start is not None
        start, end = self._utt_start, self._vad_pos
        began = time.perf_counter()
        words = merge_stable(self._stable, self._decode(start, end, True))
        limit = (end - self.config.cut_guard_samples) / RATE
        keep = max((i + 1 for i, w in enumerate(words) if w.end <= limit), default=0)
        keep = max(keep, len(self._stable))
        before = min(end, round(words[0].start * RATE)) - self.config.pad_samples \
            if words else end
        if keep == 0 and words and before - start < self.config.cut_guard_samples:
            # Every word ends too close to the end to trust, and cutting before the first
            # one is no real progress: wait once for the guard to let it in, then keep it.
            if not self._cut_after:
                self._cut_after = self._vad_pos + self.config.cut_guard_samples // 2
                return []
            keep = 1
        if keep == 0:  # cut before the first word (or, with none, before the pad)
            cut = before if words else end - self.config.pad_samples
        elif keep < len(words):
            gap_mid = (words[keep - 1].end + words[keep].start) / 2
            cut = round(gap_mid * RATE)
        else:
            cut = round(words[keep - 1].end * RATE)
        cut = min(max(cut, start), end)
        events = self._emit_final(words[:keep], start, cut, commit=cut,
                                  decode_s=time.perf_counter() - began, ended_by="max_length")
        self._utt_start = cut
        self._endpointer.restart_at(cut)
        return events

    def _emit_final(self, words: list[Word], start: int, end: int, commit: int,
                    decode_s: float = 0.0, ended_by: str | None = None) -> list[Event]:
        partial_sent = self._partial_sent
        self._cut_after = 0
        self._agreement.reset()
        self._stable = []
        self._spec = None
        self._partial_sent = False
        self._last_partial_text = ""
        self._shown = []
        self._last_partial_at = 0
        self.commit_sample = commit
        if not words and not partial_sent:
            return []  # nothing was said and nothing was promised: no utterance index used
        speaker = None
        if self.speakers is not None and words:
            began = time.perf_counter()
            audio = self._audio[start - self._audio_start:end - self._audio_start]
            words, speaker = self.speakers.label(audio, start / RATE, words)
            decode_s += time.perf_counter() - began
        text = join_words(words)
        final = Final(
            session_id=self.session_id,
            utterance=self.utterance,
            text=text,
            start=words[0].start if words else start / RATE,
            end=words[-1].end if words else end / RATE,
            words=tuple(words),
            ended_by=ended_by,
            channel=self.channel,
            speaker=speaker,
        )
        self.utterance += 1
        if self.config.final_context_samples:
            floor = (end - self.config.final_context_samples) / RATE
            self._said = [w for w in self._said + words if w.start >= floor]
        if text:
            self._prompt = (self._prompt + " " + text).strip()[-self.config.prompt_chars:]
        return [Committed(final, commit, self.utterance, decode_s, self._prompt,
                          None if self.speakers is None else self.speakers.pack())]

    def _trim(self) -> None:
        """Drop audio nothing will decode again; keeps the buffer bounded."""
        if self._utt_start is not None:
            keep_from = self._utt_start
        else:
            keep_from = min(self._vad_pos, self.position) - self.config.pad_samples
        keep_from -= self.config.final_context_samples  # the next final's context
        keep_from = max(min(keep_from, self._vad_pos), self._audio_start)  # VAD unread: kept
        drop = keep_from - self._audio_start
        if drop > 0:
            self._audio = self._audio[drop:]
            self._audio_start = keep_from
