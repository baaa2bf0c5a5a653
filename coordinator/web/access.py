"""Who is asking, and what they may see: session logins, API bearer tokens, classroom ownership.

Every view that touches a classroom goes through :func:`classroom_or_403`, so the rule
"an instructor sees only the classrooms assigned to them" lives in exactly one place.
A login session is bound to the password it was made under (:func:`password_stamp`), so a
password change or reset ends a copied or forgotten session elsewhere; and it carries a random
login id that logging out records as ended in the database (:func:`end_login`), so a copy of the
cookie, or a live stream opened under it in another tab, ends with it on every coordinator.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import wraps

from flask import abort, current_app, g, redirect, request, session, url_for
from sqlalchemy import delete, select
from sqlalchemy.orm import Session
from werkzeug.exceptions import Forbidden, Unauthorized

from coordinator import db

SESSION_COOKIE = "affectedge_session"
#: session key of :func:`password_stamp`
STAMP = "stamp"
#: session key of the login time (seconds since the epoch)
LOGGED_IN_AT = "logged_in_at"
#: session key of the random id of this login, which logging out records as ended
LOGIN_ID = "login_id"
#: what a script's request (a fetch, the event stream) is told instead of a redirect to the login page
LOGIN_ENDED = "your login has ended: log in again"
#: a login lasts this long however busy it is: Flask renews the cookie on every request, so without
#: it a copied cookie kept in use would never expire
SESSION_MAX_AGE = timedelta(hours=12)
#: wall-clock seconds for login ages (a name of its own, so tests can age a login)
clock = time.time


@dataclass(frozen=True)
class Viewer:
    """The caller: a dashboard user, or an API token (which sees everything, like an admin)."""

    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def coordinator():
    return current_app.extensions["affectedge.coordinator"]


def dbs() -> Session:
    """One SQLAlchemy session per request, closed by the app's teardown hook."""
    if "db" not in g:
        g.db = coordinator().sessions()
    return g.db


def password_stamp(password_hash: str) -> str:
    """What a login session is bound to: 16 hex digits of an HMAC of the user's password hash.

    The session cookie is signed but readable by its holder, hence a keyed digest and not the hash.
    Changing or resetting the password changes the stamp, which ends every session issued before.
    """
    key = current_app.secret_key
    key = key.encode() if isinstance(key, str) else key
    return hmac.new(key, password_hash.encode(), "sha256").hexdigest()[:16]


def bind_session(user: db.User) -> None:
    """Make this browser's session ``user``'s, under their current password (at login, and after
    this browser changed the password, so that it alone stays logged in). The login time is kept
    from the first: a password change does not extend the session's life (:data:`SESSION_MAX_AGE`)."""
    session["user_id"] = user.id
    session[STAMP] = password_stamp(user.password_hash)
    session.setdefault(LOGGED_IN_AT, clock())
    session.setdefault(LOGIN_ID, secrets.token_hex(16))


def _expired(logged_in_at: float) -> bool:
    return clock() - logged_in_at > SESSION_MAX_AGE.total_seconds()


def _now() -> datetime:
    """:data:`clock` as the schema's naive UTC."""
    return datetime.fromtimestamp(clock(), UTC).replace(tzinfo=None)


def _ended(session_: Session, login_id: str | None) -> bool:
    """Logged out (or from a cookie made before logins had ids, which cannot be logged out)."""
    return login_id is None or session_.get(db.EndedLogin, login_id) is not None


def end_login(session_: Session) -> None:
    """Record this browser's login as ended (the caller commits), and forget ended logins so old
    that they have expired anyway: the table holds at most :data:`SESSION_MAX_AGE` of logouts."""
    now = _now()
    session_.execute(delete(db.EndedLogin).where(db.EndedLogin.ended_at < now - SESSION_MAX_AGE))
    login_id = session.get(LOGIN_ID)
    if login_id is not None and session_.get(db.EndedLogin, login_id) is None:
        session_.add(db.EndedLogin(login_id=login_id, ended_at=now))


def _session_viewer() -> Viewer | None:
    user_id = session.get("user_id")
    if user_id is None:
        return None
    user = dbs().get(db.User, user_id)
    if user is None or not user.active or _expired(session.get(LOGGED_IN_AT, 0)) or not hmac.compare_digest(
        session.get(STAMP, ""), password_stamp(user.password_hash)
    ) or _ended(dbs(), session.get(LOGIN_ID)):
        session.clear()
        return None
    return Viewer(user.username, user.role)


@dataclass(frozen=True)
class Login:
    """A dashboard login, for work that outlives the request (the live event stream re-checks it)."""

    user_id: int
    password_hash: str  # the one the session was checked against: another password ends the login
    logged_in_at: float  # a stream, too, ends once the login is SESSION_MAX_AGE old
    login_id: str  # or once this login is logged out (in any tab, on any coordinator)


def login() -> Login:
    """The logged-in user's login (``login_required`` views only)."""
    user = dbs().get(db.User, session["user_id"])
    return Login(user.id, user.password_hash, session[LOGGED_IN_AT], session[LOGIN_ID])


def token_viewer() -> Viewer | None:
    """The API caller named by an ``Authorization: Bearer`` header (None without one; 401 if wrong)."""
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return None
    token = header.removeprefix("Bearer ").strip().encode()
    for known in coordinator().config.web.api_tokens:
        if token and hmac.compare_digest(token, known.encode()):
            return Viewer("api-token", "admin")
    abort(401, description="the bearer token is not valid: use one listed in web.api_tokens")


def viewer() -> Viewer | None:
    """The logged-in user (the API blueprint may have set an API token viewer before)."""
    if "viewer" not in g:
        g.viewer = _session_viewer()
    return g.viewer


def wants_data() -> bool:
    """A script's request (JSON from fetch, or the event stream) rather than a page to show."""
    return request.accept_mimetypes.best in ("application/json", "text/event-stream")


def _to_login():
    """Where a request without a valid login goes: a page to the login page; a script's request is
    answered 401, since a redirect would hand it the login page's HTML as if that were its answer."""
    if wants_data():
        raise Unauthorized(LOGIN_ENDED)
    return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))


def login_required(view):
    @wraps(view)
    def wrapper(*args, **kwargs):
        if viewer() is None:
            return _to_login()
        return view(*args, **kwargs)

    return wrapper


def admin_required(view):
    @wraps(view)
    def wrapper(*args, **kwargs):
        who = viewer()
        if who is None:
            return _to_login()
        if not who.is_admin:
            raise Forbidden("this page is for administrators; ask one if you need a change here")
        return view(*args, **kwargs)

    return wrapper


def visible_classrooms(session_: Session, who: Viewer) -> list[db.Classroom]:
    query = select(db.Classroom).order_by(db.Classroom.id)
    if not who.is_admin:
        query = query.where(db.Classroom.instructor == who.name)
    return list(session_.scalars(query))


def may_see(who: Viewer, room: db.Classroom) -> bool:
    """The one rule: admins (and API tokens) see every classroom, instructors their own."""
    return who.is_admin or room.instructor == who.name


def still_may_see(session_: Session, login_: Login, classroom_id: str) -> bool:
    """For a long-lived stream: is the user who opened it still active, under the same password,
    within the login's maximum age, not logged out, and still allowed in?"""
    user = session_.get(db.User, login_.user_id)
    room = session_.get(db.Classroom, classroom_id)
    return bool(
        user and user.active and user.password_hash == login_.password_hash and not _expired(login_.logged_in_at)
        and not _ended(session_, login_.login_id) and room and may_see(Viewer(user.username, user.role), room)
    )


def classroom_or_403(classroom_id: str) -> db.Classroom:
    """The classroom if the viewer may see it; 404 if unknown, 403 if it is someone else's."""
    room = dbs().get(db.Classroom, classroom_id)
    if room is None:
        abort(404, description=f"there is no classroom {classroom_id!r}")
    who = viewer()
    if who is None or not may_see(who, room):
        raise Forbidden(
            f"classroom {classroom_id!r} is not assigned to you; ask an administrator to assign it "
            "if you teach there"
        )
    return room


def visible_classroom_ids(who: Viewer) -> set[str] | None:
    """Ids the viewer may see, or None for "all" (admins and API tokens)."""
    if who.is_admin:
        return None
    return {room.id for room in visible_classrooms(dbs(), who)}
