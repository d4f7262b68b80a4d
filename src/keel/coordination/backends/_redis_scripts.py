"""The Redis lock scripts (Lua), each one atomic round trip.

Every script gets the same KEYS and ARGV (see `script_args`):

    KEYS: keel:<key> (the record), keel-fence:<key> (its fence counter), keel-children:<parent>/
          (the listing index), keel-q:<key> (the queue: token -> arrival number),
          keel-qseq:<key> (the arrival counter)
    ARGV: <parent>/ (for the parent's change channel), owner, ttl in ms, data, waiter token,
          the holder prefix "fence\\nowner\\n" (renew and release)

A record's value is ``fence \\n owner \\n token \\n data``. A queued waiter keeps a liveness key
``keel-w:<key>:<token>`` (its ttl, owner and data, expiring with its ttl: a waiter that died
drops out) and is woken through the list ``keel-wake:<key>:<token>``, where whoever frees the
key pushes the fence it granted to the longest live waiter. Changes are published on
``keel-ev:<key>`` and ``keel-ev:<parent>/`` for observers. The waiter keys are built inside
the scripts, so these scripts are for a single Redis instance, not a cluster.
"""

from __future__ import annotations

from typing import Any

_PRELUDE = """
local k = string.sub(KEYS[1], 6)
local function waiter_key(token) return 'keel-w:' .. k .. ':' .. token end
local function token_of(v) return string.match(v, '^%d+\\n[^\\n]*\\n([^\\n]*)\\n') end
local function publish(fence)
  redis.call('publish', 'keel-ev:' .. k, fence)
  redis.call('publish', 'keel-ev:' .. ARGV[1], fence)
end
local function grant(token, owner, ttl, data)
  local fence = redis.call('incr', KEYS[2])
  redis.call('set', KEYS[1], fence .. '\\n' .. owner .. '\\n' .. token .. '\\n' .. data, 'PX', ttl)
  redis.call('sadd', KEYS[3], KEYS[1])
  publish(fence)
  return fence
end
local function live_head()
  while true do
    local head = redis.call('zrange', KEYS[4], 0, 0)[1]
    if not head then return nil end
    local info = redis.call('get', waiter_key(head))
    if info then return head, info end
    redis.call('zrem', KEYS[4], head)
  end
end
local function hand_off()
  local head, info = live_head()
  if not head then return end
  redis.call('zrem', KEYS[4], head)
  redis.call('del', waiter_key(head))
  local ttl, owner, data = string.match(info, '^(%d+)\\n([^\\n]*)\\n(.*)$')
  local fence = grant(head, owner, ttl, data)
  local wake = 'keel-wake:' .. k .. ':' .. head
  redis.call('rpush', wake, fence)
  redis.call('pexpire', wake, ttl)
end
local function free(v)
  redis.call('del', KEYS[1])
  publish(0)
  hand_off()
end
"""

# A try: the key if it is free and nobody waits for it; nothing is left behind otherwise.
TRY = (
    _PRELUDE
    + """
if redis.call('exists', KEYS[1]) == 1 then return false end
if live_head() then return false end
return grant(ARGV[5], ARGV[2], ARGV[3], ARGV[4])
"""
)

# Join the queue (or keep our place), and take the key if it is our turn. Returns
# {fence or false, ms left on the current holder's lease}. Recognises a grant made to this
# token already (a hand-off, or an earlier attempt whose reply was lost).
ENQUEUE = (
    _PRELUDE
    + """
local v = redis.call('get', KEYS[1])
if v and token_of(v) == ARGV[5] then
  return {tonumber(string.match(v, '^%d+')), redis.call('pttl', KEYS[1])}
end
local info = ARGV[3] .. '\\n' .. ARGV[2] .. '\\n' .. ARGV[4]
redis.call('set', waiter_key(ARGV[5]), info, 'PX', ARGV[3])
if not redis.call('zscore', KEYS[4], ARGV[5]) then
  redis.call('zadd', KEYS[4], redis.call('incr', KEYS[5]), ARGV[5])
end
if not v then
  hand_off()
  v = redis.call('get', KEYS[1])
  if v and token_of(v) == ARGV[5] then
    redis.call('del', 'keel-wake:' .. k .. ':' .. ARGV[5])
    return {tonumber(string.match(v, '^%d+')), redis.call('pttl', KEYS[1])}
  end
end
if v then return {false, redis.call('pttl', KEYS[1])} end
return {false, 0}
"""
)

# Leave the queue; if the key was granted to this token meanwhile, free it for the next.
DEQUEUE = (
    _PRELUDE
    + """
redis.call('zrem', KEYS[4], ARGV[5])
redis.call('del', waiter_key(ARGV[5]), 'keel-wake:' .. k .. ':' .. ARGV[5])
local v = redis.call('get', KEYS[1])
if v and token_of(v) == ARGV[5] then free(v) end
return 1
"""
)

RENEW = """
local v = redis.call('get', KEYS[1])
if v and string.sub(v, 1, #ARGV[6]) == ARGV[6] then
  redis.call('pexpire', KEYS[1], ARGV[3])
  return 1
end
return 0
"""

# Free the key if it is still this holder's, and hand it to the longest live waiter.
RELEASE = (
    _PRELUDE
    + """
local v = redis.call('get', KEYS[1])
if v and string.sub(v, 1, #ARGV[6]) == ARGV[6] then
  free(v)
  return 1
end
return 0
"""
)

# The fewest ms left on any record under a key or a prefix (-1: none), so that an observer
# also wakes when a holder's lease runs out (an expiry publishes nothing).
NEXT_EXPIRY = """
local least = -1
local function consider(key)
  local t = redis.call('pttl', key)
  if t >= 0 and (least < 0 or t < least) then least = t end
end
if string.sub(KEYS[1], -1) == '/' then
  for _, key in ipairs(redis.call('smembers', 'keel-children:' .. string.sub(KEYS[1], 6))) do
    consider(key)
  end
else
  consider(KEYS[1])
end
return least
"""

# A persistent record (`Backend.create`): no PX, owner and token "". Taken only when the key
# is free and nobody waits for it.
CREATE = (
    _PRELUDE
    + """
if redis.call('exists', KEYS[1]) == 1 then return false end
if live_head() then return false end
local fence = redis.call('incr', KEYS[2])
redis.call('set', KEYS[1], fence .. '\\n\\n\\n' .. ARGV[4])
redis.call('sadd', KEYS[3], KEYS[1])
publish(fence)
return fence
"""
)

# New data for the record granted with this fence (ARGV[6] is "fence\\n"), same ttl.
UPDATE = """
local v = redis.call('get', KEYS[1])
if not v or string.sub(v, 1, #ARGV[6]) ~= ARGV[6] then return 0 end
local owner_end = string.find(v, '\\n', #ARGV[6] + 1, true)
local token_end = string.find(v, '\\n', owner_end + 1, true)
redis.call('set', KEYS[1], string.sub(v, 1, token_end) .. ARGV[4], 'KEEPTTL')
return 1
"""

# Delete the record granted with this fence, whoever holds it, unless a live record is
# listed under it (ARGV[7] is its children's index); the next live waiter gets the key.
DELETE = (
    _PRELUDE
    + """
local v = redis.call('get', KEYS[1])
if not v or string.sub(v, 1, #ARGV[6]) ~= ARGV[6] then return 0 end
for _, child in ipairs(redis.call('smembers', ARGV[7])) do
  if redis.call('exists', child) == 1 then return 0 end
end
free(v)
return 1
"""
)

SCRIPTS = (TRY, ENQUEUE, DEQUEUE, RENEW, RELEASE, CREATE, UPDATE, DELETE)


def script_args(
    key: str,
    *,
    owner: str = "",
    ttl: float = 0.0,
    data: bytes = b"",
    token: str = "",
    holder: str = "",
) -> list[Any]:
    """``numkeys, KEYS..., ARGV...`` for one of the lock scripts on ``key``."""
    parent = key.rpartition("/")[0] + "/"
    return [
        5,
        f"keel:{key}",
        f"keel-fence:{key}",
        f"keel-children:{parent}",
        f"keel-q:{key}",
        f"keel-qseq:{key}",
        parent,
        owner,
        max(1, int(ttl * 1000)),
        data,
        token,
        holder,
    ]
