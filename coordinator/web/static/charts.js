/* Emotion charts: a stacked area of the 7 emotion shares over time, readable without colour.
 * Colours are the Okabe-Ito palette (distinguishable with the common colour-vision deficiencies);
 * every area also has its own fill pattern, and the legend and the "right now" list name each one. */
"use strict";

const AEChart = (() => {
  const STYLE = {
    angry:    {color: "#D55E00", pattern: "diagonal"},
    disgust:  {color: "#CC79A7", pattern: "dots"},
    fear:     {color: "#0072B2", pattern: "cross"},
    happy:    {color: "#E69F00", pattern: "none"},
    sad:      {color: "#56B4E9", pattern: "horizontal"},
    surprise: {color: "#009E73", pattern: "vertical"},
    neutral:  {color: "#BBBBBB", pattern: "back-diagonal"},
  };

  function pattern(color, kind) {
    const size = 10;
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = size;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = color;
    ctx.fillRect(0, 0, size, size);
    ctx.strokeStyle = ctx.fillStyle = "rgba(0, 0, 0, 0.45)";
    ctx.lineWidth = 1.5;
    const line = (x1, y1, x2, y2) => { ctx.beginPath(); ctx.moveTo(x1, y1); ctx.lineTo(x2, y2); ctx.stroke(); };
    if (kind === "diagonal") { line(0, size, size, 0); line(-1, 1, 1, -1); line(size - 1, size + 1, size + 1, size - 1); }
    if (kind === "back-diagonal") { line(0, 0, size, size); line(size - 1, -1, size + 1, 1); line(-1, size - 1, 1, size + 1); }
    if (kind === "horizontal") line(0, size / 2, size, size / 2);
    if (kind === "vertical") line(size / 2, 0, size / 2, size);
    if (kind === "cross") { line(0, size / 2, size, size / 2); line(size / 2, 0, size / 2, size); }
    if (kind === "dots") { ctx.beginPath(); ctx.arc(size / 2, size / 2, 1.8, 0, 2 * Math.PI); ctx.fill(); }
    return ctx.createPattern(canvas, "repeat");
  }

  function swatch(name) {
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = 14;
    canvas.className = "swatch";
    canvas.setAttribute("aria-hidden", "true");
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = pattern(STYLE[name].color, STYLE[name].pattern);
    ctx.fillRect(0, 0, 14, 14);
    return canvas;
  }

  const timeLabel = (ms) => new Date(ms).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit", second: "2-digit"});

  /* One chart point per timeline bucket / live state; null shares leave a gap (suppressed, below k). */
  function point(t, distribution) {
    return {x: Date.parse(t), shares: distribution};
  }

  /* ``empty`` ({min, max} in ms): the x range while there are no points, which Chart.js would
   * otherwise start at 0, i.e. 1970; the first pushed point lets the data set the range again. */
  function create(canvas, emotions, points, empty) {
    const datasets = emotions.map((name, i) => ({
      label: name,
      data: points.map((p) => ({x: p.x, y: p.shares ? 100 * p.shares[i] : null})),
      backgroundColor: pattern(STYLE[name].color, STYLE[name].pattern),
      borderColor: STYLE[name].color,
      borderWidth: 1,
      pointRadius: 0,
      fill: i === 0 ? "origin" : "-1",
      spanGaps: false,
    }));
    const chart = new Chart(canvas, {
      type: "line",
      data: {datasets},
      options: {
        animation: false,
        maintainAspectRatio: false,
        parsing: true,
        interaction: {mode: "nearest", axis: "x", intersect: false},
        scales: {
          x: {type: "linear", ...(points.length ? {} : empty), ticks: {callback: timeLabel, maxTicksLimit: 8}},
          y: {stacked: true, min: 0, max: 100, title: {display: true, text: "% of learners"}},
        },
        plugins: {
          legend: {position: "bottom", labels: {boxWidth: 14}},
          tooltip: {callbacks: {
            title: (items) => items.length ? timeLabel(items[0].parsed.x) : "",
            label: (item) => `${item.dataset.label}: ${Math.round(item.parsed.y)}%`,
          }},
        },
      },
    });
    canvas.dataset.points = String(points.length);
    return chart;
  }

  /* Append a point and drop the ones older than keepMs. */
  function push(chart, p, keepMs) {
    const cutoff = p.x - keepMs;
    delete chart.options.scales.x.min;
    delete chart.options.scales.x.max;
    chart.data.datasets.forEach((ds, i) => {
      ds.data.push({x: p.x, y: p.shares ? 100 * p.shares[i] : null});
      while (ds.data.length && ds.data[0].x < cutoff) ds.data.shift();
    });
    chart.update("none");
    chart.canvas.dataset.points = String(chart.data.datasets[0].data.length);
  }

  return {create, push, point, swatch, STYLE};
})();
