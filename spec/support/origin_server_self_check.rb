# frozen_string_literal: true

# Plain Ruby self-check for OriginServer (not rspec):
#   ruby spec/support/origin_server_self_check.rb
# Prints one OK line per check; exits non-zero on the first failure.

require_relative "origin_server"
require "net/http"
require "tmpdir"
require "timeout"

$stdout.sync = true

class SelfCheckFailure < StandardError; end

def check(name)
  t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  Timeout.timeout(60) { yield }
  ms = ((Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0) * 1000).round
  puts "OK   #{name} (#{ms} ms)"
rescue Exception => e # rubocop:disable Lint/RescueException
  puts "FAIL #{name}: #{e.class}: #{e.message}"
  puts e.backtrace.first(8).map { |l| "     #{l}" }
  exit 1
end

def assert(cond, msg)
  raise SelfCheckFailure, msg unless cond
end

def assert_eq(expected, actual, what)
  assert(expected == actual, "#{what}: expected #{expected.inspect}, got #{actual.inspect}")
end

# Reads a full response head from a raw socket; returns [status_line, headers(hash of arrays), leftover].
def read_head(sock)
  buf = +"".b
  buf << sock.readpartial(65_536) until buf.include?("\r\n\r\n")
  head, rest = buf.split("\r\n\r\n", 2)
  lines = head.split("\r\n")
  headers = Hash.new { |h, k| h[k] = [] }
  lines[1..].each do |l|
    n, v = l.split(":", 2)
    headers[n.downcase] << v.strip
  end
  [lines[0], headers, rest.b]
end

def read_to_eof(sock)
  out = +"".b
  loop { out << sock.readpartial(65_536) }
rescue EOFError
  out
end

def raw(server)
  TCPSocket.new("127.0.0.1", server.port)
end

server = OriginServer.new.start
at_exit { server.stop }
puts "origin at #{server.url}"

check("keep-alive reuse (Net::HTTP, 5 requests on one connection)") do
  before = server.connections_accepted
  Net::HTTP.start("127.0.0.1", server.port) do |http|
    5.times do |i|
      res = http.get("/bytes?n=#{100 + i}")
      assert_eq "200", res.code, "status"
      assert_eq 100 + i, res.body.bytesize, "body size"
      assert_eq OriginServer.pattern_bytes(100 + i), res.body, "body bytes"
    end
  end
  assert_eq before + 1, server.connections_accepted, "connections accepted"
  assert_eq "/bytes?n=104", server.last_request[:path], "last path"
  assert server.wait_until(timeout: 5) { server.open_connections.zero? }, "connection not closed"
end

check("chunked request upload 5 MiB with digest (raw socket)") do
  total = 5 * 1024 * 1024
  digest = Digest::SHA256.new
  s = raw(server)
  s.write("POST /echo/upload?x=1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nX-Dup: a\r\nx-dup: b\r\n\r\n")
  sent = 0
  sizes = [1, 7, 65_536, 100_000, 3, 262_144]
  i = 0
  while sent < total
    size = [sizes[i % sizes.size], total - sent].min
    data = OriginServer.pattern_bytes(size, sent)
    digest << data
    s.write("#{size.to_s(16)};ext=1\r\n", data, "\r\n")
    sent += size
    i += 1
  end
  s.write("0\r\nX-Trailer: t\r\n\r\n")
  status, headers, rest = read_head(s)
  assert_eq "HTTP/1.1 200 OK", status, "status"
  len = headers["content-length"].first.to_i
  rest << s.readpartial(65_536) while rest.bytesize < len
  json = JSON.parse(rest)
  assert_eq "POST", json["method"], "method"
  assert_eq "/echo/upload?x=1", json["path"], "path"
  assert_eq total, json["body_bytes"], "body_bytes"
  assert_eq digest.hexdigest, json["body_sha256"], "sha"
  assert_eq %w[a b], json["headers"]["x-dup"], "dup headers"
  assert_eq total, server.last_request[:body_bytes], "recorded bytes"
  assert_eq digest.hexdigest, server.last_request[:body_sha256], "recorded sha"
  s.close
end

check("Content-Length request body 3 MiB via Net::HTTP + 100-continue") do
  body = OriginServer.pattern_bytes(3 * 1024 * 1024 + 5)
  Net::HTTP.start("127.0.0.1", server.port) do |http|
    req = Net::HTTP::Put.new("/echo")
    req["Expect"] = "100-continue"
    req["Content-Type"] = "application/octet-stream"
    req.body = body
    res = http.request(req)
    json = JSON.parse(res.body)
    assert_eq body.bytesize, json["body_bytes"], "bytes"
    assert_eq Digest::SHA256.hexdigest(body), json["body_sha256"], "sha"
  end
end

check("/bytes 20 MiB digest (streamed)") do
  n = 20 * 1024 * 1024 + 123
  Net::HTTP.start("127.0.0.1", server.port) do |http|
    http.request_get("/bytes?n=#{n}") do |res|
      assert_eq n.to_s, res["content-length"], "content-length"
      d = Digest::SHA256.new
      count = 0
      res.read_body { |s| d << s; count += s.bytesize }
      assert_eq n, count, "bytes"
      assert_eq OriginServer.expected_sha256(n), d.hexdigest, "sha"
    end
  end
end

check("/chunked digest and chunk sizes") do
  n = 1_000_000
  Net::HTTP.start("127.0.0.1", server.port) do |http|
    res = http.get("/chunked?n=#{n}&chunk=1000")
    assert_eq "chunked", res["transfer-encoding"], "te"
    assert_eq OriginServer.expected_sha256(n), Digest::SHA256.hexdigest(res.body), "sha"
    res = http.get("/chunked?n=200000&chunk=100000")
    assert_eq OriginServer.expected_sha256(200_000), Digest::SHA256.hexdigest(res.body), "sha big chunks"
  end
  s = raw(server)
  s.write("GET /chunked?n=10&chunk=4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
  _, _, rest = read_head(s)
  rest << read_to_eof(s)
  p4 = OriginServer.pattern_bytes(10)
  assert_eq "4\r\n#{p4[0, 4]}\r\n4\r\n#{p4[4, 4]}\r\n2\r\n#{p4[8, 2]}\r\n0\r\n\r\n".b, rest, "raw chunks"
end

check("/headers duplicate Set-Cookie") do
  res = Net::HTTP.get_response(URI("#{server.url}/headers?h=Set-Cookie:a=1&h=Set-Cookie:b=2&h=X-Other:%20v"))
  assert_eq %w[a=1 b=2], res.get_fields("set-cookie"), "set-cookie"
  assert_eq "v", res["x-other"], "x-other"
  assert_eq "ok\n", res.body, "body"
end

check("/status 204, 304, custom reason") do
  Net::HTTP.start("127.0.0.1", server.port) do |http|
    res = http.get("/status?code=204")
    assert_eq "204", res.code, "code"
    assert res.body.nil?, "204 body must be nil"
    res = http.get("/status?code=418&reason=I%27m+a+teapot")
    assert_eq "418", res.code, "code"
    assert_eq "I'm a teapot", res.message, "reason"
    assert_eq "status 418\n", res.body, "body"
    res = http.get("/status?code=304")
    assert_eq "304", res.code, "code"
    assert_eq "11", res["content-length"], "304 content-length"
    res = http.get("/bytes?n=3") # connection still usable after 204/304
    assert_eq 3, res.body.bytesize, "after"
  end
end

check("HEAD keeps headers, no body, connection reusable") do
  before = server.connections_accepted
  Net::HTTP.start("127.0.0.1", server.port) do |http|
    res = http.head("/bytes?n=1000")
    assert_eq "1000", res["content-length"], "cl"
    assert res.body.nil?, "no body"
    res = http.head("/echo")
    assert_eq "application/json", res["content-type"], "ct"
    res = http.get("/bytes?n=10")
    assert_eq 10, res.body.bytesize, "next get"
  end
  assert_eq before + 1, server.connections_accepted, "one connection"
  assert_eq "HEAD", server.requests[-2][:method], "recorded HEAD"
end

check("/truncate (raw): Content-Length N, M bytes, close") do
  s = raw(server)
  s.write("GET /truncate?n=1000&send=300 HTTP/1.1\r\nHost: x\r\n\r\n")
  _, headers, rest = read_head(s)
  assert_eq ["1000"], headers["content-length"], "cl"
  rest << read_to_eof(s)
  assert_eq OriginServer.pattern_bytes(300), rest, "partial body"
  s.close
end

check("/truncate-chunked (raw): no final chunk") do
  s = raw(server)
  s.write("GET /truncate-chunked?send=10&chunk=6 HTTP/1.1\r\nHost: x\r\n\r\n")
  _, headers, rest = read_head(s)
  assert_eq ["chunked"], headers["transfer-encoding"], "te"
  rest << read_to_eof(s)
  p = OriginServer.pattern_bytes(10)
  assert_eq "6\r\n#{p[0, 6]}\r\n4\r\n#{p[6, 4]}\r\n".b, rest, "chunks"
end

check("/conflicting-framing raw bytes") do
  s = raw(server)
  s.write("GET /conflicting-framing HTTP/1.1\r\nHost: x\r\n\r\n")
  all = read_to_eof(s)
  assert_eq "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n" \
            "5\r\nhello\r\n0\r\n\r\n".b, all, "raw"
end

check("/close-delimited, /garbage, /redirect, /huge-headers, /slow, 404") do
  s = raw(server)
  s.write("GET /close-delimited?n=70000 HTTP/1.1\r\nHost: x\r\n\r\n")
  _, headers, rest = read_head(s)
  assert headers["content-length"].empty? && headers["transfer-encoding"].empty?, "no framing"
  assert_eq ["close"], headers["connection"], "connection close"
  rest << read_to_eof(s)
  assert_eq OriginServer.pattern_bytes(70_000), rest, "body"

  s = raw(server)
  s.write("GET /garbage HTTP/1.1\r\nHost: x\r\n\r\n")
  assert_eq "this is not http\r\n\r\n", read_to_eof(s), "garbage"

  res = Net::HTTP.get_response(URI("#{server.url}/redirect?to=http%3A%2F%2Fexample.test%2Fx"))
  assert_eq "302", res.code, "302"
  assert_eq "http://example.test/x", res["location"], "location"

  res = Net::HTTP.get_response(URI("#{server.url}/huge-headers?kb=40"))
  assert_eq 40 * 1024, res["x-huge"].bytesize, "huge header"

  t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  res = Net::HTTP.get_response(URI("#{server.url}/slow?delay=0.3"))
  dt = Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0
  assert_eq "slow done\n", res.body, "slow body"
  assert dt >= 0.3 && dt < 2, "slow timing #{dt}"

  res = Net::HTTP.get_response(URI("#{server.url}/nope"))
  assert_eq "404", res.code, "404"
  assert_eq "not found\n", res.body, "404 body"
end

check("/drip SSE stream") do
  res = Net::HTTP.get_response(URI("#{server.url}/drip?n=3&interval=0.05"))
  assert_eq "text/event-stream", res["content-type"], "ct"
  assert_eq "data: 0\n\ndata: 1\n\ndata: 2\n\n", res.body, "events"
end

check("/reset produces RST") do
  s = raw(server)
  s.write("GET /reset HTTP/1.1\r\nHost: x\r\n\r\n")
  outcome = begin
    s.readpartial(100)
    :data
  rescue Errno::ECONNRESET
    :reset
  rescue EOFError
    :eof
  end
  assert_eq :reset, outcome, "reset outcome"
end

check("peer close detection: /hang, /hang-body, /drip, /slow, idle keep-alive") do
  base = server.peer_closed_count
  routes = ["/hang", "/hang-body?n=1000&send=10", "/drip?n=1000&interval=0.05", "/slow?delay=30"]
  routes.each_with_index do |route, i|
    n = server.request_count
    s = raw(server)
    s.write("GET #{route} HTTP/1.1\r\nHost: x\r\n\r\n")
    assert server.wait_for_requests(n + 1, timeout: 5), "request #{route} not recorded"
    s.close
    assert server.wait_for_closed(base + i + 1, timeout: 5), "peer close not detected for #{route}"
  end
  s = raw(server)
  s.write("GET /bytes?n=1 HTTP/1.1\r\nHost: x\r\n\r\n")
  read_head(s)
  s.close
  assert server.wait_for_closed(base + routes.size + 1, timeout: 5), "idle keep-alive close not detected"
  assert !server.wait_until(timeout: 0.1) { false }, "wait_until should time out"
end

check("open_connections counter") do
  assert server.wait_until(timeout: 5) { server.open_connections.zero? }, "not zero at start"
  socks = Array.new(3) { raw(server) }
  assert server.wait_until(timeout: 5) { server.open_connections == 3 }, "not 3"
  socks.each(&:close)
  assert server.wait_until(timeout: 5) { server.open_connections.zero? }, "not back to zero"
end

check("TLS with generated CA (Net::HTTP ca_file, raw ALPN)") do
  Dir.mktmpdir("origin-ca") do |dir|
    paths = OriginServer.generate_test_ca(dir)
    tls = OriginServer.new(tls: { cert: paths[:cert], key: paths[:key] }).start
    begin
      assert tls.url.start_with?("https://localhost:"), "url"
      uri = URI(tls.url)
      n = 3 * 1024 * 1024 + 17
      before = tls.connections_accepted
      Net::HTTP.start(uri.host, uri.port, use_ssl: true, ca_file: paths[:ca],
                                          verify_mode: OpenSSL::SSL::VERIFY_PEER) do |http|
        res = http.get("/bytes?n=#{n}")
        assert_eq OriginServer.expected_sha256(n), Digest::SHA256.hexdigest(res.body), "tls sha"
        post = Net::HTTP::Post.new("/echo")
        post["Content-Type"] = "application/octet-stream"
        post.body = OriginServer.pattern_bytes(100_000)
        json = JSON.parse(http.request(post).body)
        assert_eq OriginServer.expected_sha256(100_000), json["body_sha256"], "tls upload sha"
      end
      assert_eq before + 1, tls.connections_accepted, "tls keep-alive"

      # by IP, still verified (SAN IP:127.0.0.1)
      Net::HTTP.start("127.0.0.1", uri.port, use_ssl: true, ca_file: paths[:ca],
                                             verify_mode: OpenSSL::SSL::VERIFY_PEER) do |http|
        assert_eq "ok\n", http.get("/headers").body, "tls by ip"
      end

      ctx = OpenSSL::SSL::SSLContext.new
      ctx.ca_file = paths[:ca]
      ctx.verify_mode = OpenSSL::SSL::VERIFY_PEER
      ctx.alpn_protocols = %w[h2 http/1.1]
      sock = TCPSocket.new("127.0.0.1", uri.port)
      ssl = OpenSSL::SSL::SSLSocket.new(sock, ctx)
      ssl.hostname = "localhost"
      ssl.sync_close = true
      ssl.connect
      ssl.post_connection_check("localhost")
      assert_eq "http/1.1", ssl.alpn_protocol, "alpn"
      ssl.write("GET /hang HTTP/1.1\r\nHost: localhost\r\n\r\n")
      assert tls.wait_until(timeout: 5) { tls.last_request && tls.last_request[:path] == "/hang" }, "hang recorded"
      ssl.close
      assert tls.wait_for_closed(1, timeout: 5), "tls peer close detected"

      # Untrusted client must fail and be recorded as a TLS error, not an error.
      failed = begin
        Net::HTTP.start(uri.host, uri.port, use_ssl: true, verify_mode: OpenSSL::SSL::VERIFY_PEER,
                                            cert_store: OpenSSL::X509::Store.new) { |h| h.get("/") }
        false
      rescue OpenSSL::SSL::SSLError
        true
      end
      assert failed, "untrusted verification should fail"
      assert tls.wait_until(timeout: 5) { tls.tls_errors.size >= 1 }, "tls error recorded"
      assert_eq [], tls.errors, "tls server errors"
    ensure
      t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      tls.stop
      assert Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0 < 4, "tls stop too slow"
    end
  end
end

check("stop never hangs with hanging / mid-body / uploading clients") do
  s2 = OriginServer.new.start
  socks = []
  %w[/hang /hang-body?n=100&send=1 /slow?delay=60 /drip?n=100000&interval=1].each do |r|
    s = TCPSocket.new("127.0.0.1", s2.port)
    s.write("GET #{r} HTTP/1.1\r\nHost: x\r\n\r\n")
    socks << s
  end
  up = TCPSocket.new("127.0.0.1", s2.port)
  up.write("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\nabc")
  socks << up
  big = TCPSocket.new("127.0.0.1", s2.port) # never reads a 200 MiB response
  big.write("GET /bytes?n=209715200 HTTP/1.1\r\nHost: x\r\n\r\n")
  socks << big
  assert s2.wait_for_requests(5, timeout: 5), "requests not recorded"
  assert s2.wait_until(timeout: 5) { s2.open_connections == 6 }, "open connections"
  t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  s2.stop
  dt = Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0
  assert dt < 1.5, "stop took #{dt}s"
  assert_eq 0, s2.open_connections, "open after stop"
  assert_eq 0, s2.peer_closed_count, "stop-initiated closes are not peer closes"
  assert_eq [], s2.errors, "errors"
  socks.each(&:close)
end

check("bad request is answered 400 and recorded in errors") do
  s3 = OriginServer.new.start
  s = TCPSocket.new("127.0.0.1", s3.port)
  s.write("NOT A VALID REQUEST LINE\r\n\r\n")
  status, = read_head(s)
  assert_eq "HTTP/1.1 400 Bad Request", status, "400"
  assert s3.wait_until(timeout: 5) { s3.errors.size == 1 }, "error recorded"
  s3.stop
end

check("no unexpected errors on main server") do
  assert_eq [], server.errors, "errors"
end

t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
server.stop
dt = Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0
abort "FAIL stop took #{dt}s" if dt > 2
puts "OK   stop (#{(dt * 1000).round} ms)"
puts "ALL OK"
