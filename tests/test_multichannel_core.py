"""Multichannel without I/O: the normaliser keeps channels apart, the channel cores split and
merge in time order and resume each channel from its own point, Twilio's two tracks are
aligned by timestamp, and the exports mark each channel."""

from __future__ import annotations

import io
import itertools
import json
import wave

import numpy as np
import pysrt
import pytest
import webvtt

from common.audio import AudioNormalizer, StreamFormat, parse_stream_format
from common.errors import InvalidAudio, UnsupportedAudio
from common.messages import (
    AudioFrame,
    Final,
    Partial,
    Word,
    pack_audio_entry,
    result_to_dict,
    to_json,
    unpack_audio_entry,
)
from common.session_meta import channel_points
from fanout import formats
from ingest.dialects.twilio import MULAW_SILENCE, TrackAligner
from tests.audio_refs import wav_bytes
from tests.test_streaming_core import CFG, BurstDecoder, fake_vad, utterance
from transcriber.channels import ChannelCores, ChannelPartials, CrosstalkGate
from transcriber.endpointing import WINDOW
from transcriber.streaming import RATE, Committed, StreamingTranscriber


def test_multichannel_query_values_are_checked() -> None:
    fmt = parse_stream_format("pcm_s16le", "48000", "3", multichannel=True)
    assert (fmt.channels, fmt.width, fmt.multichannel) == (3, 3, True)
    assert parse_stream_format("pcm_s16le", None, "2").width == 1  # downmixed, as before
    for encoding, channels in (("pcm_s16le", "1"), ("pcm_s16le", "33"), ("opus", "2"),
                               ("flac", "2")):
        with pytest.raises(UnsupportedAudio):
            parse_stream_format(encoding, None, channels, multichannel=True)
    with pytest.raises(UnsupportedAudio):
        parse_stream_format("pcm_s16le", None, "3")  # three channels are not downmixed


def test_stereo_at_48k_stays_two_channels_at_16k() -> None:
    """Each channel resampled on its own: channel 0 a 300 Hz tone, channel 1 silence."""
    t = np.arange(48000) / 48000
    left = (0.5 * np.sin(2 * np.pi * 300 * t) * 32767).astype(np.int16)
    stereo = np.stack([left, np.zeros_like(left)], axis=1).reshape(-1)
    norm = AudioNormalizer(StreamFormat("pcm_s16le", 48000, 2, multichannel=True))
    raw = stereo.astype("<i2").tobytes()
    out = np.concatenate([norm.feed(raw[:4801]), norm.feed(raw[4801:]), norm.flush()])
    frames = out.reshape(-1, 2)
    assert abs(len(frames) - 16000) <= 2
    assert np.abs(frames[:, 1]).max() == 0
    assert 0.3 < np.abs(frames[1000:15000, 0]).max() / 32767 < 0.6


def test_a_wav_must_have_the_declared_channels() -> None:
    pcm = np.zeros((1600, 2), np.int16)
    norm = AudioNormalizer(StreamFormat("wav", 16000, 2, multichannel=True))
    assert len(norm.feed(wav_bytes(pcm, 16000))) == 3200  # interleaved, as sent
    three = AudioNormalizer(StreamFormat("wav", 16000, 3, multichannel=True))
    with pytest.raises(InvalidAudio):
        three.feed(wav_bytes(pcm, 16000))


def test_mulaw_channels_are_kept_apart() -> None:
    stereo = bytes([0x00, MULAW_SILENCE]) * 800  # loud left, silent right, 8 kHz
    norm = AudioNormalizer(StreamFormat("mulaw", 8000, 2, multichannel=True))
    frames = np.concatenate([norm.feed(stereo), norm.flush()]).reshape(-1, 2)
    assert abs(len(frames) - 1600) <= 2
    assert np.abs(frames[100:1500, 0]).min() > 10000
    assert np.abs(frames[:, 1]).max() < 100


def test_audio_frames_carry_their_channel_count() -> None:
    frame = AudioFrame(3, 1600, bytes(4 * 160), channels=2)
    assert frame.samples == 160
    assert unpack_audio_entry({b"m": pack_audio_entry(frame)["m"]}) == frame
    mono = AudioFrame(1, 0, bytes(320))
    assert b"ch" not in pack_audio_entry(mono)["m"]  # mono entries are stored as before
    assert unpack_audio_entry({b"m": pack_audio_entry(mono)["m"]}).samples == 160


def test_channel_is_omitted_when_unset_and_sent_when_set() -> None:
    mono = Final("s", 0, "hi", 0.0, 1.0)
    assert "channel" not in result_to_dict(mono) and '"channel"' not in to_json(mono)
    assert result_to_dict(Partial("s", 2, "a", "", 0.0, 1.0, channel=1))["channel"] == 1


def pcm16(samples: np.ndarray) -> np.ndarray:
    return np.round(samples * 32768).astype(np.int16)


def cores(start: tuple[int, int] = (0, 0), next_utt: tuple[int, int] = (0, 0)
          ) -> ChannelCores:
    return ChannelCores([
        StreamingTranscriber("s", BurstDecoder(), fake_vad, CFG, start_sample=start[c],
                             next_utterance=next_utt[c], channel=c) for c in (0, 1)])


def two_speakers() -> np.ndarray:
    """Channel 0 speaks from 0 s (w11 w12), and again from 4 s (w13); channel 1 from 1.5 s
    (w21 w22 w23), overlapping the end of channel 0's first turn not at all, then silent."""
    total = int(7 * RATE)
    a, b = np.zeros(total, np.float32), np.zeros(total, np.float32)
    first, later, other = utterance([11, 12]), utterance([13]), utterance([21, 22, 23])
    a[:len(first)] = first
    a[4 * RATE:4 * RATE + len(later)] = later
    b[int(1.5 * RATE):int(1.5 * RATE) + len(other)] = other
    return pcm16(np.stack([a, b], axis=1).reshape(-1))


def run(core: ChannelCores, pcm: np.ndarray, chunk_s: float = 0.1) -> list[object]:
    events: list[object] = []
    step = int(chunk_s * RATE) * core.width
    for i in range(0, len(pcm), step):
        events += core.feed(pcm[i:i + step], detach=False)
    return events + core.finish()


def test_each_channel_has_its_own_utterances_and_the_finals_come_in_time_order() -> None:
    events = run(cores(), two_speakers())
    finals = [ev.final for ev in events if isinstance(ev, Committed)]
    assert [(f.channel, f.utterance, f.text) for f in finals] == [
        (0, 0, "w11 w12"), (1, 0, "w21 w22 w23"), (0, 1, "w13")]
    ends = [ev.commit_sample for ev in events if isinstance(ev, Committed)]
    assert ends == sorted(ends)
    partials = [ev for ev in events if isinstance(ev, Partial)]
    assert partials and all(p.channel in (0, 1) for p in partials)
    assert {p.channel for p in partials} == {0, 1}


def test_partials_of_several_channels_are_one_detached_job() -> None:
    both = np.stack([utterance([11, 12, 13]), utterance([21, 22, 23])], axis=1).reshape(-1)
    core = cores()
    jobs = [ev for i in range(0, len(both), 3200)
            for ev in core.feed(pcm16(both[i:i + 3200]), detach=True)
            if isinstance(ev, ChannelPartials)]
    assert jobs and any(len(job.jobs) == 2 for job in jobs)
    job = next(job for job in jobs if len(job.jobs) == 2)
    partials = core.partial_done(job, job.run())
    assert sorted(p.channel for p in partials) == [0, 1]


def test_a_resumed_session_continues_each_channel_from_its_own_commit_point() -> None:
    """The record says channel 0 committed up to 3.5 s (one utterance), channel 1 up to
    1.0 s (none yet): the audio is re-read from 1.0 s, and channel 0 hears only what
    follows its point."""
    pcm = two_speakers()
    start = (int(3.5 * RATE), RATE)
    core = cores(start=start, next_utt=(1, 0))
    assert core.position == RATE
    events = run(core, pcm[RATE * 2:])
    finals = [ev.final for ev in events if isinstance(ev, Committed)]
    assert [(f.channel, f.utterance, f.text) for f in finals] == [
        (1, 0, "w21 w22 w23"), (0, 1, "w13")]


def test_the_record_holds_each_channels_point() -> None:
    raw = {b"commit_sample.0": b"800", b"next_utterance.0": b"2", b"prompt.0": b"hi",
           b"commit_sample.1": b"1600", b"commit_sample": b"800"}
    points = channel_points(raw, 3)
    assert [(p.commit_sample, p.next_utterance, p.prompt) for p in points] == [
        (800, 2, "hi"), (1600, 0, ""), (0, 0, "")]


# --------------------------------------------------------------------------- Twilio tracks

def test_twilio_tracks_are_aligned_by_timestamp_and_gaps_are_silence() -> None:
    aligner = TrackAligner()
    assert aligner.add(0, b"\x01" * 160, 0) == b""  # outbound not there yet
    out = aligner.add(1, b"\x02" * 160, 0)
    assert out == b"\x01\x02" * 160
    # inbound skips 20 ms (a lost packet): silence in its place
    assert aligner.add(0, b"\x03" * 160, 40) == b""
    out = aligner.add(1, b"\x04" * 320, 20)
    assert out == b"\xff\x04" * 160 + b"\x03\x04" * 160
    # a repeat of what was given is dropped
    assert aligner.add(1, b"\x05" * 160, 20) == b""
    assert aligner.ends == [480, 480]


def test_a_silent_track_is_not_waited_for_past_the_skew_bound() -> None:
    aligner = TrackAligner(skew=800)
    out = b"".join(aligner.add(0, b"\x01" * 160, 20 * i) for i in range(10))
    frames = np.frombuffer(out, np.uint8).reshape(-1, 2)
    assert len(frames) == 1600 - 800  # the outbound track is taken as silent up to the bound
    assert set(frames[:, 1]) == {MULAW_SILENCE}
    assert max(len(p) for p in aligner.pending) <= 800
    tail = np.frombuffer(aligner.flush(), np.uint8).reshape(-1, 2)
    assert len(tail) == 800 and set(tail[:, 0]) == {1}


def test_a_timestamp_jump_fills_at_most_the_gap_bound() -> None:
    aligner = TrackAligner(gap=1600)
    aligner.add(0, b"\x01" * 160, 0)
    aligner.add(0, b"\x01" * 160, 3_600_000)  # an hour later
    assert aligner.ends[0] == 160 + 1600 + 160
    aligner.add(0, b"\x01" * 160, 3_600_020)  # and on from there, without another gap
    assert aligner.ends[0] == 160 + 1600 + 320


# --------------------------------------------------------------------------- exports

def finals() -> list[Final]:
    return [Final("s", 0, " Hello there.", 0.5, 1.5, (Word(" Hello", 0.5, 1.0, 0.9),
                                                      Word(" there.", 1.0, 1.5, 0.9)),
                  seq=3, channel=0),
            Final("s", 0, " Hi.", 0.2, 0.8, (Word(" Hi.", 0.2, 0.8, 0.9),), seq=4,
                  channel=1)]


def test_exports_mark_each_channel() -> None:
    text = formats.to_text(finals())
    assert text == "[channel 0] Hello there.\n[channel 1] Hi.\n"
    # parsed by maintained libraries: cues by start time, the channel as the voice
    vtt = webvtt.from_buffer(io.StringIO(formats.to_vtt(finals())))
    assert [(c.start, c.voice, c.text) for c in vtt] == [
        ("00:00:00.200", "Channel 1", "Hi."), ("00:00:00.500", "Channel 0", "Hello there.")]
    srt = pysrt.from_string(formats.to_srt(finals()))
    assert [(str(c.start), c.text) for c in srt] == [
        ("00:00:00,200", "[channel 1] Hi."), ("00:00:00,500", "[channel 0] Hello there.")]
    body = json.loads(formats.to_json(finals(), {"state": "closed"}))
    assert [u["channel"] for u in body["utterances"]] == [0, 1]
    mono = [Final("s", 0, " Hello.", 0.0, 1.0)]
    assert formats.to_text(mono) == "Hello.\n" and "<v" not in formats.to_vtt(mono)


def test_a_stereo_wav_header() -> None:
    header = formats.wav_header(16000, channels=2)
    with wave.open(io.BytesIO(header + bytes(64000))) as w:
        assert (w.getnchannels(), w.getframerate(), w.getnframes()) == (2, 16000, 16000)


# --------------------------------------------------------------------------- crosstalk

def test_bleed_of_the_other_channel_is_silenced_and_speech_of_both_is_kept() -> None:
    """Channel 1 carries channel 0's speech at -30 dB (a headset's bleed) for 1 s, then
    both talk at comparable levels: the bleed becomes silence, both talkers stay."""
    rng = np.random.default_rng(1)
    talk0, talk1 = rng.normal(0, 3000, 32000), rng.normal(0, 2000, 32000)
    left = talk0
    right = np.concatenate([0.03 * talk0[:16000], talk1[16000:]])
    frames = np.stack([left, right], axis=1).round().astype(np.int16)
    gated = CrosstalkGate(2, 20.0)(frames)
    assert np.array_equal(gated[:, 0], frames[:, 0])
    assert not gated[800:16000, 1].any()  # after the envelope has settled
    kept = gated[17600:, 1] != 0
    assert kept.mean() > 0.99


def test_the_gate_does_not_depend_on_how_the_audio_is_chunked() -> None:
    rng = np.random.default_rng(2)
    frames = (rng.normal(0, 1, (16000, 2)) * np.array([3000, 60])
              * np.sin(np.linspace(0, 20, 16000))[:, None]).round().astype(np.int16)
    whole = CrosstalkGate(2, 20.0)(frames)
    gate = CrosstalkGate(2, 20.0)
    edges = [0, 1, 1000, 1037, 5000, 5001, 12000, 16000]  # any cuts
    cut = np.concatenate([gate(frames[a:b]) for a, b in itertools.pairwise(edges)])
    assert np.array_equal(whole, cut)


def test_a_silent_channel_could_start_over_where_its_vad_has_heard_silence() -> None:
    core = cores().cores[1]
    core.feed(pcm16(np.zeros(3 * RATE, np.float32)))
    heard = 3 * RATE // WINDOW * WINDOW  # the VAD's whole windows
    assert core.idle_point == heard - CFG.pad_samples  # the pad before speech is kept
    core.feed(pcm16(utterance([21, 22])[:int(0.5 * RATE)]))
    assert core.idle_point is None  # an utterance is open
