"""What `fedpeft server` and `fedpeft client` check before starting anything: one line per mistake."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest

from client.supernode import ClientError, ClientOptions, probe_server
from fedpeft.certs import make_certs
from fedpeft.cli import main
from fedpeft.config import load_config
from fedpeft.data import DataError, load_client_file, load_server_splits
from fedpeft.errors import UserError
from server.deployment import ServerOptions, prepare
from tests.deployment import free_port, write_rows

LABELS = ["billing", "delivery", "technical", "account"]


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    certs = make_certs(tmp_path / "certs", [], ["alice", "bob"])
    test_file = write_rows(tmp_path / "test.jsonl", ["refund please", "where is it"], [0, 1])
    config = tmp_path / "deploy.toml"
    config.write_text(f'[data]\nlabels = {LABELS!r}\ntest_source = "{test_file}"\n'.replace("'", '"'))
    return {"certs": certs.root, "config": config, "test": test_file, "root": tmp_path}


def test_prepare_counts_registered_clients_and_picks_a_run_dir(setup):
    deployment = prepare(ServerOptions(setup["config"], certs_dir=setup["certs"]))
    assert deployment.overrides[0] == "data.num_clients=2"
    assert load_config(setup["config"], list(deployment.overrides)).data.num_clients == 2
    assert deployment.run_dir.name.startswith("run-")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "pass --certs DIR"),
        ({"insecure": True, "certs_dir": "certs"}, "not both"),
        ({"certs_dir": "missing"}, "is missing; create it with `fedpeft certs"),
        ({"insecure": True, "overrides": ("data.labels=[]",)}, "set data.labels"),
        ({"insecure": True, "overrides": ("data.test_source='nope.jsonl'",)}, "does not exist"),
        ({"insecure": True, "overrides": ("data.test_source=''",)}, "set data.test_source"),
        ({"insecure": True, "overrides": ("strategy.name='nope'",)}, "nope"),
        ({"insecure": True, "resume": True, "run_dir": "fresh"}, "holds no checkpoint"),
    ],
)
def test_server_mistakes_fail_before_anything_starts(setup, options, message):
    for key in ("certs_dir", "run_dir"):
        if key in options:
            options[key] = setup["root"] / options[key]
    with pytest.raises(UserError, match=message) as caught:
        prepare(ServerOptions(setup["config"], **options))
    assert "\n" not in str(caught.value)


def test_client_mistakes_are_one_line(tmp_path, capsys):
    data = write_rows(tmp_path / "mine.jsonl", ["hello"], [0])
    cases = [
        (["--data", str(tmp_path / "nope.jsonl"), "--insecure"], "does not exist"),
        (["--data", str(data)], "--ca  is not a file"),
        (["--data", str(data), "--insecure", "--key", str(data)], "--key needs TLS"),
        (["--data", str(data), "--insecure", "--inject-fault", "evil"], "must be one of nan, wrong-shape"),
    ]
    for args, message in cases:
        assert main(["client", "--server", "127.0.0.1:1", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main(["client", "--server", "nowhere", "--data", str(data), "--insecure"]) == 2
    assert "must be HOST:PORT" in capsys.readouterr().err


def test_node_config_carries_data_path_name_state_dir_and_rank(tmp_path, monkeypatch):
    data = write_rows(tmp_path / "my data.jsonl", ["hello"], [0])
    options = ClientOptions("127.0.0.1:9092", data, "alice", rank=4, insecure=True, state_dir=tmp_path / "s")
    assert options.node_config() == (
        f'data-path="{data.resolve()}" client-id="alice" state-dir="{tmp_path / "s"}" rank=4'
    )
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert ClientOptions("127.0.0.1:9092", data, "alice").state_dir == tmp_path / "xdg" / "fedpeft"


def tls_server(certs_root: Path, port: int) -> threading.Thread:
    """Accepts TLS connections with the server certificate from `fedpeft certs` (a daemon thread)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs_root / "server.pem", certs_root / "server.key")
    listener = socket.create_server(("127.0.0.1", port))

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def plain_http_server(port: int) -> None:
    """Answers every connection as a plain-HTTP server (a SuperLink started with --insecure) does."""
    listener = socket.create_server(("127.0.0.1", port))

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()


def test_probe_tells_tls_mismatches_apart(setup, tmp_path):
    certs, data = setup["certs"], setup["test"]

    def secure(port: int, ca: Path = certs / "ca.pem") -> ClientOptions:
        address = f"127.0.0.1:{port}"
        return ClientOptions(address, data, "alice", key=certs / "clients/alice", ca=ca, connect_timeout=60)

    port = free_port()
    tls_server(certs, port)
    probe_server(secure(port))

    port = free_port()
    tls_server(certs, port)
    with pytest.raises(ClientError, match="requires TLS but this client was started with --insecure"):
        probe_server(ClientOptions(f"127.0.0.1:{port}", data, "alice", insecure=True, connect_timeout=60))

    other_ca = make_certs(tmp_path / "other", [], []).ca_cert
    port = free_port()
    tls_server(certs, port)
    with pytest.raises(ClientError, match="does not verify against"):
        probe_server(secure(port, ca=other_ca))

    port = free_port()
    plain_http_server(port)
    with pytest.raises(ClientError, match="does not speak TLS"):
        probe_server(secure(port))

    unreachable = ClientOptions(f"127.0.0.1:{free_port()}", data, "a", insecure=True, connect_timeout=0)
    with pytest.raises(ClientError, match="could not reach the server"):
        probe_server(unreachable)


def test_server_and_client_data_files(setup, tmp_path):
    spec = load_config(setup["config"]).data
    splits = load_server_splits(spec)
    assert splits.train is None and splits.label_names == LABELS and splits.test["label"] == [0, 1]
    rows = load_client_file(str(write_rows(tmp_path / "c.jsonl", ["a", "b", "c"], [3, 3, 1])), spec)
    assert rows["label"] == [3, 3, 1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "label": "refunds"}\n')
    with pytest.raises(DataError, match="not in data.labels"):
        load_client_file(str(bad), spec)


def test_a_client_whose_data_cannot_be_used_ends_in_one_line_before_it_connects(setup, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    undecodable = tmp_path / "latin.csv"
    undecodable.write_bytes(b"text,label\n\xe9t\xe9 \xff\xfe,billing\n")
    no_label = tmp_path / "nolabel.jsonl"
    no_label.write_text('{"text": "refund please"}\n')
    unknown = write_rows(tmp_path / "unknown.jsonl", ["refund please"], [0]).read_text()
    (tmp_path / "unknown.jsonl").write_text(unknown.replace('"billing"', '"refunds"'))
    config = ["--config", str(setup["config"])]
    cases = [
        ([str(empty)], "holds no rows"),
        ([str(undecodable)], "cannot parse"),
        ([str(no_label), *config], "has no field 'label'"),
        ([str(tmp_path / "unknown.jsonl"), *config], "not in data.labels"),
    ]
    for args, message in cases:  # the server (port 1) is never reached: the check comes first
        code = main(
            ["client", "--server", "127.0.0.1:1", "--insecure", "--connect-timeout", "600", "--data", *args]
        )
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_a_usable_file_is_summarised_against_the_run(setup, tmp_path):
    from client.preflight import check_data

    data = write_rows(tmp_path / "mine.jsonl", ["refund please", "where is it", "broken"], [0, 1, 2])
    assert check_data(data, None).startswith("3 rows in mine.jsonl")
    summary = check_data(data, setup["config"])
    assert summary.startswith("3 rows in mine.jsonl read and tokenized for") and "billing" in summary


def test_the_supernodes_tracebacks_fold_into_their_last_line():
    from client.supernode import TracebackFold

    output = [
        "INFO :  connecting\n",
        "Traceback (most recent call last):\n",
        '  File "grpc.py", line 1, in call\n',
        "    raise RpcError()\n",
        "\n",
        "During handling of the above exception, another exception occurred:\n",
        "Traceback (most recent call last):\n",
        '  File "connect.py", line 9, in retry\n',
        "grpc.RpcError: connection refused\n",
        "INFO :  reconnecting\n",
    ]
    fold = TracebackFold()
    shown = [line for raw in output for line in fold.feed(raw)]
    assert shown == [
        "INFO :  connecting\n",
        "grpc.RpcError: connection refused (7 traceback lines folded; --verbose shows them)\n",
        "INFO :  reconnecting\n",
    ]
    verbose = TracebackFold(show=True)
    assert [line for raw in output for line in verbose.feed(raw)] == output


def test_a_server_killed_before_its_first_round_can_be_resumed(tmp_path):
    from server.loop import check_run_dir

    run_dir = tmp_path / "run"
    (run_dir / "flower").mkdir(parents=True)  # what `fedpeft server` makes before the SuperLink starts
    check_run_dir(run_dir, resume=True)  # accepted: the run starts again from round 0
    with pytest.raises(UserError, match="holds no checkpoint"):
        check_run_dir(tmp_path / "elsewhere", resume=True)
