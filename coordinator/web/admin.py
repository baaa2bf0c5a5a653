"""Admin pages: classrooms and their instructors, agents, users, policy thresholds, retention.

Settings edited here are rows of ``db.Setting`` that override the config file at run time
(the policy engine reads ``policy.<rule>.threshold``, retention ``retention.*``), so
a change needs no restart and an empty field falls back to the file's value.
"""

from __future__ import annotations

import logging

from flask import Blueprint, flash, redirect, render_template, request, url_for
from sqlalchemy import delete, func, select
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import NotFound

from affectedge.settings import ConfigError
from affectedge.topics import ID_PATTERN
from coordinator import db, policy, retention, users
from coordinator.provision import provision_agent
from coordinator.store import utcnow
from coordinator.web import access
from coordinator.web.live import agent_rows

log = logging.getLogger(__name__)
bp = Blueprint("admin", __name__, url_prefix="/admin")

#: admin-editable retention, key in db.Setting -> (label, attribute of config.database)
RETENTION = {
    retention.RAW_KEY: ("Raw observations", "retention_days"),
    retention.AGGREGATE_KEY: ("Aggregates (timelines of past sessions)", "aggregate_retention_days"),
}


def _settings() -> dict[str, object]:
    return dict(access.dbs().execute(select(db.Setting.key, db.Setting.value)).all())


def _store_setting(key: str, value: float | None) -> None:
    session = access.dbs()
    if value is None:
        session.execute(delete(db.Setting).where(db.Setting.key == key))
    else:
        session.merge(db.Setting(key=key, value=value))


def _number(field: str, low: float, high: float, what: str) -> float | None:
    """A form number in [low, high], None if empty; ValueError naming ``what`` otherwise."""
    raw = request.form.get(field, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{what}: {raw!r} is not a number") from None
    if not low <= value <= high:
        raise ValueError(f"{what}: {raw} is outside {low:g}–{high:g}")
    return value


@bp.get("/")
@access.admin_required
def home():
    return redirect(url_for("admin.classrooms"))


# -- classrooms -------------------------------------------------------------------------------


def _instructor_names() -> list[str]:
    return list(access.dbs().scalars(select(db.User.username).where(db.User.active).order_by(db.User.username)))


@bp.route("/classrooms", methods=["GET", "POST"])
@access.admin_required
def classrooms():
    session = access.dbs()
    if request.method == "POST":
        room_id = request.form.get("id", "").strip()
        if not ID_PATTERN.match(room_id):
            flash("Classroom id must be 1-64 letters, digits, '_' or '-'.", "error")
        elif session.get(db.Classroom, room_id) is not None:
            flash(f"Classroom {room_id!r} already exists; edit it below.", "error")
        else:
            try:
                fields = _classroom_fields()
            except ValueError as exc:
                flash(f"Classroom {room_id!r} not created: {exc}.", "error")
            else:
                session.add(db.Classroom(id=room_id, **fields))
                session.commit()
                flash(f"Classroom {room_id!r} created.", "ok")
                return redirect(url_for("admin.classrooms"))
    rooms = session.scalars(select(db.Classroom).order_by(db.Classroom.id)).all()
    agents = dict(
        session.execute(select(db.Agent.classroom_id, func.count()).group_by(db.Agent.classroom_id)).all()
    )
    return render_template("admin/classrooms.html", rooms=rooms, agents=agents, people=_instructor_names())


def _classroom_fields(current_instructor: str | None = None) -> dict:
    """The classroom form's fields; ValueError (the message says why) for an instructor who is not
    an active user, except the room's current one: its row offers them even while deactivated
    (marked inactive), so saving a room of someone on leave keeps them assigned."""
    instructor = request.form.get("instructor", "").strip() or None
    if instructor not in (None, current_instructor) and instructor not in _instructor_names():
        raise ValueError(f"there is no active user {instructor!r}; create or reactivate the account first")
    return {
        "name": request.form.get("name", "").strip()[:200],
        "course_id": request.form.get("course_id", "").strip()[:64],
        "instructor": instructor,
    }


@bp.post("/classrooms/<classroom_id>")
@access.admin_required
def update_classroom(classroom_id: str):
    session = access.dbs()
    room = session.get(db.Classroom, classroom_id)
    if room is None:
        raise NotFound(f"there is no classroom {classroom_id!r}")
    try:
        fields = _classroom_fields(room.instructor)
    except ValueError as exc:
        flash(f"Classroom {room.id!r} not saved: {exc}.", "error")
        return redirect(url_for("admin.classrooms"))
    for key, value in fields.items():
        setattr(room, key, value)
    session.commit()
    log.info("classroom %s updated by %s (instructor %s)", room.id, access.viewer().name, room.instructor)
    flash(f"Classroom {room.id!r} saved.", "ok")
    return redirect(url_for("admin.classrooms"))


# -- agents -----------------------------------------------------------------------------------


@bp.get("/agents")
@access.admin_required
def agents():
    offline_after = access.coordinator().config.aggregate.agent_offline_after_s
    rows = agent_rows(access.dbs(), None, utcnow(), offline_after)
    rooms = access.dbs().scalars(select(db.Classroom.id).order_by(db.Classroom.id)).all()
    return render_template("admin/agents.html", agents=rows, rooms=rooms, health=access.coordinator().health())


@bp.post("/agents/provision")
@access.admin_required
def provision():
    """Broker credentials for a new (or rotated) agent, shown once: the password is not stored."""
    name, classroom = request.form.get("name", "").strip(), request.form.get("classroom", "").strip()
    config = access.coordinator().config
    try:
        result = provision_agent(config, name, classroom)
    except (ConfigError, OSError) as exc:
        flash(f"Not provisioned: {exc}", "error")
        return redirect(url_for("admin.agents"))
    except SQLAlchemyError as exc:
        flash(f"Not provisioned: {db.describe_error(exc, config.database.url)}", "error")
        return redirect(url_for("admin.agents"))
    log.info("agent %s provisioned for classroom %s by %s", name, classroom, access.viewer().name)
    return render_template("admin/provisioned.html", result=result, classroom=classroom)


# -- users ------------------------------------------------------------------------------------


def _other_active_admins(username: str) -> int:
    return access.dbs().scalar(
        select(func.count())
        .select_from(db.User)
        .where(db.User.role == "admin", db.User.active, db.User.username != username)
    )


@bp.route("/users", methods=["GET", "POST"])
@access.admin_required
def users_page():
    session = access.dbs()
    if request.method == "POST":
        try:
            users.create_user(
                session,
                request.form.get("username", "").strip(),
                request.form.get("password", ""),
                request.form.get("role", ""),
            )
        except users.UserError as exc:
            flash(f"Not created: {exc}.", "error")
        else:
            session.commit()
            flash("User created.", "ok")
            return redirect(url_for("admin.users_page"))
    people = session.scalars(select(db.User).order_by(db.User.username)).all()
    return render_template("admin/users.html", people=people, roles=users.ROLES)


@bp.post("/users/<username>")
@access.admin_required
def update_user(username: str):
    session = access.dbs()
    user = session.scalar(select(db.User).where(db.User.username == username))
    if user is None:
        raise NotFound(f"there is no user {username!r}")
    role = request.form.get("role", user.role)
    active = request.form.get("active") == "on"
    if (role != "admin" or not active) and user.role == "admin" and not _other_active_admins(username):
        flash("Not saved: this is the last active admin; make another admin first.", "error")
        return redirect(url_for("admin.users_page"))
    if role not in users.ROLES:
        flash(f"Not saved: role must be one of {', '.join(users.ROLES)}.", "error")
        return redirect(url_for("admin.users_page"))
    password = request.form.get("password", "")
    try:
        if password:
            users.set_password(user, password)
    except users.UserError as exc:
        flash(f"Not saved: {exc}.", "error")
        return redirect(url_for("admin.users_page"))
    user.role, user.active = role, active
    session.commit()
    if password and username == access.viewer().name:
        access.bind_session(user)  # a new password ends the user's sessions; keep the admin's own
    log.info("user %s updated by %s: role %s, active %s", username, access.viewer().name, role, active)
    flash(f"User {username!r} saved.", "ok")
    return redirect(url_for("admin.users_page"))


# -- policy and retention ---------------------------------------------------------------------


def _threshold(rule: policy.Rule) -> float | None:
    """The form's override of ``rule``'s threshold in percent, None if empty; held to the bounds the
    rules file has (:meth:`coordinator.policy.Rule.override_problem`), since 0 % on a rule that fires
    above its threshold would fire at once and never clear."""
    percent = _number(f"threshold.{rule.name}", 0, 100, f"threshold of {rule.name}")
    if percent is not None and (problem := rule.override_problem(percent / 100)):
        raise ValueError(f"threshold of {rule.name}: {percent:g} %: {problem}")
    return percent


@bp.route("/settings", methods=["GET", "POST"])
@access.admin_required
def settings():
    config = access.coordinator().config
    rules = policy.load_rules(config.policy.rules)
    if request.method == "POST":
        try:
            thresholds = {rule.name: _threshold(rule) for rule in rules}
            days = {key: _number(key, 0.01, 36500, label) for key, (label, _attr) in RETENTION.items()}
        except ValueError as exc:
            flash(f"Not saved: {exc}.", "error")
        else:
            for name, percent in thresholds.items():
                _store_setting(policy.threshold_key(name), None if percent is None else percent / 100)
            for key, value in days.items():
                _store_setting(key, value)
            access.dbs().commit()
            log.info("policy/retention settings changed by %s", access.viewer().name)
            flash("Settings saved; they apply from the next tick.", "ok")
            return redirect(url_for("admin.settings"))
    current = _settings()
    rule_rows = [
        {"rule": rule, "override": current.get(policy.threshold_key(rule.name))} for rule in rules
    ]
    retention_rows = [
        {"key": key, "label": label, "default": getattr(config.database, attr), "override": current.get(key)}
        for key, (label, attr) in RETENTION.items()
    ]
    return render_template("admin/settings.html", rules=rule_rows, retention=retention_rows)
