"""Dashboard logins, cookies, CSRF, the login rate limit, roles, the first admin and create-user."""

from __future__ import annotations

import io
import logging
import re
import stat
import time
from datetime import timedelta

import pytest
from outlets import publish_signal
from sqlalchemy import select
from webapp import ADMIN_PASSWORD, PASSWORD, add_classroom, add_user, csrf_token, login, web

from affectedge.settings import ConfigError
from coordinator import cli, db, users
from coordinator.config import load_config
from coordinator.store import utcnow
from coordinator.web import access, create_app
from coordinator.web.access import SESSION_COOKIE


def test_pages_need_a_login_and_a_login_sets_a_safe_cookie(tmp_path):
    _, app = web(tmp_path)
    client = app.test_client()
    answer = client.get("/classrooms/x")
    assert answer.status_code == 302 and answer.headers["Location"].startswith("/login?next=/classrooms/x")

    wrong = login(client, "admin", "not-the-password")
    assert wrong.status_code == 401 and "Wrong user name or password" in wrong.get_data(as_text=True)

    token = csrf_token(client)
    ok = client.post(
        "/login",
        data={"username": "admin", "password": ADMIN_PASSWORD, "csrf_token": token, "next": "https://evil.example/"},
    )
    assert ok.status_code == 302 and ok.headers["Location"] == "/"  # no open redirect
    cookie = ok.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    page = client.get("/")
    assert page.status_code == 200 and "Your classrooms" in page.get_data(as_text=True)
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]

    client.post("/logout", data={"csrf_token": csrf_token(client, "/")})
    assert client.get("/").status_code == 302


@pytest.mark.parametrize("target, location", [
    ("/classrooms/x?window=60", "/classrooms/x?window=60"),
    ("/\\evil.example/x", "/"),  # browsers read "/\\" as "//": another site
    ("/\t/evil.example/x", "/"),  # and drop the tab
    ("/classrooms/x\\..", "/"),
    ("//evil.example/x", "/"),
    ("https://evil.example/", "/"),
    ("evil.example", "/"),
])
def test_login_redirects_only_to_paths_on_this_site(tmp_path, target, location):
    _, app = web(tmp_path)
    client = app.test_client()
    answer = client.post("/login", data={"username": "admin", "password": ADMIN_PASSWORD,
                                         "csrf_token": csrf_token(client), "next": target})
    assert answer.status_code == 302 and answer.headers["Location"] == location


def test_cookie_secure_when_configured(tmp_path):
    _, app = web(tmp_path, web={"cookie_secure": True})
    answer = login(app.test_client(), "admin", ADMIN_PASSWORD)
    assert "Secure" in answer.headers["Set-Cookie"]


def test_posts_without_csrf_token_are_refused(tmp_path):
    _, app = web(tmp_path)
    client = app.test_client()
    answer = client.post("/login", data={"username": "admin", "password": ADMIN_PASSWORD})
    assert answer.status_code == 400 and "reload the page" in answer.get_data(as_text=True)
    login(client, "admin", ADMIN_PASSWORD)
    answer = client.post("/admin/users", data={"username": "eve", "password": "x" * 12, "role": "admin"})
    assert answer.status_code == 400
    assert "eve" not in client.get("/admin/users").get_data(as_text=True)


def test_login_is_rate_limited(tmp_path):
    _, app = web(tmp_path, web={"login_rate": "3 per minute"})
    client = app.test_client()
    for _ in range(3):
        assert login(client, "admin", "guess-guess-guess").status_code == 401
    blocked = login(client, "admin", ADMIN_PASSWORD)  # even the right password waits now
    assert blocked.status_code == 429 and "Too many login attempts" in blocked.get_data(as_text=True)
    assert client.get("/login").status_code == 200  # only the POST is limited


def test_instructor_sees_only_assigned_classrooms(tmp_path):
    p, app = web(tmp_path)
    add_user(p, "alice")
    add_user(p, "bob")
    add_classroom(p, "room-a", "alice")
    add_classroom(p, "room-b", "bob")
    client = app.test_client()
    login(client, "alice")

    index = client.get("/").get_data(as_text=True)
    assert "room-a" in index and "room-b" not in index
    assert client.get("/classrooms/room-a").status_code == 200
    for path in (
        "/classrooms/room-b",
        "/classrooms/room-b/events",
        "/classrooms/room-b/sessions",
    ):
        denied = client.get(path)
        assert denied.status_code == 403, path
        assert "is not assigned to you" in denied.get_data(as_text=True)
    assert client.get("/classrooms/nowhere").status_code == 404
    for path in ("/admin/classrooms", "/admin/users", "/admin/agents", "/admin/settings"):
        assert client.get(path).status_code == 403, path
    assert "Admin" not in client.get("/").get_data(as_text=True)


def test_deactivated_user_is_logged_out(tmp_path):
    p, app = web(tmp_path)
    add_user(p, "alice")
    client = app.test_client()
    login(client, "alice")
    assert client.get("/").status_code == 200
    with p.sessions() as session:
        session.scalar(select(db.User).where(db.User.username == "alice")).active = False
        session.commit()
    assert client.get("/").status_code == 302
    assert login(client, "alice").status_code == 401


def test_first_admin_gets_a_generated_password_logged_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="coordinator")
    p, _ = web(tmp_path, web={"admin_password": "", "admin_user": "root"})
    line = next(r.getMessage() for r in caplog.records if "generated password" in r.getMessage())
    password = re.search(r"generated password (\S+)", line).group(1)
    with p.sessions() as session:
        assert users.authenticate(session, "root", password) is not None
        stored = session.scalar(select(db.User.password_hash).where(db.User.username == "root"))
    assert password not in stored and stored.startswith("scrypt:")

    key_file = tmp_path / "web-secret-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text()
    caplog.clear()
    from coordinator.web import create_app

    again = create_app(p)  # a restart: same key, no second admin, no password in the log
    assert again.config["SECRET_KEY"] == key
    assert not [r for r in caplog.records if "generated password" in r.getMessage()]


def _create_user(monkeypatch, capsys, tmp_path, *args: str, password: str = PASSWORD) -> tuple[int, str]:
    config = tmp_path / "coordinator.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "coordinator.db"}"\n')
    monkeypatch.setattr("sys.stdin", io.StringIO(password + "\n"))
    status = cli.main(["create-user", *args, "--config", str(config)])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def test_create_user_command(tmp_path, monkeypatch, capsys):
    status, out = _create_user(monkeypatch, capsys, tmp_path, "carol", "--role", "instructor")
    assert status == 0 and "created instructor 'carol'" in out

    status, out = _create_user(monkeypatch, capsys, tmp_path, "carol")
    assert status == 2 and out.strip() == "error: user 'carol' already exists: pick another name or use --update"

    status, out = _create_user(monkeypatch, capsys, tmp_path, "dave", password="short")
    assert status == 2 and "too short" in out and len(out.strip().splitlines()) == 1

    status, out = _create_user(
        monkeypatch, capsys, tmp_path, "carol", "--role", "admin", "--update", password="another-password-2"
    )
    assert status == 0
    sessions = db.connect(f"sqlite:///{tmp_path / 'coordinator.db'}")
    with sessions() as session:
        carol = users.authenticate(session, "carol", "another-password-2")
        assert carol is not None and carol.role == "admin"


@pytest.mark.parametrize("name", ["has space", "", "x" * 65])
def test_bad_user_names_are_refused(tmp_path, name):
    p, _ = web(tmp_path)
    with p.sessions() as session, pytest.raises(users.UserError, match="not valid"):
        users.create_user(session, name, PASSWORD, "instructor")


def test_a_new_password_ends_every_other_session(tmp_path):
    """A session cookie copied elsewhere (or left logged in on a lab PC) stops working once its user
    changes the password, or an admin resets it; the browser that changed it stays logged in."""
    p, app = web(tmp_path)
    add_user(p, "alice")
    add_classroom(p, "room-a", "alice")
    alice, copy = app.test_client(), app.test_client()
    login(alice, "alice")
    copy.set_cookie(SESSION_COOKIE, alice.get_cookie(SESSION_COOKIE).value)
    assert copy.get("/classrooms/room-a").status_code == 200

    changed = alice.post("/account", data={"current": PASSWORD, "new": "new-password-22", "repeat": "new-password-22",
                                           "csrf_token": csrf_token(alice, "/account")}, follow_redirects=True)
    assert "Password changed." in changed.get_data(as_text=True)
    assert alice.get("/classrooms/room-a").status_code == 200
    assert copy.get("/classrooms/room-a").status_code == 302
    assert copy.get("/api/v1/classrooms").status_code == 401

    admin = app.test_client()
    login(admin, "admin", ADMIN_PASSWORD)
    token = csrf_token(admin, "/admin/users")
    admin.post("/admin/users/alice", data={"role": "instructor", "active": "on", "password": "reset-password-33",
                                           "csrf_token": token})
    assert alice.get("/classrooms/room-a").status_code == 302  # the reset ends alice's session too
    assert admin.get("/admin/users").status_code == 200  # resetting someone else's leaves the admin's alone
    saved = admin.post("/admin/users/admin", data={"role": "admin", "active": "on", "password": "admin-password-44",
                                                   "csrf_token": token}, follow_redirects=True)
    assert "User &#39;admin&#39; saved." in saved.get_data(as_text=True)  # resetting one's own: still in


def test_a_login_ends_after_its_maximum_age_however_busy(tmp_path, monkeypatch):
    """Flask renews the cookie on every request, so a copied cookie kept in use never expired."""
    p, app = web(tmp_path)
    add_user(p, "alice")
    add_classroom(p, "room-a", "alice")
    alice = app.test_client()
    login(alice, "alice")
    start = time.time()
    monkeypatch.setattr(access, "clock", lambda: start + access.SESSION_MAX_AGE.total_seconds() - 60)
    assert alice.get("/classrooms/room-a").status_code == 200
    monkeypatch.setattr(access, "clock", lambda: start + access.SESSION_MAX_AGE.total_seconds() + 60)
    assert alice.get("/classrooms/room-a").status_code == 302
    assert alice.get("/api/v1/classrooms").status_code == 401


def test_behind_a_trusted_proxy_the_login_limit_keys_on_the_client(tmp_path):
    """Behind the HTTPS proxy every request comes from the proxy's address: keyed on that, five
    wrong passwords from anyone would lock out everyone."""
    proxy = {"REMOTE_ADDR": "127.0.0.1"}
    _, app = web(tmp_path, web={"trusted_proxies": 1, "login_rate": "3 per minute"})
    attacker = app.test_client()
    for _ in range(3):
        token = csrf_token(attacker)
        attacker.post("/login", data={"username": "nobody", "password": "guess-guess-1", "csrf_token": token},
                      headers={"X-Forwarded-For": "203.0.113.66"}, environ_base=proxy)
    token = csrf_token(attacker)
    blocked = attacker.post("/login", data={"username": "admin", "password": ADMIN_PASSWORD, "csrf_token": token},
                            headers={"X-Forwarded-For": "203.0.113.66"}, environ_base=proxy)
    assert blocked.status_code == 429 and "Too many login attempts from here" in blocked.get_data(as_text=True)
    admin = app.test_client()
    token = csrf_token(admin)
    ok = admin.post("/login", data={"username": "admin", "password": ADMIN_PASSWORD, "csrf_token": token},
                    headers={"X-Forwarded-For": "198.51.100.7"}, environ_base=proxy)
    assert ok.status_code == 302

    # without trusted proxies, a client cannot dodge the limit with a forged X-Forwarded-For
    (tmp_path / "direct").mkdir()
    _, direct = web(tmp_path / "direct", web={"login_rate": "3 per minute"})
    client = direct.test_client()
    answers = []
    for i in range(4):
        token = csrf_token(client)
        answers.append(client.post("/login", data={"username": "nobody", "password": "guess-guess-1",
                                                   "csrf_token": token},
                                   headers={"X-Forwarded-For": f"192.0.2.{i}"}).status_code)
    assert answers == [401, 401, 401, 429]


def test_trusted_proxies_is_checked_at_load(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[web]\ntrusted_proxies = 2\n")
    assert load_config(path).web.trusted_proxies == 2
    for value in ("-1", "6", "true", '"1"'):
        path.write_text(f"[web]\ntrusted_proxies = {value}\n")
        with pytest.raises(ConfigError, match=r"key `web\.trusted_proxies`: Input should be"):
            load_config(path)


def test_failed_logins_per_user_name_are_limited(tmp_path):
    """Guessing one user's password from many addresses is capped at twice the per-address rate;
    one address alone never reaches that, so it can lock nobody out (it hits its own limit first)."""
    p, app = web(tmp_path, web={"login_rate": "3 per minute"})
    add_user(p, "alice")
    add_user(p, "bob")

    def attempt(address: str, name: str, password: str) -> int:
        client = app.test_client()
        token = csrf_token(client)
        return client.post("/login", data={"username": name, "password": password, "csrf_token": token},
                           environ_base={"REMOTE_ADDR": address}).status_code

    assert [attempt("192.0.2.1", "alice", "guess-guess-1") for _ in range(4)] == [401, 401, 401, 429]
    assert attempt("192.0.2.2", "alice", PASSWORD) == 302  # one address: alice is not locked out
    assert attempt("192.0.2.2", "alice", PASSWORD) == 302  # and successes do not count
    assert [attempt("192.0.2.3", "alice", "guess-guess-2") for _ in range(3)] == [401, 401, 401]
    refused = app.test_client()
    token = csrf_token(refused)
    answer = refused.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": token},
                          environ_base={"REMOTE_ADDR": "192.0.2.4"})
    assert answer.status_code == 429  # 6 failures from two addresses: alice waits out the minute
    assert "Too many failed logins for this user name" in answer.get_data(as_text=True)
    assert attempt("192.0.2.4", "bob", PASSWORD) == 302  # other names are not affected


JSON = {"Accept": "application/json"}
STREAM = {"Accept": "text/event-stream"}


@pytest.mark.parametrize("end", ["deactivated", "logged out"])
def test_a_script_is_told_its_login_ended_not_sent_the_login_page(tmp_path, end):
    """The page's fetch followed the redirect to the login page and took its 200 for success: the
    card read "undefined by undefined" while the signal stayed open. Scripts get a 401 instead."""
    p, app = web(tmp_path)
    add_user(p, "alice")
    add_classroom(p, "room-a", "alice")
    signal = publish_signal(p, classroom="room-a")
    client = app.test_client()
    login(client, "alice")
    token = csrf_token(client, "/classrooms/room-a")
    if end == "deactivated":
        with p.sessions.begin() as session:
            session.scalar(select(db.User).where(db.User.username == "alice")).active = False
    else:  # logging out also drops the CSRF token: the answer must still say why
        client.post("/logout", data={"csrf_token": token})

    ack = client.post(f"/classrooms/room-a/signals/{signal.id}", data={"decision": "acknowledge", "csrf_token": token},
                      headers={**JSON, "X-CSRFToken": token})
    assert ack.status_code == 401 and ack.json == {"error": "your login has ended: log in again", "status": 401}
    events = client.get("/classrooms/room-a/events", headers=STREAM)
    assert events.status_code == 401 and events.mimetype != "text/event-stream"
    page = client.get("/classrooms/room-a")
    assert page.status_code == 302 and page.headers["Location"].startswith("/login?next=/classrooms/room-a")
    with p.sessions() as session:
        assert session.get(db.Signal, signal.id).status == "open"


def test_logging_out_ends_the_login_on_every_coordinator(tmp_path):
    """Logging out only cleared the browser's cookie: a copy of it (or another tab's live view) went on
    for 12 h. The ended login is kept in the database, so a second coordinator refuses it too."""
    p, app = web(tmp_path)
    add_user(p, "alice")
    add_classroom(p, "room-a", "alice")
    alice, elsewhere = app.test_client(), app.test_client()
    login(alice, "alice")
    login(elsewhere, "alice")  # her own other login, e.g. on her laptop
    cookie = alice.get_cookie(SESSION_COOKIE).value
    copy, other_coordinator = app.test_client(), create_app(p).test_client()
    for client in (copy, other_coordinator):
        client.set_cookie(SESSION_COOKIE, cookie)
        assert client.get("/classrooms/room-a").status_code == 200

    alice.post("/logout", data={"csrf_token": csrf_token(alice, "/")})
    for client in (alice, copy, other_coordinator):
        assert client.get("/classrooms/room-a").status_code == 302
        assert client.get("/api/v1/classrooms").status_code == 401
    assert elsewhere.get("/classrooms/room-a").status_code == 200

    with p.sessions.begin() as session:  # a logout from long ago: its login has expired anyway
        session.add(db.EndedLogin(login_id="old", ended_at=utcnow() - access.SESSION_MAX_AGE - timedelta(minutes=1)))
    elsewhere.post("/logout", data={"csrf_token": csrf_token(elsewhere, "/")})
    with p.sessions() as session:
        ended = list(session.scalars(select(db.EndedLogin.login_id)))
    assert len(ended) == 2 and "old" not in ended  # the two logouts; the expired one is purged
