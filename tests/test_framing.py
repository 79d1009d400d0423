"""Framing and waiting: what the header carries, payload types on the wire, how a rank waits."""
import numpy as np
import pytest

from halo_mpi.net.framing import HEADER, Body, Kind, decode, encode, encode_into, message_nbytes
from halo_mpi.net.local import LocalHub
from halo_mpi.net.transport import WaitPolicy


def test_header_is_32_bytes_and_carries_step_layer_seq_and_plan():
    assert HEADER.itemsize == 36
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    m = decode(3, encode(Kind.PARTIAL, 70000, 29, x, 1.25, seq=5, plan=9))
    assert (m.source, m.kind, m.step, m.layer, m.seq, m.plan, m.sent_at) == \
        (3, Kind.PARTIAL, 70000, 29, 5, 9, 1.25)
    assert m.payload.dtype == np.float32 and np.array_equal(m.payload, x)


def test_plan_ids_travel_as_int32_and_json_as_bytes():
    ids = np.array([[3, 4, -1], [0, -1, -1]], np.int32)
    m = decode(0, encode(Kind.PLAN, 1, -1, ids, 0.0, plan=2))
    assert m.payload.dtype == np.int32 and np.array_equal(m.payload, ids) and m.layer == -1
    blob = np.frombuffer(b'{"rank": 1}', np.uint8)
    assert decode(1, encode(Kind.DONE, 0, 0, blob, 0.0)).json() == {"rank": 1}


@pytest.mark.parametrize("wire, nbytes", [("float32", 2340), ("float16", 1188), ("bfloat16", 1188),
                                          ("q8", 648)])
def test_float_payloads_go_in_the_wire_precision(wire, nbytes):
    x = np.random.default_rng(0).standard_normal((1, 576)).astype(np.float32)
    data = encode(Kind.INPUT, 1, 0, x, 0.0, wire=wire)
    assert data.size == message_nbytes(x, wire) == nbytes
    assert Body(int(data[:HEADER.itemsize].view(HEADER)[0]["body"])) == Body[wire.upper()]
    m = decode(0, data)
    assert m.payload.shape == (1, 576) and np.abs(m.payload - x).max() < 0.05
    ids = np.array([[1, 2]], np.int32)              # exact types stay exact whatever the wire
    assert decode(0, encode(Kind.PLAN, 1, -1, ids, 0.0, wire=wire)).payload.dtype == np.int32
    empty = encode(Kind.STOP, 2, -1, np.zeros((0, 1), np.float32), 0.0, wire=wire)
    assert empty.size == 36 and decode(0, empty).payload.shape == (0, 1)


def test_encode_into_a_longer_buffer_and_decode_from_it():
    buf = np.full(4096, 0xAB, np.uint8)
    x = np.ones((1, 64), np.float32)
    n = encode_into(buf, Kind.INPUT, 4, 2, x, 0.0, wire="q8")
    assert n == message_nbytes(x, "q8") and buf[n] == 0xAB     # nothing written past the message
    m = decode(0, buf)                                           # the buffer is longer: fine
    buf[:n] = 0                                                  # the payload is a copy
    assert np.allclose(m.payload, 1.0, atol=1e-2)


def test_wait_policy_spins_only_when_every_rank_has_a_core(monkeypatch):
    for var in ("HALO_SPIN_S", "HALO_NAP_MIN_S", "HALO_NAP_MAX_S"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MPI_LOCALNRANKS", "1")
    assert WaitPolicy.default().spin_s > 0
    monkeypatch.setenv("MPI_LOCALNRANKS", "4096")                # far more ranks than cores
    assert WaitPolicy.default().spin_s == 0
    assert WaitPolicy.default(spin_s=0.002).spin_s == 0.002     # --spin-us decides
    monkeypatch.setenv("HALO_SPIN_S", "0.0001")
    assert WaitPolicy.default().spin_s == 0.0001


def test_threads_of_the_local_twin_never_spin():
    hub = LocalHub(2)
    assert all(t.wait.spin_s == 0 for t in hub.transports)
    hub.transports[0].send(1, Kind.INPUT, 1, 0, np.ones((1, 4), np.float32))
    (m,) = hub.transports[1].poll(0.1)
    assert (m.source, m.step) == (0, 1)
