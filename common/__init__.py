"""Shared protocol types, Redis key builders, settings, audio helpers and errors."""
