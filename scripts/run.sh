#!/usr/bin/env bash
# make run: use REDIS_URL when reachable, else start a local redis-server; then the
# transcriber and the gateway. Ctrl-C stops everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
RUN_DIR=.run
mkdir -p "$RUN_DIR"
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8765}
export REDIS_URL=${REDIS_URL:-redis://localhost:6379/0}
# A local developer run: no API keys unless AUTH=required and API_KEYS are set. Authentication
# is off only because this says so, and the gateway listens on loopback by default.
export AUTH=${AUTH:-off}
if [ "$AUTH" = off ] && [ "$HOST" != 127.0.0.1 ] && [ "$HOST" != localhost ]; then
  echo "WARNING: authentication is off and the gateway listens on $HOST" >&2
fi

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

if "$BIN/python" -c "import redis,sys; redis.Redis.from_url('$REDIS_URL', socket_timeout=2).ping()" 2>/dev/null; then
  echo "using Redis at $REDIS_URL"
else
  port=$("$BIN/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
  echo "no Redis at $REDIS_URL; starting redis-server on 127.0.0.1:$port (data in $RUN_DIR)"
  redis-server --port "$port" --bind 127.0.0.1 --dir "$PWD/$RUN_DIR" --appendonly yes \
    --save "" --logfile "$PWD/$RUN_DIR/redis.log" &
  pids+=($!)
  export REDIS_URL="redis://127.0.0.1:$port/0"
  for _ in $(seq 50); do
    "$BIN/python" -c "import redis; redis.Redis.from_url('$REDIS_URL').ping()" 2>/dev/null && break
    sleep 0.1
  done
fi

"$BIN/python" -m transcriber &
pids+=($!)
"$BIN/python" -m ingest --host "$HOST" --port "$PORT" &
pids+=($!)

echo
echo "  Live transcription is running: open http://$HOST:$PORT/"
echo "  WebSocket endpoint: ws://$HOST:$PORT/v1/listen   (Ctrl-C to stop)"
[ "$AUTH" = off ] && echo "  Authentication is OFF (local development; AUTH=required API_KEYS=... to turn it on)"
echo
wait -n "${pids[@]}"
