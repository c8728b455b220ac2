"""Every Lua script the services run, with its KEYS / ARGV / return contract beside it.

Each script touches one session's hash-tagged keys (``stt:{sid}:...``) or one global key,
never both, so every one is legal on Redis Cluster. Field names are those of the session's
meta hash (``stt:{sid}:meta``): state, epoch, owner, lease_entry, lease_at, attach,
audio_seq, seq, commit_sample, next_utterance, prompt, resume_id, stable, speakers,
processed_sample, heartbeat, created, duration. Times come from the Redis server's clock
(``TIME``), never from the machine that runs the script.

Who runs what: the gateway CREATE_SESSION, HEARTBEAT, APPEND_AUDIO, NOTICE, CAP_ACQUIRE,
DELETE_SESSION (the gateway's sessions API);
replays CREATE_SESSION, HEARTBEAT, APPEND_AUDIO; the transcriber the LEASE_* scripts,
PUBLISH, PROGRESS, COMMIT, ADVANCE_CHANNEL, CLIENT_SILENCE and CLOSE
(transcriber/commit.py),
ANNOUNCE_WORKER (the worker registry, common/models.py), and COMPACT_AUDIO after a close
(``Sessions.compact``).
"""

from __future__ import annotations

# Redis time in seconds with milliseconds, as text (the format of 'created' and 'heartbeat').
NOW_S = """
local t = redis.call('TIME')
local now = string.format('%.3f', tonumber(t[1]) + tonumber(t[2]) / 1000000)
"""


# The time on the Redis server, in milliseconds: every lease and age is measured on this one
# clock, never on the wall clocks of the machines that read or write it.
NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""


# KEYS: meta. ARGV: field, value, field, value, ... (the caller's fields).
# Writes the session record unless it exists; returns its 'created' time either way.
CREATE_SESSION = NOW_S + """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('HGET', KEYS[1], 'created') end
if #ARGV > 0 then redis.call('HSET', KEYS[1], unpack(ARGV)) end
redis.call('HSET', KEYS[1], 'state', 'active', 'created', now, 'heartbeat', now, 'epoch', 0,
           'seq', 0, 'commit_sample', 0, 'next_utterance', 0, 'attach', 1)
return now
"""


# KEYS: meta. Refreshes the client heartbeat (Redis time); 0 when the session is gone.
HEARTBEAT = NOW_S + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'heartbeat', now)
return 1
"""


# KEYS: meta, audio. ARGV: attach generation, then (seq, packed entry) pairs.
# Returns the number of entries added, -1 when another connection has the session, -2 when
# the session has ended (its transcriber closed it: audio after that would never be heard),
# -3 when its record is gone (deleted, or expired).
APPEND_AUDIO = """
local attach = redis.call('HGET', KEYS[1], 'attach')
if not attach then return -3 end
if attach ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[1], 'state') == 'closed' then return -2 end
local last = tonumber(redis.call('HGET', KEYS[1], 'audio_seq') or '0')
local added = 0
for i = 2, #ARGV, 2 do
  local seq = tonumber(ARGV[i])
  if seq > last then
    redis.call('XADD', KEYS[2], '*', 'm', ARGV[i + 1])
    last = seq
    added = added + 1
  end
end
redis.call('HSET', KEYS[1], 'audio_seq', last)
return added
"""


# A notice from the gateway (queue position, lag): not fenced by a worker epoch.
# KEYS: meta, results. ARGV: body. Returns seq, or -1 when the session is gone.
NOTICE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('XADD', KEYS[2], '*', 'seq', seq, 'm', ARGV[1], 'epoch', 0)
return seq
"""


# KEYS: one connections set. ARGV: now, lease expiry, member, cap (0 = none), key TTL.
# Returns 1 when the member was added, 2 when it was already there (a resumed session: its
# lease is refreshed and it does not count twice), 0 when the set is at its cap.
# (ZADD XX INCR 0 is nil for a missing member: the existence test with the gateway's ACL,
# docker/redis-users.acl, which grants zadd but not zscore.)
CAP_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZADD', KEYS[1], 'XX', 'INCR', 0, ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  return 2
end
local cap = tonumber(ARGV[4])
if cap > 0 and redis.call('ZCARD', KEYS[1]) >= cap then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


# Take ownership with work-queue entry ARGV[2]: a new epoch fences out every earlier owner.
# The meta hash records which entry holds the lease (lease_entry) and when its owner last
# renewed it (lease_at, Redis time); an entry that is not the recorded one while that
# lease is fresh is a duplicate (a retried creation or hand-back) and takes nothing.
# With ARGV[4] (the model the worker serves), a session that asked for another model is not
# taken (-3: the worker moves its entry to that model's queue); one that named none records
# the worker's model, so the record names the model that transcribes.
# KEYS: meta. ARGV: owner, entry id, lease ms[, model].
# Returns the new epoch, -1 if the session is gone, -2 for a duplicate entry, -3 for another
# model's session.
LEASE_ACQUIRE = NOW_MS + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local entry = redis.call('HGET', KEYS[1], 'lease_entry')
local at = tonumber(redis.call('HGET', KEYS[1], 'lease_at') or '0')
if entry and entry ~= ARGV[2] and now - at < tonumber(ARGV[3]) then return -2 end
local model = redis.call('HGET', KEYS[1], 'model')
if ARGV[4] and model and model ~= '' and model ~= ARGV[4] then return -3 end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'lease_entry', ARGV[2], 'lease_at', now)
if ARGV[4] then redis.call('HSET', KEYS[1], 'model', ARGV[4]) end
return epoch
"""


# The owner keeps its lease fresh. KEYS: meta. ARGV: epoch. 1, or 0 when no longer the owner.
LEASE_RENEW = NOW_MS + """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lease_at', now)
return 1
"""


# The owner gives the session up (shutdown hand-back): the next entry queued for it may
# take it at once. KEYS: meta. ARGV: epoch. 1, or 0 when no longer the owner.
LEASE_RELEASE = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'lease_entry', 'lease_at')
return 1
"""


# KEYS: meta, results. ARGV: epoch, body, and for a partial its promised (stable) words,
# packed (kept in 'stable' so that a worker taking over the open utterance keeps them), and
# for a channel of a multichannel session that channel (kept in 'stable.N').
# Returns seq, or -1 when the epoch is stale.
PUBLISH = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return -1 end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('XADD', KEYS[2], '*', 'seq', seq, 'm', ARGV[2], 'epoch', ARGV[1])
if ARGV[3] then
  local field = 'stable'
  if ARGV[4] then field = 'stable.' .. ARGV[4] end
  redis.call('HSET', KEYS[1], field, ARGV[3])
end
return seq
"""


# How far the owner has transcribed (for lag reporting). ARGV: epoch, processed sample.
PROGRESS = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'processed_sample', ARGV[2])
return 0
"""


# A final and its commit point in one step. Idempotent: a final whose utterance
# is already committed (a retried write whose reply was lost) returns 0.
# ARGV: epoch, body, commit_sample, next_utterance, prompt, resume_id, utterance, timing,
# and for a channel of a multichannel session: the channel and the session's commit sample
# (the earliest of its channels'), '' otherwise; then, for a session with speaker labels, its
# speakers after this final (packed, '' without), so a new owner labels with the same
# speakers. A channel's point is kept in 'commit_sample.N', 'next_utterance.N', 'prompt.N'
# (its stable words in 'stable.N'); 'next_utterance' then counts the finals of all
# channels, 'commit_sample' is the session's.
COMMIT = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return -1 end
local sfx = ''
if ARGV[9] and ARGV[9] ~= '' then sfx = '.' .. ARGV[9] end
local done = redis.call('HGET', KEYS[1], 'next_utterance' .. sfx) or '0'
if tonumber(done) > tonumber(ARGV[7]) then
  -- stored already (a retry): write the same value back, so that this connection's WAIT
  -- covers the first attempt's writes too (common/replication.py)
  redis.call('HSET', KEYS[1], 'next_utterance' .. sfx, done)
  return 0
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('XADD', KEYS[2], '*', 'seq', seq, 'm', ARGV[2], 'epoch', ARGV[1], 't', ARGV[8])
redis.call('HSET', KEYS[1], 'commit_sample' .. sfx, ARGV[3], 'next_utterance' .. sfx, ARGV[4],
           'prompt' .. sfx, ARGV[5], 'resume_id', ARGV[6])
if sfx ~= '' then
  redis.call('HINCRBY', KEYS[1], 'next_utterance', 1)
  redis.call('HSET', KEYS[1], 'commit_sample', ARGV[10])
end
if ARGV[11] and ARGV[11] ~= '' then redis.call('HSET', KEYS[1], 'speakers', ARGV[11]) end
redis.call('HDEL', KEYS[1], 'stable' .. sfx)
return seq
"""


# A multichannel session's silent channel moves its commit point on without a final (so a
# takeover does not re-read all the audio since that channel last spoke). KEYS: meta.
# ARGV: epoch, channel, its commit sample, resume_id, the session's commit sample. Only
# forward. Returns 1, 0 when the point was not ahead, -1 when the epoch is stale.
ADVANCE_CHANNEL = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return -1 end
local field = 'commit_sample.' .. ARGV[2]
if tonumber(redis.call('HGET', KEYS[1], field) or '0') >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], field, ARGV[3])
redis.call('HSET', KEYS[1], 'resume_id', ARGV[4], 'commit_sample', ARGV[5])
return 1
"""


# Milliseconds since the client's heartbeat, on Redis time (-1: none). KEYS: meta.
CLIENT_SILENCE = NOW_MS + """
local beat = redis.call('HGET', KEYS[1], 'heartbeat')
if not beat then return -1 end
return now - math.floor(tonumber(beat) * 1000)
"""


# The closing message, then the retention TTL on every key of the session.
# KEYS: meta, results, audio. ARGV: epoch, body, retention seconds, duration, and for an idle
# close: idle ms (0 = not an idle close) and the id of the last audio entry read. An idle
# close is refused (-3) when the client's heartbeat (Redis time) is fresher than the idle
# time or audio came after the entry read: the decision is re-checked where it takes effect.
CLOSE = NOW_MS + """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[1], 'state') == 'closed' then
  redis.call('HSET', KEYS[1], 'state', 'closed')  -- a retry: see COMMIT
  return 0
end
local idle = tonumber(ARGV[5] or '0')
if idle > 0 then
  local beat = tonumber(redis.call('HGET', KEYS[1], 'heartbeat') or '0')
  if now - beat * 1000 < idle then return -3 end
  local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)[1]
  if last and last[1] ~= ARGV[6] then return -3 end
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('XADD', KEYS[2], '*', 'seq', seq, 'm', ARGV[2], 'epoch', ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'closed', 'duration', ARGV[4])
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return seq
"""


# Deletion: every key of one session, at once. KEYS: meta, then the session's other keys.
# Returns 1, or 0 when it had no record (never existed, expired, or deleted already); its
# other keys are removed either way. UNLINK: a long session's audio is freed in the
# background, not while Redis serves nobody else. A writer that comes after finds no record:
# every script above refuses a session without one (no epoch, no attach generation).
DELETE_SESSION = """
local existed = redis.call('EXISTS', KEYS[1])
redis.call('UNLINK', unpack(KEYS))
return existed
"""


# Compaction: a closed session's audio stream replaced by its compressed form, at once.
# KEYS: meta, audio, audio.z. ARGV: id of the last audio entry read, codec, samples, markers
# (packed), data, raw bytes. Refused (-1) unless the session is closed, (-2) when the stream
# changed since it was read (its last entry is another one; or it is gone: compacted or
# deleted meanwhile). The compacted key takes the record's remaining TTL.
COMPACT_AUDIO = """
if redis.call('HGET', KEYS[1], 'state') ~= 'closed' then return -1 end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
if not last or last[1] ~= ARGV[1] then return -2 end
redis.call('HSET', KEYS[3], 'codec', ARGV[2], 'samples', ARGV[3], 'markers', ARGV[4],
           'data', ARGV[5], 'raw_bytes', ARGV[6])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) end
redis.call('UNLINK', KEYS[2])
return 1
"""


# --------------------------------------------------------------------- answers

#: APPEND_AUDIO: another connection has the session (its attach generation moved on).
APPEND_TAKEN = -1
#: APPEND_AUDIO: the session has ended.
APPEND_CLOSED = -2
#: APPEND_AUDIO: the session's record is gone (deleted or expired).
APPEND_GONE = -3
#: LEASE_ACQUIRE: the session is gone.
LEASE_GONE = -1
#: LEASE_ACQUIRE: another work entry holds a live lease on the session.
LEASE_DUPLICATE = -2
#: LEASE_ACQUIRE: the session asked for another model than the worker's.
LEASE_OTHER_MODEL = -3
#: PUBLISH, COMMIT, PROGRESS, ADVANCE_CHANNEL, CLOSE: the writer's epoch is no longer the
#: session's.
STALE_EPOCH = -1
#: CLOSE: an idle close found the client back (fresh heartbeat, or audio after the last read).
CLOSE_CLIENT_BACK = -3


# A worker announces what it serves (common/models.py). KEYS: the worker registry (one
# global key). ARGV: worker name, its record (a JSON object), ms the record stays valid.
# Stores the record with 'expires_ms' (Redis time + ARGV[3]) added; returns Redis time (ms).
ANNOUNCE_WORKER = NOW_MS + """
local record = cjson.decode(ARGV[2])
record['expires_ms'] = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(record))
return now
"""
