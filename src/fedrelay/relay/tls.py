"""The relay's TLS: one server context from a certificate chain and its key, checked at start.

A relay that cannot serve TLS must say why before it listens, in a sentence naming the flag
and the file: OpenSSL's own text for most of these cases is "PEM lib". The files are read once;
renewing a certificate means restarting the relay.
"""

from __future__ import annotations

import ssl
from pathlib import Path

_CERT_MARK = b"-----BEGIN CERTIFICATE-----"
_KEY_MARK = b"PRIVATE KEY-----"


class TlsError(ValueError):
    """The certificate or key cannot be used; the text names the flag and the file."""


def server_context(certfile: str, keyfile: str | None = None) -> ssl.SSLContext:
    """A TLS 1.2+ server context, or :class:`TlsError` saying what is wrong with which file.

    ``keyfile`` may be left out when ``certfile`` holds the key too. An encrypted key is
    refused rather than prompted for: a relay runs unattended.
    """
    cert_pem = _read("--certfile", certfile)
    if _CERT_MARK not in cert_pem:
        raise TlsError(f"--certfile {certfile} holds no PEM certificate ({_CERT_MARK.decode()} ...)")
    key_path, key_pem = (keyfile, _read("--keyfile", keyfile)) if keyfile else (certfile, cert_pem)
    key_flag = "--keyfile" if keyfile else "--certfile"
    if _KEY_MARK not in key_pem:
        hint = "" if keyfile else "; give the key with --keyfile"
        raise TlsError(f"{key_flag} {key_path} holds no PEM private key{hint}")
    if b"ENCRYPTED" in key_pem:
        raise _encrypted(key_flag, key_path)

    def no_password() -> str:
        raise _encrypted(key_flag, key_path)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(
            Path(certfile).expanduser(), Path(key_path).expanduser(), password=no_password
        )
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(
                f"the key in {key_flag} {key_path} does not belong to the certificate in "
                f"--certfile {certfile}"
            ) from None
        raise TlsError(f"cannot use --certfile {certfile} with {key_flag} {key_path}: {exc}") from None
    return context


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise TlsError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None


def _encrypted(flag: str, path: str) -> TlsError:
    return TlsError(
        f"{flag} {path} is encrypted; the relay needs an unencrypted key "
        "(protect it with file permissions: chmod 600)"
    )
