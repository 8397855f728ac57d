// The RPC analytics dashboard: draws the calls-per-minute chart with the Chart.js Unfold ships,
// and refreshes the page's figures in place every few seconds while it is open.
(function () {
  "use strict";

  function cssColor(value) {
    var match = /^var\((.*)\)$/.exec(value || "");
    if (!match) return value;
    return getComputedStyle(document.documentElement).getPropertyValue(match[1]).trim() || "#9333ea";
  }

  function drawChart(canvas) {
    if (!window.Chart || !canvas) return;
    var data = JSON.parse(canvas.dataset.value);
    data.datasets.forEach(function (dataset) {
      dataset.backgroundColor = cssColor(dataset.backgroundColor);
      dataset.borderRadius = 3;
      dataset.maxBarThickness = 14;
    });
    var previous = window.Chart.getChart(canvas);
    if (previous) previous.destroy();
    new window.Chart(canvas, {
      type: "bar",
      data: data,
      options: {
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        plugins: { legend: { display: false }, tooltip: { enabled: true } },
        scales: {
          x: { stacked: true, grid: { display: false }, ticks: { color: "#9ca3af", maxTicksLimit: 12 } },
          y: {
            stacked: true,
            beginAtZero: true,
            border: { display: false },
            grid: { color: "rgba(156, 163, 175, 0.2)" },
            ticks: { color: "#9ca3af", precision: 0 },
          },
        },
      },
    });
  }

  function refresh(root) {
    var url = new URL(window.location.href);
    url.searchParams.set("window", root.dataset.window);
    fetch(url.toString(), { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } })
      .then(function (response) {
        if (!response.ok || response.redirected) throw new Error(response.status);
        return response.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("rpc-dashboard");
        if (!fresh) return;
        root.innerHTML = fresh.innerHTML;
        drawChart(root.querySelector("[data-rpc-chart]"));
      })
      .catch(function () {
        // A missed refresh is retried at the next tick; the figures on screen stay.
      });
  }

  function start() {
    var root = document.getElementById("rpc-dashboard");
    if (!root) return;
    drawChart(root.querySelector("[data-rpc-chart]"));
    var seconds = parseInt(root.dataset.refreshSeconds, 10);
    if (seconds > 0) {
      window.setInterval(function () {
        if (!document.hidden) refresh(root);
      }, seconds * 1000);
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
