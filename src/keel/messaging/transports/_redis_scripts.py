"""Lua scripts of the Redis transport, each one atomic: a crash between its steps cannot
lose or double a message. Keys other than KEYS are built inside from the ``keel:mq:`` prefix,
so they need one Redis server, not a Cluster."""

# An exclusive queue's messages go by PUBLISH to its channel while its auto_ack consumer is
# subscribed (no AOF write, so no fsync on the reply path), else to its list.
# KEYS: stream, owner key, list. ARGV: body, list ttl ms, channel. 1 = queued, 0 = no queue.
_SEND = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('XADD', KEYS[1], '*', 'b', ARGV[1])
  return 1
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  if redis.call('PUBLISH', ARGV[3], ARGV[1]) == 0 then
    redis.call('RPUSH', KEYS[3], ARGV[1])
    redis.call('PEXPIRE', KEYS[3], ARGV[2])
  end
  return 1
end
return 0
"""

# KEYS: binding set. ARGV: body, list ttl ms, prefix. Drops bindings of queues that are gone.
_PUBLISH = """
local n = 0
for _, q in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local s = ARGV[3] .. 'q:' .. q
  if redis.call('EXISTS', s) == 1 then
    redis.call('XADD', s, '*', 'b', ARGV[1])
    n = n + 1
  elseif redis.call('EXISTS', ARGV[3] .. 'x:' .. q) == 1 then
    if redis.call('PUBLISH', ARGV[3] .. 'c:' .. q, ARGV[1]) == 0 then
      local l = ARGV[3] .. 'l:' .. q
      redis.call('RPUSH', l, ARGV[1])
      redis.call('PEXPIRE', l, ARGV[2])
    end
    n = n + 1
  else
    redis.call('SREM', KEYS[1], q)
  end
end
return n
"""

# Move entries back to the tail of the queue. KEYS: stream. ARGV: group, count increment,
# ids... Entries no longer pending (settled meanwhile, or queue deleted) are left alone.
_RETURN = """
local moved = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local e = redis.call('XRANGE', KEYS[1], id, id)
  if redis.call('XACK', KEYS[1], ARGV[1], id) == 1 then
    redis.call('XDEL', KEYS[1], id)
    if e[1] then
      local f, n = e[1][2], 1
      for j = 1, #f, 2 do if f[j] == 'n' then n = tonumber(f[j + 1]) end end
      redis.call('XADD', KEYS[1], '*', 'b', f[2], 'n', n + tonumber(ARGV[2]))
      moved = moved + 1
    end
  end
end
return moved
"""

# KEYS: stream, dead-letter stream. ARGV: group, id, body, reason.
_DEAD = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('XDEL', KEYS[1], ARGV[2])
  redis.call('XADD', KEYS[2], '*', 'b', ARGV[3], 'reason', ARGV[4])
  return 1
end
return 0
"""

# Entries pending longer than the visibility timeout belong to a dead consumer: move them to
# the tail. KEYS: stream. ARGV: group, consumer, min idle ms, count.
_RECLAIM = """
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], '0-0', 'COUNT', ARGV[4])
local moved = 0
for _, e in ipairs(r[2]) do
  local f, n = e[2], 1
  for j = 1, #f, 2 do if f[j] == 'n' then n = tonumber(f[j + 1]) end end
  redis.call('XACK', KEYS[1], ARGV[1], e[1])
  redis.call('XDEL', KEYS[1], e[1])
  redis.call('XADD', KEYS[1], '*', 'b', f[2], 'n', n + 1)
  moved = moved + 1
end
return moved
"""

# A cancelled consumer's pending entries it never handed over (a read cut by the cancel) go
# back unchanged. KEYS: stream. ARGV: group, consumer, ids handed over...
_ORPHANS = """
local keep = {}
for i = 3, #ARGV do keep[ARGV[i]] = true end
local moved = 0
for _, p in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 10000, ARGV[2])) do
  local id = p[1]
  if not keep[id] then
    local e = redis.call('XRANGE', KEYS[1], id, id)
    redis.call('XACK', KEYS[1], ARGV[1], id)
    redis.call('XDEL', KEYS[1], id)
    if e[1] then
      redis.call('XADD', KEYS[1], '*', unpack(e[1][2]))
      moved = moved + 1
    end
  end
end
if #ARGV == 2 then redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) end
return moved
"""

# KEYS: stream, owner key, list, reverse-binding set. ARGV: prefix, queue.
_DELETE = """
for _, s in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  redis.call('SREM', ARGV[1] .. 'b:' .. s, ARGV[2])
end
return redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
"""


SCRIPTS = {
    "send": _SEND,
    "publish": _PUBLISH,
    "return": _RETURN,
    "dead": _DEAD,
    "reclaim": _RECLAIM,
    "orphans": _ORPHANS,
    "delete": _DELETE,
}
