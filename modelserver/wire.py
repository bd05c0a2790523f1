"""The wire format: length-prefixed frames with a msgpack header and raw array buffers.

Used by the model server, its clients and the harness's control channel. There is no
pickle anywhere: a frame holds msgpack data plus the raw bytes of numpy arrays and torch
tensors, described by dtype and shape.

Frame layout (integers big-endian)::

    offset  size  field
    0       2     magic b"BL"
    2       1     version (VERSION)
    3       1     flags: FLAG_REWIND (0x01) or 0; other bits reserved (sent as 0)
    4       4     H: header length in bytes
    8       8     B: body length in bytes
    16      H     header: one msgpack object (the message)
    16+H    B     body: the raw bytes of every array the header refers to, back to back,
                  in the order the arrays appear in the header

An array in the message is a msgpack ExtType(EXT_ARRAY) whose 3+8n bytes of data are
``kind:u8 dtype:u8 ndim:u8 dims:u64[ndim]`` (little-endian): kind 0 is a numpy array and
1 a torch tensor, dtype an index into ``DTYPE_NAMES``. The reader allocates each array
from its descriptor as the header is unpacked and then ``recv_into``s the body straight
into those allocations. Only what the reader's small look-ahead buffer (``READ_AHEAD``)
already holds is copied: small frames cost one recv, large arrays are not copied.

Arrays of at most INLINE_MAX bytes travel inside the header instead, as
ExtType(EXT_INLINE_ARRAY) holding the same descriptor followed by the raw bytes: for a
one-row request that is cheaper than a separate buffer on both sides.

Arrays of at least the sender's ``shm.Region.threshold`` bytes, on a connection that
shares memory (``modelserver.shm``), travel as ExtType(EXT_SHM_ARRAY): the same
descriptor followed by ``offset:u64 nbytes:u64``, the place the sender copied the bytes to
in its own region; the receiver checks it against that region's bounds and borrows or
copies the bytes. ExtType(EXT_SHM_RETURN), with the same data, names a place in the
*receiver's* own region instead: a reply array that is (a piece of) the request's input,
handed back without a copy; the client copies it out. ``FLAG_REWIND`` on a frame says its sender has read every reply to its
earlier frames (the server may then reuse its reply region; see shm.py for the rules).

A few plain values that model parameters and inference arguments use travel as
ExtType(EXT_VALUE) holding a msgpack ``[tag, payload]`` (still data, never pickle):

    tag          payload                        decodes to
    "dtype"      "float16"                      torch.float16
    "device"     "cuda:0"                       torch.device("cuda:0")
    "dataclass"  [class ref, {field: value}]    a ``DataclassValue`` (the class is not
                                                imported while decoding; the model loader
                                                builds the instance where it is used)

Limits: H <= MAX_HEADER_BYTES; B <= the receiver's ``max_body`` (the server's
``--max-frame-bytes``); the descriptors must add up to exactly B; the shared-memory ones
must lie in the region (64-byte aligned) and add up to at most its size. A frame that
breaks a limit raises ``FrameTooLarge`` or ``ProtocolError``; the caller then closes the
connection, since the stream position can no longer be trusted.

A clean EOF between frames is ``FrameReader.read() -> None``; an EOF inside a frame is a
``ProtocolError`` ("truncated").
"""

from __future__ import annotations

import array
import dataclasses
import os
import socket
import struct
import sys
import time
from typing import Any

import msgpack
import numpy as np

from modelserver.errors import FrameTooLarge, ProtocolError
from modelserver.shm import Region

MAGIC = b"BL"
VERSION = 1
PREFIX = struct.Struct("!2sBBIQ")
MAX_HEADER_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_BODY = 1 << 30
EXT_ARRAY = 1
EXT_INLINE_ARRAY = 2
EXT_VALUE = 3
EXT_SHM_ARRAY = 4
EXT_SHM_RETURN = 5
INLINE_MAX = 4096
FLAG_REWIND = 0x01  # the sender has read every reply to its earlier frames (shm.py)
MAX_FDS = 4  # descriptors a reader keeps waiting for the request that claims them
_IOV_BATCH = 512

# Wire dtypes, by index. bfloat16 has no numpy dtype: it travels as its raw 16 bits and
# decodes into torch tensors only.
DTYPE_NAMES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128", "bfloat16",
)  # fmt: skip
BF16 = DTYPE_NAMES.index("bfloat16")
_NP_DTYPES = [np.dtype("uint16" if n == "bfloat16" else n) for n in DTYPE_NAMES]
_NP_CODE = {dt: i for i, dt in enumerate(_NP_DTYPES) if i != BF16}
_DESC = struct.Struct("<BBB")
_SHM = struct.Struct("<QQ")  # offset, nbytes
KIND_NP, KIND_PT = 0, 1
READ_AHEAD = 64 * 1024

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("beamlet's wire format assumes a little-endian host")

_torch: Any = None
_PT_DTYPES: list[Any] = []
_PT_CODE: dict[Any, int] = {}


def _torch_module() -> Any:
    """torch, imported on first use so the control channel does not pay for it."""
    global _torch
    if _torch is None:
        import torch

        _PT_DTYPES.extend(getattr(torch, n) for n in DTYPE_NAMES)
        _PT_CODE.update({dt: i for i, dt in enumerate(_PT_DTYPES)})
        _torch = torch
    return _torch


def _is_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # no tensor can exist before torch is imported
    return torch is not None and isinstance(obj, torch.Tensor)


class DataclassValue:
    """A dataclass instance as it arrived: the class named (``userclass.describe``) and
    its init fields. ``modelserver.loaders.materialize`` turns it into the instance; it
    encodes back to the same bytes, so a spec that holds one round-trips unchanged."""

    __slots__ = ("ref", "fields")

    def __init__(self, ref: dict[str, Any], fields: dict[str, Any]) -> None:
        self.ref = ref
        self.fields = fields

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DataclassValue) and (self.ref, self.fields) == (other.ref, other.fields)

    def __hash__(self) -> int:
        return hash(self.ref.get("name"))

    def __repr__(self) -> str:
        return f"{self.ref.get('name')}(**{self.fields!r})"


def _plain_value(obj: Any) -> tuple[str, Any] | None:
    """(tag, payload) for the plain values EXT_VALUE carries, None for anything else."""
    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(obj, torch.dtype):
            return ("dtype", str(obj).removeprefix("torch."))
        if isinstance(obj, torch.device):
            return ("device", str(obj))
    if isinstance(obj, DataclassValue):
        return ("dataclass", [obj.ref, obj.fields])
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        from modelserver import userclass

        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
        return ("dataclass", [userclass.describe(type(obj)), fields])
    return None


class _Encoder:
    """Collects the raw buffers of the arrays met while packing one message; with a
    shared-memory region, copies the big ones there instead."""

    __slots__ = ("buffers", "nbytes", "fallback", "shm", "peer")

    def __init__(self, fallback: Any = None, shm: Region | None = None, peer: Region | None = None) -> None:
        self.buffers: list[memoryview] = []
        self.nbytes = 0
        self.fallback = fallback  # for fingerprints of values that never travel
        self.shm = shm
        self.peer = peer

    def default(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return self._array(KIND_NP, obj)
        if _is_tensor(obj):
            return self._tensor(obj)
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, tuple) and hasattr(obj, "_asdict"):
            return obj._asdict()  # a NamedTuple such as PredictionResult travels as a map
        if isinstance(obj, (tuple, set, frozenset)):
            return list(obj)
        if isinstance(obj, dict):
            return dict(obj)
        if isinstance(obj, list):
            return list(obj)
        plain = _plain_value(obj)
        if plain is not None:
            payload = msgpack.packb(list(plain), default=self.default, use_bin_type=True, strict_types=True)
            return msgpack.ExtType(EXT_VALUE, payload)
        if self.fallback is not None:
            return self.fallback(obj)
        raise TypeError(
            f"cannot send a {type(obj).__name__} on the wire (no pickle; plain data, arrays, "
            f"torch dtypes and devices, and dataclasses travel): {obj!r:.80}"
        )

    def _array(self, kind: int, arr: np.ndarray, code: int | None = None) -> msgpack.ExtType:
        if code is None:
            code = _NP_CODE.get(arr.dtype)
            if code is None:
                if arr.dtype.byteorder == ">" and arr.dtype.newbyteorder("<") in _NP_CODE:
                    arr = arr.astype(arr.dtype.newbyteorder("<"))
                    code = _NP_CODE[arr.dtype]
                else:
                    raise TypeError(f"cannot send an array of dtype {arr.dtype} on the wire")
        shape = arr.shape
        desc = _DESC.pack(kind, code, len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
        if arr.nbytes <= INLINE_MAX:
            return msgpack.ExtType(EXT_INLINE_ARRAY, desc + arr.tobytes())
        if self.peer is not None:
            place = self.peer.place_of(arr)
            if place is not None:
                return msgpack.ExtType(EXT_SHM_RETURN, desc + _SHM.pack(place, arr.nbytes))
        if self.shm is not None and arr.nbytes >= self.shm.threshold:
            spot = self.shm.reserve(arr.nbytes)
            if spot is not None:
                offset, dst = spot
                np.copyto(dst.view(arr.dtype).reshape(arr.shape), arr)
                return msgpack.ExtType(EXT_SHM_ARRAY, desc + _SHM.pack(offset, arr.nbytes))
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        self.buffers.append(memoryview(arr).cast("B"))  # type: ignore[arg-type]
        self.nbytes += arr.nbytes
        return msgpack.ExtType(EXT_ARRAY, desc)

    def _tensor(self, t: Any) -> msgpack.ExtType:
        torch = _torch_module()
        if t.requires_grad:
            t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        code = _PT_CODE.get(t.dtype)
        if code is None:
            raise TypeError(f"cannot send a tensor of dtype {t.dtype} on the wire")
        if code == BF16:
            return self._array(KIND_PT, t.view(torch.uint16).numpy(), BF16)
        return self._array(KIND_PT, t.numpy(), code)


class _Decoder:
    """Allocates the arrays of one frame as its header is unpacked. Arrays in the peer's
    shared memory are borrowed as views of ``shm`` (``borrow``) or copied out of it;
    arrays handed back in our ``own`` region are copied out of that."""

    __slots__ = ("views", "nbytes", "limit", "shm", "borrow", "own", "shm_nbytes")

    def __init__(
        self, limit: int, shm: Region | None = None, borrow: bool = False, own: Region | None = None
    ) -> None:
        self.views: list[memoryview] = []
        self.nbytes = 0
        self.limit = limit
        self.shm = shm
        self.borrow = borrow
        self.own = own
        self.shm_nbytes = {EXT_SHM_ARRAY: 0, EXT_SHM_RETURN: 0}

    def ext_hook(self, code: int, data: bytes) -> Any:
        if code == EXT_VALUE:
            return self._value(data)
        if code not in (EXT_ARRAY, EXT_INLINE_ARRAY, EXT_SHM_ARRAY, EXT_SHM_RETURN) or len(data) < 3:
            raise ProtocolError(f"unknown or malformed msgpack extension (type {code})")
        kind, dtype_code, ndim = _DESC.unpack_from(data)
        end = 3 + 8 * ndim
        if len(data) < end or dtype_code >= len(DTYPE_NAMES) or kind not in (KIND_NP, KIND_PT):
            raise ProtocolError("malformed array descriptor")
        if kind == KIND_NP and dtype_code == BF16:
            raise ProtocolError("bfloat16 arrays travel as torch tensors only")
        shape = struct.unpack_from(f"<{ndim}Q", data, 3)
        np_dtype = _NP_DTYPES[dtype_code]
        count = 1
        for d in shape:
            count *= d
        nbytes = count * np_dtype.itemsize
        if code == EXT_INLINE_ARRAY:
            if len(data) - end != nbytes:
                raise ProtocolError(f"inline array holds {len(data) - end} bytes, its shape needs {nbytes}")
            return _wrap(kind, dtype_code, np.frombuffer(data, np_dtype, count, end).reshape(shape).copy())
        if code in (EXT_SHM_ARRAY, EXT_SHM_RETURN):
            return _wrap(kind, dtype_code, self._shm_array(code, data, end, nbytes, np_dtype, shape))
        if len(data) != end:
            raise ProtocolError("malformed array descriptor")
        self.nbytes += nbytes
        if self.nbytes > self.limit:
            raise ProtocolError(f"array descriptors add up to more than the {self.limit}-byte frame body")
        if kind == KIND_NP:
            arr = np.empty(shape, dtype=np_dtype)
            if nbytes:
                self.views.append(memoryview(arr).cast("B"))  # type: ignore[arg-type]
            return arr
        torch = _torch_module()
        t = torch.empty(shape, dtype=_PT_DTYPES[dtype_code])
        if nbytes:
            holder = t.view(torch.uint16) if dtype_code == BF16 else t
            self.views.append(memoryview(holder.numpy()).cast("B"))
        return t

    def _shm_array(
        self, code: int, data: bytes, end: int, nbytes: int, dtype: np.dtype, shape: tuple[int, ...]
    ) -> Any:
        if len(data) != end + _SHM.size:
            raise ProtocolError("malformed shared-memory array descriptor")
        offset, size = _SHM.unpack_from(data, end)
        if size != nbytes:
            raise ProtocolError(f"shared-memory array says {size} bytes, its dtype and shape need {nbytes}")
        region = self.shm if code == EXT_SHM_ARRAY else self.own
        if region is None:
            raise ProtocolError(
                "a shared-memory array on a connection without shared memory (shm_attach)"
                if code == EXT_SHM_ARRAY
                else "an array handed back in shared memory this side does not write"
            )
        self.shm_nbytes[code] += nbytes
        if self.shm_nbytes[code] > region.size:
            raise ProtocolError(f"shared-memory arrays add up to more than the {region.size}-byte region")
        src = region.view(offset, nbytes).view(dtype).reshape(shape)
        if self.borrow and code == EXT_SHM_ARRAY:
            return src
        arr = np.empty(shape, dtype)  # numpy's allocator asks for huge pages: fewer faults
        np.copyto(arr, src)
        return arr

    def _value(self, data: bytes) -> Any:
        try:
            tag, payload = msgpack.unpackb(data, ext_hook=self.ext_hook, raw=False)
        except ProtocolError:
            raise
        except Exception:
            raise ProtocolError("malformed value extension") from None
        if tag == "dtype" and isinstance(payload, str):
            dtype = getattr(_torch_module(), payload, None)
            if isinstance(dtype, _torch.dtype):
                return dtype
        elif tag == "device" and isinstance(payload, str):
            try:
                return _torch_module().device(payload)
            except (RuntimeError, ValueError):
                pass
        elif (
            tag == "dataclass"
            and isinstance(payload, list)
            and len(payload) == 2
            and isinstance(payload[0], dict)
            and isinstance(payload[1], dict)
        ):
            return DataclassValue(payload[0], payload[1])
        raise ProtocolError(f"malformed value extension {tag!r:.40}")


def _wrap(kind: int, dtype_code: int, arr: np.ndarray) -> Any:
    """A decoded array as its kind says: the numpy array, or a torch tensor on its memory."""
    if kind == KIND_NP:
        return arr
    t = _torch_module().from_numpy(arr)
    return t.view(_PT_DTYPES[BF16]) if dtype_code == BF16 else t


def fingerprint(value: Any, fallback: Any = None) -> str:
    """A stable hash of a value as the wire would carry it (arrays by their bytes).
    ``fallback(obj)`` stands in for what the wire cannot carry (for a model that stays
    in-process); without one such a value raises TypeError."""
    import hashlib

    enc = _Encoder(fallback)
    header = msgpack.packb(value, default=enc.default, use_bin_type=True, strict_types=True)
    h = hashlib.sha256(header)
    for buf in enc.buffers:
        h.update(buf)
    return h.hexdigest()


def encode(
    message: Any,
    *,
    shm: Region | None = None,
    peer: Region | None = None,
    flags: int = 0,
    stages: dict[str, float] | None = None,
) -> tuple[bytes, list[memoryview]]:
    """Pack a message into (prefix + header, body buffers). Raises TypeError for unsendables.
    ``shm``: the sender's own shared-memory region, for arrays of at least its threshold;
    ``peer``: the receiver's, for arrays that already lie in it (handed back by place).
    ``stages`` (a reply's stage times, seconds; ``message`` then a map without a
    ``stages`` field): sent as the message's last field, ``stages``, with ``encode`` added:
    the seconds packing the rest of the message took, its arrays included."""
    enc = _Encoder(shm=shm, peer=peer)
    if stages is None:
        header = msgpack.packb(message, default=enc.default, use_bin_type=True, strict_types=True)
    else:
        header = _pack_timed(message, stages, enc)
    if len(header) > MAX_HEADER_BYTES:
        raise FrameTooLarge(f"message header is {len(header)} bytes, over the {MAX_HEADER_BYTES}-byte limit")
    prefix = PREFIX.pack(MAGIC, VERSION, flags, len(header), enc.nbytes)
    return prefix + header, enc.buffers


def _pack_timed(message: dict[str, Any], stages: dict[str, float], enc: _Encoder) -> bytes:
    """The map ``message`` plus ``stages``, its encode time measured first: the map's
    fields are packed one by one, so the time can go into the same header."""
    started = time.monotonic()
    packer = msgpack.Packer(default=enc.default, use_bin_type=True, strict_types=True)
    parts = [packer.pack_map_header(len(message) + 1)]
    for key, value in message.items():
        parts.append(packer.pack(key))
        parts.append(packer.pack(value))
    stages["encode"] = time.monotonic() - started
    parts.append(packer.pack("stages"))
    parts.append(packer.pack(stages))
    return b"".join(parts)


def send_frame(sock: socket.socket, message: Any, max_body: int | None = None) -> int:
    """Send one message; returns the frame's size. Not thread-safe: hold the socket's lock."""
    head, buffers = encode(message)
    body = sum(b.nbytes for b in buffers)
    if max_body is not None and body > max_body:
        raise FrameTooLarge(f"frame body of {body} bytes is over the peer's {max_body}-byte limit")
    sendmsg_all(sock, [memoryview(head), *buffers])
    return len(head) + body


def sendmsg_all(
    sock: socket.socket, parts: list[memoryview], flags: int = 0, fds: list[int] | None = None
) -> None:
    """Write every byte of ``parts`` with scatter-gather sends (no concatenation copy).
    ``fds`` travel (SCM_RIGHTS) with the first bytes."""
    parts = [p for p in parts if p.nbytes]
    ancillary = [fds_message(fds)] if fds else []
    while parts:
        sent = sock.sendmsg(parts[:_IOV_BATCH], ancillary, flags)
        ancillary = []
        parts = advance(parts, sent)


def fds_message(fds: list[int]) -> tuple[int, int, bytes]:
    """The ancillary item that passes ``fds`` over a Unix socket."""
    return (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())


def advance(parts: list[memoryview], sent: int) -> list[memoryview]:
    """Drop ``sent`` bytes from the front of a list of buffers."""
    i = 0
    while i < len(parts) and sent >= parts[i].nbytes:
        sent -= parts[i].nbytes
        i += 1
    rest = parts[i:]
    if sent and rest:
        rest[0] = rest[0][sent:]
    return rest


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class FrameReader:
    """Reads frames from one socket. Not thread-safe: one reader thread per socket.

    Keeps a small look-ahead buffer so that a small frame (prefix, header and body) costs
    one ``recv``; array bytes beyond what the buffer already holds go straight from the
    socket into the arrays' own memory.

    ``shm``: the peer's shared-memory region, once attached; its arrays are borrowed as
    views (``borrow``) or copied out. ``own``: our own region, for arrays the peer hands
    back in it (copied out). ``flags``: the flags byte of the last frame read;
    ``arrived``: when its first bytes were read (``time.monotonic()``), so a caller can
    tell waiting for a frame from decoding it.
    While ``accept_fds`` is set, descriptors that arrive (SCM_RIGHTS) are kept for
    ``take_fds`` (at most ``MAX_FDS``; more is a ProtocolError); otherwise the kernel drops
    them.
    """

    def __init__(self, sock: socket.socket, max_body: int = DEFAULT_MAX_BODY):
        self.sock = sock
        self.max_body = max_body
        self.shm: Region | None = None
        self.borrow = False
        self.own: Region | None = None
        self.flags = 0
        self.arrived = 0.0
        self.accept_fds = False
        self._fds: list[int] = []
        self._buf = bytearray(READ_AHEAD)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    def take_fds(self) -> list[int]:
        """The descriptors received so far; the caller owns (and closes) them now."""
        fds, self._fds = self._fds, []
        return fds

    def close_fds(self) -> None:
        for fd in self.take_fds():
            os.close(fd)

    def read(self) -> Any | None:
        """The next message, or None on a clean EOF between frames."""
        if not self._fill(PREFIX.size, at_boundary=True):
            return None
        self.arrived = time.monotonic()
        magic, version, flags, header_len, body_len = PREFIX.unpack_from(self._buf, self._start)
        if magic != MAGIC:
            raise ProtocolError(f"bad frame magic {bytes(magic)!r} (not a beamlet peer?)")
        if version != VERSION:
            raise ProtocolError(f"unsupported wire version {version} (this side speaks {VERSION})")
        if header_len > MAX_HEADER_BYTES:
            raise FrameTooLarge(
                f"frame header of {header_len} bytes is over the {MAX_HEADER_BYTES}-byte limit"
            )
        if body_len > self.max_body:
            raise FrameTooLarge(f"frame body of {body_len} bytes is over the {self.max_body}-byte limit")
        self._start += PREFIX.size
        self.flags = flags
        header = self._take(header_len)
        dec = _Decoder(body_len, self.shm, self.borrow, self.own)
        try:
            message = msgpack.unpackb(header, ext_hook=dec.ext_hook, raw=False)
        except ProtocolError:
            raise
        except Exception as exc:  # msgpack raises several unrelated types for bad input
            raise ProtocolError(f"malformed frame header: {exc}") from None
        if dec.nbytes != body_len:
            raise ProtocolError(f"frame body is {body_len} bytes but its arrays need {dec.nbytes} bytes")
        for view in dec.views:
            self._read_into(view)
        return message

    def _buffered(self) -> int:
        return self._end - self._start

    def _fill(self, need: int, *, at_boundary: bool = False) -> bool:
        """Make at least ``need`` (<= READ_AHEAD) bytes available in the buffer."""
        if self._buffered() >= need:
            return True
        if self._start and self._start + need > len(self._buf):
            kept = self._buffered()
            self._buf[:kept] = self._buf[self._start : self._end]
            self._start, self._end = 0, kept
        while self._buffered() < need:
            n = self._recv(self._view[self._end :], idle=at_boundary and self._buffered() == 0)
            if n == 0:
                if at_boundary and self._buffered() == 0:
                    return False
                raise ProtocolError(
                    f"connection closed inside a frame ({self._buffered()} of {need} bytes read)"
                )
            self._end += n
        return True

    def _take(self, n: int) -> memoryview | bytearray:
        """The next n bytes, from the buffer when they fit, else read into their own array."""
        if n <= len(self._buf):
            self._fill(n)
            view = self._view[self._start : self._start + n]
            self._start += n
            return view
        own = bytearray(n)
        self._read_into(memoryview(own))
        return own

    def _read_into(self, view: memoryview) -> None:
        have = min(self._buffered(), view.nbytes)
        if have:
            view[:have] = self._view[self._start : self._start + have]
            self._start += have
        got = have
        total = view.nbytes
        while got < total:
            n = self._recv(view[got:], idle=False)
            if n == 0:
                raise ProtocolError(f"connection closed inside a frame ({got} of {total} bytes read)")
            got += n
        if self._start == self._end:
            self._start = self._end = 0

    def _recv(self, view: memoryview, *, idle: bool) -> int:
        while True:
            try:
                if self.accept_fds:
                    return self._recv_with_fds(view)
                return self.sock.recv_into(view)
            except BlockingIOError:
                # SO_RCVTIMEO expired: fine while idle between frames, fatal inside one.
                if idle:
                    continue
                raise ProtocolError("peer stalled inside a frame") from None

    def _recv_with_fds(self, view: memoryview) -> int:
        n, ancillary, msg_flags, _ = self.sock.recvmsg_into([view], socket.CMSG_SPACE(MAX_FDS * 4))
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                self._fds.extend(fds)
        if len(self._fds) > MAX_FDS or msg_flags & socket.MSG_CTRUNC:
            self.close_fds()
            raise ProtocolError(f"more than {MAX_FDS} file descriptors sent")
        return n
