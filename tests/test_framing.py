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


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_silence_counts_listening_time_not_this_ranks_own_stalls():
    """Rank 0 (fake clock, beat period 1 s, timeout 3 s) hears rank 1's beats while it listens;
    then it computes, or is descheduled, for 20 s without receiving: on its next receive rank 1
    is not silent (its beats sat in the queue, and even a receive that finds none yet only counts
    one beat period), the stall is counted as rank 0's own; a rank that really stops is named
    after 3 s of listening."""
    from halo_mpi.net.liveness import RankSilent
    hub = LocalHub(3)
    t0, t1, t2 = hub.transports
    clock = FakeClock()
    t0.init_liveness(clock)
    t0.rank_timeout, t0.fatal, t0.beat_s = 3.0, {1, 2}, 1.0

    def listen_for(seconds: float, beating=(1, 2)):
        for _ in range(int(seconds * 4)):             # rank 0 receives every 0.25 s
            clock.now += 0.25
            for r in beating:
                hub.transports[r].send(0, Kind.BEAT, 0, 0, np.zeros((0, 0), np.float32))
            assert t0.poll(0.0) == []                # beats are taken out
    listen_for(5.0)
    assert t0.silent() == [] and t0.stalls == 0
    clock.now += 20.0                                 # no receive: computing, or descheduled
    assert t0.silent() == []                          # (the planner asks between receives too)
    t0.listen()                                       # a receive that finds nothing yet
    assert t0.silent() == [] and t0.stalls == 1 and t0.stalled_s == pytest.approx(19.0)
    listen_for(2.0, beating=(1,))                     # rank 2 froze while rank 0 was stalled
    assert t0.silent() == []                          # 1 + 2 s of listening: not yet
    listen_for(0.5, beating=(1,))
    assert t0.silent() == [2]
    with pytest.raises(RankSilent, match="rank 2 silent for 3 s"):
        t0.check_fatal()


def test_a_busy_rank_keeps_beating_to_a_peer_it_has_not_listened_to():
    """The heartbeat rule: beats stop going to a peer silent for 5 periods of *listening*: a
    worker loading its weights for longer (not receiving) keeps telling rank 0 it is alive."""
    hub = LocalHub(2)
    t1 = hub.transports[1]
    clock = FakeClock()
    t1.init_liveness(clock)
    t1.beat_s = 1.0
    clock.now += 30.0                                 # loading: nothing received from rank 0
    assert t1.silence(0) == 0.0
    t1.listen()
    assert t1.silence(0) == 1.0 < 5 * t1.beat_s       # so the beat thread still beats to it
    for _ in range(6):
        clock.now += 1.0
        t1.listen()
    assert t1.silence(0) == 7.0 and t1.silent(timeout=5.0) == [0]
