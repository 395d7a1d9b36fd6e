"""The settings every client of a relay reads, declared once: emitters, ``fedrelay runs``,
``tail``, ``export``, ``sync``, the MLflow bridge and the demo.

Each is an argument (a flag, a keyword) first, then a ``FEDRELAY_*`` variable, then a default.
One place, so that a variable's name or the default address cannot differ between commands
(``fedrelay runs`` once ignored ``FEDRELAY_SUBSCRIBE_TOKEN`` that ``tail`` and ``export``
read). The CA file lives with the TLS helpers (:func:`fedrelay.tls.resolve_ca_file`); the
relay's own settings are :class:`fedrelay.relay.config.RelayConfig`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .failover import parse_urls

DEFAULT_URL = "ws://127.0.0.1:8765"
URL_ENV = "FEDRELAY_URL"
"""The relay's address; several nodes of one relay comma-separated."""
PUBLISH_TOKEN_ENVS = ("FEDRELAY_PUBLISH_TOKEN", "FEDRELAY_TOKEN")
"""Where producers find the publish token, in this order (``FEDRELAY_TOKEN``: the older name)."""
SUBSCRIBE_TOKEN_ENV = "FEDRELAY_SUBSCRIBE_TOKEN"


def relay_urls_and_source(
    url: str | Sequence[str] | None, source: str = "argument"
) -> tuple[tuple[str, ...], str]:
    """A client's relay addresses and where they came from: ``url`` (comma-separated or a list;
    ``source`` names it), else ``FEDRELAY_URL`` (comma-separated), else the local default."""
    urls = parse_urls(url)
    if urls:
        return urls, source
    env = parse_urls(os.environ.get(URL_ENV))
    if env:
        return env, URL_ENV
    return (DEFAULT_URL,), "default"


def relay_urls(url: str | Sequence[str] | None) -> tuple[str, ...]:
    """A client's relay addresses (see :func:`relay_urls_and_source`)."""
    return relay_urls_and_source(url)[0]


def publish_token(token: str | None) -> str | None:
    """The publish token: argument, ``FEDRELAY_PUBLISH_TOKEN`` or ``FEDRELAY_TOKEN``; empty is none."""
    return token or next((os.environ[name] for name in PUBLISH_TOKEN_ENVS if os.environ.get(name)), None)


def subscribe_token(token: str | None) -> str | None:
    """The subscribe token (subscribers and ``/api``): argument, else ``FEDRELAY_SUBSCRIBE_TOKEN``."""
    return token or os.environ.get(SUBSCRIBE_TOKEN_ENV) or None
