/* Small helpers every page uses: local times, and posting forms without a page reload. */
"use strict";

const AE = (() => {
  const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

  function localTimes(root) {
    root.querySelectorAll("time[data-local]").forEach((el) => {
      const when = new Date(el.getAttribute("datetime"));
      if (!isNaN(when)) el.textContent = when.toLocaleString([], {dateStyle: "short", timeStyle: "medium"});
    });
  }

  /* Submit a form with fetch; resolves to the JSON answer, rejects with the server's message. */
  async function post(form, submitter) {
    const body = new FormData(form);
    if (submitter && submitter.name) body.set(submitter.name, submitter.value);
    const response = await fetch(form.getAttribute("action"), {
      method: "POST", body, credentials: "same-origin",
      headers: {"Accept": "application/json", "X-CSRFToken": csrf()},
    });
    const answer = await response.json().catch(() => ({error: response.statusText}));
    if (!response.ok) throw new Error(answer.error || response.statusText);
    return answer;
  }

  document.addEventListener("DOMContentLoaded", () => localTimes(document));
  return {localTimes, post};
})();
