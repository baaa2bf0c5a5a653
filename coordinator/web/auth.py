"""Logging in and out, and changing one's own password.

The login POST is rate limited per client address in ``create_app`` (``web.login_rate``, with
``web.trusted_proxies`` naming the real client behind a proxy), and failures per user name at twice
that, so guessing passwords is slow; the session is cleared on login so a planted session id is useless.
"""

from __future__ import annotations

import logging

from flask import Blueprint, flash, redirect, render_template, request, session, url_for

from coordinator import db, users
from coordinator.web import access

log = logging.getLogger(__name__)
bp = Blueprint("auth", __name__)


def _safe_next(target: str | None) -> str:
    r"""Only same-site paths: an open redirect after login would help phishing. Browsers read ``\`` as
    ``/`` and drop tabs and newlines, so ``/\evil.example`` and ``/<tab>/evil.example`` lead to another
    site just as ``//evil.example`` does: only ``/`` followed by a character other than ``/`` passes,
    and nothing with a backslash or a control character anywhere in it."""
    if (not target or not target.startswith("/") or target[1:2] in ("", "/")
            or any(char == "\\" or not char.isprintable() for char in target)):
        return url_for("live.index")
    return target


@bp.route("/login", methods=["GET", "POST"])
def login():
    if request.method == "GET":
        return render_template("login.html", next=request.args.get("next", ""))
    username = request.form.get("username", "").strip()
    user = users.authenticate(access.dbs(), username, request.form.get("password", ""))
    if user is None:
        log.info("failed dashboard login for %r from %s", username[:64], request.remote_addr)
        return render_template(
            "login.html", next=request.form.get("next", ""), error="Wrong user name or password."
        ), 401
    session.clear()
    access.bind_session(user)
    session.permanent = True
    log.info("dashboard login: %s (%s)", user.username, user.role)
    return redirect(_safe_next(request.form.get("next")))


@bp.post("/logout")
def logout():
    """Ends this login everywhere it is used: this browser's other tabs and their live streams, and
    any copy of its cookie. Other logins of the same user stay (a password change ends those)."""
    access.end_login(access.dbs())
    access.dbs().commit()
    session.clear()
    return redirect(url_for("auth.login"))


@bp.route("/account", methods=["GET", "POST"])
@access.login_required
def account():
    if request.method == "POST":
        user = access.dbs().get(db.User, session["user_id"])
        if not users.authenticate(access.dbs(), user.username, request.form.get("current", "")):
            flash("The current password is wrong.", "error")
        elif request.form.get("new") != request.form.get("repeat"):
            flash("The two new passwords differ.", "error")
        else:
            try:
                users.set_password(user, request.form.get("new", ""))
            except users.UserError as exc:
                flash(f"Not changed: {exc}.", "error")
            else:
                access.dbs().commit()
                access.bind_session(user)  # the new password ends every session but this one
                flash("Password changed.", "ok")
                return redirect(url_for("auth.account"))
    return render_template("account.html")
