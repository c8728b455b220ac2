"""Client protocols other than /v1/listen's own, each a thin ``Wire`` (``ingest/listen.py``)
over the same listen sessions: Deepgram's live API (``deepgram.py``), Twilio Media Streams
(``twilio.py``), OpenAI's realtime transcription and file uploads (``openai.py``).

A dialect reads its own query string into ``ListenParams`` and spells the session's messages
its own way; everything else (admission, caps, resume where it has one, limits, the audio
path, viewers, exports) is the listen session's.
"""
