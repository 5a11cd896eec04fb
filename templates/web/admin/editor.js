// The structured editor's live preview: as the author types, the form is sent (after a
// pause, so not on every key) to the server, which renders it exactly as a save would; the
// phone and desktop frames then load that preview, and each preflight warning is written on
// the section it is about. Nothing is saved. Without JavaScript the editor's buttons do the
// same with a page load ("Preview without saving", "Save and preview").
(function () {
  "use strict";
  var form = document.getElementById("editor");
  if (!form || !window.fetch || !window.FormData) {
    return;
  }
  var url = form.getAttribute("data-preview");
  var wait = 600;
  var timer = null;
  var asked = 0;
  var note = document.getElementById("preview-note");

  function list(node, items) {
    while (node.firstChild) {
      node.removeChild(node.firstChild);
    }
    (items || []).forEach(function (text) {
      var li = document.createElement("li");
      li.textContent = text;
      node.appendChild(li);
    });
    node.hidden = !items || items.length === 0;
  }

  function show(answer) {
    var sections = answer.sections || {};
    var cards = form.querySelectorAll("ul.section-warnings");
    Array.prototype.forEach.call(cards, function (ul) {
      list(ul, sections[ul.id.replace("warnings-", "")]);
    });
    var panel = document.getElementById("preflight");
    list(document.getElementById("general-warnings"), answer.general);
    panel.hidden = !answer.general || answer.general.length === 0;
    var problems = document.getElementById("problems");
    while (problems.firstChild) {
      problems.removeChild(problems.firstChild);
    }
    if (answer.problems && answer.problems.length) {
      var box = document.createElement("div");
      box.className = "error-summary";
      var title = document.createElement("h2");
      title.textContent = "There is a problem";
      var ul = document.createElement("ul");
      box.appendChild(title);
      box.appendChild(ul);
      list(ul, answer.problems);
      problems.appendChild(box);
    }
    if (answer.preview) {
      document.getElementById("preview-desktop").src = answer.preview;
      document.getElementById("preview-phone").src = answer.preview;
      note.textContent = "The preview shows the text as it stands, not saved yet.";
    } else {
      note.textContent = "The preview waits until the problems above are fixed.";
    }
  }

  function refresh() {
    timer = null;
    var data = new FormData(form);
    data.delete("image");
    data.delete("do");
    var mine = ++asked;
    fetch(url, {method: "POST", body: data, credentials: "same-origin",
                headers: {"Accept": "application/json"}})
      .then(function (response) {
        if (!response.ok) {
          throw new Error(String(response.status));
        }
        return response.json();
      })
      .then(function (answer) {
        if (mine === asked) {  // an older answer arriving late is not shown
          show(answer);
        }
      })
      .catch(function () {
        note.textContent = "The preview could not be updated; it will be when you save.";
      });
  }

  function changed(event) {
    if (event.target && event.target.type === "file") {
      return;
    }
    if (timer !== null) {
      window.clearTimeout(timer);
    }
    timer = window.setTimeout(refresh, wait);
  }

  form.addEventListener("input", changed);
  form.addEventListener("change", changed);
  if (document.getElementById("title").value) {  // a blank page has nothing to show yet
    refresh();
  }
}());
