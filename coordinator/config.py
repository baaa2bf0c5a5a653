"""The coordinator's configuration: one TOML file, validated section by section.

Every key has a default so an empty file runs a localhost demo; ``deploy/coordinator.example.toml``
shows each key with a comment. Paths that must exist (TLS files, rules) are checked here, at load
time, so a typo is a one-line :class:`~affectedge.settings.ConfigError` (exit status 2) instead of a
failure minutes later when the first client connects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import limits
from pydantic import Field, ValidationInfo, field_validator, model_validator

from affectedge.settings import ConfigError, Section, load
from affectedge.topics import ID_PATTERN

Port = Annotated[int, Field(ge=1, le=65535)]
Positive = Annotated[float, Field(gt=0)]


MIN_TOKEN = 16  # characters: a bearer token shorter than this is guessable
PLACEHOLDER = "change-me"  # deploy/coordinator.example.toml's secrets start so: never a real one
#: deliveries to an LMS: 32 attempts 2 s apart and doubling (jittered) up to the 5-minute cap of
#: coordinator.outbox.MAX_BACKOFF_S give up 2 h 4 min to 2 h 6 min after the first, so they ride out a
#: 2-hour LMS outage; 10 gave up after 17-26 minutes, marking most of an hour-long outage's signals dead
DEFAULT_ATTEMPTS = 32
HOME_PAGE_EXAMPLE = "https://affectedge.school.example"  # in [xapi] home_page's errors
#: a query or fragment, or characters RFC 3987 excludes from IRIs (as it does spaces)
NOT_IN_BASE_URL = '?#<>"{}|\\^`'


def _existing_file(value: str) -> str:
    if value and not Path(value).is_file():
        raise ValueError(f"file {value!r} does not exist")
    return value


def _http_url(value: str) -> str:
    """An http(s) URL, or empty where the key is optional (empty = off)."""
    if value and urlsplit(value).scheme not in ("http", "https"):
        raise ValueError("use an http:// or https:// URL")
    return value


def _base_url(value: str) -> str:
    """``value`` as a public base URL, without trailing "/" (so "https://x/" and "https://x" name the
    same classrooms)."""
    if not _is_base_url(value):
        raise ValueError(f"use this coordinator's public base URL, e.g. {HOME_PAGE_EXAMPLE}: http:// or https://, "
                         "a host, no user name, query or fragment")
    return value.rstrip("/")


def _is_base_url(value: str) -> bool:
    """Whether ``value`` can root valid IRIs: http(s), a host and a usable port, no user name (it would be
    published in every statement), and no query, fragment or character that IRIs exclude."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number from 0 to 65535
    except ValueError:  # also an unclosed "[" of an IPv6 host
        return False
    return (parts.scheme in ("http", "https") and bool(parts.hostname) and "@" not in parts.netloc
            and not any(c.isspace() or c in NOT_IN_BASE_URL for c in value))


def _tokens(values: tuple[str, ...]) -> tuple[str, ...]:
    """Bearer tokens; an empty one (an unset template variable) would let anyone in."""
    for i, token in enumerate(values):
        if token.startswith(PLACEHOLDER):
            raise ValueError(f"token {i + 1} is the example config's placeholder: replace it with a random one, "
                             "e.g. from `openssl rand -hex 24`")
        if len(token.strip()) < MIN_TOKEN:
            raise ValueError(f"token {i + 1} has {len(token.strip())} characters; use at least {MIN_TOKEN} "
                             "random ones, e.g. from `openssl rand -hex 24`")
    return values


class MqttConfig(Section):
    url: str = "mqtt://127.0.0.1:1883"
    username: str = ""
    password: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # a broker with use_username_as_clientid (the shipped one) replaces it with `username`: there each
    # instance needs its own username, as elsewhere its own client_id (two would keep kicking each other)
    client_id: str = "affectedge-coordinator"
    # "" = a plain subscription (one instance only; brokers without shared subscriptions)
    shared_group: str = "coordinators"
    # "5", or "3.1.1" for brokers without MQTT 5 such as the embedded one of `make demo`
    # (3.1.1 persistent sessions use clean_session = false)
    protocol: Literal["5", "3.1.1"] = "5"
    qos: Annotated[int, Field(ge=0, le=2)] = 1
    # persistent session: QoS 1 messages published while the coordinator is down wait in the broker
    clean_start: bool = False

    @field_validator("password")
    @classmethod
    def _password(cls, value: str) -> str:
        # provision-agent writes this password into the broker's password file: a publicly known
        # one would let anyone read every classroom's labels as the coordinator
        if value.startswith(PLACEHOLDER):
            raise ValueError("this is the example config's placeholder: set the coordinator's own broker password, "
                             "e.g. from `openssl rand -hex 24`")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("use mqtt://host:port or mqtts://host:port")
        return value

    @field_validator("client_id", "shared_group")
    @classmethod
    def _id(cls, value: str, info) -> str:
        if not (value == "" and info.field_name == "shared_group") and not ID_PATTERN.match(value):
            raise ValueError("use 1-64 letters, digits, '_' or '-'")
        return value

    _files = field_validator("tls_ca", "tls_cert", "tls_key")(_existing_file)

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"


class DatabaseConfig(Section):
    url: str = "sqlite:///affectedge-coordinator.db"
    retention_days: Annotated[float, Field(gt=0)] = 30
    aggregate_retention_days: Annotated[float, Field(gt=0)] = 365

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("sqlite://", "postgresql")):
            raise ValueError("use sqlite:///path.db or postgresql+psycopg://user:pass@host/db")
        return value


class AggregateConfig(Section):
    windows: tuple[Annotated[int, Field(ge=1, le=86400)], ...] = (10, 60, 300)
    default_window: int = 60
    k_anonymity: Annotated[int, Field(ge=1)] = 3
    # 0.25 s keeps publish-to-signal p95 under 1 s (measured with `coordinator bench --tick`)
    tick_seconds: Positive = 0.25
    agent_offline_after_s: Positive = 30
    # a classroom's open session is closed after this long without observations
    session_idle_minutes: Positive = 15

    @model_validator(mode="after")
    def _default_is_a_window(self) -> AggregateConfig:
        if not self.windows:
            raise ValueError("windows must list at least one window length in seconds")
        if self.default_window not in self.windows:
            raise ValueError(f"default_window {self.default_window} must be one of windows {self.windows}")
        return self


class PolicyConfig(Section):
    rules: str = ""  # path to a rules TOML; "" = the shipped coordinator/rules.toml

    _files = field_validator("rules")(_existing_file)


class GrpcConfig(Section):
    host: str = "127.0.0.1"
    port: Port = 50051
    tokens: tuple[str, ...] = ()  # bearer tokens; empty = auth disabled (logged as a warning)
    tls_cert: str = ""
    tls_key: str = ""

    _files = field_validator("tls_cert", "tls_key")(_existing_file)
    _tokens = field_validator("tokens")(_tokens)

    @model_validator(mode="after")
    def _pair(self) -> GrpcConfig:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("set both tls_cert and tls_key, or neither")
        return self


class WebConfig(Section):
    host: str = "127.0.0.1"
    port: Port = 8080
    secret_key: str = ""  # empty: generated once and kept in state_dir
    api_tokens: tuple[str, ...] = ()
    admin_user: str = "admin"
    admin_password: str = ""  # empty: generated on first start, printed once to the log
    cookie_secure: bool = False
    login_rate: str = "5 per minute"
    # reverse proxies in front of the web app, whose X-Forwarded-For/-Proto/-Host are believed;
    # 0 = clients connect directly and those headers are ignored (any client could forge them)
    trusted_proxies: Annotated[int, Field(ge=0, le=5, strict=True)] = 0  # strict: `true` is not 1

    _tokens = field_validator("api_tokens")(_tokens)

    @field_validator("login_rate")
    @classmethod
    def _rate(cls, value: str) -> str:
        """Checked here: flask-limiter would only log an unreadable rate and then not limit at all."""
        try:
            limits.parse_many(value)
        except ValueError:
            raise ValueError("use a rate such as '5 per minute' or '10/hour'") from None
        return value


class WebhookConfig(Section):
    url: str
    secret: str = ""
    classrooms: tuple[str, ...] = ()  # empty = all
    max_attempts: Annotated[int, Field(ge=1)] = DEFAULT_ATTEMPTS
    backoff_s: Positive = 2.0
    timeout_s: Positive = 5.0

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value:
            raise ValueError("set the receiver's http:// or https:// URL")
        return _http_url(value)


class XapiConfig(Section):
    endpoint: str = ""  # empty = off
    # this coordinator's public base URL: the classroom accounts' homePage and the root of every activity
    # IRI. Validated even when left at its default, because with an endpoint it is required
    home_page: str = Field("", validate_default=True)
    username: str = ""
    password: str = ""
    max_attempts: Annotated[int, Field(ge=1)] = DEFAULT_ATTEMPTS
    backoff_s: Positive = 2.0

    _url = field_validator("endpoint")(_http_url)

    @field_validator("home_page")
    @classmethod
    def _home_page(cls, value: str, info: ValidationInfo) -> str:
        """Required with an endpoint: the identifiers used to be built from ``[web] host:port``, a
        listening address (127.0.0.1:8080 behind a proxy) that two schools share and that changes with a
        port or a failover, so one LRS merged schools' classrooms and split each across actors."""
        if not value:
            if info.data.get("endpoint"):
                raise ValueError(f"set it to this coordinator's public base URL, e.g. {HOME_PAGE_EXAMPLE}, "
                                 "whenever endpoint is set: classroom and course identifiers in the LRS are "
                                 "built from it and must stay the same across hosts, ports and failovers")
            return value
        return _base_url(value)


class BrokerConfig(Section):
    """Where provision-agent writes Mosquitto credentials and what it tells agents to connect to."""

    passwd_file: str = ""
    acl_file: str = ""
    host: str = "127.0.0.1"
    port: Port = 1883
    tls: bool = False
    # the broker user of every coordinator instance, each granted read on every agent's topic; empty =
    # just this instance's [mqtt] username. One user per instance: the shipped broker ties the session to it
    coordinator_users: tuple[str, ...] = ()

    @field_validator("coordinator_users")
    @classmethod
    def _users(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        """Each becomes a `user` line of the ACL file: a blank or spaced name would grant the wrong user."""
        for i, user in enumerate(values, 1):
            if not user or user != "".join(user.split()):
                raise ValueError(f"user {i} ({user!r}) must be a non-empty broker user name without spaces")
        return values


class CoordinatorConfig(Section):
    state_dir: str = "."
    mqtt: MqttConfig = MqttConfig()
    database: DatabaseConfig = DatabaseConfig()
    aggregate: AggregateConfig = AggregateConfig()
    policy: PolicyConfig = PolicyConfig()
    grpc: GrpcConfig = GrpcConfig()
    web: WebConfig = WebConfig()
    webhooks: tuple[WebhookConfig, ...] = ()
    xapi: XapiConfig = XapiConfig()
    broker: BrokerConfig = BrokerConfig()

    @field_validator("webhooks")
    @classmethod
    def _distinct_urls(cls, hooks: tuple[WebhookConfig, ...]) -> tuple[WebhookConfig, ...]:
        """Deliveries and senders are keyed by URL, so a second entry with the same URL would silently
        replace the first (the URL is not repeated: it may hold credentials)."""
        first: dict[str, int] = {}
        for i, hook in enumerate(hooks, 1):
            if hook.url in first:
                raise ValueError(f"webhooks {first[hook.url]} and {i} have the same url: keep one entry per "
                                 "receiver and list all its classrooms there")
            first[hook.url] = i
        return hooks


def load_config(path: Path | str | None) -> CoordinatorConfig:
    """Validated config from ``path`` (defaults when None); :class:`ConfigError` on any problem."""
    return load(path, CoordinatorConfig)


__all__ = ["ConfigError", "CoordinatorConfig", "load_config"]
