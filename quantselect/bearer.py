"""Bearer secrets on the HTTP edges (the REST API's token, a deployment's API key), asked for by one
pure ASGI gate before anything else of a request is read: a client without the secret gets a 401
for a malformed body or a route that does not exist too, and a route added later is closed."""

from __future__ import annotations

import hmac
from typing import Any, Callable

NO, WRONG = "no", "wrong"


def refused(authorization: str, secret: str) -> str | None:
    """``NO`` or ``WRONG`` when the ``Authorization`` header (its bytes decoded as latin-1, as the gate
    reads them) does not carry ``secret`` as its bearer token, compared in constant time as bytes:
    the header's own against the secret's UTF-8 (what curl sends of a UTF-8 command line); None when it does."""
    scheme, _, sent = authorization.partition(" ")
    sent = sent.strip(" \t")  # HTTP's own blanks only: str.strip() would eat a UTF-8 byte such as 0xa0
    if scheme.lower() != "bearer" or not sent:
        return NO
    return None if hmac.compare_digest(sent.encode("latin-1"), secret.encode()) else WRONG


class BearerGate:
    """Every path of the app but ``open_paths`` (as the app routes them: without the ``root_path`` it is
    mounted under, nor a trailing slash) answers ``refusal(NO | WRONG)``, an ASGI response, to a
    request without ``secret()`` (None: nothing asked); a websocket is closed (1008)."""

    def __init__(self, app: Any, secret: Callable[[], str | None], open_paths: frozenset[str],
                 refusal: Callable[[str], Any]) -> None:
        self.app, self.secret, self.open_paths, self.refusal = app, secret, open_paths, refusal

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        secret = self.secret()
        if secret is not None and scope["type"] in ("http", "websocket") and _route_path(scope) not in self.open_paths:
            headers = dict(scope.get("headers") or [])
            why = refused(headers.get(b"authorization", b"").decode("latin-1"), secret)
            if why and scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            if why:
                await self.refusal(why)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _route_path(scope: dict) -> str:
    path, root = scope["path"], scope.get("root_path") or ""
    return (path[len(root):] if root and path.startswith(root) else path).rstrip("/")
