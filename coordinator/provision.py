"""``coordinator provision-agent NAME --classroom C``: broker credentials and a config for one edge agent.

The broker is the privacy boundary between lab PCs and the coordinator, so every agent gets its
own Mosquitto user and may publish only under ``affectedge/v1/<classroom>/<agent>/#``: a stolen
lab-PC password can neither read other classrooms nor impersonate another agent. Provisioning

1. sets the agent's password in ``[broker] passwd_file`` (and this coordinator's own, from
   ``[mqtt] username``/``password``, so the two files never disagree) with the real
   ``mosquitto_passwd`` when it is installed, else by writing the PBKDF2-SHA512 line Mosquitto 2
   reads (:func:`hash_password`);
2. records ``provisioned_at`` on the agent's row and regenerates ``[broker] acl_file`` from every
   provisioned agent in the database (the database, not the file, is the source of truth, so the
   ACL can always be rebuilt; re-provisioning an agent rotates its password and can move it to
   another classroom), letting every coordinator user (``[broker] coordinator_users``) read them all;
3. returns the ``[agent]``/``[mqtt]`` part of the agent's TOML, ready to paste.

Mosquitto reads both files only at start and on SIGHUP: reload it afterwards
(``systemctl reload mosquitto``; ``deploy/systemd/affectedge-broker-reload.path`` does it whenever the
ACL changes). ``deploy/mosquitto/mosquitto.conf`` is the broker config these files plug into; it puts
them in a directory the coordinator's service user owns, the one its unit may write. It also sets
``use_username_as_clientid``, so each user is its own session: an agent's password cannot take over the
coordinator's or another agent's session, and each coordinator instance needs its own broker user.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from affectedge import topics
from affectedge.settings import ConfigError
from coordinator import db
from coordinator.commands import with_config
from coordinator.config import CoordinatorConfig
from coordinator.store import utcnow

#: what mosquitto_passwd 2.0 writes; the password is 32 random URL-safe characters (~190 bits),
#: so key stretching adds nothing against guessing and more rounds would only slow every CONNECT
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12
#: a new passwd/ACL file: readable by the broker's group, never by everyone (it holds hashes)
NEW_FILE_MODE = 0o640


class ProvisionError(ConfigError):
    """Provisioning cannot proceed; the message is one line saying how to fix it."""


@dataclass(frozen=True)
class ProvisionResult:
    username: str
    password: str
    config_snippet: str


def hash_password(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """The Mosquitto 2 password-file hash of ``password``: ``$7$<iterations>$<salt b64>$<hash b64>``."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _replace_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so the broker never reads half a file; keep an existing file's mode."""
    mode = path.stat().st_mode & 0o777 if path.exists() else NEW_FILE_MODE
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def set_password(passwd_file: Path, username: str, password: str) -> None:
    """Create or update ``username`` in a Mosquitto password file."""
    if not passwd_file.exists():
        passwd_file.touch()
        # explicitly: touch(mode=) is masked by the umask, and the unit's UMask=0077 left the broker's group out
        os.chmod(passwd_file, NEW_FILE_MODE)
    binary = shutil.which("mosquitto_passwd")
    if binary:
        # the password goes through stdin (prompt + confirmation), never argv, where `ps` shows it
        done = subprocess.run([binary, str(passwd_file), username], input=f"{password}\n{password}\n",
                              capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ProvisionError(f"mosquitto_passwd could not update {passwd_file}: {reason[0]}")
        return
    kept = [line for line in passwd_file.read_text(encoding="utf-8").splitlines()
            if line.strip() and line.split(":", 1)[0] != username]
    _replace_atomically(passwd_file, "\n".join([*kept, f"{username}:{hash_password(password)}"]) + "\n")


def acl_text(coordinators: Sequence[str], agents: list[tuple[str, str]]) -> str:
    """The Mosquitto ACL: each coordinator user reads every agent topic, each agent writes only its own."""
    lines = [
        "# Generated by `coordinator provision-agent` from the coordinator database: do not edit,",
        "# the next provisioning overwrites this file. Users not listed here may do nothing.",
    ]
    for user in coordinators:
        lines += ["", f"user {user}", f"topic read {topics.PREFIX}/#"]
    for agent, classroom in sorted(agents):
        lines += ["", f"user {agent}", f"topic write {topics.PREFIX}/{classroom}/{agent}/#"]
    return "\n".join(lines) + "\n"


def _toml(value: str | int) -> str:
    return json.dumps(value)  # a JSON string or integer is also a valid TOML one


def agent_snippet(config: CoordinatorConfig, name: str, classroom: str, password: str) -> str:
    """The agent's ``[agent]`` and ``[mqtt]`` TOML (keys of :mod:`edge_agent.config`)."""
    broker = config.broker
    lines = [
        f"# AffectEdge edge agent {name!r}, provisioned {utcnow():%Y-%m-%d %H:%M} UTC by the coordinator.",
        # as deploy/systemd/install.sh installs that file: 0600 root-only would lock out `User=affectedge`
        "# Paste into the agent's config, /etc/affectedge/agent.toml. It holds a password: keep that file mode",
        "# 0640, owner root, group affectedge, as install.sh does (the service's user reads it, no one else may):",
        "#   chown root:affectedge /etc/affectedge/agent.toml && chmod 0640 /etc/affectedge/agent.toml",
        "[agent]",
        f"id = {_toml(name)}",
        f"classroom = {_toml(classroom)}",
        "",
        "[mqtt]",
        f"host = {_toml(broker.host)}",
        f"port = {broker.port}",
        f"username = {_toml(name)}",
        f"password = {_toml(password)}",
    ]
    if broker.tls:
        lines += ["", "[mqtt.tls]"]
        if config.mqtt.tls_ca:
            lines += ["# the CA that signed the broker's certificate: copy this file to the agent",
                      f"ca = {_toml(config.mqtt.tls_ca)}"]
        else:
            lines.append("# no `ca`: the system's trusted CAs verify the broker's certificate")
    return "\n".join(lines) + "\n"


def _coordinator_users(config: CoordinatorConfig) -> tuple[str, ...]:
    """The broker users the ACL lets read every agent: ``[broker] coordinator_users``, else this instance's
    ``[mqtt] username``. The shipped broker makes a user's name its client id, so instances sharing one user
    would keep taking each other's session: each needs its own, and every one must be listed."""
    own, listed = config.mqtt.username, config.broker.coordinator_users
    if not listed:
        if not own:
            raise ProvisionError("set [mqtt] username (and password): the coordinator's broker user, the one "
                                 "the ACL lets read every agent's topic")
        return (own,)
    if own and own not in listed:
        raise ProvisionError(f"[mqtt] username {own!r} is not in [broker] coordinator_users: add it, or this "
                             "coordinator may read nothing once the ACL is rewritten")
    return listed


def _check(config: CoordinatorConfig, name: str, classroom: str) -> tuple[Path, Path, tuple[str, ...]]:
    broker = config.broker
    if not broker.passwd_file or not broker.acl_file:
        raise ProvisionError("set [broker] passwd_file and acl_file (the files Mosquitto's password_file "
                             "and acl_file point at) in the coordinator config")
    coordinators = _coordinator_users(config)
    try:
        topics.check_id(name, "agent name")
        topics.check_id(classroom, "classroom")
    except ValueError as exc:
        raise ProvisionError(str(exc)) from None
    if name in coordinators:
        raise ProvisionError(f"agent name {name!r} is a coordinator's broker user; choose another name")
    passwd_file, acl_file = Path(broker.passwd_file), Path(broker.acl_file)
    for path in (passwd_file, acl_file):
        if not path.parent.is_dir():
            raise ProvisionError(f"directory {path.parent} does not exist; create it or fix [broker] in the config")
        # both files are replaced by renaming a new one over them, so the directory must be writable;
        # under the shipped unit only the ReadWritePaths directory is (a read-only file system fails here too)
        if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.R_OK)):
            raise ProvisionError(
                f"user {_user()} cannot read and replace {path}: provision as the coordinator's service user "
                f"(sudo -u affectedge), with {path.parent} owned by it (install -d -o affectedge -g mosquitto "
                "-m 2750 DIR) and listed in its unit's ReadWritePaths "
                "(deploy/systemd/affectedge-coordinator.service; deploy/mosquitto/mosquitto.conf has the layout)")
    return passwd_file, acl_file, coordinators


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid without a passwd entry (some containers)
        return str(os.geteuid())


def provision_agent(config: CoordinatorConfig, name: str, classroom: str) -> ProvisionResult:
    """Create or rotate agent ``name``'s broker credentials, pin it to ``classroom``, rebuild the ACL."""
    passwd_file, acl_file, coordinators = _check(config, name, classroom)
    password = secrets.token_urlsafe(24)
    sessions = db.connect(config.database.url)
    # the database first, the password file inside its transaction: a database that is down must
    # not leave the agent's old password replaced by one nobody was shown
    with sessions.begin() as s:
        agent = s.get(db.Agent, name)
        if agent is None:
            agent = db.Agent(id=name, classroom_id=classroom)
            s.add(agent)
        agent.classroom_id, agent.provisioned_at = classroom, utcnow()
        s.flush()
        provisioned = s.execute(
            select(db.Agent.id, db.Agent.classroom_id).where(db.Agent.provisioned_at.is_not(None))
        ).all()
        set_password(passwd_file, name, password)
        if config.mqtt.username and config.mqtt.password:
            set_password(passwd_file, config.mqtt.username, config.mqtt.password)
    _replace_atomically(acl_file, acl_text(coordinators, [tuple(row) for row in provisioned]))
    return ProvisionResult(name, password, agent_snippet(config, name, classroom, password))


def _run(args: argparse.Namespace) -> int:
    result = with_config(args.config, lambda config: provision_agent(config, args.name, args.classroom),
                         OSError, subprocess.SubprocessError)
    print(result.config_snippet, end="")
    print(f"agent {result.username!r} may now publish under {topics.PREFIX}/{args.classroom}/{result.username}/#; "
          "reload the broker so it rereads its password and ACL files (affectedge-broker-reload.path does that "
          "where it runs; else: systemctl reload mosquitto)",
          file=sys.stderr)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "provision-agent", help="create or rotate an edge agent's broker credentials; print its config")
    parser.add_argument("name", help="agent id (1-64 letters, digits, '_' or '-'); also its broker user")
    parser.add_argument("--classroom", required=True, help="classroom id the agent publishes for")
    parser.add_argument("--config", help="coordinator TOML config (its [broker], [mqtt] and [database])")
    parser.set_defaults(func=_run)
