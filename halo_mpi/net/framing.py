"""Framing: every message between ranks is a fixed header plus a payload.

The header (kind, step, layer, rows, cols, seq, send time) lets a receiver recognise a late
message and discard it, never mixing it into a later step. `seq` is the plan version in tensor
mode and the sequence id in pipeline mode.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

TAG = 7      # one MPI tag for everything: the header, not the tag, says what a message is


class Kind(IntEnum):
    INPUT = 1       # rank 0 -> worker: normalized hidden state x (T, dim) for (step, layer)
    PARTIAL = 2     # worker -> rank 0: the worker's partial MLP sum (T, dim) for (step, layer)
    STOP = 3        # rank 0 -> worker: finish; reply with DONE
    DONE = 4        # worker -> rank 0: the worker's statistics (JSON), its last message
    PLAN = 5        # rank 0 -> worker: new group ids per layer, int32 (n_layers, width), -1 = none
    ACTIVATION = 6  # pipeline mode: hidden states (T, dim) of sequence `seq` entering stage `layer`


class Body(IntEnum):
    """How the payload's bytes are to be read."""
    FLOAT32 = 0     # (rows, cols) float32
    INT32 = 1       # (rows, cols) int32
    BYTES = 2       # (rows,) uint8, e.g. UTF-8 JSON


BODY_DTYPES = {Body.FLOAT32: np.float32, Body.INT32: np.int32, Body.BYTES: np.uint8}
DTYPE_BODIES = {np.dtype(v): k for k, v in BODY_DTYPES.items()}

# kind, payload type, layer, step, payload rows and cols, seq (pipeline: the sequence id), plan
# (tensor: the placement version the message was made under), send time (sender's clock): 32 bytes
HEADER = np.dtype([("kind", "u1"), ("body", "u1"), ("layer", "<i2"), ("step", "<i4"),
                   ("rows", "<i4"), ("cols", "<i4"), ("seq", "<i4"), ("plan", "<i4"),
                   ("sent_at", "<f8")])


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

    def json(self) -> dict:
        return json.loads(self.payload.tobytes().decode())


def encode(kind: Kind, step: int, layer: int, payload: np.ndarray, sent_at: float, seq: int = 0,
           plan: int = 0) -> bytes:
    """Header + payload bytes; the payload keeps its dtype (float32, int32 or uint8)."""
    body = np.ascontiguousarray(payload)
    if body.dtype not in DTYPE_BODIES:
        body = body.astype(np.float32)
    kind_of_body = DTYPE_BODIES[body.dtype]
    if kind_of_body == Body.BYTES:
        rows, cols = body.size, 1
    else:
        rows, cols = body.shape if body.ndim == 2 else (body.shape[0], 1)
    head = np.array([(int(kind), int(kind_of_body), layer, step, rows, cols, seq, plan, sent_at)],
                    HEADER)
    return head.tobytes() + body.tobytes()


def decode(source: int, data) -> Message:
    head = np.frombuffer(data, HEADER, count=1)[0]
    rows, cols, body = int(head["rows"]), int(head["cols"]), Body(int(head["body"]))
    flat = np.frombuffer(data, BODY_DTYPES[body], offset=HEADER.itemsize, count=rows * cols)
    payload = flat.copy() if body == Body.BYTES else flat.reshape(rows, cols).copy()
    return Message(source, Kind(int(head["kind"])), int(head["step"]), int(head["layer"]), payload,
                   float(head["sent_at"]), int(head["seq"]), int(head["plan"]))


def json_payload(obj) -> np.ndarray:
    return np.frombuffer(json.dumps(obj).encode(), np.uint8)
