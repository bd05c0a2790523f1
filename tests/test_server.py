"""The model server as a real process on a real socket: results, bad input, security."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import torch

from modelserver import userclass, wire
from modelserver.channel import Channel
from modelserver.errors import (
    BadRequest,
    FrameTooLarge,
    ModelError,
    ModelLoadError,
    ModelNotFound,
    ProtocolError,
    ServerUnavailable,
)
from modelserver.loaders import ModelSpec
from tests.conftest import ROOT, server_env, start_server
from tests.models import MLP, Gate, make_checkpoint


def mlp_spec(path: str, **params) -> dict:
    return ModelSpec("pytorch_state_dict", path, userclass.describe(MLP), params).to_wire()


@pytest.fixture
def mlp(server, private_dir):
    path = os.path.join(private_dir, "mlp.pt")
    model = make_checkpoint(path)
    with server.channel() as ch:
        ch.request({"op": "load", "key": "mlp", "spec": mlp_spec(path)})
    return model, path


def assert_serving(server, model) -> None:
    """The server still answers correctly on a fresh connection."""
    x = torch.randn(4, 8)
    with server.channel() as ch:
        out = ch.request({"op": "infer", "key": "mlp", "inputs": x})["outputs"]
    with torch.inference_mode():
        assert torch.allclose(out, model(x))


def test_inference_matches_torch_in_process(server, mlp):
    model, path = mlp
    x = torch.randn(64, 8)
    with server.channel() as ch:
        reply = ch.request({"op": "infer", "key": "mlp", "inputs": x})
    with torch.inference_mode():
        assert torch.equal(reply["outputs"], model(x))
    assert reply["model_id"] == path


def test_many_requests_in_flight_on_one_connection(server, mlp):
    model, _ = mlp
    xs = [torch.randn(i + 1, 8) for i in range(20)]
    with server.channel() as ch:
        replies = ch.request_many([{"op": "infer", "key": "mlp", "inputs": x} for x in xs])
    with torch.inference_mode():
        for x, r in zip(xs, replies):
            assert torch.allclose(r["outputs"], model(x))


def test_wrong_shape_and_dtype_are_model_errors_and_the_server_keeps_serving(server, mlp):
    model, _ = mlp
    with server.channel() as ch:
        with pytest.raises(ModelError, match=r"float32\[3, 5\].*shapes cannot be multiplied"):
            ch.request({"op": "infer", "key": "mlp", "inputs": torch.randn(3, 5)})
        with pytest.raises(ModelError, match=r"float64\[3, 8\]"):
            ch.request({"op": "infer", "key": "mlp", "inputs": torch.randn(3, 8, dtype=torch.float64)})
        with pytest.raises(ModelError, match="int64"):
            ch.request({"op": "infer", "key": "mlp", "inputs": torch.arange(8).reshape(1, 8)})
        # the same connection is still good
        out = ch.request({"op": "infer", "key": "mlp", "inputs": torch.ones(1, 8)})["outputs"]
        assert out.shape == (1, 3)
    assert_serving(server, model)


def test_unknown_model_and_unknown_operation(server, mlp):
    with server.channel() as ch:
        with pytest.raises(ModelNotFound, match="'nope'"):
            ch.request({"op": "infer", "key": "nope", "inputs": torch.ones(1, 8)})
        with pytest.raises(BadRequest, match="unknown operation 'getattr'"):
            ch.request({"op": "getattr", "name": "__class__"})
        with pytest.raises(BadRequest, match="'key' must be str"):
            ch.request({"op": "infer", "key": 7, "inputs": torch.ones(1, 8)})
    assert_serving(server, mlp[0])


def test_missing_and_corrupt_checkpoints_and_unimportable_classes(server, mlp, private_dir):
    corrupt = os.path.join(private_dir, "corrupt.pt")
    with open(corrupt, "wb") as f:
        f.write(b"this is not a checkpoint")
    wrong = os.path.join(private_dir, "wrong.pt")
    make_checkpoint(wrong, d_in=5)
    cases = [
        (mlp_spec(os.path.join(private_dir, "missing.pt")), "model file not found"),
        (mlp_spec(corrupt), "cannot read checkpoint"),
        (mlp_spec(wrong), "does not fit"),
        (
            ModelSpec("pytorch_state_dict", None, {"name": "no_such_module:Model", "source": None}).to_wire(),
            "cannot import model class 'no_such_module:Model'",
        ),
        (
            ModelSpec("pytorch_state_dict", None, {"name": "torch.nn:NoSuchLayer", "source": None}).to_wire(),
            "cannot import model class",
        ),
        (ModelSpec("torchscript", corrupt).to_wire(), "cannot load TorchScript"),
        ({**mlp_spec(corrupt), "loader": "pickle"}, "unknown loader 'pickle'"),
        ({**mlp_spec(corrupt), "evil": 1}, "unknown fields"),
    ]
    with server.channel() as ch:
        for i, (spec, message) in enumerate(cases):
            with pytest.raises(ModelLoadError, match=message):
                ch.request({"op": "load", "key": f"bad{i}", "spec": spec})
    assert_serving(server, mlp[0])


def modelserver_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m modelserver ARGS`` as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "modelserver", *args],
        env=server_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def raw_connection(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.settimeout(10)
    return s


def read_until_closed(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def test_malformed_frames_close_only_their_connection(server, mlp):
    model, _ = mlp
    with server.channel() as bystander:
        # garbage
        s = raw_connection(server.path)
        s.sendall(b"GET / HTTP/1.1\r\n\r\n")
        reply = read_until_closed(s)
        assert b"protocol" in reply and b"magic" in reply
        # a header that is not msgpack
        s = raw_connection(server.path)
        s.sendall(wire.PREFIX.pack(b"BL", wire.VERSION, 0, 4, 0) + b"\xc1\xc1\xc1\xc1")
        assert b"malformed frame header" in read_until_closed(s)
        # truncated: half a frame, then the client goes away
        head, bufs = wire.encode({"op": "infer", "id": 1, "key": "mlp", "inputs": torch.ones(1000, 8)})
        s = raw_connection(server.path)
        s.sendall(head + bytes(bufs[0])[:50])
        s.close()
        # the other client never noticed
        x = torch.randn(2, 8)
        out = bystander.request({"op": "infer", "key": "mlp", "inputs": x})["outputs"]
        with torch.inference_mode():
            assert torch.allclose(out, model(x))
    assert_serving(server, model)


def test_oversized_frames_are_refused(sock_path, private_dir):
    srv = start_server(sock_path, "--max-frame-bytes", "1MiB")
    try:
        with srv.channel() as ch:
            ch.request(
                {
                    "op": "load",
                    "key": "id",
                    "spec": ModelSpec(
                        "pytorch_state_dict", None, {"name": "torch.nn:Identity", "source": None}
                    ).to_wire(),
                }
            )
            # the client knows the limit from the handshake and refuses before sending
            with pytest.raises(FrameTooLarge, match="over the server's 1048576-byte frame limit"):
                ch.request({"op": "infer", "key": "id", "inputs": torch.zeros(2, 1 << 18)})
            assert not ch.dead
            assert ch.request({"op": "infer", "key": "id", "inputs": torch.ones(2)})["outputs"].shape == (2,)
        # a peer that ignores the limit is told why, then closed
        s = raw_connection(sock_path)
        s.sendall(wire.PREFIX.pack(b"BL", wire.VERSION, 0, 8, 2 << 20))
        reply = read_until_closed(s)
        assert b"frame_too_large" in reply
        with srv.channel() as ch:
            assert ch.request({"op": "status"})["status"]["pid"] == srv.proc.pid
    finally:
        srv.stop()


def test_slow_request_does_not_block_other_clients(server, mlp, private_dir):
    model, _ = mlp
    gate = os.path.join(private_dir, "gate")
    spec = ModelSpec("pytorch_state_dict", None, userclass.describe(Gate), {"gate": gate}).to_wire()
    with server.channel() as ch:
        ch.request({"op": "load", "key": "gate", "spec": spec})
    done = threading.Event()
    result = {}

    def slow() -> None:
        with server.channel() as ch:
            result["out"] = ch.request({"op": "infer", "key": "gate", "inputs": torch.ones(2)})["outputs"]
        done.set()

    t = threading.Thread(target=slow)
    t.start()
    try:
        with server.channel() as ch:
            deadline = time.monotonic() + 20
            while not any(
                m["key"] == "gate" and m["in_flight"]
                for m in ch.request({"op": "status"})["status"]["models"]
            ):
                assert time.monotonic() < deadline, "gate request never reached the model"
            for _ in range(20):
                x = torch.randn(3, 8)
                out = ch.request({"op": "infer", "key": "mlp", "inputs": x})["outputs"]
                with torch.inference_mode():
                    assert torch.allclose(out, model(x))
        assert not done.is_set(), "the slow request finished before the gate opened"
    finally:
        open(gate, "w").close()
        t.join(30)
    assert done.is_set() and torch.equal(result["out"], torch.ones(2))


def test_socket_is_private_and_peers_of_another_uid_are_refused(server, mlp):
    directory = os.path.dirname(server.path)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")
    # Open the file permissions so only SO_PEERCRED stands between a stranger and the server.
    os.chmod(directory, 0o711)
    os.chmod(server.path, 0o666)
    try:
        code = subprocess.run(
            [
                sys.executable,
                "-c",
                "import os, sys\n"
                "from modelserver.channel import Channel\n"
                "os.setgid(65534); os.setuid(65534)\n"
                f"try:\n    Channel({server.path!r})\nexcept Exception as e:\n    print(type(e).__name__, e); sys.exit(7)\n",
            ],
            env=server_env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        os.chmod(directory, 0o700)
        os.chmod(server.path, 0o600)
    assert code.returncode == 7, code.stdout + code.stderr
    assert "ServerUnavailable" in code.stdout
    with server.channel() as ch:
        assert ch.request({"op": "status"})["status"]["rejected_peers"] == 1


def test_server_refuses_a_socket_directory_others_can_enter(private_dir):
    shared = os.path.join(private_dir, "shared")
    os.mkdir(shared, 0o755)
    os.chmod(shared, 0o755)
    proc = modelserver_cli("serve", "--socket", os.path.join(shared, "s.sock"))
    assert proc.returncode == 2
    assert "open to other users" in proc.stderr


def test_status_command_shows_models_and_counts(server, mlp):
    x = torch.randn(5, 8)
    with server.channel() as ch:
        ch.request({"op": "infer", "key": "mlp", "inputs": x})
    run = modelserver_cli("status", "--socket", server.path, "--json")
    assert run.returncode == 0, run.stderr
    status = json.loads(run.stdout)
    (model,) = status["models"]
    assert model["key"] == "mlp" and model["device"] == "cpu" and model["loaded"]
    assert model["nbytes"] == sum(p.numel() * 4 for p in mlp[0].parameters())
    assert model["requests"] == 1 and model["rows"] == 5
    human = modelserver_cli("status", "--socket", server.path)
    assert "mlp" in human.stdout and "model_id" in human.stdout


def test_stop_command_and_sigterm_remove_the_socket(sock_path):
    srv = start_server(sock_path)
    run = modelserver_cli("stop", "--socket", sock_path)
    assert run.returncode == 0, run.stderr
    assert srv.proc.wait(20) == 0
    assert not os.path.exists(sock_path)
    srv = start_server(sock_path)
    assert srv.stop() == 0
    assert not os.path.exists(sock_path)
    with pytest.raises(ServerUnavailable):
        Channel(sock_path)


def test_second_server_on_the_same_socket_exits_and_stale_sockets_are_replaced(server, sock_path):
    second = modelserver_cli("serve", "--socket", sock_path)
    assert second.returncode == 3 and "already serves" in second.stderr
    server.proc.kill()
    server.proc.wait()
    assert os.path.exists(sock_path)  # a killed server leaves its socket file
    fresh = start_server(sock_path)
    try:
        with fresh.channel() as ch:
            assert ch.server_pid == fresh.proc.pid
    finally:
        fresh.stop()


def test_protocol_error_reply_for_unparseable_request_keeps_connection(server, mlp):
    s = raw_connection(server.path)
    with s:
        wire.send_frame(s, ["not", "a", "map"])
        reply = wire.FrameReader(s).read()
        assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
        wire.send_frame(s, {"op": "status", "id": 5})
        assert wire.FrameReader(s).read()["id"] == 5
    _ = msgpack  # noqa: F841


def test_closing_a_channel_mid_request_is_harmless(server, mlp):
    ch = server.channel()
    wire.send_frame(ch.sock, {"op": "infer", "id": 1, "key": "mlp", "inputs": torch.randn(1000, 8)})
    ch.close()
    assert_serving(server, mlp[0])
    with pytest.raises(ServerUnavailable):
        ch.request({"op": "status"})
    assert ProtocolError  # typed errors are importable from one place
