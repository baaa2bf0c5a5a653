/* The live classroom view: one EventSource, fed by the coordinator's hub once per tick. */
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const data = JSON.parse(document.getElementById("live-data").textContent);
  const $ = (id) => document.getElementById(id);
  const percent = (v) => `${Math.round(100 * v)}%`;
  const asArray = (dist) => dist ? data.emotions.map((e) => dist[e]) : null;

  const chart = AEChart.create(
    $("emotion-chart"), data.emotions,
    data.history.map((p) => AEChart.point(p.t, p.suppressed ? null : p.distribution)),
    {min: Date.now() - data.history_s * 1000, max: Date.now()},
  );

  const mixItems = {};
  data.emotions.forEach((name) => {
    const li = document.createElement("li");
    li.append(AEChart.swatch(name), document.createTextNode(` ${name} `));
    const value = document.createElement("strong");
    li.append(value);
    $("mix").append(li);
    mixItems[name] = value;
  });

  function showAgents(agents) {
    const list = $("agents");
    list.replaceChildren(...agents.map((a) => {
      const li = document.createElement("li");
      li.dataset.status = a.status;
      const mark = {ONLINE: "●", DEGRADED: "◐", OFFLINE: "○"}[a.status] || "?";
      li.textContent = `${mark} ${a.id}: ${a.status.toLowerCase()}`;
      if (a.detail && a.status !== "ONLINE") li.title = a.detail;
      return li;
    }));
  }

  function showState(s, live) {
    $("faces").textContent = s.faces_present;
    $("learners").textContent = s.learners;
    $("agents-online").textContent = s.agents_online;
    $("suppressed").hidden = !s.suppressed;
    $("gauges").hidden = s.suppressed;
    if (s.states) {
      document.querySelectorAll("#gauges li").forEach((li) => {
        const score = s.states[li.dataset.state] || 0;
        li.querySelector("meter").value = score;
        li.querySelector(".gauge-value").textContent = percent(score);
      });
    }
    const shares = asArray(s.distribution);
    data.emotions.forEach((name, i) => { mixItems[name].textContent = shares ? percent(shares[i]) : "—"; });
    $("emotion-chart").setAttribute("aria-label", shares
      ? "Emotion shares now: " + data.emotions.map((n, i) => `${n} ${percent(shares[i])}`).join(", ")
      : `Fewer than ${s.k} learners in view: emotion shares hidden`);
    if (s.agents) showAgents(s.agents);
    if (live) {
      AEChart.push(chart, AEChart.point(s.window_end, shares), data.history_s * 1000);
      $("chart-empty").hidden = true;
    }
  }

  const template = $("signal-template");
  /* One piece of a signal's evidence sentence: text, or a time (localized with the card). */
  function evidencePiece(piece) {
    if (!piece.time) return document.createTextNode(piece.text);
    const time = document.createElement("time");
    time.setAttribute("datetime", piece.time);
    time.dataset.local = "time";
    return time;
  }

  function addSignal(sig) {
    if (document.querySelector(`#signals [data-signal-id="${CSS.escape(sig.id)}"]`)) return;
    const card = template.content.firstElementChild.cloneNode(true);
    card.dataset.signalId = sig.id;
    card.dataset.kind = sig.kind;
    card.querySelector(".signal-kind").textContent = sig.kind_label;
    card.querySelector(".signal-strength").textContent = `strength ${percent(sig.strength)}`;
    card.querySelector(".signal-time").setAttribute("datetime", sig.created_at);
    card.querySelector(".signal-reason").textContent = sig.reason;
    card.querySelector(".signal-evidence").replaceChildren(...sig.evidence_pieces.map(evidencePiece));
    const form = card.querySelector("form");
    form.setAttribute("action", form.getAttribute("action").replace("__ID__", encodeURIComponent(sig.id)));
    AE.localTimes(card);
    $("signals").prepend(card);
    $("no-signals").hidden = true;
  }

  $("signals").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    const card = form.closest(".signal");
    form.querySelectorAll("button").forEach((b) => { b.disabled = true; });
    const note = document.createElement("p");
    note.className = "signal-status";
    card.querySelector(".signal-status")?.remove();
    try {
      const answer = await AE.post(form, event.submitter);
      note.textContent = `${answer.status} by ${answer.handled_by}`;
      card.classList.add("handled");
      form.replaceWith(note);
    } catch (error) {
      note.replaceChildren(...AE.explain(error, "Not saved: "));
      note.setAttribute("role", "alert");
      form.querySelectorAll("button").forEach((b) => { b.disabled = false; });
      form.after(note);
    }
  });

  const connection = $("connection");
  function setConnection(state, ...content) { connection.dataset.state = state; connection.replaceChildren(...content); }

  /* The browser gave up on the stream (the server refused it): say why, e.g. the login has ended. */
  async function explainClosed() {
    try {
      await AE.request(data.state_url);
      setConnection("down", "Connection closed: reload the page to reconnect");
    } catch (error) {
      setConnection("down", ...AE.explain(error, "Connection closed: "));
    }
  }

  showState(data.state, false);
  showAgents(data.agents);
  const events = new EventSource(data.events_url);
  events.onopen = () => setConnection("waiting", "Connected · waiting for data from the classroom");
  events.onerror = () => {
    if (events.readyState === EventSource.CLOSED) explainClosed();
    else setConnection("down", "Connection lost · reconnecting…");
  };
  events.addEventListener("state", (e) => {
    setConnection("live", "Live");
    showState(JSON.parse(e.data), true);
  });
  events.addEventListener("signal", (e) => addSignal(JSON.parse(e.data)));
});
