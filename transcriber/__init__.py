"""Transcriber worker: leases sessions from the work queue, runs Silero VAD and faster-whisper."""
