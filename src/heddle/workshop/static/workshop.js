// Heddle Workshop: one Server-Sent Events stream per page says which fragments to refresh.
// Elements opt in with data-watch="tick" (every tick), data-watch="tasks" (any task event),
// data-watch-task="ID" (events of one task), data-watch-goal="ID" (progress of one goal or
// pipeline run, and the events of its nodes' tasks) or data-watch-eval="ID" (progress of one evaluation run); each refreshes
// through its htmx "refresh" trigger. An element with data-stream-task="ID" shows that task's
// token stream as the model writes it (/tasks/ID/stream: every chunk from the first, then "end").
(function () {
  "use strict";
  var live = document.getElementById("live");
  var pendingTasks = null;
  function refresh(selector) {
    document.querySelectorAll(selector).forEach(function (el) { htmx.trigger(el, "refresh"); });
  }
  function byId(kind) {
    return function (e) { refresh("[data-watch-" + kind + '="' + CSS.escape(e.data) + '"]'); };
  }
  function connect() {
    var source = new EventSource("/events/stream");
    source.onopen = function () {
      if (live) { live.textContent = "live"; live.className = "live on"; }
      // Whatever happened between rendering the page and this stream opening was not announced.
      refresh("[data-watch-task], [data-watch-goal], [data-watch-eval]");
    };
    source.onerror = function () { if (live) { live.textContent = "reconnecting…"; live.className = "live"; } };
    source.addEventListener("tick", function () { refresh('[data-watch="tick"]'); });
    source.addEventListener("task", function (e) {
      byId("task")(e);
      // A graph node's task id is "GOAL:PATH": its start and end move the goal's page on too.
      document.querySelectorAll("[data-watch-goal]").forEach(function (el) {
        if (e.data.indexOf(el.getAttribute("data-watch-goal") + ":") === 0) { htmx.trigger(el, "refresh"); }
      });
      if (pendingTasks === null) {  // at most one task-list refresh per half second
        pendingTasks = setTimeout(function () { pendingTasks = null; refresh('[data-watch="tasks"]'); }, 500);
      }
    });
    source.addEventListener("goal", byId("goal"));
    source.addEventListener("eval", byId("eval"));
  }
  function follow(el) {
    if (el.getAttribute("data-streaming")) { return; }
    el.setAttribute("data-streaming", "on");
    var source = new EventSource("/tasks/" + encodeURIComponent(el.getAttribute("data-stream-task")) + "/stream");
    // Every (re)connection replays the stream from its first chunk.
    source.onopen = function () { el.textContent = ""; };
    source.addEventListener("chunk", function (e) {
      var chunk = JSON.parse(e.data);
      if (chunk.new_reply) { el.textContent = ""; }  // a retry, repair or escalation writes it anew
      el.hidden = false;
      el.textContent += chunk.text;
    });
    source.addEventListener("problem", function (e) { el.setAttribute("data-problem", JSON.parse(e.data)); });
    source.addEventListener("end", function () { source.close(); el.setAttribute("data-streaming", "done"); });
  }
  function followAll(root) {
    if (root.matches && root.matches("[data-stream-task]")) { follow(root); }
    if (root.querySelectorAll) { root.querySelectorAll("[data-stream-task]").forEach(follow); }
  }
  if (window.EventSource) {
    connect();
    if (window.htmx) { htmx.onLoad(followAll); } else { followAll(document); }
  }
})();
