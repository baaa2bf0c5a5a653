/* Small helpers every page uses: local times, and talking to the server without a page reload. */
"use strict";

const AE = (() => {
  const meta = (name) => document.querySelector(`meta[name="${name}"]`).content;
  const FULL = {year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit",
                second: "2-digit", timeZoneName: "short"};
  const TIME_ONLY = {hour: "2-digit", minute: "2-digit", second: "2-digit", timeZoneName: "short"};

  /* Every time on a page in the reader's zone, named (data-local="time": without the date). */
  function localTimes(root) {
    root.querySelectorAll("time[data-local]").forEach((el) => {
      const when = new Date(el.getAttribute("datetime"));
      if (!isNaN(when)) el.textContent = when.toLocaleString([], el.dataset.local === "time" ? TIME_ONLY : FULL);
    });
  }

  /* The login behind the page ended (logged out, expired, deactivated, new password). */
  class LoginEnded extends Error {
    constructor() { super("Your login has ended: log in again"); this.name = "LoginEnded"; }
  }

  /* Fetch and return the JSON answer; anything else (401, a redirect to the login page, another
   * error status, an answer that is not JSON) rejects, so a page never takes it for success. */
  async function request(url, options = {}) {
    const response = await fetch(url, {
      credentials: "same-origin", ...options, headers: {"Accept": "application/json", ...options.headers},
    });
    const toLogin = response.redirected && new URL(response.url).pathname === meta("login-url");
    if (response.status === 401 || toLogin) throw new LoginEnded();
    const isJson = (response.headers.get("Content-Type") || "").startsWith("application/json");
    const answer = isJson ? await response.json().catch(() => null) : null;
    if (!response.ok || response.redirected || answer === null) {
      throw new Error(answer?.error || `unexpected answer from the server (HTTP ${response.status}): reload the page and try again`);
    }
    return answer;
  }

  /* Submit a form; resolves to the JSON answer, rejects with the server's message. */
  function post(form, submitter) {
    const body = new FormData(form);
    if (submitter && submitter.name) body.set(submitter.name, submitter.value);
    return request(form.getAttribute("action"), {method: "POST", body, headers: {"X-CSRFToken": meta("csrf-token")}});
  }

  /* An error as status-line content: "Your login has ended: log in again" links to the login page,
   * which brings the reader back here; other errors get ``prefix``. */
  function explain(error, prefix) {
    if (!(error instanceof LoginEnded)) return [document.createTextNode(`${prefix}${error.message}`)];
    const link = document.createElement("a");
    link.href = `${meta("login-url")}?next=${encodeURIComponent(location.pathname + location.search)}`;
    link.textContent = "log in again";
    return [document.createTextNode("Your login has ended: "), link];
  }

  document.addEventListener("DOMContentLoaded", () => localTimes(document));
  return {localTimes, request, post, explain, LoginEnded};
})();
