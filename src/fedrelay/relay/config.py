"""Relay settings: one dataclass, filled from flags or ``FEDRELAY_*`` env vars."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from platformdirs import user_data_dir

from .alerts.settings import AlertSettings
from .store import MEMORY


def default_db_path() -> str:
    return str(Path(user_data_dir("fedrelay", appauthor=False)) / "relay.db")


LOOPBACK_HOSTS = ["127.0.0.1", "::1"]


@dataclass
class RelayConfig:
    host: list[str] = field(default_factory=lambda: list(LOOPBACK_HOSTS))
    """Addresses to listen on, all on ``port``. Both loopbacks by default: ``localhost``
    resolves to ::1 first on many systems (Node, browsers). A string is split on commas."""
    port: int = 8765
    db: str = field(default_factory=default_db_path)
    """SQLite file, ``:memory:`` for a relay that forgets on exit, or a PostgreSQL URL
    (``postgresql://USER@HOST:PORT/DB``): several relays on one database form one relay."""
    replay_size: int = 1000
    """Events per run kept in memory for instant catch-up."""
    replay_bytes: int = 8 << 20
    """...and at most this many characters of them per run."""
    retain_events: int = 0
    """Events per run kept in the store; 0 keeps everything."""
    forget_producers_after: float = 30 * 86400.0
    """Seconds after which an idle producer's dedup position is forgotten; 0 keeps every one.

    A producer counts as idle once it has neither stored an event nor been
    connected for that long. Forgotten, its name is new again: a resend of an
    event already stored (whose ack was lost) would be stored a second time.
    """
    max_frame_bytes: int = 1 << 20
    """Larger frames get an error frame; 4x this closes the connection."""
    max_events_per_frame: int = 1000
    max_queue_bytes: int = 4 << 20
    """Bytes waiting for one subscriber before it is cut as a slow consumer."""
    max_store_lag: int = 200_000
    """Uncommitted events past which producers are read no further (backpressure)."""
    max_connections_per_ip: int = 2048
    """Open connections (WebSocket or HTTP) per client address (IPv6: per /64); 0 = no limit.

    High enough for a 1,000-client federation behind one NAT, or a benchmark's
    1,000 subscribers on loopback; low enough that one address cannot take
    every file descriptor.
    """
    publish_token: str | None = None
    subscribe_token: str | None = None
    allow_origins: list[str] = field(default_factory=list)
    """Extra browser origins allowed; '*' allows any."""
    certfile: str | None = None
    """PEM certificate chain: the relay then serves wss:// and https:// only, on the same port."""
    keyfile: str | None = None
    """PEM private key of ``certfile`` (may be left out when ``certfile`` holds the key too)."""
    stall_after: float = 300.0
    """Seconds without events after which a running run shows as stalled."""
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    compression: bool = False
    """permessage-deflate: saves bandwidth, costs CPU per subscriber."""
    alert_webhook: list[str] = field(default_factory=list)
    """Webhook URLs alerts are POSTed to (docs/alerts.md). They hold secrets: prefer
    ``FEDRELAY_ALERT_WEBHOOK`` (comma-separated) or the alerts file to a flag ``ps`` shows."""
    alert_rule: list[str] = field(default_factory=list)
    """Rules on metrics, e.g. ``eval_metrics.val_loss > 2`` (docs/alerts.md has the syntax)."""
    alerts: str | None = None
    """A TOML file with webhooks, rules and delivery options; flags add to it."""
    log_level: str = "info"
    log_format: str = "text"

    def __post_init__(self) -> None:
        """Refuse settings that would break the relay later, with the setting's name."""
        if isinstance(self.host, str):
            self.host = [part.strip() for part in self.host.split(",") if part.strip()]
        if not self.host:
            raise ValueError("--host / FEDRELAY_HOST names no address to listen on")
        at_least = {
            "port": 0,
            "replay_size": 0,
            "replay_bytes": 0,
            "retain_events": 0,
            "max_frame_bytes": 1024,
            "max_events_per_frame": 1,
            "max_queue_bytes": 1024,
            "max_store_lag": 1,
            "max_connections_per_ip": 0,
            "forget_producers_after": 0,
            "stall_after": 0,
            "ping_interval": 0,
            "ping_timeout": 0,
        }
        for name, low in at_least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= low:  # NaN too
                flag = name.replace("_", "-")
                raise ValueError(
                    f"--{flag} / FEDRELAY_{name.upper()} must be a number >= {low}, not {value!r}"
                )
        if self.port > 65535:
            raise ValueError(f"--port must be 0-65535, not {self.port}")
        for name in ("publish_token", "subscribe_token"):
            if getattr(self, name) == "":  # e.g. --publish-token "$UNSET": "?token=" would match it
                flag = name.replace("_", "-")
                raise ValueError(f"--{flag} is empty; leave it out to run without a token")
        if self.keyfile is not None and self.certfile is None:
            raise ValueError("--keyfile / FEDRELAY_KEYFILE needs --certfile / FEDRELAY_CERTFILE too")
        self.alerting: AlertSettings | None = AlertSettings.build(
            self.alert_webhook, self.alert_rule, self.alerts
        )
        """The alert settings, checked here (a bad rule or URL fails the start); None: no alerts."""

    @property
    def in_memory(self) -> bool:
        return self.db == MEMORY

    @property
    def tls(self) -> bool:
        return self.certfile is not None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> RelayConfig:
        """Defaults, then ``FEDRELAY_<FIELD>`` variables, then explicit overrides."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"FEDRELAY_{f.name.upper()}")
            if raw is None:
                continue
            values[f.name] = _parse(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


def _parse(name: str, kind: object, raw: str) -> object:
    kind = str(kind)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind.startswith("list"):
            return [item.strip() for item in raw.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"FEDRELAY_{name.upper()}={raw!r} is not a valid {kind}") from None
    return raw or None if kind.startswith("str |") else raw
