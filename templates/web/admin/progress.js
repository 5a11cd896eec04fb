// The console's live progress page: fetches the figures every 10 seconds and writes them into
// the table, instead of reloading the page (a timed reload moves focus and the reading
// position, which WCAG 2.2.1 and axe-core's meta-refresh rule forbid). Updates stop when the
// send is over, and the person can pause them (WCAG 2.2.2). Without JavaScript the page is
// complete as served and has a link to load it again.
(function () {
  "use strict";
  var root = document.getElementById("progress");
  var button = document.getElementById("pause-updates");
  if (!root || !button || !window.fetch) {
    return;
  }
  var url = root.getAttribute("data-json");
  var every = 10000;
  var timer = null;
  var note = document.getElementById("live-note");

  function text(id, value) {
    var node = document.getElementById(id);
    if (node && value !== undefined && value !== null) {
      node.textContent = String(value);
    }
  }

  function stop(message) {
    if (timer !== null) {
      window.clearInterval(timer);
      timer = null;
    }
    if (message) {
      note.textContent = message;
      button.hidden = true;
    }
  }

  function update() {
    window.fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (data) {
        if (!data) {
          stop("The figures could not be updated: reload the page.");
          return;
        }
        Object.keys(data.counts).forEach(function (key) { text("count-" + key, data.counts[key]); });
        text("count-total", data.total);
        text("progress-status", data.status);
        text("progress-eta", data.eta);
        text("progress-ambiguous", data.ambiguous);
        text("progress-taken-over", data.taken_over);
        text("progress-once", data.once);
        text("progress-updated", data.updated);
        if (!data.live) {
          stop(data.status === "sent" ? "Finished: these are the final figures."
            : "The send is " + data.status + ": updates have stopped.");
        }
      })
      .catch(function () { stop("The figures could not be updated: reload the page."); });
  }

  function start() {
    timer = window.setInterval(update, every);
    button.textContent = "Pause updates";
    button.setAttribute("aria-pressed", "false");
  }

  button.hidden = false;
  button.addEventListener("click", function () {
    if (timer === null) {
      update();
      start();
    } else {
      stop(null);
      button.textContent = "Resume updates";
      button.setAttribute("aria-pressed", "true");
    }
  });
  note.textContent = "The figures update every 10 seconds.";
  start();
}());
