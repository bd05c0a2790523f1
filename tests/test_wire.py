"""The wire format, pure: frames, arrays, limits, and fuzzed garbage."""

from __future__ import annotations

import socket
import struct
import threading

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelserver import wire
from modelserver.errors import FrameTooLarge, ProtocolError


def roundtrip(message, max_body=wire.DEFAULT_MAX_BODY):
    a, b = socket.socketpair()
    with a, b:
        head, buffers = wire.encode(message)
        sender = threading.Thread(target=wire.sendmsg_all, args=(a, [memoryview(head), *buffers]))
        sender.start()
        out = wire.FrameReader(b, max_body).read()
        sender.join()
        return out


@pytest.mark.parametrize("dtype", [n for n in wire.DTYPE_NAMES if n != "bfloat16"])
def test_numpy_and_torch_arrays_of_every_dtype_survive(dtype):
    arr = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    out = roundtrip({"np": arr, "pt": torch.from_numpy(arr.copy())})
    assert isinstance(out["np"], np.ndarray) and out["np"].dtype == arr.dtype
    np.testing.assert_array_equal(out["np"], arr)
    assert isinstance(out["pt"], torch.Tensor)
    np.testing.assert_array_equal(out["pt"].numpy(), arr)


def test_bfloat16_empty_scalar_and_strided_tensors():
    x = torch.randn(5, 6)
    msg = {
        "bf16": x.to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
        "strided": x.t(),
        "grad": torch.ones(3, requires_grad=True),
        "nested": [{"a": np.float32(1.5), "b": (1, 2)}],
    }
    out = roundtrip(msg)
    assert out["bf16"].dtype == torch.bfloat16 and torch.equal(out["bf16"], msg["bf16"])
    assert out["empty"].shape == (0, 4)
    assert out["scalar"].shape == () and out["scalar"].item() == 3.5
    assert torch.equal(out["strided"], x.t())
    assert out["nested"] == [{"a": 1.5, "b": [1, 2]}]


def test_large_array_is_read_into_its_own_memory():
    big = torch.randn(512, 1024)  # 2 MiB: far past the reader's look-ahead buffer
    out = roundtrip({"x": big, "y": torch.arange(10)})
    assert torch.equal(out["x"], big) and torch.equal(out["y"], torch.arange(10))


def test_several_frames_back_to_back_on_one_stream():
    a, b = socket.socketpair()
    with a, b:
        for i in range(5):
            wire.send_frame(a, {"i": i, "x": torch.full((3,), float(i))})
        reader = wire.FrameReader(b)
        for i in range(5):
            msg = reader.read()
            assert msg["i"] == i and torch.equal(msg["x"], torch.full((3,), float(i)))


def test_no_pickle_objects_are_refused_when_sending():
    with pytest.raises(TypeError, match="no pickle"):
        wire.encode({"x": object()})
    with pytest.raises(TypeError, match="dtype object"):
        wire.encode({"x": np.array([object()], dtype=object)})


def read_raw(data: bytes, max_body=wire.DEFAULT_MAX_BODY, close=True):
    a, b = socket.socketpair()
    with a, b:
        a.sendall(data)
        if close:
            a.shutdown(socket.SHUT_WR)
        return wire.FrameReader(b, max_body).read()


def frame(header: bytes, body: bytes = b"", magic=b"BL", version=wire.VERSION) -> bytes:
    return wire.PREFIX.pack(magic, version, 0, len(header), len(body)) + header + body


def test_clean_eof_between_frames_is_none_and_eof_inside_is_an_error():
    assert read_raw(b"") is None
    good = frame(msgpack.packb({"a": 1}))
    with pytest.raises(ProtocolError, match="closed inside a frame"):
        read_raw(good[:10])
    with pytest.raises(ProtocolError, match="closed inside a frame"):
        read_raw(good[:-1])


def test_bad_magic_version_and_sizes_are_refused():
    with pytest.raises(ProtocolError, match="magic"):
        read_raw(frame(msgpack.packb(1), magic=b"XX"))
    with pytest.raises(ProtocolError, match="version"):
        read_raw(frame(msgpack.packb(1), version=99))
    huge = wire.PREFIX.pack(b"BL", wire.VERSION, 0, 10, 1 << 40)
    with pytest.raises(FrameTooLarge, match="over the"):
        read_raw(huge, close=False)
    big_header = wire.PREFIX.pack(b"BL", wire.VERSION, 0, wire.MAX_HEADER_BYTES + 1, 0)
    with pytest.raises(FrameTooLarge, match="header"):
        read_raw(big_header, close=False)


def test_body_must_match_the_array_descriptors():
    head, buffers = wire.encode({"x": np.zeros(2048, np.float32)})
    header = head[wire.PREFIX.size :]
    with pytest.raises(ProtocolError, match="need 8192 bytes"):
        read_raw(frame(header, b"\0" * 8200))
    small = wire._DESC.pack(0, 10, 1) + struct.pack("<Q", 4) + b"\0" * 15
    with pytest.raises(ProtocolError, match="inline array holds 15 bytes, its shape needs 16"):
        read_raw(frame(msgpack.packb(msgpack.ExtType(wire.EXT_INLINE_ARRAY, small))))
    desc = wire._DESC.pack(0, 10, 1) + struct.pack("<Q", 1 << 40)
    liar = msgpack.packb(msgpack.ExtType(wire.EXT_ARRAY, desc))
    with pytest.raises(ProtocolError, match="add up to more"):
        read_raw(frame(liar, b"\0" * 8))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(st.binary(max_size=200))
def test_fuzzed_bytes_give_a_message_or_a_protocol_error(data):
    try:
        read_raw(data, max_body=1 << 20)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None, derandomize=True)
@given(header=st.binary(max_size=120), body=st.binary(max_size=64))
def test_fuzzed_headers_behind_a_valid_prefix(header, body):
    try:
        read_raw(frame(header, body), max_body=1 << 20)
    except ProtocolError:
        pass
