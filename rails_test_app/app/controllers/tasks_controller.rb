# frozen_string_literal: true

# The event-stream demo: a page whose EventSource follows a task's progress,
# published from a background thread (any Ruby code can publish).
class TasksController < ApplicationController
  include ThreadedProxy::Controller

  PAGE = <<~HTML
    <!doctype html>
    <meta charset="utf-8">
    <title>Task %<id>s</title>
    <h1>Task %<id>s</h1>
    <progress id="bar" max="100" value="0"></progress> <span id="text">waiting…</span>
    <script>
      const source = new EventSource("/tasks/%<id>s/progress");
      source.addEventListener("taskProgress", (e) => {
        const { progress } = JSON.parse(e.data);
        document.getElementById("bar").value = progress;
        document.getElementById("text").textContent = progress + "%%";
        if (progress >= 100) source.close();
      });
    </script>
  HTML

  # GET /tasks/:id: the page (and the task starts, in a background thread).
  def show
    start_task(params[:id])
    render html: format(PAGE, id: ERB::Util.html_escape(params[:id])).html_safe
  end

  # GET /tasks/:id/progress: the EventSource.
  def progress
    stream_events "task:#{params[:id]}", retry: 3_000, heartbeat: 15
  end

  # POST /tasks/:id/start?steps=5&interval=0.2: starts the task only.
  def start
    start_task(params[:id], steps: Integer(params.fetch(:steps, 10)), interval: Float(params.fetch(:interval, 0.5)))
    head :accepted
  end

  private

  # A stand-in for real work: publishes its progress with an id, so a
  # reconnecting EventSource (Last-Event-ID) gets what it missed.
  def start_task(id, steps: 10, interval: 0.5)
    Thread.new do
      (1..steps).each do |step|
        sleep interval
        ThreadedProxy.publish("task:#{id}", { progress: step * 100 / steps }, event: "taskProgress", id: step.to_s)
      end
    end
  end
end
