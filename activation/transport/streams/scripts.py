"""The Lua scripts of the streams transport: each one step that must be atomic on Redis.

Rules every script keeps: all keys come in KEYS (none is built inside Lua), and all keys of a
call share one hash tag, so each runs on a single Redis Cluster slot. Times are Redis's own
(idle times in the pending list, TIME for age trimming), so host clocks never matter.

The fencing token of a delivery is (consumer, delivery count at receipt). A holder's script
(renew, complete, hand back, dead-letter) first checks, with XPENDING, that the entry is still
pending on that consumer at that count; anything else is a refusal, returned as a value.

Replies are flat arrays whose first element is the status; `client.py` turns them into types.
"""

from __future__ import annotations

# Shared by the holder's scripts: one copy of the token check and of the age cut-off.
_PRELUDE = r"""
local function holder_check(stream, group, id, consumer, deliveries)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if #p == 0 then
    return {'refused', 'not_pending', id .. ' is not pending (completed, dead-lettered or lost)'}, nil
  end
  p = p[1]
  if p[2] ~= consumer or tonumber(p[4]) ~= tonumber(deliveries) then
    return {'refused', 'not_holder', p[2] .. ' holds ' .. id .. ' at delivery ' .. p[4]}, nil
  end
  return nil, p
end

local function age_cutoff(retention_ms)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  return string.format('%.0f-0', math.max(0, now - tonumber(retention_ms)))
end

-- A result or dead letter on its stream, which keeps the retention's worth (by Redis's clock).
local function add_outcome(stream, retention_ms, ...)
  return redis.call('XADD', stream, 'MINID', age_cutoff(retention_ms), '*', ...)
end

-- An entry whose outcome is recorded in its task key leaves the stream and the pending list;
-- the task key outlives it by the retention (a replay is answered from it). XACK of an entry no
-- consumer holds (a cancel of one never delivered) is a no-op.
local function retire(stream, group, id, task_key, retention_ms)
  redis.call('PEXPIRE', task_key, retention_ms)
  redis.call('XACK', stream, group, id)
  redis.call('XDEL', stream, id)
end

local function field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end
"""

# KEYS: tasks, task key.  ARGV: group, task_id, task JSON, allow re-dispatch of a dead task (0/1).
# Idempotent by task id: a known id adds nothing and says where it is, so the orchestrator may
# re-send its whole outbox at any time (after NOGROUP, say) and only lost tasks go again. The
# group is created at 0 with the stream, so after a restart without persistence the next
# dispatch recreates both.
DISPATCH = r"""
local state = redis.call('HGET', KEYS[2], 'state')
local entry = redis.call('HGET', KEYS[2], 'entry') or ''
-- A queued id whose entry is gone (lost with an AOF tail, or deleted by hand) is sent again.
local lost = state == 'queued' and #redis.call('XRANGE', KEYS[1], entry, entry) == 0
if state and not lost and not (state == 'dead' and ARGV[4] == '1') then
  return {'duplicate', state, entry}
end
local made = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
if type(made) == 'table' and made.err and not string.find(made.err, 'BUSYGROUP', 1, true) then
  return redis.error_reply(made.err)
end
local id = redis.call('XADD', KEYS[1], '*', 'task_id', ARGV[2], 'task', ARGV[3])
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'state', 'queued', 'entry', id)
return {'queued', 'queued', id}
"""

# KEYS: tasks.  ARGV: group, consumer, lease ms, max deliveries, how many to look at.
# Claims the oldest entry idle past the lease. Being one script, exactly one claimer wins each
# entry. An entry already delivered max times is taken with JUSTID (no delivery counted) and
# returned as 'exhausted', for the claimer to dead-letter with the task key it names. Nudges
# and entries deleted under the pending list are dropped on the way.
CLAIM = (
    _PRELUDE
    + r"""
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', ARGV[5])
for _, p in ipairs(pending) do
  local id, owner, deliveries = p[1], p[2], tonumber(p[4])
  local entry = redis.call('XRANGE', KEYS[1], id, id)
  if #entry == 0 then
    redis.call('XACK', KEYS[1], ARGV[1], id)
  elseif field(entry[1][2], 'task_id') == nil then
    redis.call('XACK', KEYS[1], ARGV[1], id)
    redis.call('XDEL', KEYS[1], id)
  elseif deliveries >= tonumber(ARGV[4]) then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], id, 'JUSTID')
    return {'exhausted', id, owner, deliveries, entry[1][2]}
  else
    local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], id)
    if #claimed > 0 then
      return {'claimed', id, owner, deliveries + 1, claimed[1][2]}
    end
  end
end
return {'none'}
"""
)

# KEYS: tasks.  ARGV: group, entry id, consumer, deliveries, lease ms.
# Resets the entry's idle time with XCLAIM JUSTID, which counts no delivery. A lapsed lease is
# not revived, even if nobody took it yet: a stopped or cut-off holder loses it like a dead one.
RENEW = (
    _PRELUDE
    + r"""
local refusal, p = holder_check(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
if refusal then return refusal end
if tonumber(p[3]) >= tonumber(ARGV[5]) then
  return {'refused', 'expired', ARGV[2] .. ' was idle ' .. p[3] .. ' ms, past the lease'}
end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return {'renewed', tostring(p[3])}
"""
)

# KEYS: tasks, results, task key.  ARGV: group, entry id, consumer, deliveries, task_id,
# result JSON, digest of the result, retention ms.
# Checks the token, records the result in the task key, adds it to the result stream (trimmed
# by age), then acks and deletes the task entry. Replayed with the same token and digest (the
# caller never heard the first answer) it answers 'already_done'; a late result is refused.
COMPLETE = (
    _PRELUDE
    + r"""
local done = redis.call('HMGET', KEYS[3], 'state', 'digest', 'consumer', 'deliveries', 'result_entry')
if done[1] == 'done' then
  if done[2] == ARGV[7] and done[3] == ARGV[3] and done[4] == ARGV[4] then
    return {'already_done', done[5]}
  end
  return {'refused', 'done_by_other',
    'already completed by ' .. tostring(done[3]) .. ' at delivery ' .. tostring(done[4])}
end
local refusal = holder_check(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
if refusal then return refusal end
local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #entry == 0 or field(entry[1][2], 'task_id') ~= ARGV[5] then
  return {'refused', 'wrong_task', ARGV[2] .. ' does not hold task ' .. ARGV[5]}
end
local rid = add_outcome(KEYS[2], ARGV[8], 'task_id', ARGV[5],
  'result', ARGV[6], 'consumer', ARGV[3], 'deliveries', ARGV[4], 'entry', ARGV[2])
redis.call('HSET', KEYS[3], 'state', 'done', 'entry', ARGV[2], 'digest', ARGV[7], 'consumer', ARGV[3],
  'deliveries', ARGV[4], 'result', ARGV[6], 'result_entry', rid)
retire(KEYS[1], ARGV[1], ARGV[2], KEYS[3], ARGV[8])
return {'done', rid}
"""
)

# KEYS: tasks, dead, task key.  ARGV: group, entry id, consumer, deliveries, task_id, reason,
# last owner, retention ms.
# Moves the held entry to the dead-letter stream with its payload, delivery count, last owner and
# reason; gone from the task stream and the pending list. The task key says 'dead'.
DEAD_LETTER = (
    _PRELUDE
    + r"""
local refusal = holder_check(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
if refusal then return refusal end
local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
local task = ''
if #entry > 0 then task = field(entry[1][2], 'task') or '' end
local did = add_outcome(KEYS[2], ARGV[8], 'task_id', ARGV[5], 'task', task,
  'deliveries', ARGV[4], 'last_owner', ARGV[7], 'reason', ARGV[6], 'entry', ARGV[2])
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[3], 'state', 'dead', 'entry', ARGV[2], 'reason', ARGV[6], 'dead_entry', did)
retire(KEYS[1], ARGV[1], ARGV[2], KEYS[3], ARGV[8])
return {'dead', did}
"""
)

# KEYS: tasks.  ARGV: group, entry id, consumer, deliveries, the hand-back consumer, whether the
# delivery counts (0/1).
# For a drain: parks the entry on the hand-back consumer with its delivery time at the epoch
# (so it is past any lease at once) and its count set one lower, so that the claim that takes it
# next counts it back to where it was: no delivery is counted for the hand-back. A run that was
# cut short by a crash (the executor's recovery) keeps its count instead: it was an attempt, and
# the next claim counts the next one, without waiting a lease. A nudge entry wakes one reader
# blocked on the stream, which then claims it.
HAND_BACK = (
    _PRELUDE
    + r"""
local refusal = holder_check(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
if refusal then return refusal end
local count = tonumber(ARGV[4]) - 1
if ARGV[6] == '1' then count = tonumber(ARGV[4]) end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[5], 0, ARGV[2], 'TIME', 1, 'RETRYCOUNT', count, 'JUSTID')
redis.call('XADD', KEYS[1], '*', 'nudge', ARGV[2])
return {'handed_back', ARGV[2]}
"""
)

# KEYS: tasks, results, task key.  ARGV: group, task_id, cancelled result JSON, retention ms,
# the hand-back consumer, the request JSON (who, when).
# Cancels a queued task id. An entry no replica holds (not delivered yet, or parked for a taker
# after a hand-back) is retired at once as a completion would retire it, with the cancelled
# result on the result stream: nobody can receive it after this script. An entry a replica
# holds gets the request in its task key instead; the holder polls for it, kills the agent and
# completes with its own cancelled result (its token still fences it).
CANCEL = (
    _PRELUDE
    + r"""
local state = redis.call('HGET', KEYS[3], 'state')
if not state then return {'unknown', ''} end
if state ~= 'queued' then return {'finished', state} end
local entry = redis.call('HGET', KEYS[3], 'entry')
local p = redis.call('XPENDING', KEYS[1], ARGV[1], entry, entry, 1)
if #p > 0 and p[1][2] ~= ARGV[5] then
  redis.call('HSET', KEYS[3], 'cancel', ARGV[6])
  return {'requested', p[1][2]}
end
local rid = add_outcome(KEYS[2], ARGV[4], 'task_id', ARGV[2],
  'result', ARGV[3], 'consumer', 'cancel', 'deliveries', '0', 'entry', entry)
redis.call('HSET', KEYS[3], 'state', 'done', 'consumer', 'cancel', 'deliveries', '0', 'result', ARGV[3],
  'result_entry', rid, 'cancel', ARGV[6])
retire(KEYS[1], ARGV[1], entry, KEYS[3], ARGV[4])
return {'cancelled', rid}
"""
)

# KEYS: tasks.  ARGV: group, entry id.  Drops a nudge (or any non-task entry) once read.
DROP = r"""
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return {'dropped', ARGV[2]}
"""

# KEYS: tasks.  ARGV: group, idle ms, a consumer to keep (the caller).
# Removes consumers idle longer than the given time that hold nothing pending. Being atomic, no
# entry can be delivered to a consumer between the check and its removal.
PRUNE_CONSUMERS = r"""
local removed = {}
local consumers = redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
for _, c in ipairs(consumers) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info['name'] ~= ARGV[3] and tonumber(info['pending']) == 0 and tonumber(info['idle']) > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    table.insert(removed, info['name'])
  end
end
return removed
"""

# KEYS: the replica's heartbeat key, the role's replica index.  ARGV: consumer, state JSON, ttl ms.
# One heartbeat per replica, a key with a TTL; the index (a sorted set scored by expiry on
# Redis's clock) lets `activation status` list a role's replicas without SCAN across a cluster.
BEAT = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
return {'beat', ARGV[1]}
"""

# KEYS: the role's replica index.  The consumers whose heartbeat has not expired, on Redis's clock.
LIVE_REPLICAS = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. string.format('%.0f', now), '+inf')
"""

# KEYS: the replica's heartbeat key, the role's replica index.  ARGV: consumer.  A clean exit.
LEAVE = r"""
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return {'left', ARGV[1]}
"""

# KEYS: the task's key.  ARGV: the delivery count of the run whose agent started.
# When that run started, on Redis's clock, for `activation tasks` on any host. Only while the task
# is queued: a finished task's key must neither be recreated nor lose its TTL.
STARTED = r"""
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return {'finished', ''} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'started_ms', string.format('%.0f', now), 'started_attempt', ARGV[1])
return {'started', ARGV[1]}
"""

ALL = {
    "dispatch": DISPATCH,
    "claim": CLAIM,
    "renew": RENEW,
    "complete": COMPLETE,
    "dead_letter": DEAD_LETTER,
    "hand_back": HAND_BACK,
    "cancel": CANCEL,
    "drop": DROP,
    "prune_consumers": PRUNE_CONSUMERS,
    "beat": BEAT,
    "live_replicas": LIVE_REPLICAS,
    "leave": LEAVE,
    "started": STARTED,
}
