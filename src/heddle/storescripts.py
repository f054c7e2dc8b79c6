"""The Lua scripts of the result store (:mod:`heddle.store` says what each one keeps true).

They take a worker's whole batch (every key in KEYS), so a batch costs one command
to encode, send and parse instead of one per task.
"""

from __future__ import annotations

from typing import Final

from heddle import names

# A final record larger than this is announced on Valkey by its key: the waiter reads it.
NOTICE_MAX_BYTES: Final = 256 * 1024

_FINAL = "st == 'SUCCESS' or st == 'FAILURE' or st == 'REVOKED'"
# Where a result key's task id starts (Lua counts from 1).
_ID_AT = len(names.RESULT_KEY_PREFIX) + 1

# A claim's token: the server's clock in microseconds, above the task's last token
# (tostring would print a float this large in exponent form; %d keeps every digit).
CLAIM_LUA = f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {{}}
for i, key in ipairs(KEYS) do
  local h = redis.call('HMGET', key, 'state', 'retries', 'fence')
  local st = h[1]
  if {_FINAL} then
    out[i] = {{st, redis.call('HGET', key, 'record') or '', 0, '0'}}
  else
    local retries = tonumber(h[2] or '0')
    local token = math.max(now, tonumber(h[3] or '0') + 1)
    local fence = string.format('%d', token)
    redis.call('HSET', key, 'state', 'STARTED', 'started_at', ARGV[1], 'worker', ARGV[2], 'fence', fence)
    redis.call('EXPIRE', key, ARGV[3])
    out[i] = {{st or '', '', retries, fence}}
  end
end
return out
"""

# ARGV: ttl, then state, record, retries ('' = unchanged), token ('' = none), notice
# channel ('' = none) for each key. Per key: 1 written (or already written by this
# token), 0 a final state is stored, -1 fenced off (a newer claim's state is stored).
# The EXPIRE on every path is a write, so a WAIT after this script also covers a final
# state found stored. A final state written is announced on the key's channel and on
# the task's own channel (names.task_notice_channel: the key's task id after the task
# channel prefix), in the same script: its record, or the key itself when the record
# is too large to announce.
STORE_LUA = f"""
local out = {{}}
for i, key in ipairs(KEYS) do
  local a = 2 + (i - 1) * 5
  local token = ARGV[a + 3]
  local h = redis.call('HMGET', key, 'state', 'wfence')
  local st = h[1]
  local held = tonumber(h[2] or '0')
  if {_FINAL} then
    if token ~= '' and tonumber(token) == held then out[i] = 1 else out[i] = 0 end
    redis.call('EXPIRE', key, ARGV[1])
  elseif token ~= '' and tonumber(token) < held and ARGV[a] ~= 'SUCCESS' and ARGV[a] ~= 'FAILURE' then
    out[i] = -1
    redis.call('EXPIRE', key, ARGV[1])
  else
    local fields = {{'state', ARGV[a], 'record', ARGV[a + 1]}}
    if ARGV[a + 2] ~= '' then
      fields[#fields + 1] = 'retries'
      fields[#fields + 1] = ARGV[a + 2]
    end
    if token ~= '' then
      fields[#fields + 1] = 'wfence'
      fields[#fields + 1] = token
    end
    redis.call('HSET', key, unpack(fields))
    redis.call('EXPIRE', key, ARGV[1])
    out[i] = 1
    local channel = ARGV[a + 4]
    if channel ~= '' and (ARGV[a] == 'SUCCESS' or ARGV[a] == 'FAILURE' or ARGV[a] == 'REVOKED') then
      local notice = key
      if #ARGV[a + 1] <= {NOTICE_MAX_BYTES} then notice = ARGV[a + 1] end
      redis.call('PUBLISH', channel, notice)
      redis.call('PUBLISH', '{names.TASK_NOTICE_CHANNEL_PREFIX}' .. string.sub(key, {_ID_AT}), notice)
    end
  end
end
return out
"""


# The final records among KEYS, as a flat list of (index, record) pairs: waiting
# handles read many at once without a command each.
FINAL_RECORDS_LUA = f"""
local out = {{}}
for i, key in ipairs(KEYS) do
  local st = redis.call('HGET', key, 'state')
  if {_FINAL} then
    out[#out + 1] = i
    out[#out + 1] = redis.call('HGET', key, 'record') or ''
  end
end
return out
"""
