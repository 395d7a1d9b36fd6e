"""Relay settings, declared once: each field is a ``fedrelay serve`` flag, a ``FEDRELAY_*``
variable and a default, and a row of docs/settings.md.

The flags are generated from the fields (:mod:`fedrelay.relay.settings_cli`), the docs table
too (:mod:`fedrelay.relay.settings_doc`): adding a setting is adding a field with a docstring.
Precedence: flag, then environment, then default. This module stays light (no relay
imports at module level): ``fedrelay --help`` builds the serve flags from it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args, get_origin

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

if TYPE_CHECKING:
    from .alerts.settings import AlertSettings

ENV_PREFIX = "FEDRELAY_"
LOOPBACK_HOSTS = ["127.0.0.1", "::1"]


def default_db_path() -> str:
    from pathlib import Path

    from platformdirs import user_data_dir

    return str(Path(user_data_dir("fedrelay", appauthor=False)) / "relay.db")


@dataclass(frozen=True)
class Flag:
    """How a setting shows on the command line and in the docs where its name alone does not say.

    ``name`` replaces ``--<field-name>``; ``default`` describes a default computed at start
    (a path, a list) so help and docs read the same on every machine.
    """

    name: str | None = None
    metavar: str | None = None
    default: str | None = None


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_hint(field: FieldInfo) -> Flag:
    return next((m for m in field.metadata if isinstance(m, Flag)), Flag())


def flag_of(name: str, field: FieldInfo) -> str:
    return flag_hint(field).name or "--" + name.replace("_", "-")


class SettingsError(ValueError):
    """A setting the relay cannot start with; the message names its flag and variable."""


_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("fedrelay_settings_environ", default=None)


@contextmanager
def _environment(environ: Mapping[str, str] | None) -> Iterator[None]:
    token = _ENVIRON.set(environ)
    try:
        yield
    finally:
        _ENVIRON.reset(token)


class _Environment(PydanticBaseSettingsSource):
    """``FEDRELAY_<FIELD>`` variables, read as people write them in a shell: lists
    comma-separated (not JSON), an empty optional string as unset, an empty bool as off."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.environ = environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.environ.get(env_name(field_name)), field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            raw, _, _ = self.get_field_value(field, name)
            if raw is None:
                continue
            if raw == "" and type(None) in get_args(field.annotation):
                values[name] = None
            elif raw.strip() == "" and field.annotation is bool:
                values[name] = False
            else:
                values[name] = raw  # lists: split by the model's validator
        return values


class RelayConfig(BaseSettings):
    """Everything ``fedrelay serve`` can be told. ``RelayConfig(**values)`` reads the
    environment for what ``values`` leaves out; a bad value raises :class:`SettingsError`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        use_attribute_docstrings=True,
        validate_default=True,
        extra="forbid",
    )

    host: Annotated[list[str], Flag(default="127.0.0.1 and ::1")] = Field(
        default_factory=lambda: list(LOOPBACK_HOSTS)
    )
    """Addresses to listen on, all on ``port``; repeat the flag or comma-separate for several.
    Both loopbacks by default: ``localhost`` resolves to ::1 first on many systems (Node,
    browsers); without IPv6 the relay starts on 127.0.0.1 alone and says so."""
    port: int = Field(8765, ge=0, le=65535)
    """Port to listen on; 0 picks a free one."""
    db: Annotated[str, Flag(metavar="PATH|URL", default="relay.db in the user data dir")] = Field(
        default_factory=default_db_path,
        repr=False,  # a PostgreSQL URL may hold a password
    )
    """SQLite file (WAL), ``:memory:`` for a relay that forgets on exit (``--memory``), or a
    PostgreSQL URL (``postgresql://USER@HOST:PORT/DB``): several relays on one database form one
    relay (docs/operations.md)."""
    replay_size: int = Field(1000, ge=0)
    """Events per run kept in memory for instant catch-up."""
    replay_bytes: int = Field(8 << 20, ge=0)
    """...and at most this many characters of them per run."""
    retain_events: int = Field(0, ge=0)
    """Events per run kept in the store; 0 keeps everything."""
    forget_producers_after: Annotated[float, Flag(default="2592000 (30 days)")] = Field(30 * 86400.0, ge=0)
    """Seconds after which an idle producer's dedup position is forgotten; 0 keeps every one.

    A producer counts as idle once it has neither stored an event nor been
    connected for that long. Forgotten, its name is new again: a resend of an
    event already stored (whose ack was lost) would be stored a second time.
    """
    max_frame_bytes: int = Field(1 << 20, ge=1024)
    """Larger frames get an error frame; 4x this closes the connection (with compression,
    inflating past 1x does)."""
    max_events_per_frame: int = Field(1000, ge=1)
    """Events one publish frame may carry."""
    max_queue_bytes: int = Field(4 << 20, ge=1024)
    """Bytes waiting for one subscriber before it is cut as a slow consumer (past it for 2 s,
    or past 4x it)."""
    max_store_lag: int = Field(200_000, ge=1)
    """Uncommitted events past which producers are read no further (backpressure)."""
    max_connections_per_ip: int = Field(2048, ge=0)
    """Open connections (WebSocket or HTTP) per client address (IPv6: per /64); more get
    HTTP 503; 0 = no limit.

    High enough for a 1,000-client federation behind one NAT, or a benchmark's
    1,000 subscribers on loopback; low enough that one address cannot take
    every file descriptor.
    """
    publish_token: Annotated[str | None, Flag(metavar="TOKEN")] = Field(None, repr=False)
    """Token producers must present; without one anyone who reaches the port may publish."""
    subscribe_token: Annotated[str | None, Flag(metavar="TOKEN")] = Field(None, repr=False)
    """Token subscribers and ``/api`` must present."""
    allow_origins: Annotated[list[str], Flag(name="--allow-origin", metavar="ORIGIN")] = Field(
        default_factory=list
    )
    """Extra browser origins allowed (loopback and the same origin always are), and their hosts
    as names of the relay; '*' allows any."""
    certfile: Annotated[str | None, Flag(metavar="PEM")] = None
    """PEM certificate chain: the relay then serves wss:// and https:// only, on the same port;
    a bad file stops the start (exit 2)."""
    keyfile: Annotated[str | None, Flag(metavar="PEM")] = None
    """PEM private key of ``certfile``, unencrypted (may be left out when ``certfile`` holds
    the key too)."""
    stall_after: float = Field(300.0, ge=0)
    """Seconds without events after which a running run shows as stalled (inactive when only
    clients stream it)."""
    ping_interval: float = Field(20.0, ge=0)
    """Seconds between keepalive pings (0: none)."""
    ping_timeout: float = Field(20.0, ge=0)
    """Seconds to wait for a pong before the connection is closed (0: no limit)."""
    compression: bool = False
    """permessage-deflate: saves bandwidth, costs CPU per subscriber."""
    alert_webhook: Annotated[list[str], Flag(metavar="URL")] = Field(default_factory=list, repr=False)
    """Webhook URLs an alert is POSTed to when a run fails, stalls or ends, or a rule holds
    (docs/alerts.md). They hold secrets: prefer
    ``FEDRELAY_ALERT_WEBHOOK`` (comma-separated) or the alerts file to a flag ``ps`` shows."""
    alert_rule: Annotated[list[str], Flag(metavar="RULE")] = Field(default_factory=list)
    """Rules on metrics, e.g. ``eval_metrics.val_loss > 2`` or ``no improvement of auroc for 10
    rounds`` (docs/alerts.md has the syntax)."""
    alerts: Annotated[str | None, Flag(metavar="FILE")] = None
    """A TOML file with webhooks, rules and delivery options; flags add to it."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level."""
    log_format: Literal["text", "json"] = "text"
    """``json``: one object per line, for log shippers."""

    _alerting: AlertSettings | None = PrivateAttr(default=None)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            environ = _ENVIRON.get()
            raise SettingsError(explain(exc, values, os.environ if environ is None else environ)) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments (flags), then ``FEDRELAY_*`` variables; no .env or secrets files."""
        environ = _ENVIRON.get()
        return init_settings, _Environment(settings_cls, os.environ if environ is None else environ)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> RelayConfig:
        """Defaults, then ``FEDRELAY_<FIELD>`` variables (``environ``, else the process's),
        then the overrides that are not None (flags not given are None)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        with _environment(environ):
            return cls(**given)

    @field_validator("host", "allow_origins", "alert_webhook", "alert_rule", mode="before")
    @classmethod
    def _comma_separated(cls, value: object, info: Any) -> object:
        """A string (the environment) is split on commas; so is each ``--host`` value."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if info.field_name == "host" and isinstance(value, list | tuple):
            return [part.strip() for item in value for part in str(item).split(",") if part.strip()]
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: object, info: Any) -> object:
        """True is an int to Python, never a port or a size."""
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation in (int, float):
            raise ValueError(f"{names(info.field_name)} must be a number, not {value!r}")
        return value

    @field_validator("host")
    @classmethod
    def _some_host(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("--host / FEDRELAY_HOST names no address to listen on")
        return value

    @field_validator("publish_token", "subscribe_token")
    @classmethod
    def _not_empty(cls, value: str | None, info: Any) -> str | None:
        if value == "":  # e.g. --publish-token "$UNSET": "?token=" would match it
            flag = info.field_name.replace("_", "-")
            raise ValueError(f"--{flag} is empty; leave it out to run without a token")
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> RelayConfig:
        """Refuse settings that would break the relay later; check the alerts now (a bad rule
        or URL fails the start, not the first alert)."""
        if self.keyfile is not None and self.certfile is None:
            raise ValueError("--keyfile / FEDRELAY_KEYFILE needs --certfile / FEDRELAY_CERTFILE too")
        from .alerts.settings import AlertSettings

        self._alerting = AlertSettings.build(self.alert_webhook, self.alert_rule, self.alerts)
        return self

    @property
    def alerting(self) -> AlertSettings | None:
        """The alert settings, checked at construction; None: no alerts."""
        return self._alerting

    @property
    def in_memory(self) -> bool:
        from .store import MEMORY

        return self.db == MEMORY

    @property
    def tls(self) -> bool:
        return self.certfile is not None


def names(field_name: str) -> str:
    """``--flag / FEDRELAY_VAR``: how an error message names a setting."""
    return f"{flag_of(field_name, RelayConfig.model_fields[field_name])} / {env_name(field_name)}"


def kind_of(annotation: object) -> str:
    """A setting's type as the docs and error messages say it."""
    if get_origin(annotation) is Literal:
        return " | ".join(str(choice) for choice in get_args(annotation))
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is list:
        return f"list of {kind_of(args[0])}"
    if args and len(args) < len(get_args(annotation)):  # X | None
        return kind_of(args[0])
    return getattr(annotation, "__name__", str(annotation))


def explain(exc: ValidationError, given: Mapping[str, object], environ: Mapping[str, str]) -> str:
    """One line per problem, naming the flag and variable as the pre-pydantic relay did."""
    lines = []
    for error in exc.errors(include_url=False):
        ctx = error.get("ctx") or {}
        field_name = str(error["loc"][0]) if error["loc"] else None
        if error["type"] == "extra_forbidden":
            lines.append(f"{field_name}: no such setting")
            continue
        if field_name not in RelayConfig.model_fields:
            lines.append(str(ctx.get("error", error["msg"])))
            continue
        field = RelayConfig.model_fields[field_name]
        value = error["input"]
        shown = value if isinstance(value, str) else repr(value)  # FEDRELAY_X=10: "not 10"
        raw = environ.get(env_name(field_name))
        if error["type"] == "value_error":
            lines.append(str(ctx["error"]))
        elif error["type"] == "greater_than_equal":
            lines.append(f"{names(field_name)} must be a number >= {_number(ctx['ge'])}, not {shown}")
        elif error["type"] == "less_than_equal":
            low = next((m.ge for m in field.metadata if getattr(m, "ge", None) is not None), 0)
            lines.append(f"{names(field_name)} must be {_number(low)}-{_number(ctx['le'])}, not {shown}")
        elif field_name not in given and raw is not None:
            lines.append(f"{env_name(field_name)}={raw!r} is not {_a(field.annotation)}")
        else:
            lines.append(f"{names(field_name)}: {error['msg']}, not {value!r}")
    return "; ".join(lines)


def _number(value: object) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _a(annotation: object) -> str:
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(str(choice) for choice in get_args(annotation))
    return f"a valid {kind_of(annotation)}"
