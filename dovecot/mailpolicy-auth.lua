-- mailpolicy-auth.lua: Dovecot Lua passdb + userdb that asks the mailpolicy daemon.
--
-- The same AUTH / USER verbs as hooks/checkpassword (docs/auth.md), over the daemon's auth
-- socket, but inside Dovecot's auth-worker processes: no fork and no interpreter start per
-- login. On Dovecot 2.4 (which dropped checkpassword) this is the only way in.
--
-- Configuration: dovecot/auth-lua.conf.ext (passdb/userdb { driver = lua  args = file=...
-- blocking=yes }). blocking=yes matters: the socket I/O below blocks, so it must run in an
-- auth-worker process, never in the main auth process (which would serialise every login and
-- hang all of them while the daemon hangs).
--
-- Socket path, first found wins:
--   * Dovecot 2.4: `socket` in the script's settings (script_init / auth_passdb_init /
--     auth_userdb_init get a table of them);
--   * MAILPOLICY_AUTH_SOCKET in the environment (Dovecot 2.3 passes nothing from `args` but
--     file= and blocking= to the script, so: import_environment =
--     $import_environment MAILPOLICY_AUTH_SOCKET=/run/mailpolicy/auth.sock; a restart, not a
--     reload, changes it);
--   * /run/mailpolicy/auth.sock.
-- MAILPOLICY_AUTH_TIMEOUT (seconds, default 10) bounds one request, connect to last byte.
--
-- Protocol (one request per connection: write the line, shut down our write side, read to
-- EOF; values standard base64, empty for empty):
--   AUTH user=<b64> pass=<b64> service=<b64> ip=<ip or empty>   password login
--   USER user=<b64> service=<b64>                               lookup without password
-- Replies and what they become here (exactly what the hook's exit codes mean):
--   OK user=<b64> home=<b64> [more]   PASSDB_RESULT_OK / USERDB_RESULT_OK, fields user, home
--                                     (passdb: also userdb_home, for `userdb prefetch`)
--   FAIL <text>      (AUTH only)      PASSDB_RESULT_PASSWORD_MISMATCH; unknown users too: the
--                                     daemon does not tell them apart, on purpose
--   NOTFOUND         (USER only)      USERDB_RESULT_USER_UNKNOWN
--   anything else                     *_INTERNAL_FAILURE (a temporary failure for the client):
--     DEFER, an empty, multi-line, CR-carrying or over-long (> 4096 bytes) reply, a verb that
--     does not fit the request, OK without user or home, bad base64, a control character
--     (TAB included) in user or home, a home that is not absolute or has '..' components,
--     no socket, refused, timeout, any Lua error. Never a wrong password for our trouble.
-- One log line (auth: Error: ... mailpolicy-auth: ...) for trouble; never the password.
--
-- Base64 is a small local function, not lua-basexx: Debian 12 packages lua-basexx for Lua 5.1
-- and 5.2 only, and Dovecot 2.3.19's auth plugin is linked against Lua 5.4. The socket is
-- LuaSocket's socket.unix (Debian lua-socket, built for 5.4).

local unix = require("socket.unix")
local socket_core = require("socket")

local DEFAULT_SOCKET = "/run/mailpolicy/auth.sock"
local DEFAULT_TIMEOUT = 10.0
local MAX_REPLY = 4096

local socket_path = os.getenv("MAILPOLICY_AUTH_SOCKET")
if socket_path == nil or socket_path == "" then
  socket_path = DEFAULT_SOCKET
end
local timeout = tonumber(os.getenv("MAILPOLICY_AUTH_TIMEOUT") or "") or DEFAULT_TIMEOUT
if not (timeout > 0) then
  timeout = DEFAULT_TIMEOUT
end

-- Dovecot 2.4 hands settings to the script; 2.3 calls script_init() without arguments.
local function take_settings(args)
  if type(args) == "table" then
    if type(args.socket) == "string" and args.socket ~= "" then
      socket_path = args.socket
    end
    local t = tonumber(args.timeout or "")
    if t ~= nil and t > 0 then
      timeout = t
    end
  end
end

function script_init(args)
  take_settings(args)
  return 0
end

function auth_passdb_init(args)
  take_settings(args)
end

function auth_userdb_init(args)
  take_settings(args)
end

-- base64 ------------------------------------------------------------------------------------

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local B64_VALUE = {}
for i = 1, 64 do
  B64_VALUE[B64:byte(i)] = i - 1
end

local function b64encode(s)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local n = (a << 16) | ((b or 0) << 8) | (c or 0)
    local q1, q2 = (n >> 18) & 63, (n >> 12) & 63
    local q3, q4 = (n >> 6) & 63, n & 63
    out[#out + 1] = B64:sub(q1 + 1, q1 + 1) .. B64:sub(q2 + 1, q2 + 1)
      .. (b and B64:sub(q3 + 1, q3 + 1) or "=") .. (c and B64:sub(q4 + 1, q4 + 1) or "=")
  end
  return table.concat(out)
end

-- Strict: only the alphabet, length a multiple of 4, '=' only as padding, no stray bits.
local function b64decode(s)
  if #s % 4 ~= 0 then
    return nil
  end
  local out = {}
  for i = 1, #s, 4 do
    local c1, c2, c3, c4 = s:byte(i, i + 3)
    local v1, v2 = B64_VALUE[c1], B64_VALUE[c2]
    local last = i + 3 == #s
    local pad3, pad4 = c3 == 61, c4 == 61
    local v3 = pad3 and 0 or B64_VALUE[c3]
    local v4 = pad4 and 0 or B64_VALUE[c4]
    if v1 == nil or v2 == nil or v3 == nil or v4 == nil then
      return nil
    end
    if (pad3 or pad4) and not last then
      return nil
    end
    if pad3 and not pad4 then
      return nil
    end
    local n = (v1 << 18) | (v2 << 12) | (v3 << 6) | v4
    if pad3 then
      if n & 0xFFFF ~= 0 then
        return nil
      end
      out[#out + 1] = string.char(n >> 16)
    elseif pad4 then
      if n & 0xFF ~= 0 then
        return nil
      end
      out[#out + 1] = string.char(n >> 16, (n >> 8) & 255)
    else
      out[#out + 1] = string.char(n >> 16, (n >> 8) & 255, n & 255)
    end
  end
  return table.concat(out)
end

-- talking to the daemon -----------------------------------------------------------------------

-- Printable ASCII only, bounded: for log lines (user names, reply text).
local function clean(text, limit)
  text = tostring(text or ""):sub(1, limit or 200)
  return (text:gsub("[^\32-\126]", "?"))
end

-- One request; returns the reply (string) or nil, reason.
local function ask(line)
  local deadline = socket_core.gettime() + timeout
  local sock, err = unix.stream and unix.stream() or unix()
  if sock == nil then
    return nil, "cannot make a socket: " .. tostring(err)
  end
  local function remaining()
    local left = deadline - socket_core.gettime()
    if left <= 0 then
      return false
    end
    sock:settimeout(left)
    return true
  end
  local function fail(reason)
    sock:close()
    if reason == "timeout" then
      return nil, "daemon did not answer in time"
    end
    return nil, "daemon socket " .. clean(socket_path) .. ": " .. tostring(reason)
  end
  if not remaining() then
    return fail("timeout")
  end
  local ok
  ok, err = sock:connect(socket_path)
  if ok == nil then
    return fail(err)
  end
  if not remaining() then
    return fail("timeout")
  end
  ok, err = sock:send(line)
  if ok == nil then
    return fail(err)
  end
  sock:shutdown("send")
  local chunks, size = {}, 0
  while true do
    if not remaining() then
      return fail("timeout")
    end
    local data, rerr, partial = sock:receive(MAX_REPLY + 1 - size)
    data = data or partial
    if data ~= nil and #data > 0 then
      chunks[#chunks + 1] = data
      size = size + #data
      if size > MAX_REPLY then
        sock:close()
        return nil, "reply longer than " .. MAX_REPLY .. " bytes"
      end
    end
    if rerr == "closed" then
      break
    elseif rerr ~= nil then
      return fail(rerr)
    end
  end
  sock:close()
  return table.concat(chunks)
end

local function split_spaces(s)
  local words = {}
  local start = 1
  while true do
    local i = s:find(" ", start, true)
    if i == nil then
      words[#words + 1] = s:sub(start)
      return words
    end
    words[#words + 1] = s:sub(start, i - 1)
    start = i + 1
  end
end

local function has_control(s)
  return s:find("[%z\1-\31\127]") ~= nil
end

-- The fields of an OK: user, home; or nil, reason.
local function parse_ok(words)
  local fields = {}
  for i = 2, #words do
    local key, value = words[i]:match("^([^=]+)=(.*)$")
    if key == nil then
      return nil, "OK with a field that is not key=value"
    end
    if fields[key] ~= nil then
      return nil, "OK with " .. clean(key, 40) .. " twice"
    end
    fields[key] = value
  end
  if fields.user == nil or fields.home == nil then
    return nil, "OK without user or home"
  end
  local user, home = b64decode(fields.user), b64decode(fields.home)
  if user == nil or home == nil then
    return nil, "OK with bad base64 in user or home"
  end
  if has_control(user) or has_control(home) then
    return nil, "OK with a control character in user or home"
  end
  if user == "" then
    return nil, "OK with an empty user"
  end
  if home:sub(1, 1) ~= "/" then
    return nil, "OK with a home that is not an absolute path without '..'"
  end
  for part in home:gmatch("[^/]+") do
    if part == ".." then
      return nil, "OK with a home that is not an absolute path without '..'"
    end
  end
  return { user = user, home = home }
end

-- Ask and classify: "OK", fields | "FAIL" | "NOTFOUND" | nil, reason (trouble).
local function query(line, lookup, who)
  local reply, err = ask(line)
  if reply == nil then
    return nil, err
  end
  if reply == "" then
    return nil, "empty reply from the daemon for " .. who
  end
  if reply:sub(-1) ~= "\n" or reply:sub(1, -2):find("[\r\n]") then
    return nil, "reply for " .. who .. " is not one LF-terminated line"
  end
  local words = split_spaces(reply:sub(1, -2))
  local verb = words[1]
  if verb == "OK" then
    local fields, why = parse_ok(words)
    if fields == nil then
      return nil, why .. " for " .. who
    end
    return "OK", fields
  end
  if verb == "FAIL" and not lookup then
    return "FAIL"
  end
  if verb == "NOTFOUND" and lookup and #words == 1 then
    return "NOTFOUND"
  end
  if verb == "DEFER" then
    return nil, "daemon deferred " .. who .. ": " .. clean(reply:sub(7, -2))
  end
  return nil, "unexpected reply for " .. who .. ": " .. clean(reply:sub(1, -2), 80)
end

local function remote_ip(req)
  local ip = req.remote_ip or ""
  if #ip > 45 or ip:find("[^0-9a-fA-F.:]") then
    return nil
  end
  return ip
end

local function trouble(req, reason)
  req:log_error("mailpolicy-auth: " .. reason)
end

-- Dovecot entry points ----------------------------------------------------------------------

local PASSDB = dovecot.auth

-- Password login (passdb { driver = lua }): AUTH.
function auth_password_verify(req, pass)
  local user = req.user or ""
  local who = clean(user, 100)
  if user == "" then
    trouble(req, "empty user name")
    return PASSDB.PASSDB_RESULT_INTERNAL_FAILURE, ""
  end
  local ip = remote_ip(req)
  if ip == nil then
    trouble(req, "remote address " .. clean(req.remote_ip, 60) .. " is not an IP address")
    return PASSDB.PASSDB_RESULT_INTERNAL_FAILURE, ""
  end
  local line = "AUTH user=" .. b64encode(user) .. " pass=" .. b64encode(pass or "")
    .. " service=" .. b64encode(req.service or "") .. " ip=" .. ip .. "\n"
  local verdict, fields = query(line, false, who)
  line = nil -- carries the password
  if verdict == "OK" then
    -- user: Dovecot takes the canonical name from here on; userdb_home feeds `prefetch`.
    return PASSDB.PASSDB_RESULT_OK, { user = fields.user, userdb_home = fields.home }
  elseif verdict == "FAIL" then
    return PASSDB.PASSDB_RESULT_PASSWORD_MISMATCH, ""
  end
  trouble(req, fields)
  return PASSDB.PASSDB_RESULT_INTERNAL_FAILURE, ""
end

local function lookup(req)
  local user = req.user or ""
  local who = clean(user, 100)
  if user == "" then
    return nil, "empty user name"
  end
  local line = "USER user=" .. b64encode(user) .. " service=" .. b64encode(req.service or "")
    .. "\n"
  local verdict, fields = query(line, true, who)
  if verdict == nil then
    return nil, fields
  end
  return verdict, fields
end

-- userdb { driver = lua }: USER (LMTP delivery, doveadm user, logins after prefetch missed).
function auth_userdb_lookup(req)
  local verdict, fields = lookup(req)
  if verdict == "OK" then
    return PASSDB.USERDB_RESULT_OK, { user = fields.user, home = fields.home }
  elseif verdict == "NOTFOUND" then
    return PASSDB.USERDB_RESULT_USER_UNKNOWN, ""
  end
  trouble(req, fields)
  return PASSDB.USERDB_RESULT_INTERNAL_FAILURE, ""
end
