"""Framing: every message between ranks is a fixed header plus a payload.

The header (kind, step, layer, rows, cols, seq, plan, pos, send time) lets a receiver recognise a
late message and discard it, never mixing it into a later step. `seq` is the sequence id in
pipeline mode, `plan` the placement version in tensor mode, `pos` the position of the payload's
first token in its sequence (a step's tokens).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from .wire import CODE_WIRES, HEADER_BYTES, WIRE_CODES, body_nbytes, decode_body, encode_body_into

TAG = 7      # one MPI tag for everything: the header, not the tag, says what a message is


class Kind(IntEnum):
    INPUT = 1       # rank 0 -> satellite: normalized hidden state x (T, dim) for (step, layer, plan)
    PARTIAL = 2     # a rank's partial MLP sum (T, dim) for (step, layer): a satellite's to rank 0,
                    # a member's to every member (the framed all-reduce)
    STOP = 3        # rank 0 -> worker: finish; reply with DONE
    DONE = 4        # worker -> rank 0: the worker's statistics (JSON), its last message
    PLAN = 5        # rank 0 -> worker: the groups of plan `plan` (JSON); read them, then READY
    ACTIVATION = 6  # pipeline mode: hidden states (T, dim) of sequence `seq` entering stage `layer`
    ATTN_PARTIAL = 8  # a member's attention partial (T, dim) to every member (framed all-reduce)
    LOGITS = 10     # member -> rank 0: logits of its vocabulary slice (T, stop - start), float32
    STEP = 12       # rank 0 -> members: the step's token ids (T,) int32, first at `pos`, under plan
                    # `plan`; `layer`: flags, 1 = logits of the last token only, 2 = a decode step
    BEAT = 13       # heartbeat (empty): "this rank is alive", from a thread every beat period;
                    # the transport counts it and never hands it on (net/transport.py)
    READY = 14      # worker -> rank 0: the groups of plan `plan` are resident (held.py)


class Body(IntEnum):
    """How the payload's bytes are to be read (float payloads: in their wire precision)."""
    FLOAT32 = 0     # (rows, cols) float32
    INT32 = 1       # (rows, cols) int32
    BYTES = 2       # (rows,) uint8, e.g. UTF-8 JSON
    FLOAT16 = 3     # (rows, cols) float32 sent as float16            (net/wire.py)
    BFLOAT16 = 4    # (rows, cols) float32 sent as bfloat16           (net/wire.py)
    Q8 = 5          # (rows, cols) float32 sent as int8 blocks of 32 with a float16 scale


WIRE_BODIES = {wire: Body(code) for wire, code in WIRE_CODES.items()}   # wire dtype -> body
EXACT = {Body.INT32: np.int32, Body.BYTES: np.uint8}                     # bodies sent as they are

# kind, payload type, layer, step, payload rows and cols, seq (pipeline: the sequence id), plan
# (tensor: the placement version the message was made under), pos (first token's position),
# send time (sender's clock): 36 bytes
HEADER = np.dtype([("kind", "u1"), ("body", "u1"), ("layer", "<i2"), ("step", "<i4"),
                   ("rows", "<i4"), ("cols", "<i4"), ("seq", "<i4"), ("plan", "<i4"),
                   ("pos", "<i4"), ("sent_at", "<f8")])
assert HEADER.itemsize == HEADER_BYTES, "net/wire.py sizes messages with this header"


@dataclass
class Message:
    source: int
    kind: Kind
    step: int
    layer: int
    payload: np.ndarray     # (rows, cols) float32 or int32; (rows,) uint8 for bytes
    sent_at: float
    seq: int = 0            # pipeline mode: the sequence
    plan: int = 0           # tensor mode: the placement version
    pos: int = 0            # position of the payload's first token (attention inputs, caches)
    arrived_at: float = 0.0  # when a reader set it aside (tensor/exchange.py): a late reply's time

    def json(self) -> dict:
        return json.loads(self.payload.tobytes().decode())


@dataclass(frozen=True)
class Frame:
    """A payload prepared for the wire: how its body is read, and the (rows, cols) array."""
    body: Body
    x: np.ndarray
    rows: int
    cols: int

    @property
    def nbytes(self) -> int:
        """Bytes of the whole message (header + body)."""
        n = self.x.nbytes if self.body in EXACT else body_nbytes(self.rows, self.cols,
                                                                 CODE_WIRES[int(self.body)])
        return HEADER.itemsize + n


def frame(payload: np.ndarray, wire: str = "float32") -> Frame:
    """int32 and uint8 payloads go as they are, anything else as float32 rows in `wire` precision."""
    if payload.dtype == np.uint8:
        return Frame(Body.BYTES, payload.reshape(-1), payload.size, 1)
    if payload.dtype == np.int32:
        body = Body.INT32
    else:                             # (an empty payload, as a STOP's, needs no codec)
        body = WIRE_BODIES[wire] if payload.size else Body.FLOAT32
        payload = payload.astype(np.float32, copy=False)
    rows, cols = payload.shape if payload.ndim == 2 else (payload.shape[0], 1)
    return Frame(body, payload.reshape(rows, cols), rows, cols)


def write_frame(out: np.ndarray, kind: Kind, step: int, layer: int, f: Frame, sent_at: float,
                seq: int = 0, plan: int = 0, pos: int = 0) -> int:
    """Header + body written into `out` (uint8, at least `f.nbytes` long), one copy of the
    payload; returns the bytes written."""
    h = HEADER.itemsize
    if f.body in EXACT:
        n = f.x.nbytes
        out[h:h + n] = f.x.view(np.uint8).reshape(-1)
    else:
        n = encode_body_into(f.x, CODE_WIRES[int(f.body)], out[h:])
    out[:h].view(HEADER)[0] = (int(kind), int(f.body), layer, step, f.rows, f.cols, seq, plan, pos,
                                  sent_at)
    return h + n


def message_nbytes(payload: np.ndarray, wire: str = "float32") -> int:
    """Bytes of the whole message (header + body) that `encode_into` will write."""
    return frame(payload, wire).nbytes


def encode_into(out: np.ndarray, kind: Kind, step: int, layer: int, payload: np.ndarray,
                sent_at: float, seq: int = 0, plan: int = 0, wire: str = "float32") -> int:
    """Header + payload written into `out` (uint8, at least `message_nbytes` long) with one copy of
    the payload; returns the bytes written. Float payloads go in `wire` precision."""
    return write_frame(out, kind, step, layer, frame(payload, wire), sent_at, seq, plan)


def encode(kind: Kind, step: int, layer: int, payload: np.ndarray, sent_at: float, seq: int = 0,
           plan: int = 0, wire: str = "float32") -> np.ndarray:
    """The message as a new uint8 array (tests, and transports without buffers of their own)."""
    out = np.empty(message_nbytes(payload, wire), np.uint8)
    encode_into(out, kind, step, layer, payload, sent_at, seq, plan, wire)
    return out


_KINDS = {int(k): k for k in Kind}      # (calling an Enum by value costs ~5 us; a dict ~0.1)
_BODIES = {int(b): b for b in Body}


def decode(source: int, data) -> Message:
    """The message at the start of `data` (a receive buffer may be longer: the header says how
    much is the message). The payload is a fresh array: the buffer can take the next message."""
    (kind, body, layer, step, rows, cols, seq, plan, pos, sent_at) = np.frombuffer(
        data, HEADER, count=1)[0].tolist()
    body = _BODIES[body]
    h = HEADER.itemsize
    if body in EXACT:
        flat = np.frombuffer(data, EXACT[body], count=rows * cols, offset=h).copy()
        payload = flat if body == Body.BYTES else flat.reshape(rows, cols)
    else:
        payload = decode_body(data, CODE_WIRES[int(body)], rows, cols, offset=h)
    return Message(source, _KINDS[kind], step, layer, payload, sent_at, seq, plan, pos)


def json_payload(obj) -> np.ndarray:
    return np.frombuffer(json.dumps(obj).encode(), np.uint8)
