"""Big arrays through shared memory: the regions, the wire's descriptors, and real
servers and clients (round trips in every dtype, forged descriptors, killed peers, RSS)."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import msgpack
import numpy as np
import psutil
import pytest
import torch

from modelserver import config, shm, userclass, wire
from modelserver.channel import Channel
from modelserver.errors import BadRequest, ProtocolError, ServerUnavailable
from modelserver.loaders import ModelSpec
from tests.conftest import ROOT, server_env, start_server
from tests.models import Gate, HandsBack

MiB = 1 << 20
IDENTITY = ModelSpec("pytorch_state_dict", None, {"name": "torch.nn:Identity", "source": None}).to_wire()


# -- helpers ---------------------------------------------------------------------------------
def random_array(dtype_name: str, nbytes: int, seed: int) -> np.ndarray:
    """``nbytes`` of random bits as an array of a wire dtype (bfloat16 as its uint16 bits;
    bools 0 or 1). Every bit pattern counts, NaNs included: comparisons are bitwise."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, nbytes, dtype=np.uint8)
    if dtype_name == "bool":
        return (raw & 1).view(np.bool_)
    dtype = np.dtype("uint16" if dtype_name == "bfloat16" else dtype_name)
    return raw[: nbytes - nbytes % dtype.itemsize].view(dtype)


def as_tensor(arr: np.ndarray, dtype_name: str) -> torch.Tensor:
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype_name == "bfloat16" else t


def raw_bytes(value: torch.Tensor | np.ndarray) -> bytes:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            value = value.view(torch.uint16)
        value = value.numpy()
    return np.ascontiguousarray(value).tobytes()


def beamlet_memfds(pid: int) -> set[tuple[int, str]]:
    """(inode, name) of every beamlet memfd that process ``pid`` holds open or maps."""
    found: set[tuple[int, str]] = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/memfd:beamlet"):
                    found.add((os.stat(f"/proc/{pid}/fd/{fd}").st_ino, target.split()[0]))
            except FileNotFoundError:
                continue
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                fields = line.split(None, 5)
                if len(fields) == 6 and fields[5].startswith("/memfd:beamlet"):
                    found.add((int(fields[4]), fields[5].split()[0]))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


def wait_until(predicate, timeout: float, what: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def model_status(path: str, key: str) -> dict:
    with Channel(path, shm_bytes=0) as ch:
        return next(m for m in ch.request({"op": "status"})["status"]["models"] if m["key"] == key)


def model_in_flight(path: str, key: str) -> bool:
    """Whether a request is in the model: taken off its queue (a batch), not merely queued."""
    status = model_status(path, key)
    return bool(status["in_flight"]) and status["queued"] == 0


def dev_shm() -> set[str]:
    """beamlet's entries in /dev/shm (there must be none: its regions are anonymous
    memfds). Other work on the machine (multiprocessing's semaphores, torch's shared
    tensors, other test runs) makes and removes entries there at any time, so a
    comparison of the whole directory would be flaky; that no process of ours holds or
    maps anything there is checked per process (``uses_dev_shm``)."""
    if not os.path.isdir("/dev/shm"):
        return set()
    return {name for name in os.listdir("/dev/shm") if "beamlet" in name.lower()}


def uses_dev_shm(pid: int, besides: frozenset[str] = frozenset()) -> bool:
    """Whether process ``pid`` holds or maps anything in /dev/shm, other than POSIX
    semaphores (``sem.*``, multiprocessing's) and ``besides`` (what it held before)."""
    return bool(dev_shm_held(pid) - besides)


def dev_shm_held(pid: int) -> frozenset[str]:
    """What process ``pid`` holds or maps in /dev/shm, semaphores left out."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue
    with open(f"/proc/{pid}/maps") as maps:
        links.extend(line.split(None, 5)[-1] for line in maps)
    return frozenset(
        link for link in links if link.startswith("/dev/shm/") and not link.startswith("/dev/shm/sem.")
    )


def frame(message: dict, flags: int = 0) -> bytes:
    header = msgpack.packb(message, use_bin_type=True)
    return wire.PREFIX.pack(wire.MAGIC, wire.VERSION, flags, len(header), 0) + header


def shm_ext(offset: int, nbytes: int, shape: tuple[int, ...], dtype: int = 10, kind: int = 1, signed=False):
    desc = struct.pack("<BBB", kind, dtype, len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
    return msgpack.ExtType(wire.EXT_SHM_ARRAY, desc + struct.pack("<qq" if signed else "<QQ", offset, nbytes))


@pytest.fixture(scope="module")
def identity():
    """One server with torch.nn.Identity loaded as "id", for the tests that leave it running."""
    directory = tempfile.mkdtemp(prefix="bl-")
    os.chmod(directory, 0o700)
    srv = start_server(os.path.join(directory, "ms.sock"))
    try:
        with srv.channel() as ch:
            ch.request({"op": "load", "key": "id", "spec": IDENTITY})
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(directory, ignore_errors=True)


# -- regions -----------------------------------------------------------------------------------
def test_region_allocates_aligned_until_full_and_rewinds():
    region = shm.Region.create("beamlet-test", 1 * MiB)
    try:
        offset, view = region.reserve(100)
        assert offset == 0 and view.nbytes == 100 and view.flags.writeable
        second = region.reserve(1000)
        assert second is not None and second[0] == 128  # the next 64-byte boundary
        assert region.reserve(MiB) is None  # full: that array goes through the socket
        assert region.written == 1128
        region.rewind()
        again = region.reserve(MiB)
        assert again is not None and again[0] == 0 and region.written == MiB
    finally:
        region.close()


def test_region_trims_pages_long_unused():
    now = [0.0]
    region = shm.Region.create("beamlet-test", 256 * MiB, clock=lambda: now[0])
    try:
        _, view = region.reserve(64 * MiB)
        view[:] = 7
        region.rewind()
        assert region.written == 64 * MiB  # within the window: kept
        now[0] += shm.TRIM_SECONDS
        region.reserve(1 * MiB)
        region.rewind()  # a window that needed the 64 MiB ends: nothing goes
        assert region.written == 64 * MiB
        for _ in range(3):
            region.reserve(1 * MiB)
            region.rewind()
        now[0] += shm.TRIM_SECONDS
        region.rewind()  # a whole window needed 1 MiB at most: all but the floor goes back
        assert region.written == shm.TRIM_FLOOR
        _, again = region.reserve(64 * MiB)
        assert again[shm.TRIM_FLOOR - 1] == 7 and again[shm.TRIM_FLOOR] == 0 and again[-1] == 0
    finally:
        region.close()


def test_keep_bytes_policy():
    assert shm.keep_bytes(written=100 * MiB, recent_peak=1 * MiB) == shm.TRIM_FLOOR
    assert shm.keep_bytes(written=100 * MiB, recent_peak=30 * MiB) == 60 * MiB
    assert shm.keep_bytes(written=10 * MiB, recent_peak=30 * MiB) == 10 * MiB
    assert shm.keep_bytes(written=100 * MiB, recent_peak=30 * MiB + 1) % shm.PAGE == 0


def test_adopt_refuses_what_is_not_a_sealed_memfd_of_the_announced_size(private_dir):
    plain = os.memfd_create("beamlet-test", os.MFD_CLOEXEC)  # resizable: the peer could shrink it
    os.ftruncate(plain, MiB)
    with pytest.raises(BadRequest, match="sealed"):
        shm.Region.adopt(plain, MiB, limit=MiB, writable=True)
    path = os.path.join(private_dir, "file")
    with open(path, "wb") as f:
        f.truncate(MiB)
    with pytest.raises(BadRequest, match="not a memfd"):
        shm.Region.adopt(os.open(path, os.O_RDWR), MiB, limit=MiB, writable=True)
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(BadRequest):
        shm.Region.adopt(r, MiB, limit=MiB, writable=True)
    write_sealed = os.memfd_create("beamlet-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(write_sealed, MiB)
    fcntl.fcntl(write_sealed, fcntl.F_ADD_SEALS, shm.SEALS | fcntl.F_SEAL_WRITE)
    with pytest.raises(BadRequest, match="cannot map"):
        shm.Region.adopt(write_sealed, MiB, limit=MiB, writable=True)
    for announced, limit in ((2 * MiB, 4 * MiB), (MiB, MiB // 2), (0, MiB)):
        region = shm.Region.create("beamlet-test", MiB)
        with pytest.raises(BadRequest):
            shm.Region.adopt(region.take_fd(), announced, limit=limit, writable=True)
        region.close()
    region = shm.Region.create("beamlet-test", MiB)
    fd = region.take_fd()
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & shm.REQUIRED_SEALS == shm.REQUIRED_SEALS
    with pytest.raises(PermissionError):
        os.ftruncate(fd, MiB // 2)  # sealed: nobody can shrink it under a mapping
    peer = shm.Region.adopt(fd, MiB, limit=MiB, writable=False)
    with pytest.raises(OSError):
        os.fstat(fd)  # adopt closed the received descriptor; the mapping keeps its own
    region.close()
    peer.close()


def test_closing_a_region_with_views_lent_out_keeps_them_valid():
    region = shm.Region.create("beamlet-test", MiB)
    offset, view = region.reserve(4096)
    view[:] = 3
    borrowed = region.view(offset, 4096)
    del view
    region.close()
    assert region.closed and region.reserve(1) is None
    assert int(borrowed.sum()) == 3 * 4096  # still mapped: it goes with the last view


# -- the wire's descriptors --------------------------------------------------------------------
def decode(head: bytes, region: shm.Region | None, borrow: bool):
    dec = wire._Decoder(0, region, borrow)
    return msgpack.unpackb(head[wire.PREFIX.size :], ext_hook=dec.ext_hook, raw=False)


def test_big_arrays_travel_as_descriptors_borrowed_or_copied():
    region = shm.Region.create("beamlet-test", 8 * MiB)
    a, b = socket.socketpair()
    try:
        reader = wire.FrameReader(b)
        reader.shm = region
        big = torch.randn(MiB // 4)
        small = np.arange(10)
        mid = np.arange(shm.THRESHOLD // 8 - 1, dtype=np.int64)  # just under the threshold
        message = {"big": big, "small": small, "mid": mid}
        for borrow in (True, False):
            region.rewind()
            head, body = wire.encode(message, shm=region, flags=wire.FLAG_REWIND)
            assert len(head) < 1024 and sum(p.nbytes for p in body) == mid.nbytes  # only mid in the body
            reader.borrow = borrow
            wire.sendmsg_all(a, [memoryview(head), *body])
            got = reader.read()
            assert reader.flags == wire.FLAG_REWIND
            assert torch.equal(got["big"], big)
            assert np.array_equal(got["small"], small) and np.array_equal(got["mid"], mid)
            assert np.shares_memory(got["big"].numpy(), region.view(0, region.size)) is borrow
    finally:
        a.close()
        b.close()
        region.close()


FORGED = {
    "offset past the end": lambda size: shm_ext(size + 64, 4096, (1024,)),
    "offset + nbytes past the end": lambda size: shm_ext(size - 64, 4096, (1024,)),
    "offset + nbytes overflowing u64": lambda size: shm_ext(2**64 - 64, 128, (32,)),
    "negative offset": lambda size: shm_ext(-64, 4096, (1024,), signed=True),
    "negative nbytes": lambda size: shm_ext(0, -4096, (1024,), signed=True),
    "nbytes not dtype * shape": lambda size: shm_ext(0, 4096, (1025,)),
    "huge shape": lambda size: shm_ext(0, 2**64 - 1, (2**63, 2**63)),
    "unaligned offset": lambda size: shm_ext(3, 4096, (1024,)),
    "descriptor cut short": lambda size: msgpack.ExtType(
        wire.EXT_SHM_ARRAY, b"\x01\x0a\x01" + bytes(8) + bytes(8)
    ),
    "bad dtype": lambda size: shm_ext(0, 4096, (1024,), dtype=99),
    "more than the region in all": lambda size: [shm_ext(0, size, (size // 4,))] * 2,
    "handed back to the server": lambda size: msgpack.ExtType(
        wire.EXT_SHM_RETURN, shm_ext(0, 4096, (1024,)).data
    ),
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_forged_descriptors_are_refused_by_the_decoder(case):
    region = shm.Region.create("beamlet-test", MiB)
    try:
        head = frame({"inputs": FORGED[case](region.size)})
        with pytest.raises(ProtocolError):
            decode(head, region, borrow=True)
    finally:
        region.close()


def test_a_descriptor_without_a_region_is_refused():
    with pytest.raises(ProtocolError, match="without shared memory"):
        decode(frame({"inputs": shm_ext(0, 4096, (1024,))}), None, borrow=True)


def test_an_input_handed_back_is_named_by_its_place_and_copied_out():
    requests = shm.Region.create("beamlet-test", 8 * MiB)
    replies = shm.Region.create("beamlet-test", 8 * MiB)
    try:
        x = torch.randn(64, 4096)
        head, _ = wire.encode({"inputs": x}, shm=requests)
        borrowed = decode(head, requests, borrow=True)["inputs"]  # the server's view
        rows = borrowed[2:4]  # a contiguous, aligned piece of it
        fresh = borrowed * 2
        head, body = wire.encode({"same": borrowed, "rows": rows, "fresh": fresh}, shm=replies, peer=requests)
        assert not body and replies.written == fresh.nbytes  # only the new tensor was copied
        dec = wire._Decoder(0, replies, False, own=requests)
        got = msgpack.unpackb(head[wire.PREFIX.size :], ext_hook=dec.ext_hook, raw=False)
        assert (
            torch.equal(got["same"], x)
            and torch.equal(got["rows"], x[2:4])
            and torch.equal(got["fresh"], x * 2)
        )
        whole = requests.view(0, requests.size)
        assert not any(np.shares_memory(t.numpy(), whole) for t in got.values())  # copies, never views
        with pytest.raises(ProtocolError, match="does not write"):
            decode(head, replies, borrow=True)  # a server has no region of its own to resolve them in
        forged = msgpack.ExtType(wire.EXT_SHM_RETURN, shm_ext(8 * MiB, 4096, (1024,)).data)
        dec = wire._Decoder(0, replies, False, own=requests)
        with pytest.raises(ProtocolError, match="outside"):
            msgpack.unpackb(frame({"x": forged})[wire.PREFIX.size :], ext_hook=dec.ext_hook, raw=False)
    finally:
        requests.close()
        replies.close()


# -- through a real server ---------------------------------------------------------------------
def test_round_trip_every_dtype_bitwise(identity):
    """Every wire dtype, numpy and torch, inline, through the socket and through shared
    memory, comes back bit for bit."""
    sizes = (1024, shm.THRESHOLD - 8, shm.THRESHOLD, 1 * MiB + 24)
    with identity.channel() as ch:
        assert ch.shm is not None
        for i, name in enumerate(wire.DTYPE_NAMES):
            messages, sent = [], []
            for j, nbytes in enumerate(sizes):
                arr = random_array(name, nbytes, seed=100 * i + j)
                value = as_tensor(arr, name) if name == "bfloat16" or j % 2 else arr
                sent.append(value)
                messages.append({"op": "infer", "key": "id", "inputs": value})
            for value, reply in zip(sent, ch.request_many(messages)):
                assert not isinstance(reply, Exception), reply
                out = reply["outputs"]
                assert isinstance(out, torch.Tensor)  # the server turns numpy inputs into tensors
                assert tuple(out.shape) == tuple(value.shape)
                assert raw_bytes(out) == raw_bytes(value), (name, value.shape)
            assert ch.shm.written >= 1 * MiB  # the big ones went through shared memory


def test_round_trip_up_to_256_mib(identity):
    with identity.channel() as ch:
        for mib in (16, 256):
            x = torch.empty(mib * MiB // 4, dtype=torch.float32).random_()
            out = ch.request({"op": "infer", "key": "id", "inputs": x})["outputs"]
            assert torch.equal(out, x)
            del out
        assert ch.shm is not None and ch.shm.written >= 256 * MiB


def test_arrays_that_do_not_fit_go_through_the_socket(identity):
    """A region too small for everything: what fits goes through shared memory, the rest
    through the socket, replies likewise; pipelined replies never overwrite each other."""
    with Channel(identity.path, shm_bytes=3 * MiB) as ch:
        xs = [torch.full((MiB // 4,), float(i)) for i in range(5)]  # 1 MiB each
        replies = ch.request_many([{"op": "infer", "key": "id", "inputs": x} for x in xs])
        for x, reply in zip(xs, replies):
            assert torch.equal(reply["outputs"], x)
        big = torch.arange(2 * MiB, dtype=torch.float32)  # 8 MiB: more than the region
        assert torch.equal(ch.request({"op": "infer", "key": "id", "inputs": big})["outputs"], big)
        for _ in range(3):  # rewound at each call: the region serves again
            replies = ch.request_many([{"op": "infer", "key": "id", "inputs": x} for x in xs[:2]])
            assert all(torch.equal(r["outputs"], x) for x, r in zip(xs, replies))


def test_requests_in_shared_memory_merge_with_each_other(identity, private_dir):
    """Queued requests of two clients, both borrowed from their regions, merge into one
    forward pass (torch.cat over the views) and each gets its own rows back."""
    gate, held = os.path.join(private_dir, "gate"), os.path.join(private_dir, "entered")
    with identity.channel() as ch:
        ch.request({"op": "load", "key": "merge", "spec": gate_spec(gate, held)})
    xs = [torch.randn(64, 4096) for _ in range(3)]  # 1 MiB each, 128 rows when merged
    got: dict[int, torch.Tensor] = {}

    def send(i: int) -> None:
        with attached_channel(identity.path) as ch:
            got[i] = ch.request({"op": "infer", "key": "merge", "inputs": xs[i]})["outputs"]

    k = model_status(identity.path, "merge")["compute_threads"]  # requests the gate holds at once
    xs += [torch.randn(64, 4096) for _ in range(k - 1)]
    threads: list[threading.Thread] = []
    try:
        for i in range(k):  # one at a time, each held alone in a forward pass (no longer gathering)
            threads.append(threading.Thread(target=send, args=(i,)))
            threads[-1].start()
            wait_until(lambda n=i + 1: entered(held) == n, 30, "the gate to hold it")
        threads += [threading.Thread(target=send, args=(i,)) for i in (k, k + 1)]
        for t in threads[k:]:
            t.start()
        wait_until(lambda: model_status(identity.path, "merge")["queued"] == 2, 30, "two requests to queue")
    finally:
        open(gate, "w").close()
        for t in threads:
            t.join(30)
    assert all(torch.equal(got[i], xs[i]) for i in range(k + 2))
    stats = model_status(identity.path, "merge")
    assert (stats["requests"], stats["batches"]) == (k + 2, k + 1)  # the two queued ones ran as one batch


def test_outputs_that_are_inputs_are_handed_back_without_a_copy(identity):
    spec = ModelSpec("pytorch_state_dict", None, userclass.describe(HandsBack)).to_wire()
    with identity.channel() as ch:
        ch.request({"op": "load", "key": "hands-back", "spec": spec})
    with attached_channel(identity.path) as ch:
        before = reply_bytes(identity.path)
        x = torch.randn(64, 4096)  # 1 MiB
        assert torch.equal(ch.request({"op": "infer", "key": "id", "inputs": x})["outputs"], x)
        assert reply_bytes(identity.path) == before  # Identity: nothing copied into the reply region
        out = ch.request({"op": "infer", "key": "hands-back", "inputs": x})["outputs"]
        assert reply_bytes(identity.path) == before + x.nbytes  # only the new tensor was
        assert torch.equal(out["same"], x * 0.5) and torch.equal(out["halved"], x * 0.5)  # changed in place
        assert torch.equal(out["rows"], x[1:3] * 0.5) and torch.equal(out["twice"], x * 2)


def reply_bytes(path: str) -> int:
    with Channel(path, shm_bytes=0) as ch:
        return int(ch.request({"op": "status"})["status"]["shm_reply_bytes"])


def test_region_size_default_environment_and_argument(identity, monkeypatch):
    monkeypatch.delenv(config.SHM_BYTES_ENV, raising=False)
    assert config.shm_bytes() == config.DEFAULT_SHM_BYTES == 1 << 30
    with Channel(identity.path) as ch:  # the default: 1 GiB, the server's frame limit too
        assert ch.shm is not None and ch.shm.size == 1 << 30
    monkeypatch.setenv(config.SHM_BYTES_ENV, "8MiB")
    with Channel(identity.path) as ch:
        assert ch.shm is not None and ch.shm.size == 8 * MiB
    with Channel(identity.path, shm_bytes=2 * MiB) as ch:
        assert ch.shm is not None and ch.shm.size == 2 * MiB
    for bad in ("lots", "-1"):
        monkeypatch.setenv(config.SHM_BYTES_ENV, bad)
        with pytest.raises(ValueError, match=config.SHM_BYTES_ENV):
            config.shm_bytes()


def test_without_shared_memory_everything_still_works(identity, monkeypatch):
    monkeypatch.setenv("BEAMLET_SHM_BYTES", "0")
    with Channel(identity.path) as ch:
        assert ch.shm is None
        x = torch.randn(MiB)
        assert torch.equal(ch.request({"op": "infer", "key": "id", "inputs": x})["outputs"], x)
        status = ch.request({"op": "status"})["status"]
        assert status["shm_connections"] == 0


def attached_channel(path: str) -> Channel:
    ch = Channel(path)
    assert ch.shm is not None
    return ch


def assert_identity_serves(path: str) -> None:
    with attached_channel(path) as ch:
        x = torch.randn(MiB)
        assert torch.equal(ch.request({"op": "infer", "key": "id", "inputs": x})["outputs"], x)


@pytest.mark.parametrize(
    "case",
    [
        "offset past the end",
        "offset + nbytes overflowing u64",
        "negative offset",
        "nbytes not dtype * shape",
        "handed back to the server",
    ],
)
def test_forged_descriptor_closes_only_its_connection(identity, case):
    bystander = attached_channel(identity.path)
    with attached_channel(identity.path) as ch:
        assert ch.shm is not None
        forged = FORGED[case](ch.shm.size)
        ch.sock.sendall(frame({"op": "infer", "id": 1, "key": "id", "inputs": forged}))
        reply = wire.FrameReader(ch.sock).read()
        assert reply["id"] is None and reply["error"]["code"] == "protocol", reply
        assert wire.FrameReader(ch.sock).read() is None  # and the server closed it
    x = torch.randn(MiB)
    assert torch.equal(bystander.request({"op": "infer", "key": "id", "inputs": x})["outputs"], x)
    bystander.close()
    assert_identity_serves(identity.path)


def raw_hello(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(path)
    s.sendall(frame({"op": "hello", "id": 1, "version": wire.VERSION, "pid": os.getpid()}))
    assert wire.FrameReader(s).read()["ok"]
    return s


def test_bad_attach_requests_are_refused_and_the_connection_serves_on(identity, private_dir):
    unsealed = os.memfd_create("beamlet-test", os.MFD_CLOEXEC)
    os.ftruncate(unsealed, MiB)
    path = os.path.join(private_dir, "f")
    with open(path, "wb") as f:
        f.truncate(MiB)
    plain_file = os.open(path, os.O_RDWR)
    sealed = shm.Region.create("beamlet-test", MiB)
    cases = [
        ("no descriptor", [], MiB),
        ("an unsealed memfd", [unsealed], MiB),
        ("a plain file", [plain_file], MiB),
        ("the wrong size", [sealed.take_fd()], 2 * MiB),
    ]
    for what, fds, size in cases:
        s = raw_hello(identity.path)
        reader = wire.FrameReader(s)
        attach = frame({"op": "shm_attach", "id": 2, "request_bytes": size, "reply_bytes": MiB})
        wire.sendmsg_all(s, [memoryview(attach)], fds=fds)
        for fd in fds:
            os.close(fd)
        reply = reader.read()
        assert not reply["ok"] and reply["error"]["code"] == "bad_request", (what, reply)
        s.sendall(frame({"op": "status", "id": 3}))
        assert reader.read()["ok"], what  # the connection serves on, over the socket
        s.close()
    sealed.close()
    # an attach after another request, or a second one, is refused too
    with attached_channel(identity.path) as ch:
        with pytest.raises(BadRequest, match="already"):
            ch._exchange({"op": "shm_attach", "request_bytes": MiB, "reply_bytes": MiB}, fds=[])
    assert_identity_serves(identity.path)


def test_many_descriptors_close_the_connection(identity):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(identity.path)
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(wire.MAX_FDS + 1)]
    hello = frame({"op": "hello", "id": 1, "version": wire.VERSION, "pid": os.getpid()})
    wire.sendmsg_all(s, [memoryview(hello)], fds=fds)
    for fd in fds:
        os.close(fd)
    reply = wire.FrameReader(s).read()
    assert reply["id"] is None and reply["error"]["code"] == "protocol"
    s.close()
    assert_identity_serves(identity.path)


CHILD = """
import sys, torch
from modelserver.channel import Channel
ch = Channel(sys.argv[1])
print("attached", flush=True)
ch.request({"op": "infer", "key": "gate", "inputs": torch.ones(16 << 20)})
print("answered", flush=True)
"""


def gate_spec(gate: str, entered: str = "") -> dict:
    params = {"gate": gate, "limit": 60, **({"entered": entered} if entered else {})}
    return ModelSpec("pytorch_state_dict", None, userclass.describe(Gate), params).to_wire()


def entered(path: str) -> int:
    """How many batches have entered the Gate's forward (``Gate(entered=path)``)."""
    try:
        with open(path) as f:
            return len(f.read().splitlines())
    except FileNotFoundError:
        return 0


def test_killed_client_leaves_no_shared_memory_behind(identity, private_dir):
    gate = os.path.join(private_dir, "gate")
    with identity.channel() as ch:
        ch.request({"op": "load", "key": "gate", "spec": gate_spec(gate)})
    before = dev_shm()
    server_pid = identity.proc.pid
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, identity.path],
        env=server_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "attached"
        theirs = {m for m in beamlet_memfds(server_pid) if m[1].endswith(f"-{child.pid}")}
        assert len(theirs) == 2  # the child's request region, and the reply region made for it
        wait_until(
            lambda: model_in_flight(identity.path, "gate"), 30, "the child's request to reach the model"
        )
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert theirs & beamlet_memfds(server_pid)  # the batch still borrows the dead client's memory
        assert not uses_dev_shm(server_pid)
        assert_identity_serves(identity.path)  # other clients carry on meanwhile
    finally:
        open(gate, "w").close()
        if child.poll() is None:
            child.kill()
            child.wait()
    wait_until(
        lambda: not theirs & beamlet_memfds(server_pid),
        30,
        "the server to let go of the dead client's memory",
    )
    assert dev_shm() == before
    assert_identity_serves(identity.path)


def test_killed_server_leaves_no_shared_memory_behind(sock_path, private_dir):
    srv = start_server(sock_path)
    gate = os.path.join(private_dir, "gate")
    with Channel(sock_path) as ch:
        ch.request({"op": "load", "key": "id", "spec": IDENTITY})
        ch.request({"op": "load", "key": "gate", "spec": gate_spec(gate)})
    before = dev_shm()
    me = os.getpid()
    mine = dev_shm_held(me)  # the test process may hold what earlier tests' helpers made
    held_before = beamlet_memfds(me)  # earlier tests' pooled channels have regions of their own
    outcome: dict = {}

    def call() -> None:
        x = torch.randn(8 * MiB)
        try:
            with Channel(sock_path) as ch:
                outcome["mapped"] = {m for m in beamlet_memfds(me) if "reply" in m[1]}
                outcome["dev_shm"] = uses_dev_shm(me, mine) or uses_dev_shm(srv.proc.pid)
                # the first reply lands in the reply region; the second never comes
                ch.request_many([{"op": "infer", "key": k, "inputs": x} for k in ("id", "gate")])
        except ServerUnavailable as exc:
            outcome["error"] = exc

    t = threading.Thread(target=call)
    t.start()
    try:
        wait_until(lambda: model_in_flight(sock_path, "gate"), 30, "the request to reach the gated model")
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(10)
        t.join(30)
        assert isinstance(outcome.get("error"), ServerUnavailable)
        assert outcome["mapped"] and not outcome["dev_shm"]  # we mapped the server's reply region...
        ours = {m for m in beamlet_memfds(me) - held_before if m[1].endswith(f"-{me}")}
        assert not ours  # ...and hold nothing of it, nor of our own, any more
        assert dev_shm() == before
        # a new server on the same socket serves a new connection through shared memory
        srv = start_server(sock_path, "--max-frame-bytes", "64MiB")
        with attached_channel(sock_path) as ch:
            assert ch.shm is not None and ch.shm.size == 64 * MiB  # capped by the server's frame limit
            ch.request({"op": "load", "key": "id", "spec": IDENTITY})
            x = torch.randn(MiB)
            assert torch.equal(ch.request({"op": "infer", "key": "id", "inputs": x})["outputs"], x)
    finally:
        open(gate, "w").close()
        t.join(30)
        srv.stop()


def test_server_rss_stays_flat_over_10000_requests(identity):
    """1 MiB requests, half to ReLU (a new output: request region borrowed, reply region
    written, copied out) and half to Identity (the input handed back)."""
    relu = ModelSpec("pytorch_state_dict", None, {"name": "torch.nn:ReLU", "source": None}).to_wire()
    proc = psutil.Process(identity.proc.pid)
    x = torch.randn(MiB // 4)  # 1 MiB
    messages = [{"op": "infer", "key": key, "inputs": x} for key in ("relu", "id")]
    with identity.channel() as ch:
        ch.request({"op": "load", "key": "relu", "spec": relu})
        for i in range(500):
            ch.request(messages[i % 2])
        start = proc.memory_info().rss
        samples = []
        for i in range(10_000):
            out = ch.request(messages[i % 2])["outputs"]
            if i % 1000 == 999:
                samples.append(proc.memory_info().rss)
        assert torch.equal(out, x)
        assert torch.equal(ch.request(messages[0])["outputs"], x.relu())
    growth = max(samples) - start
    print(
        f"\nserver RSS over 10,000 x 1 MiB through shm: {start / MiB:.1f} MiB -> "
        f"{samples[-1] / MiB:.1f} MiB (largest growth {growth / MiB:.2f} MiB)"
    )
    assert growth < 8 * MiB, [s / MiB for s in samples]
