"""``python -m server.superlink ARGS``: Flower's ``flower-superlink ARGS`` with every API but the
Fleet API refused to other hosts.

Flower 1.41 serves its Fleet, Control and Runtime APIs from one HTTP server on one port. Clients
need only the Fleet API (``/v1/fleet``). The Control API (submit a run, which executes its code on
this machine; stop runs; list them; stream their logs) and the Runtime API (the ServerApp's link
to the SuperLink) have one user, ``fedpeft server`` on this machine, and Flower's open-source
build authenticates neither: with ``--enable-supernode-auth`` only the Fleet API checks keys.
Flower has no flag to serve them apart, so this wraps its app with a middleware (written here: no
library offers it) that answers 403 to a request from a non-loopback address for any path outside
the Fleet API and the health check.

A second middleware prints one line (``REFUSED`` and the key's ``fedpeft.certs.key_id``) for each
SuperNode whose activation the SuperLink refuses, which is how an unregistered client key shows:
``fedpeft server`` relays those lines from the SuperLink's log to its console.
"""

from __future__ import annotations

import base64
import ipaddress
import sys

from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

FLEET_API, HEALTH = "/v1/fleet/", "/health"  # all that other hosts may reach
ACTIVATE = "/v1/fleet/activate-node"  # where a SuperNode with an unregistered key is refused
PUBLIC_KEY_HEADER = b"flwr-public-key"  # base64 of the SuperNode's PEM public key (Flower's)
REFUSED = "fedpeft: refused a client key that is not registered:"


class LoopbackOnly:
    """ASGI middleware: requests from other hosts reach only the Fleet API and the health check."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not is_loopback(scope.get("client")):
            path = scope.get("path", "")
            if not (path.startswith(FLEET_API) or path == HEALTH):
                refusal = PlainTextResponse("this API is served to the server's own host only", 403)
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RefusedKeys:
    """ASGI middleware: one ``REFUSED`` line on stdout per refused SuperNode activation."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != ACTIVATE:
            await self.app(scope, receive, send)
            return

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                print(f"{REFUSED} {refused_key(dict(scope.get('headers', [])))}", flush=True)
            await send(message)

        await self.app(scope, receive, watch)


def refused_key(headers: dict[bytes, bytes]) -> str:
    """The ``key_id`` of the key a SuperNode authenticated with, or why it cannot be named."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from fedpeft.certs import key_id

    try:
        return key_id(load_pem_public_key(base64.b64decode(headers[PUBLIC_KEY_HEADER])))  # type: ignore[arg-type]
    except (KeyError, ValueError, TypeError):
        return "(no readable key in the request)"


def is_loopback(client: tuple[str, int] | list | None) -> bool:
    """Whether the peer ``client`` (ASGI's ``(host, port)``) is this machine's loopback."""
    if not client:
        return False
    try:
        return ipaddress.ip_address(str(client[0])).is_loopback
    except ValueError:
        return False


def main() -> None:
    import flwr.superlink.main as superlink_app
    from flwr.supercore.logger import update_console_handler
    from flwr.superlink.cli.flower_superlink import flower_superlink

    if not sys.stdout.isatty():
        update_console_handler(colored=False)  # a log file gets no colour codes

    create_app = superlink_app.create_app

    def guarded(*args, **kwargs):  # type: ignore[no-untyped-def]
        app = create_app(*args, **kwargs)
        app.add_middleware(RefusedKeys)
        app.add_middleware(LoopbackOnly)  # outermost: before Flower's own middleware runs
        return app

    superlink_app.create_app = guarded  # flower_superlink imports it at call time
    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
