"""The instructor dashboard and REST API, served by the coordinator (``create_app(coordinator)``).

Plain server-rendered pages with a little vanilla JavaScript; the only third-party browser code is
the vendored Chart.js in ``static/vendor``. Nothing is fetched from a CDN, and the Content Security
Policy allows only this origin, so the dashboard works on an offline campus network.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

import limits
from flask import Flask, g, jsonify, render_template, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from coordinator import health, users
from coordinator.web import access

log = logging.getLogger(__name__)

SECRET_FILE = "web-secret-key"
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def secret_key(configured: str, state_dir: str) -> str:
    """The configured key, else one generated on first start and kept (mode 0600) in state_dir.

    Keeping it means sessions survive a restart; generating it means no demo ships a known key.
    """
    if configured:
        return configured
    path = Path(state_dir) / SECRET_FILE
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(key)
    log.info("generated the dashboard session key in %s", path)
    return key


def create_app(coordinator) -> Flask:
    """The Flask app for ``coordinator`` (its config, database sessions and hub)."""
    from coordinator.web import admin, api, auth, history, live

    config = coordinator.config
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=secret_key(config.web.secret_key, config.state_dir),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=config.web.cookie_secure,
        SESSION_COOKIE_NAME=access.SESSION_COOKIE,
        PERMANENT_SESSION_LIFETIME=access.SESSION_MAX_AGE,
        WTF_CSRF_TIME_LIMIT=None,  # the token lives as long as the login session
        WTF_CSRF_SSL_STRICT=config.web.cookie_secure,
        MAX_CONTENT_LENGTH=1 << 20,
    )
    if config.web.trusted_proxies:
        # the login limit keys on the client's address: behind a proxy without this, every login
        # would come from the proxy, and a few wrong passwords from anyone would lock out everyone
        hops = config.web.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)
    app.extensions["affectedge.coordinator"] = coordinator
    csrf = CSRFProtect(app)
    for blueprint in (auth.bp, live.bp, history.bp, admin.bp):
        app.register_blueprint(blueprint)
    app.register_blueprint(api.bp)
    csrf.exempt(api.bp)  # api.bp enforces CSRF itself for cookie logins; bearer tokens need none

    limiter = Limiter(get_remote_address, app=app, storage_uri="memory://", headers_enabled=True)
    per_address = limiter.limit(
        config.web.login_rate,
        methods=["POST"],
        error_message=f"Too many login attempts from here (limit {config.web.login_rate}): wait, then try again.",
    )
    per_user = limiter.limit(
        _doubled(config.web.login_rate),
        key_func=_login_name,
        methods=["POST"],
        deduct_when=lambda response: response.status_code == 401,
        error_message="Too many failed logins for this user name from several places: wait, then try again.",
    )
    app.view_functions["auth.login"] = per_address(per_user(app.view_functions["auth.login"]))

    @app.get("/healthz")
    def _healthz():
        """For load balancers and monitoring: no login, no counts; 503 while the coordinator is down."""
        now = coordinator.health()
        return jsonify(now.public()), 503 if now.status == health.DOWN else 200

    @app.teardown_request
    def _close_db(_exc) -> None:
        session = g.pop("db", None)
        if session is not None:
            session.close()

    @app.after_request
    def _security_headers(response):
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        if request.endpoint and request.endpoint != "static":
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.errorhandler(CSRFError)
    def _csrf_error(exc: CSRFError):
        if access.wants_data() and access.viewer() is None:  # logging out drops the token with the login
            return _error(401, access.LOGIN_ENDED)
        return _error(400, "The form expired or was not sent from this dashboard: reload the page and try again.")

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return _error(exc.code or 500, exc.description or exc.name)

    @app.context_processor
    def _globals() -> dict:
        return {"viewer": access.viewer(), "k": config.aggregate.k_anonymity}

    users.ensure_admin(coordinator.sessions, config.web.admin_user, config.web.admin_password)
    return app


def _doubled(rate: str) -> str:
    """The failed-login limit per user name: twice ``web.login_rate`` (per address).

    One address alone can never reach it, so an attacker with one address can neither lock a user
    out nor, by spraying names, anyone else; guessing one user's password from many addresses is
    still capped. The price: failures from several addresses lock that user name out for the rest
    of the window.
    """
    return "; ".join(
        f"{2 * item.amount} per {item.multiples} {item.GRANULARITY.name}" for item in limits.parse_many(rate)
    )


def _login_name() -> str:
    """The per-user-name limit's key: the name as ``auth.login`` looks it up (names are at most 64)."""
    return "user:" + request.form.get("username", "").strip()[:64]


def _error(code: int, message: str):
    if request.path.startswith("/api/") or access.wants_data():
        return {"error": message, "status": code}, code
    return render_template("error.html", code=code, message=message), code
