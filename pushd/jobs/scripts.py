"""The Lua scripts that change a job's state in Redis, each one atomic step (docs/jobs.md, "How a job runs").

A job is a hash (spec, state, counters), a stream of batches read by the consumer group `workers`, a sorted set
of batches waiting to be retried, and a list of permanent failures. Every step that moves recipients between
them is one script, so the counters always add up and a crash between two steps loses nothing: at worst a batch
is sent again by the worker that claims it after the visibility timeout.
"""

GROUP = "workers"

#: A new job, or the job a --key already named. KEYS: job, jobs index, live set, key ('' = none), queue,
#: audience. ARGV: id, spec JSON, first state, now, key window, audience must exist (1/0).
#: Returns {id, 1} when created, {first id, 0} for a known key, {'', -1} when the audience does not exist.
CREATE = """
if ARGV[6] == '1' and redis.call('EXISTS', KEYS[6]) == 0 then return {'', -1} end
if KEYS[4] ~= '' then
  local first = redis.call('GET', KEYS[4])
  if first then return {first, 0} end
  redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[5])
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'spec', ARGV[2], 'state', ARGV[3], 'created', ARGV[4],
           'cursor', '0', 'expanded', '0', 'total', 0, 'sent', 0, 'failed', 0, 'invalid', 0)
if ARGV[3] == 'running' then redis.call('HSET', KEYS[1], 'started', ARGV[4]) end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('XGROUP', 'CREATE', KEYS[5], 'workers', '0', 'MKSTREAM')
return {ARGV[1], 1}
"""

#: A state change asked for by a user or a worker, only from the states it is allowed from.
#: KEYS: job, live set, queue, delayed, audience. ARGV: action, now, next state (confirm), test report (tested),
#: private audience (1/0). Returns {1 if changed, state after}.
TRANSITION = """
local job = KEYS[1]
local state = redis.call('HGET', job, 'state')
if not state then return {0, ''} end
local action = ARGV[1]
local function enter(next_state)
  redis.call('HSET', job, 'state', next_state)
  if next_state == 'running' and not redis.call('HGET', job, 'started') then
    redis.call('HSET', job, 'started', ARGV[2])
  end
  return {1, next_state}
end
if action == 'confirm' and state == 'awaiting_confirmation' then return enter(ARGV[3]) end
if action == 'tested' and state == 'testing' then
  redis.call('HSET', job, 'test', ARGV[4])
  return enter('awaiting_confirmation')
end
if action == 'start' and state == 'scheduled' then return enter('running') end
if action == 'pause' and (state == 'running' or state == 'scheduled') then
  redis.call('HSET', job, 'paused_from', state)
  return enter('paused')
end
if action == 'resume' and state == 'paused' then return enter(redis.call('HGET', job, 'paused_from') or 'running') end
if action == 'cancel' and state ~= 'done' and state ~= 'cancelled' then
  local c = redis.call('HMGET', job, 'total', 'sent', 'failed', 'invalid')
  local left = tonumber(c[1] or 0) - tonumber(c[2] or 0) - tonumber(c[3] or 0) - tonumber(c[4] or 0)
  if left > 0 then redis.call('HSET', job, 'cancelled', left) end
  redis.call('HSET', job, 'state', 'cancelled', 'finished', ARGV[2], 'retrying', 0)
  redis.call('SREM', KEYS[2], redis.call('HGET', job, 'id'))
  redis.call('DEL', KEYS[3], KEYS[4])
  if ARGV[5] == '1' then redis.call('DEL', KEYS[5]) end
  return {1, 'cancelled'}
end
return {0, state}
"""

#: Up to ARGV[4] batches of ARGV[2] recipients from the audience into the queue, continuing the scan where the
#: last call stopped. The cursor is compared first, so two workers expanding at once cannot both add a batch.
#: Recipients left over from a scan step are kept in the job (`carry`) for the next call: batches are exact.
#: KEYS: job, audience, queue. ARGV: expected cursor, batch, scan count, most batches.
#: Returns {cursor, recipients added, 1 if the scan is complete}; {-1} if the job is not running, {-2} if the
#: cursor moved (someone else expands).
EXPAND = """
local job = KEYS[1]
if redis.call('HGET', job, 'state') ~= 'running' then return {-1} end
if redis.call('HGET', job, 'expanded') == '1' then return {-1} end
if redis.call('HGET', job, 'cursor') ~= ARGV[1] then return {-2} end
local carry = cjson.decode(redis.call('HGET', job, 'carry') or '[]')
local size = 2 * tonumber(ARGV[2])
local cursor = ARGV[1]
local added, batches = 0, 0
local function emit(from, to)
  local part = {}
  for i = from, to do part[#part + 1] = carry[i] end
  redis.call('XADD', KEYS[3], '*', 'd', cjson.encode(part), 'a', '0')
  added = added + (to - from + 1) / 2
  batches = batches + 1
end
repeat
  local r = redis.call('HSCAN', KEYS[2], cursor, 'COUNT', ARGV[3])
  cursor = r[1]
  for _, v in ipairs(r[2]) do carry[#carry + 1] = v end
  local start = 1
  while #carry - start + 1 >= size do
    emit(start, start + size - 1)
    start = start + size
  end
  if start > 1 then
    local rest = {}
    for i = start, #carry do rest[#rest + 1] = carry[i] end
    carry = rest
  end
until cursor == '0' or batches >= tonumber(ARGV[4])
local complete = 0
if cursor == '0' then
  if #carry > 0 then emit(1, #carry) end
  carry = {}
  complete = 1
end
redis.call('HINCRBY', job, 'total', added)
if #carry == 0 then redis.call('HDEL', job, 'carry') else redis.call('HSET', job, 'carry', cjson.encode(carry)) end
redis.call('HSET', job, 'cursor', cursor)
if complete == 1 then redis.call('HSET', job, 'expanded', '1') end
return {cursor, added, complete}
"""

#: What one batch did, recorded at once, and the batch taken off the queue. A batch already acknowledged
#: (another worker took it over after the visibility timeout and finished first) changes nothing but
#: `duplicates`. KEYS: job, queue, delayed, failures, audience ('' = keep invalid addresses), live set.
#: ARGV: entry id, now, sent, failed, invalid, retrying, redelivered, errors JSON {reason: n}, sent-via JSON,
#: delayed JSON [[due, member]...], failures JSON [line...], invalid addresses JSON [...], private (1/0: the
#: audience is the job's own, deleted when it is done, so dead addresses are not removed from it one by one).
#: Returns {1 if recorded, state after}.
SETTLE = """
local job = KEYS[1]
if ARGV[1] ~= '' then
  local acked = redis.call('XACK', KEYS[2], 'workers', ARGV[1])
  redis.call('XDEL', KEYS[2], ARGV[1])
  if acked == 0 then
    if tonumber(ARGV[3]) > 0 then redis.call('HINCRBY', job, 'duplicates', ARGV[3]) end
    return {0, redis.call('HGET', job, 'state') or ''}
  end
end
local state = redis.call('HGET', job, 'state')
if not state or state == 'cancelled' then return {0, state or ''} end
for i, name in ipairs({'sent', 'failed', 'invalid', 'retrying', 'redelivered'}) do
  local n = tonumber(ARGV[i + 2])
  if n ~= 0 then redis.call('HINCRBY', job, name, n) end
end
if tonumber(ARGV[6]) > 0 then redis.call('HINCRBY', job, 'retried', ARGV[6]) end
for reason, n in pairs(cjson.decode(ARGV[8])) do redis.call('HINCRBY', job, 'e:' .. reason, n) end
for reason, n in pairs(cjson.decode(ARGV[9])) do redis.call('HINCRBY', job, 'v:' .. reason, n) end
for _, item in ipairs(cjson.decode(ARGV[10])) do redis.call('ZADD', KEYS[3], item[1], item[2]) end
for _, line in ipairs(cjson.decode(ARGV[11])) do redis.call('RPUSH', KEYS[4], line) end
if KEYS[5] ~= '' and ARGV[13] ~= '1' then
  local removed = 0
  for _, address in ipairs(cjson.decode(ARGV[12])) do removed = removed + redis.call('HDEL', KEYS[5], address) end
  if removed > 0 then redis.call('HINCRBY', job, 'removed', removed) end
end
local c = redis.call('HMGET', job, 'total', 'sent', 'failed', 'invalid', 'expanded')
if state ~= 'done' and c[5] == '1' and tonumber(c[2]) + tonumber(c[3]) + tonumber(c[4]) >= tonumber(c[1])
   and redis.call('ZCARD', KEYS[3]) == 0 then
  redis.call('HSET', job, 'state', 'done', 'finished', ARGV[2])
  redis.call('SREM', KEYS[6], redis.call('HGET', job, 'id'))
  redis.call('DEL', KEYS[2])
  if ARGV[13] == '1' then redis.call('DEL', KEYS[5]) end
  state = 'done'
end
return {1, state}
"""

#: Retries whose time has come, back into the queue. Members are "attempt count nonce pairs-JSON".
#: KEYS: delayed, queue, job. ARGV: now, most. Returns how many batches moved.
PROMOTE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  local attempt, count, pairs_json = string.match(member, '^(%d+) (%d+) %S+ (.*)$')
  redis.call('ZREM', KEYS[1], member)
  redis.call('XADD', KEYS[2], '*', 'd', pairs_json, 'a', attempt)
  redis.call('HINCRBY', KEYS[3], 'retrying', -tonumber(count))
end
return #due
"""

#: Tokens for one batch from the job's bucket and the gateway's (rate control across every worker), unless
#: the gateway asked everyone to hold off (Retry-After). Redis' clock, so workers on many machines agree.
#: KEYS: job bucket, gateway bucket, gateway hold. ARGV: tokens, job rate/s (0 = none), gateway rate/s.
#: Returns 0 when granted, else milliseconds to wait before asking again.
TAKE = """
local hold = redis.call('PTTL', KEYS[3])
if hold > 0 then return hold end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local want = tonumber(ARGV[1])
local buckets = {}
local wait = 0
for i = 1, 2 do
  local rate = tonumber(ARGV[i + 1])
  if rate > 0 then
    local burst = math.max(rate, want)
    local b = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
    local tokens = tonumber(b[1]) or burst
    local ts = tonumber(b[2]) or now
    tokens = math.min(burst, tokens + (now - ts) * rate)
    if tokens < want then wait = math.max(wait, (want - tokens) / rate) end
    buckets[#buckets + 1] = {KEYS[i], tokens, rate, burst}
  end
end
if wait > 0 then return math.max(1, math.ceil(wait * 1000)) end
for _, b in ipairs(buckets) do
  redis.call('HSET', b[1], 'tokens', b[2] - want, 'ts', now)
  redis.call('EXPIRE', b[1], math.ceil(b[4] / b[3]) + 60)
end
return 0
"""

#: Make every worker hold off a gateway for ARGV[1] ms (its Retry-After), unless a longer hold is set.
HOLD = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], '1', 'PX', ARGV[1]) end
return 0
"""

#: The state and spec of every live job: what a worker needs each tick. KEYS: live set. ARGV: job key prefix.
LIVE = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local r = redis.call('HMGET', ARGV[1] .. id, 'state', 'spec', 'expanded')
  if r[1] then
    out[#out + 1] = id
    out[#out + 1] = r[1]
    out[#out + 1] = r[2]
    out[#out + 1] = r[3]
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return out
"""
