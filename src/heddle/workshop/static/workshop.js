// Heddle Workshop: one Server-Sent Events stream per page says which fragments to refresh.
// Elements opt in with data-watch="tick" (every tick), data-watch="tasks" (any task event)
// or data-watch-task="ID" (events of one task); each refreshes through its htmx "refresh" trigger.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var pendingTasks = null;
  function refresh(selector) {
    document.querySelectorAll(selector).forEach(function (el) { htmx.trigger(el, "refresh"); });
  }
  function connect() {
    var source = new EventSource("/events/stream");
    source.onopen = function () { if (live) { live.textContent = "live"; live.className = "live on"; } };
    source.onerror = function () { if (live) { live.textContent = "reconnecting…"; live.className = "live"; } };
    source.addEventListener("tick", function () { refresh('[data-watch="tick"]'); });
    source.addEventListener("task", function (e) {
      refresh('[data-watch-task="' + CSS.escape(e.data) + '"]');
      if (pendingTasks === null) {  // at most one task-list refresh per half second
        pendingTasks = setTimeout(function () { pendingTasks = null; refresh('[data-watch="tasks"]'); }, 500);
      }
    });
  }
  if (window.EventSource) { connect(); }
})();
