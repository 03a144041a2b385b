// mailroute overview: polls /api/overview every 2 s and updates the numbers in place.
// Only textContent and SVG attributes are set, never HTML.
(function () {
  "use strict";
  var INTERVAL_MS = 2000;
  var HISTORY = 30;  // points in each sparkline (one minute)
  var history = {};

  function text(el, value) {
    if (el) { el.textContent = value; }
  }

  function shown(value) {
    return value === null || value === undefined ? "\u2013" : String(value);
  }

  function sparkline(row, stage, perMinute) {
    var points = history[stage] || (history[stage] = []);
    points.push(perMinute === null ? 0 : perMinute);
    if (points.length > HISTORY) { points.shift(); }
    var line = row.querySelector("svg.sparkline polyline");
    if (!line) { return; }
    var top = Math.max.apply(null, points.concat([1]));
    var step = 60 / (HISTORY - 1);
    line.setAttribute("points", points.map(function (v, i) {
      return (i * step).toFixed(1) + "," + (15 - 14 * v / top).toFixed(1);
    }).join(" "));
  }

  function update(data) {
    Object.keys(data.stages).forEach(function (stage) {
      var row = document.querySelector('#stage-rates tr[data-stage="' + stage + '"]');
      if (!row) { return; }
      var s = data.stages[stage];
      text(row.querySelector("td.rate"), s.per_minute === null ? "\u2013" : s.per_minute.toFixed(1));
      text(row.querySelector("td.total"), String(Math.round(s.total)));
      sparkline(row, stage, s.per_minute);
    });
    data.queues.forEach(function (q) {
      var row = document.querySelector('#backlog tr[data-queue="' + CSS.escape(q.name) + '"]');
      if (!row) { return; }
      text(row.querySelector("td.ready"), q.ready === null ? "n/a" : String(q.ready));
      text(row.querySelector("td.dead"), q.dead === null ? "n/a" : String(q.dead));
      text(row.querySelector("td.consumers"), q.consumers === null ? "n/a" : String(q.consumers));
    });
    var error = document.getElementById("backlog-error");
    if (error) {
      error.hidden = !data.queues_error;
      text(error, data.queues_error || "");
    }
    text(document.getElementById("latency-p50"), shown(data.latency_ms.p50));
    text(document.getElementById("latency-p99"), shown(data.latency_ms.p99));
    text(document.getElementById("latency-window"), data.latency_ms.window);
    text(document.getElementById("latency-count"), String(Math.round(data.latency_ms.count)));
    text(document.getElementById("processed-total"), String(data.persisted_total));
    text(document.getElementById("stored-last-minute"), String(data.persisted_last_minute));
    text(document.getElementById("stored-last-hour"), String(data.persisted_last_hour));
    text(document.getElementById("metrics-sources"),
         data.metrics_sources.up + " of " + data.metrics_sources.of);
    text(document.getElementById("updated-at"), "updated " + data.generated_at);
  }

  function poll() {
    fetch("/api/overview", {credentials: "same-origin", cache: "no-store"})
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.json();
      })
      .then(update)
      .catch(function (err) {
        text(document.getElementById("updated-at"), "update failed (" + err.message + "); retrying");
      })
      .then(function () { window.setTimeout(poll, INTERVAL_MS); });
  }

  window.setTimeout(poll, INTERVAL_MS);
}());
