# frozen_string_literal: true

require "rbconfig"
require "timeout"

# A backend process for the machine specs (spec/fixtures/machine_backend.rb):
#
#   backend = MachineBackend.new("a", "echo").start
#   backend.address   # => "127.0.0.1:PORT"
#   backend.stop
#
# #start waits (10 s at most) for the process's READY line on its stdout.
class MachineBackend
  SCRIPT = File.expand_path("../fixtures/machine_backend.rb", __dir__)

  attr_reader :port, :pid

  def initialize(name, mode = "echo", port: nil)
    @name = name
    @mode = mode
    @port = port
  end

  def start
    reader, writer = IO.pipe
    args = [@name, @mode, @port].compact.map(&:to_s)
    @pid = Process.spawn(RbConfig.ruby, SCRIPT, *args, out: writer, in: File::NULL)
    writer.close
    line = Timeout.timeout(10) { reader.gets }
    raise "backend #{@name} did not start" unless line&.start_with?("READY ")

    @port = Integer(line.split.last)
    reader.close
    self
  end

  def address
    "127.0.0.1:#{@port}"
  end

  def stop
    return unless @pid

    Process.kill("KILL", @pid)
    Process.wait(@pid)
  rescue Errno::ESRCH, Errno::ECHILD
    nil
  ensure
    @pid = nil
  end
end
