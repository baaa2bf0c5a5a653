/* A past session's chart (timeline page and printable summary). */
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const data = JSON.parse(document.getElementById("session-data").textContent);
  AEChart.create(
    document.getElementById("emotion-chart"), data.emotions,
    data.history.map((p) => AEChart.point(p.t, p.suppressed ? null : p.distribution)),
  );
  const print = document.getElementById("print");
  if (print) print.addEventListener("click", () => window.print());
});
