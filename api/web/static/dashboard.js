// tuneplane dashboard: optional extras on top of pages that work without JavaScript.
// 1. An active run's page polls /runs/{id}/live every 2 s and swaps in the server-rendered
//    (already escaped) fragments that changed. 2. Tables marked data-sortable sort on a header
//    click. Nothing here builds HTML from data: fragments come from the server's templates,
//    and text is only ever set through textContent.
(function () {
  "use strict";

  var POLL_MS = 2000;

  function startLive(main) {
    var url = main.getAttribute("data-live-url");
    var indicator = document.querySelector("[data-live-indicator]");
    var last = {};
    var failures = 0;
    var timer = null;

    function say(text) {
      if (!indicator) return;
      indicator.textContent = text;
      indicator.hidden = !text;
    }

    function schedule(ms) {
      timer = window.setTimeout(poll, ms);
    }

    function poll() {
      fetch(url, { headers: { Accept: "application/json" }, cache: "no-store", credentials: "same-origin" })
        .then(function (res) {
          if (!res.ok) throw new Error("HTTP " + res.status);
          return res.json();
        })
        .then(function (body) {
          failures = 0;
          var parts = body.html || {};
          Object.keys(parts).forEach(function (key) {
            if (last[key] === parts[key]) return;
            var target = main.querySelector('[data-live="' + key + '"]');
            if (!target) return;
            // Server-rendered by the same templates as the page, so escaped like the page.
            target.innerHTML = parts[key];
            enhanceTables(target);
            last[key] = parts[key];
          });
          main.setAttribute("data-live-status", body.status);
          if (body.active) {
            say("Live: updates every 2 s.");
            schedule(POLL_MS);
          } else {
            main.removeAttribute("data-live-active");
            say("");
          }
        })
        .catch(function () {
          failures += 1;
          say("Lost contact with the server; retrying…");
          schedule(Math.min(POLL_MS * Math.pow(2, failures), 30000));
        });
    }

    document.addEventListener("visibilitychange", function () {
      // A hidden tab stops polling; it catches up at once when it is shown again.
      if (document.hidden) {
        window.clearTimeout(timer);
      } else if (main.hasAttribute("data-live-active")) {
        window.clearTimeout(timer);
        poll();
      }
    });
    say("Live: updates every 2 s.");
    schedule(POLL_MS);
  }

  // ---- sortable tables -----------------------------------------------------------------------

  function cellValue(row, index, kind) {
    var cell = row.children[index];
    if (!cell) return kind === "num" ? NaN : "";
    var raw = cell.hasAttribute("data-value") ? cell.getAttribute("data-value") : cell.textContent;
    if (kind === "num") {
      var n = parseFloat(raw);
      return isNaN(n) ? NaN : n;
    }
    return (raw || "").trim().toLowerCase();
  }

  function sortTable(table, th) {
    var headRow = th.parentNode;
    var index = Array.prototype.indexOf.call(headRow.children, th);
    var kind = th.getAttribute("data-sort");
    var dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
    Array.prototype.forEach.call(headRow.children, function (other) {
      other.removeAttribute("aria-sort");
    });
    th.setAttribute("aria-sort", dir);
    var sign = dir === "ascending" ? 1 : -1;
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = cellValue(a, index, kind);
      var y = cellValue(b, index, kind);
      // Empty values go last in both directions.
      if (kind === "num") {
        if (isNaN(x) && isNaN(y)) return 0;
        if (isNaN(x)) return 1;
        if (isNaN(y)) return -1;
        return (x - y) * sign;
      }
      return x < y ? -sign : x > y ? sign : 0;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }

  function enhanceTables(root) {
    var tables = root.querySelectorAll("table[data-sortable]");
    Array.prototype.forEach.call(tables, function (table) {
      var heads = table.querySelectorAll("thead th[data-sort]");
      Array.prototype.forEach.call(heads, function (th) {
        th.tabIndex = th.querySelector("a") ? -1 : 0;
        th.addEventListener("click", function (event) {
          event.preventDefault();
          sortTable(table, th);
        });
        th.addEventListener("keydown", function (event) {
          if (event.key === "Enter" || event.key === " ") {
            event.preventDefault();
            sortTable(table, th);
          }
        });
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    enhanceTables(document);
    var main = document.querySelector("main[data-live-url][data-live-active]");
    if (main) startLive(main);
  });
})();
