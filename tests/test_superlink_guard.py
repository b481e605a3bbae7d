"""The SuperLink ``fedpeft server`` starts serves other hosts its Fleet API only: the Control and
Runtime APIs (one port with it in Flower 1.41) answer 403 to any address but loopback; and a client
key it refuses is named on the server's console."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from rich.console import Console

from fedpeft.certs import key_id_of_file, make_certs
from fedpeft.processes import flower_env
from server.deployment import RefusalRelay
from server.superlink import REFUSED, LoopbackOnly, RefusedKeys, is_loopback

FLEET = "/v1/fleet/register-node"
CONTROL = "/v1/control/list-runs"
RUNTIME = "/v1/runtime/acquire-task"


def other_address() -> str | None:
    """A non-loopback IPv4 address of this machine (none is sent a packet), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: picks the outgoing interface's address
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if is_loopback((address, 0)) or address == "0.0.0.0" else address


def status(host: str, port: int, path: str) -> int:
    request = urllib.request.Request(f"http://{host}:{port}{path}", data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


async def _ok(scope, receive, send):  # the wrapped app: 200 for anything that gets through
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize(
    ("client", "path", "expected"),
    [
        ("192.0.2.7", CONTROL, 403),
        ("192.0.2.7", RUNTIME, 403),
        ("192.0.2.7", "/docs", 403),
        ("192.0.2.7", FLEET, 200),
        ("192.0.2.7", "/health", 200),
        ("2001:db8::7", CONTROL, 403),
        ("127.0.0.1", CONTROL, 200),
        ("::1", RUNTIME, 200),
    ],
)
def test_other_hosts_reach_only_the_fleet_api(client, path, expected):
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "client": (client, 50000), "headers": []}
    asyncio.run(LoopbackOnly(_ok)(scope, receive, send))
    assert sent[0]["status"] == expected


def test_the_real_superlink_refuses_its_control_and_runtime_apis_to_another_address(tmp_path: Path):
    address = other_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    cmd = [sys.executable, "-m", "server.superlink", "--insecure", "--host", "0.0.0.0", "--port", str(port)]
    log = (tmp_path / "superlink.log").open("wb")
    process = subprocess.Popen(cmd, env=flower_env(tmp_path), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert process.poll() is None, (tmp_path / "superlink.log").read_text()
            assert time.monotonic() < deadline, "the SuperLink did not listen within 60 s"
            time.sleep(0.3)
        assert status(address, port, CONTROL) == 403
        assert status(address, port, RUNTIME) == 403
        assert status(address, port, FLEET) != 403  # refused by Flower for its content, not by us
        assert status("127.0.0.1", port, CONTROL) != 403
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
    written = (tmp_path / "superlink.log").read_text()
    assert "SuperLink" in written and "\x1b[" not in written  # a log file without colour codes


def test_a_refused_activation_is_printed_with_the_key_and_relayed_once(tmp_path, capsys):
    layout = make_certs(tmp_path / "certs", [], ["mallory"])
    key = serialization.load_ssh_private_key(layout.client_key("mallory").read_bytes(), password=None)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    async def refuse(scope, receive, send):  # Flower refusing an unregistered key
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    headers = [(b"flwr-public-key", base64.b64encode(pem))]
    scope = {"type": "http", "method": "POST", "path": "/v1/fleet/activate-node", "headers": headers}
    asyncio.run(RefusedKeys(refuse)(scope, receive, send))
    printed = capsys.readouterr().out
    assert printed == f"{REFUSED} {key_id_of_file(layout.client_key('mallory'))}\n"

    log = tmp_path / "superlink.log"
    log.write_text("INFO: starting\n")
    console = Console(file=io.StringIO(), width=400)
    relay = RefusalRelay(log, console)
    with log.open("a") as f:
        f.write(printed * 3 + f"{REFUSED} sha256:")  # a client retries; a line half written
    relay.poll()
    shown = console.file.getvalue()
    assert shown.count("refused a client whose key is not registered") == 1
    assert key_id_of_file(layout.client_key("mallory")) in shown
