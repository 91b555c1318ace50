"""Who is asking: HTTP Basic against hashed passwords, or a trusted proxy's user header.

Two ways to sign in, either or both configured under ``web``:

- ``users``: user name -> password hash made by ``dicomnode web-passwd`` (scrypt from
  the standard library; PBKDF2-SHA256 hashes are accepted too). The browser asks for
  them (HTTP Basic); use it behind TLS (a reverse proxy) off the machine.
- ``trusted_user_header`` (e.g. ``X-Forwarded-User``): the user an authenticating
  reverse proxy (oauth2-proxy, an OIDC-aware ingress) has signed in, taken only from a
  connection whose address is in ``trusted_proxies``.

Rules: on a loopback bind the pages may be viewed without signing in; on any other
bind every page and API call needs a user; actions always need one; patient name and
ID are shown only to a signed-in user.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from fastapi import HTTPException, Request, status

from dicomnode.config import WebSettings
from dicomnode.web.passwords import verify_password


@dataclass(frozen=True)
class Viewer:
    """Who is looking: ``user`` None for an anonymous viewer on loopback."""

    user: str | None

    @property
    def signed_in(self) -> bool:
        """Whether a user signed in."""
        return self.user is not None


def _challenge(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail,
                         headers={"WWW-Authenticate": 'Basic realm="dicomnode", charset="UTF-8"'})


def identify(request: Request, web: WebSettings) -> str | None:
    """The signed-in user of a request, or None; wrong credentials raise 401.

    Raises
    ------
    HTTPException
        401 for an unknown user or a wrong password (never says which).
    """
    if web.trusted_user_header:
        client = request.client.host if request.client else ""
        name = request.headers.get(web.trusted_user_header)
        if name and client in web.trusted_proxies:
            return name.strip()[:64] or None
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise _challenge("malformed credentials") from None
    stored = web.users.get(user)
    if stored is None or not verify_password(stored, password):
        raise _challenge("wrong user name or password")
    return user


def viewer(request: Request) -> Viewer:
    """FastAPI dependency: who views; off loopback a user is required (401 otherwise)."""
    web: WebSettings = request.app.state.web
    user = identify(request, web)
    if user is None and not web.loopback:
        raise _challenge("sign in to view this node")
    return Viewer(user)


def actor(request: Request) -> str:
    """FastAPI dependency: the user doing an action (always required, 401 otherwise).

    A state-changing request from another site's page is refused (403): its ``Origin``
    must be this server, so a browser holding Basic credentials cannot be made to act
    by a foreign form. Behind a reverse proxy in ``trusted_proxies`` the proxy's
    ``X-Forwarded-Host`` counts as this server too.
    """
    web: WebSettings = request.app.state.web
    origin = request.headers.get("origin")
    if origin:
        hosts = {request.headers.get("host", "")}
        client = request.client.host if request.client else ""
        if client in web.trusted_proxies and request.headers.get("x-forwarded-host"):
            hosts.add(request.headers["x-forwarded-host"].split(",")[0].strip())
        if origin == "null" or origin.split("://", 1)[-1] not in hosts:
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail="cross-site request refused")
    user = identify(request, web)
    if user is None:
        raise _challenge("actions need a signed-in user")
    return user
