"""Wire precision codecs (halo_mpi.net.wire): sizes, round trips within stated bounds, q8 against a
block-by-block reference and GGUF's own dequantizer, bfloat16 rounding on hand-picked bits.

Tolerances, for a value x and its decoded y:
  float16   |y - x| <= 2^-11 |x| (half an ulp of an 11-bit significand), or <= 2^-25 (half the
            smallest subnormal) for |x| below float16's normal range
  bfloat16  |y - x| <= 2^-8 |x| (half an ulp of an 8-bit significand)
  q8        |y - x| <= d (1/2 + 2^-16) per block, d its stored scale: d/2 from rounding x/d, plus
            the float32 rounding of the quotient x/d (|x/d| <= 127, ulp 2^-17)
"""
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from halo_mpi.net.framing import HEADER, Body
from halo_mpi.net.wire import (
    CODE_WIRES,
    Q8_BLOCK,
    WIRE_CODES,
    WIRE_DTYPES,
    body_nbytes,
    decode_body,
    encode_body,
    encode_body_into,
    segments,
    wire_report,
)

SHAPES = [(1, 576), (7, 576), (3, 40)]      # (3, 40): cols not a multiple of 32, padded


def random_rows(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * rng.uniform(0.1, 10, (shape[0], 1))).astype(np.float32)


def round_trip(x, wire):
    body = encode_body(x, wire)
    assert body.dtype == np.uint8 and body.flags.c_contiguous and body.size == body_nbytes(*x.shape, wire)
    y = decode_body(body, wire, *x.shape)
    assert y.dtype == np.float32 and y.shape == x.shape and y.flags.c_contiguous
    return body, y


def q8_scales(body, rows, cols):
    """The stored float16 scales, (rows, nb), read from the GGUF block layout (34 bytes a block)."""
    nb = -(-cols // Q8_BLOCK)
    return body.reshape(rows, nb, 34)[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float64)


def q8_reference(x):
    """GGUF Q8_0 bytes of x, one block at a time, with the scale rounded up to float16."""
    rows, cols = x.shape
    nb = -(-cols // Q8_BLOCK)
    padded = np.zeros((rows, nb * Q8_BLOCK), np.float32)
    padded[:, :cols] = x
    out = b""
    for r in range(rows):
        for b in range(nb):
            block = padded[r, b * Q8_BLOCK:(b + 1) * Q8_BLOCK]
            d32 = np.float32(max(abs(v) for v in block)) / np.float32(127)
            d = np.float16(d32)
            if np.float32(d) < d32:
                d = np.nextafter(d, np.float16(np.inf))
            q = [round(float(v / np.float32(d))) if d else 0 for v in block]
            out += struct.pack("<e32b", d, *q)
    return out


# ---------------------------------------------------------------- codes and sizes

def test_codes_map_both_ways_and_agree_with_framing_bodies():
    assert tuple(WIRE_CODES) == WIRE_DTYPES
    assert {c: w for w, c in WIRE_CODES.items()} == CODE_WIRES and len(CODE_WIRES) == len(WIRE_DTYPES)
    assert {w: Body(c).name for w, c in WIRE_CODES.items()} == \
        {"float32": "FLOAT32", "float16": "FLOAT16", "bfloat16": "BFLOAT16", "q8": "Q8"}
    assert not set(CODE_WIRES) & {int(Body.INT32), int(Body.BYTES)}
    assert all(0 <= c < 256 for c in CODE_WIRES)        # the header's body field is a u1


def test_one_token_sizes_and_segments():
    assert HEADER.itemsize == 36
    expected = {"float32": (2304, 2), "float16": (1152, 1), "bfloat16": (1152, 1), "q8": (612, 1)}
    for wire, (nbytes, segs) in expected.items():
        assert body_nbytes(1, 576, wire) == nbytes
        assert encode_body(np.ones((1, 576), np.float32), wire).size == nbytes
        report = wire_report(576, wire)
        assert (report["body_bytes"], report["message_bytes"], report["segments"]) == \
            (nbytes, nbytes + 36, segs)
        assert report["code"] == WIRE_CODES[wire]
    assert body_nbytes(3, 40, "q8") == 3 * 2 * 34


def test_segments_ceil():
    assert [segments(n) for n in (0, 1, 1448, 1449, 2896, 2897)] == [1, 1, 1, 2, 2, 3]
    assert segments(1000, mss=500) == 2 and segments(1001, mss=500) == 3


def test_unknown_wire_is_refused():
    with pytest.raises(ValueError, match="float16"):
        body_nbytes(1, 576, "int4")
    with pytest.raises(ValueError, match="int4"):
        encode_body(np.ones((1, 8), np.float32), "int4")


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("shape", SHAPES)
def test_float32_is_exact(shape):
    x = random_rows(shape)
    body, y = round_trip(x, "float32")
    assert body.tobytes() == x.tobytes()
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("shape", SHAPES)
def test_float16_within_half_ulp(shape):
    x = random_rows(shape)
    x[0, :3] = [1e-6, -3e-7, 0.0]           # below float16's normal range: the absolute bound
    _, y = round_trip(x, "float16")
    bound = np.maximum(np.abs(x.astype(np.float64)) * 2.0**-11, 2.0**-25)
    assert np.all(np.abs(y.astype(np.float64) - x) <= bound)
    assert np.any(y != x)                   # it did narrow


@pytest.mark.parametrize("shape", SHAPES)
def test_bfloat16_within_half_ulp(shape):
    x = random_rows(shape)
    body, y = round_trip(x, "bfloat16")
    assert np.all(np.abs(y.astype(np.float64) - x) <= np.abs(x.astype(np.float64)) * 2.0**-8)
    assert np.all(y.view(np.uint32) & 0xFFFF == 0)
    np.testing.assert_array_equal(body.view(np.uint16).reshape(shape), y.view(np.uint32) >> 16)


@pytest.mark.parametrize("shape", SHAPES)
def test_q8_within_half_scale_per_block(shape):
    rows, cols = shape
    x = random_rows(shape)
    body, y = round_trip(x, "q8")
    d = q8_scales(body, rows, cols)                             # (rows, nb)
    err = np.zeros((rows, d.shape[1] * Q8_BLOCK))
    err[:, :cols] = np.abs(y.astype(np.float64) - x)
    per_block = err.reshape(rows, -1, Q8_BLOCK).max(axis=2)     # (rows, nb)
    assert np.all(per_block <= d * (0.5 + 2.0**-16))
    # the scale is max|x|/127 rounded up to float16: no smaller float16 would do
    padded = np.zeros((rows, d.shape[1] * Q8_BLOCK), np.float32)
    padded[:, :cols] = x
    amax = np.abs(padded).reshape(rows, -1, Q8_BLOCK).max(axis=2)
    assert np.all(d >= amax / 127) and np.all(d <= amax / 127 * (1 + 2.0**-10))


@pytest.mark.parametrize("shape", SHAPES)
def test_q8_matches_block_by_block_reference(shape):
    x = random_rows(shape, seed=1)
    assert encode_body(x, "q8").tobytes() == q8_reference(x)


@pytest.mark.parametrize("shape", SHAPES)
def test_q8_decodes_as_gguf_q8_0(shape):
    rows, cols = shape
    x = random_rows(shape, seed=2)
    body = encode_body(x, "q8")
    theirs = dequantize(body.reshape(rows, -1), GGMLQuantizationType.Q8_0)     # (rows, nb * 32)
    np.testing.assert_array_equal(decode_body(body, "q8", rows, cols), theirs[:, :cols])


def test_q8_zero_huge_and_tiny_blocks():
    x = random_rows((2, 128), seed=3)
    x[0, 0:32] = 0.0                                            # all zeros: scale 0, exact
    x[0, 32:64] = np.linspace(-1.3e4, 1.1e4, 32)                # huge scale
    x[0, 64:96] = np.linspace(-1e-6, 0.9e-6, 32)                # scale below float16's subnormals
    x[1, 96:128] = 1e-3 * np.sign(np.arange(32) - 15.5)         # subnormal float16 scale
    body, y = round_trip(x, "q8")
    assert body.tobytes() == q8_reference(x)
    assert np.all(np.isfinite(y))
    d = q8_scales(body, 2, 128)
    assert d[0, 0] == 0 and np.all(y[0, :32] == 0)
    assert d[0, 2] == 2.0**-24                                  # rounded up, not flushed to zero
    err = np.abs(y.astype(np.float64) - x).reshape(2, 4, Q8_BLOCK).max(axis=2)
    assert np.all(err <= d * (0.5 + 2.0**-16))
    assert np.all(np.abs(y[0, 64:96] - x[0, 64:96]) <= 3e-8)    # tiny values keep ~3% precision


def test_q8_non_finite_blocks_decode_as_nan_and_spare_the_others():
    x = random_rows((1, 128), seed=4)
    x[0, 5] = np.nan
    x[0, 40] = np.inf
    x[0, 70] = 1e7                                              # beyond 127 * 65504
    with np.errstate(all="raise"):
        body = encode_body(x, "q8")
    y = decode_body(body, "q8", 1, 128)
    assert np.all(np.isnan(y[0, :96]))
    d = q8_scales(body, 1, 128)
    assert np.all(np.abs(y[0, 96:] - x[0, 96:]) <= d[0, 3] * (0.5 + 2.0**-16))


# ---------------------------------------------------------------- bfloat16 rounding

BF16_CASES = [                  # float32 bits -> bfloat16 bits
    (0x3F800000, 0x3F80),       # 1.0, exact
    (0x3F807FFF, 0x3F80),       # just below half: down
    (0x3F808000, 0x3F80),       # tie, 0x3F80 even: down
    (0x3F808001, 0x3F81),       # just above half: up
    (0x3F818000, 0x3F82),       # tie, 0x3F81 odd: up to even
    (0xBF818000, 0xBF82),       # the same, negative
    (0x3FFF8000, 0x4000),       # tie with carry into the exponent: 2.0
    (0x00018000, 0x0002),       # subnormal tie, odd: up
    (0x00008000, 0x0000),       # smallest tie: down to +0
    (0x7F7FFFFF, 0x7F80),       # float32 max rounds to inf
    (0x7F800000, 0x7F80),       # inf
    (0xFF800000, 0xFF80),       # -inf
]
BF16_NANS = [0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF, 0xFF80FFFF]


def test_bfloat16_rounds_ties_to_even():
    x = np.array([[bits for bits, _ in BF16_CASES]], np.uint32).view(np.float32)
    body = encode_body(x, "bfloat16")
    assert body.view(np.uint16).tolist() == [half for _, half in BF16_CASES]
    y = decode_body(body, "bfloat16", *x.shape)
    assert y.view(np.uint32).tolist() == [[half << 16 for _, half in BF16_CASES]]


def test_bfloat16_keeps_nan_a_nan():
    x = np.array([BF16_NANS], np.uint32).view(np.float32)
    body = encode_body(x, "bfloat16")
    y = decode_body(body, "bfloat16", *x.shape)
    assert np.all(np.isnan(y))
    assert (body.view(np.uint16) >> 15).tolist() == [b >> 31 for b in BF16_NANS]     # sign kept


# ---------------------------------------------------------------- buffers

@pytest.mark.parametrize("wire", WIRE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_encode_into_writes_what_encode_returns(wire, shape):
    x = random_rows(shape, seed=5)
    send = np.full(32 + body_nbytes(*shape, wire) + 16, 0xAB, np.uint8)     # header, body, spare
    n = encode_body_into(x, wire, send[32:])
    expected = encode_body(x, wire)
    assert n == expected.size
    assert send[32:32 + n].tobytes() == expected.tobytes()
    assert np.all(send[:32] == 0xAB) and np.all(send[32 + n:] == 0xAB)


def test_encode_into_refuses_a_short_or_wrong_buffer():
    x = np.ones((1, 576), np.float32)
    with pytest.raises(ValueError, match="612"):
        encode_body_into(x, "q8", np.empty(611, np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        encode_body_into(x, "float16", np.empty(1152, np.int8))


@pytest.mark.parametrize("wire", WIRE_DTYPES)
def test_decode_returns_a_fresh_array_from_an_offset(wire):
    x = random_rows((2, 576), seed=6)
    recv = bytearray(32) + bytearray(encode_body(x, wire).tobytes()) + bytearray(8)
    y = decode_body(recv, wire, 2, 576, offset=32)
    expected = decode_body(encode_body(x, wire), wire, 2, 576)
    np.testing.assert_array_equal(y, expected)
    recv[:] = bytes(len(recv))                                  # the receive buffer is reused
    np.testing.assert_array_equal(y, expected)
    with pytest.raises(ValueError, match="needs"):
        decode_body(recv, wire, 2, 576, offset=48)
