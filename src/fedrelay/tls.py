"""TLS for everything that connects to a relay: emitters, ``fedrelay tail/export/sync/runs``.

Certificates are always verified: with the system's trust store, or with a CA bundle
(``ca_file``, ``FEDRELAY_CA_FILE``, ``--ca-file``) for relays whose certificate a private
CA signed. A certificate that does not verify is a configuration problem, not an outage:
callers say so in one sentence instead of retrying in silence.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from urllib.parse import urlsplit

CA_FILE_ENV = "FEDRELAY_CA_FILE"


def resolve_ca_file(ca_file: str | os.PathLike[str] | None) -> str | None:
    """A CA bundle to verify the relay's certificate with: argument, then ``FEDRELAY_CA_FILE``.

    None means the system's trust store (certificates are always verified).
    """
    value = os.fspath(ca_file) if ca_file else os.environ.get(CA_FILE_ENV)
    return str(Path(value).expanduser()) if value else None


def is_secure(url: str) -> bool:
    """``wss://`` and ``https://`` URLs need TLS."""
    return urlsplit(url.strip()).scheme in ("wss", "https")


def context_for(url: str, ca_file: str | None) -> ssl.SSLContext | None:
    """The verifying context for a ``wss://``/``https://`` URL; None for a plain one."""
    return client_context(ca_file) if is_secure(url) else None


def client_context(ca_file: str | None) -> ssl.SSLContext:
    """A verifying client context: ``ca_file``'s CAs, else the system trust store.

    Raises ``OSError`` (a missing file) or ``ssl.SSLError`` (not a CA bundle).
    """
    return ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()


def certificate_problem(exc: BaseException | None) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind ``exc`` (also wrapped in a URLError), if any."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return exc
        exc = getattr(exc, "reason", None) or exc.__cause__ or exc.__context__
        seen += 1
    return None


def explain_ca_file(ca_file: str | None, exc: BaseException) -> str:
    """One sentence for a CA file that cannot be loaded."""
    return f"cannot load the CA file {ca_file} ({exc}); check --ca-file / FEDRELAY_CA_FILE"


def explain_certificate(url: str, exc: ssl.SSLCertVerificationError, ca_file: str | None) -> str:
    """One sentence for a user: what did not verify, and what to set."""
    reason = exc.verify_message or exc.reason or str(exc)
    where = f"the CA file {ca_file}" if ca_file else "the system's trust store"
    return (
        f"the certificate of {url} does not verify against {where} ({reason}); "
        "set ca_file= / FEDRELAY_CA_FILE / --ca-file to the CA that signed it"
    )
