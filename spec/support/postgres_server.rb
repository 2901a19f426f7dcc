# frozen_string_literal: true

require "etc"
require "fileutils"
require "open3"
require "socket"
require_relative "free_port"
require "tmpdir"

# A throw-away PostgreSQL server for the specs: its own data directory,
# listening on 127.0.0.1 only, trust authentication, fsync off (the specs
# kill Puma, never the database). Debian's server binaries come from the
# postgresql package (bin/setup --test installs it). initdb refuses to run
# as root, so as root the server runs as the postgres user.
class PostgresServer
  # PostgreSQL is not installed or did not start; the message says why.
  class Unavailable < StandardError; end

  USER = "threaded_proxy"

  attr_reader :port

  # The specs' one rule for a PostgreSQL that cannot start: where
  # SPEC_REQUIRE_POSTGRES is set (bin/test and bin/matrix set it, so CI never
  # skips) it is a failure, elsewhere a skip of what `example` runs (the
  # example, or the group from before(:all)), with the reason. A message
  # that includes `never_skip` is a failure even then. Returns the server.
  def self.start_or_skip(example, never_skip: nil)
    new.start
  rescue Unavailable => e
    raise if ENV["SPEC_REQUIRE_POSTGRES"] || (never_skip && e.message.include?(never_skip))

    example.skip "PostgreSQL could not be started here: #{e.message}"
  end

  def self.bin_dir
    Dir["/usr/lib/postgresql/*/bin"].max_by { |dir| dir[%r{/(\d+)/bin\z}, 1].to_i }
  end

  def start
    bin = self.class.bin_dir
    raise Unavailable, "no PostgreSQL server binaries under /usr/lib/postgresql (apt-get install postgresql)" unless bin

    @bin = bin
    @dir = Dir.mktmpdir("threaded-proxy-pg")
    owner = run_as_user
    FileUtils.chown_R(owner, nil, @dir) if owner
    run("initdb", "-D", data_dir, "-U", USER, "-A", "trust", "-E", "UTF8", "--no-sync")
    start_on_free_port
    self
  rescue Unavailable
    stop
    raise
  end

  def stop
    return unless @dir

    run("pg_ctl", "-D", data_dir, "-m", "immediate", "-w", "stop") if File.exist?(File.join(data_dir, "postmaster.pid"))
  rescue Unavailable
    nil
  ensure
    FileUtils.rm_rf(@dir) if @dir
    @dir = nil
  end

  # Restarts the server (fast shutdown: every connection is closed), as a
  # database failover or upgrade would.
  def restart
    run("pg_ctl", "-D", data_dir, "-l", log_path, "-m", "fast", "-w", "-t", "30", "restart")
  end

  # A new empty database; its URL.
  def create_database(name)
    psql("postgres", "CREATE DATABASE #{name}")
    url(name)
  end

  def url(database)
    "postgres://#{USER}@127.0.0.1:#{@port}/#{database}"
  end

  # Runs SQL; the output rows (unaligned, tab-separated).
  def psql(database, sql)
    run("psql", "-X", "-q", "-A", "-t", "-F", "\t", "-h", "127.0.0.1", "-p", @port.to_s, "-U", USER,
        "-d", database, "-v", "ON_ERROR_STOP=1", "-c", sql).lines.map { |line| line.chomp.split("\t") }
  end

  def log
    File.exist?(log_path) ? File.read(log_path) : ""
  end

  private

  BIND_ATTEMPTS = 5

  # PostgreSQL cannot bind port 0 (its `port` setting starts at 1, and it
  # names its socket file after the port), so the port is chosen beforehand
  # with FreePort and another process may take it first: then the server
  # fails with "could not bind" / "Address already in use" and starts again
  # on another port.
  def start_on_free_port
    BIND_ATTEMPTS.times do |attempt|
      @port = FreePort.take
      begin
        run("pg_ctl", "-D", data_dir, "-l", log_path, "-w", "-t", "30", "-o",
            "-c listen_addresses=127.0.0.1 -p #{@port} -k #{@dir} -c fsync=off -c max_connections=200", "start")
        return
      rescue Unavailable => e
        raise unless e.message.match?(/could not bind|Address already in use/) && attempt < BIND_ATTEMPTS - 1
      end
    end
  end

  def data_dir = File.join(@dir, "data")
  def log_path = File.join(@dir, "server.log")

  # As root: the postgres user (created by the package).
  def run_as_user
    return nil unless Process.uid.zero?

    Etc.getpwnam("postgres").name
  rescue ArgumentError
    raise Unavailable, "running as root and there is no postgres user to run the server as"
  end

  def run(tool, *args)
    command = [File.join(@bin, tool), *args]
    command = ["runuser", "-u", run_as_user, "--", *command] if run_as_user
    output, status = Open3.capture2e(*command, chdir: @dir)
    raise Unavailable, "#{tool} failed (#{status}): #{output.strip}\n#{log}" unless status.success?

    output
  end
end
