"""Certificates for TLS tests, made with the ``openssl`` command (EC P-256, quick to make)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
#: Valid for longer than the node's expiry warning (30 days) looks ahead.
DAYS = 400
SERVER_EXT = ("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
              "extendedKeyUsage=serverAuth,clientAuth\n"
              "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
CLIENT_EXT = ("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
              "extendedKeyUsage=clientAuth\n")


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key (PEM files)."""

    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class Pki:
    """A test CA with a server and client certificates, and a second, unrelated CA."""

    ca: Path                  # the CA both sides trust
    server: KeyPair           # issued by ``ca`` for 127.0.0.1 / localhost
    expired_server: KeyPair   # the same, expired a day ago
    client: KeyPair           # issued by ``ca``
    expired_client: KeyPair   # issued by ``ca``, expired a day ago
    other_ca: Path            # a CA nobody trusts
    stranger: KeyPair         # issued by ``other_ca``


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> KeyPair:
    pair = KeyPair(folder / f"{name}.pem", folder / f"{name}.key")
    _openssl("req", "-x509", *_EC, "-keyout", str(pair.private_key), "-out",
             str(pair.certificate), "-days", str(DAYS), "-subj", f"/CN={name}")
    return pair


def issue(folder: Path, ca: KeyPair, name: str, days: int, extensions: str) -> KeyPair:
    """A certificate issued by ``ca``, valid for ``days`` (-1: expired a day ago)."""
    pair = KeyPair(folder / f"{name}.pem", folder / f"{name}.key")
    request, ext = folder / f"{name}.csr", folder / f"{name}.ext"
    ext.write_text(extensions)
    _openssl("req", *_EC, "-keyout", str(pair.private_key), "-out", str(request),
             "-subj", f"/CN={name}")
    # -days -1: a certificate whose validity ended before it began, i.e. expired
    _openssl("x509", "-req", "-in", str(request), "-CA", str(ca.certificate), "-CAkey",
             str(ca.private_key), "-CAcreateserial", "-out", str(pair.certificate),
             "-days", str(days), "-extfile", str(ext))
    return pair


def make_pki(folder: Path) -> Pki:
    """Write a CA, its server and client certificates, and an unrelated CA into ``folder``.

    Parameters
    ----------
    folder : Path
        Created if need be.

    Returns
    -------
    Pki
    """
    folder.mkdir(parents=True, exist_ok=True)
    ca, other = _ca(folder, "testca"), _ca(folder, "otherca")
    return Pki(
        ca=ca.certificate,
        server=issue(folder, ca, "server", DAYS, SERVER_EXT),
        expired_server=issue(folder, ca, "expired_server", -1, SERVER_EXT),
        client=issue(folder, ca, "client", DAYS, CLIENT_EXT),
        expired_client=issue(folder, ca, "expired", -1, CLIENT_EXT),
        other_ca=other.certificate,
        stranger=issue(folder, other, "stranger", DAYS, CLIENT_EXT),
    )
