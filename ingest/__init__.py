"""WebSocket gateway: validates and normalises audio, appends it to Redis, serves the page."""
