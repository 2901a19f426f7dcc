# frozen_string_literal: true

require "socket"
require "openssl"
require "digest"
require "json"
require "uri"
require "io/wait"
require "monitor"
require "fileutils"

# A real HTTP/1.1 origin server on 127.0.0.1 used by the integration specs and
# the demo. It serves deterministic payloads and can misbehave on purpose
# (truncated bodies, hangs, resets, garbage, conflicting framing...).
#
#   server = OriginServer.new.start
#   server.url            # => "http://127.0.0.1:PORT"
#   server.wait_until { server.peer_closed_count >= 1 }
#   server.stop
#
# Everything is thread-safe; all counters are guarded by one Monitor and every
# change broadcasts on one condition variable, which is what #wait_until
# waits on (no sleep-polling).
class OriginServer
  CHUNK_SIZE = 65_536
  PATTERN = (0...CHUNK_SIZE).map { |i| (i * 7 + 3) % 256 }.pack("C*").freeze
  MAX_LINE = 64 * 1024
  MAX_HEADER_BYTES = 1024 * 1024
  EMPTY_SHA256 = Digest::SHA256.hexdigest("").freeze

  REASONS = {
    100 => "Continue", 200 => "OK", 201 => "Created", 202 => "Accepted",
    204 => "No Content", 206 => "Partial Content",
    301 => "Moved Permanently", 302 => "Found", 303 => "See Other",
    304 => "Not Modified", 307 => "Temporary Redirect", 308 => "Permanent Redirect",
    400 => "Bad Request", 401 => "Unauthorized", 403 => "Forbidden",
    404 => "Not Found", 405 => "Method Not Allowed", 408 => "Request Timeout",
    413 => "Payload Too Large", 429 => "Too Many Requests",
    500 => "Internal Server Error", 501 => "Not Implemented", 502 => "Bad Gateway",
    503 => "Service Unavailable", 504 => "Gateway Timeout"
  }.freeze

  # Raised internally when the client side went away (EOF, EPIPE, ECONNRESET).
  class PeerClosed < StandardError; end
  # Raised internally when the request cannot be parsed.
  class BadRequest < StandardError; end

  # Per-connection state: the raw TCP socket, the (possibly TLS) IO and a
  # binary read buffer.
  class Connection
    attr_reader :raw, :id
    attr_accessor :io, :peer_closed

    def initialize(raw, id)
      @raw = raw
      @io = raw
      @id = id
      @buf = String.new(capacity: CHUNK_SIZE, encoding: Encoding::BINARY)
      @peer_closed = false
    end

    def tls?
      !@io.equal?(@raw)
    end

    def buffered?
      !@buf.empty?
    end

    # Reads one line (without the trailing CRLF/LF). Returns nil on a clean
    # EOF before any byte when allow_eof is true.
    def read_line(allow_eof: false, limit: MAX_LINE)
      loop do
        idx = @buf.index("\n")
        if idx
          line = @buf.slice!(0, idx + 1)
          line.chomp!("\n")
          line.chomp!("\r")
          return line
        end
        raise BadRequest, "line too long" if @buf.bytesize > limit

        unless fill
          return nil if allow_eof && @buf.empty?

          raise PeerClosed, "EOF while reading line"
        end
      end
    end

    # Streams exactly n bytes, yielding binary slices.
    def read_exact(n)
      while n.positive?
        if @buf.empty?
          data = read_some([n, CHUNK_SIZE].min)
          raise PeerClosed, "EOF in body (#{n} bytes missing)" if data.nil?

          n -= data.bytesize
          yield data
        else
          take = [n, @buf.bytesize].min
          slice = @buf.slice!(0, take)
          n -= take
          yield slice
        end
      end
    end

    # Reads whatever is available without blocking; raises PeerClosed on EOF.
    # Returns true if data was buffered.
    def drain_nonblock
      got = false
      loop do
        data = map_errors { @io.read_nonblock(CHUNK_SIZE, exception: false) }
        case data
        when nil then raise PeerClosed, "EOF while idle"
        when :wait_readable, :wait_writable then return got
        else
          @buf << data
          got = true
        end
      end
    end

    # Blocks until the socket is readable (or TLS has pending data) or the
    # timeout expires. Returns truthy when readable.
    def wait_readable(timeout)
      return true if tls? && @io.pending.positive?

      @raw.wait_readable(timeout)
    end

    def write(str)
      map_errors { @io.write(str) }
      nil
    end

    def close
      if tls?
        begin
          @io.sync_close = true
          @io.close
        rescue StandardError
          nil
        end
      end
      @raw.close unless @raw.closed?
    rescue StandardError
      nil
    end

    private

    def fill
      data = read_some(CHUNK_SIZE)
      return false if data.nil?

      @buf << data
      true
    end

    def read_some(max)
      data = map_errors { @io.readpartial(max) }
      data.force_encoding(Encoding::BINARY)
    rescue EOFError
      nil
    end

    def map_errors
      yield
    rescue EOFError
      raise
    rescue Errno::EPIPE, Errno::ECONNRESET, Errno::ECONNABORTED, Errno::ENOTCONN,
           Errno::ESHUTDOWN, OpenSSL::SSL::SSLError => e
      raise PeerClosed, "#{e.class}: #{e.message}"
    end
  end

  # ---------------------------------------------------------------- class API

  def self.pattern_chunk
    PATTERN
  end

  # The first n bytes of the repeating pattern (builds the string; use for
  # small n only).
  def self.pattern_bytes(n, offset = 0)
    out = String.new(capacity: n, encoding: Encoding::BINARY)
    each_pattern_slice(offset, n) { |s| out << s }
    out
  end

  # Yields consecutive slices (each <= 64 KiB) of the pattern stream,
  # starting at byte `offset`, `len` bytes in total.
  def self.each_pattern_slice(offset, len)
    while len.positive?
      start = offset % CHUNK_SIZE
      take = [CHUNK_SIZE - start, len].min
      yield PATTERN.byteslice(start, take)
      offset += take
      len -= take
    end
  end

  # SHA-256 (hex) of the body served by /bytes?n=N, computed in 64 KiB steps.
  def self.expected_sha256(n)
    d = Digest::SHA256.new
    full, rest = n.divmod(CHUNK_SIZE)
    full.times { d.update(PATTERN) }
    d.update(PATTERN.byteslice(0, rest)) if rest.positive?
    d.hexdigest
  end

  # Creates a throw-away CA and a server certificate for localhost/127.0.0.1
  # signed by it. Returns { ca:, ca_key:, cert:, key: } (PEM file paths).
  def self.generate_test_ca(dir)
    FileUtils.mkdir_p(dir)
    now = Time.now

    ca_key = OpenSSL::PKey::RSA.new(2048)
    ca = OpenSSL::X509::Certificate.new
    ca.version = 2
    ca.serial = OpenSSL::BN.rand(63)
    ca.subject = OpenSSL::X509::Name.parse("/CN=threaded-proxy test CA")
    ca.issuer = ca.subject
    ca.public_key = ca_key
    ca.not_before = now - 3600
    ca.not_after = now + (365 * 24 * 3600)
    ef = OpenSSL::X509::ExtensionFactory.new
    ef.subject_certificate = ca
    ef.issuer_certificate = ca
    ca.add_extension(ef.create_extension("basicConstraints", "CA:TRUE", true))
    ca.add_extension(ef.create_extension("keyUsage", "keyCertSign,cRLSign,digitalSignature", true))
    ca.add_extension(ef.create_extension("subjectKeyIdentifier", "hash", false))
    ca.add_extension(ef.create_extension("authorityKeyIdentifier", "keyid:always", false))
    ca.sign(ca_key, OpenSSL::Digest.new("SHA256"))

    key = OpenSSL::PKey::RSA.new(2048)
    cert = OpenSSL::X509::Certificate.new
    cert.version = 2
    cert.serial = OpenSSL::BN.rand(63)
    cert.subject = OpenSSL::X509::Name.parse("/CN=localhost")
    cert.issuer = ca.subject
    cert.public_key = key
    cert.not_before = now - 3600
    cert.not_after = now + (365 * 24 * 3600)
    ef = OpenSSL::X509::ExtensionFactory.new
    ef.subject_certificate = cert
    ef.issuer_certificate = ca
    cert.add_extension(ef.create_extension("basicConstraints", "CA:FALSE", true))
    cert.add_extension(ef.create_extension("keyUsage", "digitalSignature,keyEncipherment", true))
    cert.add_extension(ef.create_extension("extendedKeyUsage", "serverAuth", false))
    cert.add_extension(ef.create_extension("subjectAltName", "DNS:localhost,IP:127.0.0.1", false))
    cert.add_extension(ef.create_extension("subjectKeyIdentifier", "hash", false))
    cert.add_extension(ef.create_extension("authorityKeyIdentifier", "keyid:always", false))
    cert.sign(ca_key, OpenSSL::Digest.new("SHA256"))

    paths = {
      ca: File.join(dir, "ca.pem"),
      ca_key: File.join(dir, "ca.key"),
      cert: File.join(dir, "server.pem"),
      key: File.join(dir, "server.key")
    }
    File.binwrite(paths[:ca], ca.to_pem)
    File.binwrite(paths[:ca_key], ca_key.to_pem)
    File.binwrite(paths[:cert], cert.to_pem)
    File.binwrite(paths[:key], key.to_pem)
    File.chmod(0o600, paths[:ca_key], paths[:key])
    paths
  end

  # --------------------------------------------------------------- lifecycle

  attr_reader :port

  # `port` 0 picks a free one; a fixed one brings an origin up where
  # requests have been failing.
  def initialize(tls: nil, port: 0)
    @tls = tls
    @listen_port = port
    @mon = Monitor.new
    @cond = @mon.new_cond
    @listener = nil
    @port = nil
    @accept_thread = nil
    @threads = []
    @clients = {} # raw socket => Connection
    @next_conn_id = 0
    @started = false
    @stopped = false
    @connections_accepted = 0
    @peer_closed_count = 0
    @requests = []
    @errors = []
    @tls_errors = []
    @ssl_context = build_ssl_context(tls) if tls
  end

  def start
    @mon.synchronize do
      raise "OriginServer already started" if @started

      @started = true
    end
    @listener = TCPServer.new("127.0.0.1", @listen_port)
    @port = @listener.addr[1]
    @accept_thread = Thread.new { accept_loop }
    @accept_thread.report_on_exception = false
    self
  end

  def tls?
    !@tls.nil?
  end

  def url
    tls? ? "https://localhost:#{@port}" : "http://127.0.0.1:#{@port}"
  end

  def host
    tls? ? "localhost" : "127.0.0.1"
  end

  def stopped?
    @mon.synchronize { @stopped }
  end

  # Closes the listener and every open client socket, then joins all threads
  # (bounded by `timeout`, stragglers are killed). Never hangs; idempotent.
  def stop(timeout: 3)
    clients = nil
    @mon.synchronize do
      return self if @stopped

      @stopped = true
      clients = @clients.keys
      @cond.broadcast
    end

    if @listener
      begin
        @listener.close
      rescue StandardError
        nil
      end
    end

    clients.each do |raw|
      begin
        raw.shutdown(Socket::SHUT_RDWR)
      rescue StandardError
        nil
      end
      begin
        raw.close
      rescue StandardError
        nil
      end
    end

    threads = @mon.synchronize { @threads.dup }
    threads << @accept_thread if @accept_thread
    deadline = monotonic + timeout
    threads.each do |t|
      remaining = deadline - monotonic
      t.join([remaining, 0].max)
    end
    threads.select(&:alive?).each do |t|
      t.kill
      t.join(0.5)
    end
    self
  end

  # ---------------------------------------------------------- instrumentation

  def connections_accepted
    @mon.synchronize { @connections_accepted }
  end

  def open_connections
    @mon.synchronize { @clients.size }
  end

  def peer_closed_count
    @mon.synchronize { @peer_closed_count }
  end

  # Snapshot of all recorded requests, oldest first. Each is a Hash:
  # { method:, path: (request-target incl. query), headers: {name => [values]},
  #   body_bytes:, body_sha256: }
  def requests
    @mon.synchronize { @requests.dup }
  end

  def last_request
    @mon.synchronize { @requests.last }
  end

  def request_count
    @mon.synchronize { @requests.size }
  end

  # Unexpected exceptions raised in connection threads (should stay empty).
  def errors
    @mon.synchronize { @errors.dup }
  end

  # TLS handshake failures (expected e.g. when a client rejects the cert).
  def tls_errors
    @mon.synchronize { @tls_errors.dup }
  end

  # Waits (on the condition variable, no polling) until the block returns
  # truthy. The block is evaluated while holding the (reentrant) monitor, so
  # it may call any instrumentation method. Returns true/false.
  def wait_until(timeout: 5)
    raise ArgumentError, "block required" unless block_given?

    deadline = monotonic + timeout
    @mon.synchronize do
      loop do
        return true if yield
        remaining = deadline - monotonic
        return false if remaining <= 0

        @cond.wait(remaining)
      end
    end
  end

  # Integer: waits until peer_closed_count >= n. Proc: waits until it
  # returns truthy (called with the server).
  def wait_for_closed(count_or_predicate = 1, timeout: 5)
    if count_or_predicate.respond_to?(:call)
      wait_until(timeout: timeout) { count_or_predicate.call(self) }
    else
      wait_until(timeout: timeout) { @peer_closed_count >= count_or_predicate }
    end
  end

  def wait_for_requests(count, timeout: 5)
    wait_until(timeout: timeout) { @requests.size >= count }
  end

  def wait_for_connections(count, timeout: 5)
    wait_until(timeout: timeout) { @connections_accepted >= count }
  end

  def wait_for_open_connections(count, timeout: 5)
    wait_until(timeout: timeout) { @clients.size == count }
  end

  private

  def monotonic
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end

  def changed
    @mon.synchronize { yield if block_given?; @cond.broadcast }
  end

  def build_ssl_context(tls)
    ctx = OpenSSL::SSL::SSLContext.new
    ctx.cert = OpenSSL::X509::Certificate.new(File.binread(tls.fetch(:cert)))
    ctx.key = OpenSSL::PKey.read(File.binread(tls.fetch(:key)))
    ctx.alpn_protocols = ["http/1.1"]
    ctx.alpn_select_cb = ->(protos) { protos.include?("http/1.1") ? "http/1.1" : nil }
    ctx.min_version = OpenSSL::SSL::TLS1_2_VERSION
    ctx
  end

  def record_error(err)
    changed { @errors << err }
  end

  def accept_loop
    loop do
      raw = begin
        @listener.accept
      rescue IOError, Errno::EBADF, Errno::EINVAL
        break if stopped?

        raise
      rescue Errno::ECONNABORTED, Errno::EMFILE, Errno::ENFILE, Errno::EPROTO => e
        record_error(e) unless e.is_a?(Errno::ECONNABORTED)
        next
      end

      conn = nil
      @mon.synchronize do
        if @stopped
          raw.close
          return
        end
        @connections_accepted += 1
        @next_conn_id += 1
        conn = Connection.new(raw, @next_conn_id)
        @clients[raw] = conn
        @threads.select!(&:alive?)
        t = Thread.new(conn) { |c| connection_thread(c) }
        t.report_on_exception = false
        @threads << t
        @cond.broadcast
      end
    end
  rescue StandardError => e
    record_error(e) unless stopped?
  end

  def connection_thread(conn)
    begin
      conn.raw.setsockopt(Socket::IPPROTO_TCP, Socket::TCP_NODELAY, 1)
    rescue StandardError
      nil
    end
    return unless tls_handshake(conn)

    serve(conn)
  rescue PeerClosed, EOFError
    note_peer_closed(conn)
  rescue IOError, Errno::EBADF, SystemCallError => e
    record_error(e) unless stopped?
  rescue StandardError => e
    record_error(e) unless stopped?
  ensure
    conn.close
    changed { @clients.delete(conn.raw) }
  end

  def tls_handshake(conn)
    return true unless @ssl_context

    ssl = OpenSSL::SSL::SSLSocket.new(conn.raw, @ssl_context)
    ssl.sync_close = true
    begin
      ssl.accept
    rescue OpenSSL::SSL::SSLError, SystemCallError, IOError, EOFError => e
      changed { @tls_errors << e } unless stopped?
      return false
    end
    conn.io = ssl
    true
  end

  def note_peer_closed(conn)
    return if stopped?

    changed do
      unless conn.peer_closed
        conn.peer_closed = true
        @peer_closed_count += 1
      end
    end
  end

  # Keep-alive loop: one request after another until someone closes.
  def serve(conn)
    loop do
      req = begin
        read_request(conn)
      rescue BadRequest => e
        record_error(e)
        send_simple(conn, 400, "Bad Request", "bad request\n", head: false, keep: false)
        return
      end
      if req.nil?
        # Clean EOF between requests: the client closed the connection.
        raise PeerClosed, "EOF between requests"
      end

      keep = dispatch(conn, req)
      return unless keep
    end
  end

  # ---------------------------------------------------------- request parsing

  def utf8(str)
    s = str.dup.force_encoding(Encoding::UTF_8)
    s.valid_encoding? ? s : s.scrub("?")
  end

  def read_request(conn)
    line = conn.read_line(allow_eof: true)
    return nil if line.nil?

    # Tolerate stray empty lines before a request (RFC 9112 §2.2).
    while line.empty?
      line = conn.read_line(allow_eof: true)
      return nil if line.nil?
    end

    parts = line.split(" ")
    raise BadRequest, "bad request line: #{utf8(line).inspect}" unless parts.size == 3

    method, target, version = parts
    unless version =~ %r{\AHTTP/1\.[01]\z} && method =~ /\A[A-Z!#$%&'*+.^_`|~0-9-]+\z/i
      raise BadRequest, "bad request line: #{utf8(line).inspect}"
    end

    headers = {}
    total = 0
    loop do
      hl = conn.read_line
      break if hl.empty?

      total += hl.bytesize
      raise BadRequest, "headers too large" if total > MAX_HEADER_BYTES

      name, value = hl.split(":", 2)
      raise BadRequest, "bad header line: #{utf8(hl).inspect}" if value.nil? || name.empty? || name =~ /\s/

      (headers[utf8(name).downcase] ||= []) << utf8(value.strip)
    end

    req = {
      method: utf8(method),
      path: utf8(target),
      version: version,
      headers: headers
    }

    digest = Digest::SHA256.new
    bytes = 0
    framing = request_body_framing(headers)
    if framing != 0 && expects_continue?(headers)
      conn.write("HTTP/1.1 100 Continue\r\n\r\n")
    end
    case framing
    when :chunked
      read_chunked(conn) do |s|
        digest.update(s)
        bytes += s.bytesize
      end
    when Integer
      conn.read_exact(framing) do |s|
        digest.update(s)
        bytes += s.bytesize
      end
    end

    record = {
      method: req[:method],
      path: req[:path],
      headers: headers,
      body_bytes: bytes,
      body_sha256: bytes.zero? ? EMPTY_SHA256 : digest.hexdigest
    }
    changed { @requests << record }
    req.merge(body_bytes: record[:body_bytes], body_sha256: record[:body_sha256])
  end

  def expects_continue?(headers)
    (headers["expect"] || []).any? { |v| v.downcase == "100-continue" }
  end

  def request_body_framing(headers)
    te = headers["transfer-encoding"]
    if te
      codings = te.join(",").split(",").map { |c| c.strip.downcase }.reject(&:empty?)
      raise BadRequest, "unsupported transfer-encoding #{te.inspect}" unless codings.last == "chunked"

      return :chunked
    end
    cl = headers["content-length"]
    return 0 unless cl

    values = cl.join(",").split(",").map(&:strip).uniq
    raise BadRequest, "bad content-length #{cl.inspect}" unless values.size == 1 && values[0] =~ /\A\d+\z/

    values[0].to_i
  end

  def read_chunked(conn, &block)
    loop do
      line = conn.read_line
      size = line.split(";", 2).first.strip
      raise BadRequest, "bad chunk size #{utf8(line).inspect}" unless size =~ /\A\h+\z/

      n = size.to_i(16)
      break if n.zero?

      conn.read_exact(n, &block)
      crlf = conn.read_line
      raise BadRequest, "missing CRLF after chunk" unless crlf.empty?
    end
    # trailer section
    loop { break if conn.read_line.empty? }
  end

  # ------------------------------------------------------------------ routing

  def keep_alive?(req)
    conn_tokens = (req[:headers]["connection"] || []).join(",").split(",").map { |t| t.strip.downcase }
    return false if conn_tokens.include?("close")
    return conn_tokens.include?("keep-alive") if req[:version] == "HTTP/1.0"

    true
  end

  def parse_query(query)
    URI.decode_www_form(query || "")
  rescue ArgumentError
    []
  end

  def int_param(q, name, default)
    v = q[name]
    return default if v.nil? || v.empty?

    Integer(v, 10)
  rescue ArgumentError
    default
  end

  def float_param(q, name, default)
    v = q[name]
    return default if v.nil? || v.empty?

    Float(v)
  rescue ArgumentError
    default
  end

  # Returns true when the connection may serve another request.
  def dispatch(conn, req)
    target = req[:path]
    if target =~ %r{\Ahttps?://}i
      begin
        target = URI.parse(target).request_uri
      rescue URI::InvalidURIError
        nil
      end
    end
    path, query = target.split("?", 2)
    pairs = parse_query(query)
    q = {}
    pairs.each { |k, v| q[k] = v unless q.key?(k) }
    head = req[:method] == "HEAD"
    keep = keep_alive?(req)

    case path
    when "/bytes" then route_bytes(conn, q, head, keep)
    when "/chunked" then route_chunked(conn, q, head, keep)
    when "/close-delimited" then route_close_delimited(conn, q, head)
    when "/slow" then route_slow(conn, q, head, keep)
    when %r{\A/echo} then route_echo(conn, req, head, keep)
    when "/headers" then route_headers(conn, pairs, head, keep)
    when "/status" then route_status(conn, q, head, keep)
    when "/truncate" then route_truncate(conn, q, head)
    when "/truncate-chunked" then route_truncate_chunked(conn, q, head)
    when "/hang" then route_hang(conn)
    when "/hang-body" then route_hang_body(conn, q, head)
    when "/drip" then route_drip(conn, q, head, keep)
    when "/garbage" then route_garbage(conn)
    when "/conflicting-framing" then route_conflicting(conn, head)
    when "/huge-headers" then route_huge_headers(conn, q, head, keep)
    when "/reset" then route_reset(conn)
    when "/redirect" then route_redirect(conn, q, head, keep)
    else
      send_simple(conn, 404, "Not Found", "not found\n", head: head, keep: keep)
    end
  end

  # ----------------------------------------------------------------- writing

  def head_block(status, reason, headers)
    out = +"HTTP/1.1 #{status} #{reason}\r\n"
    headers.each { |name, value| out << "#{name}: #{value}\r\n" }
    out << "\r\n"
    out.force_encoding(Encoding::BINARY)
  end

  def write_head(conn, status, reason, headers, keep)
    headers = headers.dup
    headers << ["Connection", "close"] unless keep
    conn.write(head_block(status, reason, headers))
  end

  def send_simple(conn, status, reason, body, head:, keep:, headers: nil, content_type: "text/plain")
    headers = (headers || []).dup
    names = headers.map { |n, _| n.downcase }
    headers.unshift(["Content-Type", content_type]) unless names.include?("content-type")
    headers << ["Content-Length", body.bytesize.to_s] unless names.include?("content-length")
    headers << ["Connection", "close"] unless keep
    out = head_block(status, reason, headers)
    out << body.b unless head
    conn.write(out)
    keep
  end

  def write_pattern(conn, offset, len)
    self.class.each_pattern_slice(offset, len) { |s| conn.write(s) }
  end

  # Writes `len` pattern bytes as chunked frames of `chunk` bytes, starting
  # at pattern offset 0.
  def write_pattern_chunks(conn, len, chunk)
    offset = 0
    while offset < len
      size = [chunk, len - offset].min
      if size <= CHUNK_SIZE
        frame = +"#{size.to_s(16)}\r\n"
        frame.force_encoding(Encoding::BINARY)
        self.class.each_pattern_slice(offset, size) { |s| frame << s }
        frame << "\r\n"
        conn.write(frame)
      else
        conn.write("#{size.to_s(16)}\r\n")
        write_pattern(conn, offset, size)
        conn.write("\r\n")
      end
      offset += size
    end
  end

  # Waits `seconds` (nil = forever) while watching the client socket, so a
  # peer close is noticed immediately (raises PeerClosed). Pipelined bytes
  # that arrive meanwhile are kept in the connection buffer.
  def wait_watching_peer(conn, seconds)
    deadline = seconds && (monotonic + seconds)
    loop do
      remaining = deadline && (deadline - monotonic)
      return if remaining && remaining <= 0

      ready = begin
        conn.wait_readable(remaining)
      rescue IOError, Errno::EBADF
        raise PeerClosed, "socket closed" unless stopped?

        raise
      end
      conn.drain_nonblock if ready
    end
  end

  # -------------------------------------------------------------------- routes

  # ?n=bytes; ?pause=seconds waits (watching the peer) after the first half
  # of the body, so a proxied body stays in flight that long.
  def route_bytes(conn, q, head, keep)
    n = [int_param(q, "n", 1024), 0].max
    pause = float_param(q, "pause", 0.0)
    write_head(conn, 200, "OK", [["Content-Type", "application/octet-stream"], ["Content-Length", n.to_s]], keep)
    return keep if head

    if pause.positive?
      write_pattern(conn, 0, n / 2)
      wait_watching_peer(conn, pause)
      write_pattern(conn, n / 2, n - (n / 2))
    else
      write_pattern(conn, 0, n)
    end
    keep
  end

  def route_chunked(conn, q, head, keep)
    n = [int_param(q, "n", 1024), 0].max
    chunk = int_param(q, "chunk", 16_384)
    chunk = 16_384 if chunk <= 0
    write_head(conn, 200, "OK", [["Content-Type", "application/octet-stream"], ["Transfer-Encoding", "chunked"]], keep)
    return keep if head

    write_pattern_chunks(conn, n, chunk)
    conn.write("0\r\n\r\n")
    keep
  end

  def route_close_delimited(conn, q, head)
    n = [int_param(q, "n", 1024), 0].max
    write_head(conn, 200, "OK", [["Content-Type", "application/octet-stream"]], false)
    write_pattern(conn, 0, n) unless head
    false
  end

  def route_slow(conn, q, head, keep)
    delay = float_param(q, "delay", 1.0)
    wait_watching_peer(conn, delay) if delay.positive?
    send_simple(conn, 200, "OK", "slow done\n", head: head, keep: keep)
  end

  def route_echo(conn, req, head, keep)
    body = JSON.generate(
      "method" => req[:method],
      "path" => req[:path],
      "headers" => req[:headers],
      "body_bytes" => req[:body_bytes],
      "body_sha256" => req[:body_sha256]
    )
    send_simple(conn, 200, "OK", body, head: head, keep: keep, content_type: "application/json")
  end

  def route_headers(conn, pairs, head, keep)
    headers = []
    pairs.each do |k, v|
      next unless k == "h"

      name, value = v.split(":", 2)
      next if name.nil? || name.strip.empty?

      headers << [name.strip, (value || "").lstrip]
    end
    send_simple(conn, 200, "OK", "ok\n", head: head, keep: keep, headers: headers)
  end

  def route_status(conn, q, head, keep)
    code = int_param(q, "code", 200)
    code = 200 unless (100..999).cover?(code)
    reason = q["reason"] || REASONS[code] || "Unknown"
    body = "status #{code}\n"
    case code
    when 204
      write_head(conn, 204, reason, [], keep)
    when 304
      write_head(conn, 304, reason, [["Content-Length", body.bytesize.to_s]], keep)
    else
      send_simple(conn, code, reason, body, head: head, keep: keep)
    end
    keep
  end

  def route_truncate(conn, q, head)
    n = [int_param(q, "n", 1024), 0].max
    send = [[int_param(q, "send", n / 2), 0].max, n].min
    write_head(conn, 200, "OK", [["Content-Type", "application/octet-stream"], ["Content-Length", n.to_s]], true)
    write_pattern(conn, 0, send) unless head
    false
  end

  def route_truncate_chunked(conn, q, head)
    send = [int_param(q, "send", 1024), 0].max
    chunk = int_param(q, "chunk", 16_384)
    chunk = 16_384 if chunk <= 0
    write_head(conn, 200, "OK", [["Content-Type", "application/octet-stream"], ["Transfer-Encoding", "chunked"]], true)
    write_pattern_chunks(conn, send, chunk) unless head
    false
  end

  def route_hang(conn)
    wait_watching_peer(conn, nil)
    false
  end

  def route_hang_body(conn, q, head)
    n = [int_param(q, "n", 1024), 0].max
    send = [[int_param(q, "send", n / 2), 0].max, n].min
    write_head(conn, 200, "OK", [["Content-Type", "application/octet-stream"], ["Content-Length", n.to_s]], true)
    write_pattern(conn, 0, send) unless head
    wait_watching_peer(conn, nil)
    false
  end

  def route_drip(conn, q, head, keep)
    n = [int_param(q, "n", 10), 0].max
    interval = float_param(q, "interval", 0.1)
    write_head(conn, 200, "OK", [["Content-Type", "text/event-stream"], ["Cache-Control", "no-cache"],
                                 ["Transfer-Encoding", "chunked"]], keep)
    return keep if head

    n.times do |i|
      wait_watching_peer(conn, interval) if i.positive? && interval.positive?
      data = "data: #{i}\n\n"
      conn.write("#{data.bytesize.to_s(16)}\r\n#{data}\r\n")
    end
    conn.write("0\r\n\r\n")
    keep
  end

  def route_garbage(conn)
    conn.write("this is not http\r\n\r\n")
    false
  end

  def route_conflicting(conn, head)
    out = +"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    out << "5\r\nhello\r\n0\r\n\r\n" unless head
    conn.write(out)
    false # ambiguous framing: never reuse this connection
  end

  def route_huge_headers(conn, q, head, keep)
    kb = [int_param(q, "kb", 16), 0].max
    send_simple(conn, 200, "OK", "ok\n", head: head, keep: keep, headers: [["X-Huge", "a" * (kb * 1024)]])
  end

  def route_reset(conn)
    begin
      conn.raw.setsockopt(Socket::Option.linger(true, 0))
    rescue StandardError
      nil
    end
    # Close the TCP socket directly (no TLS close_notify) => RST.
    conn.raw.close unless conn.raw.closed?
    false
  end

  def route_redirect(conn, q, head, keep)
    to = q["to"] || "/"
    send_simple(conn, 302, "Found", "redirecting\n", head: head, keep: keep, headers: [["Location", to]])
  end
end
