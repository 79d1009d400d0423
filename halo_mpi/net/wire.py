"""Wire precision: how a (rows, cols) float32 payload (hidden states, partial sums) is packed on
the wire between ranks.

Why: under packet loss a message that fits one TCP segment (MSS 1448 bytes) is repaired within
milliseconds, a two-segment one waits for the retransmission timeout (~200 ms). A float32
576-vector is 2304 bytes (2 segments with the 36-byte header); float16 and bfloat16 halve it
(1152 B), q8 (GGUF's Q8_0 blocks) brings it to 612 B: one segment each.

Bodies, for x of shape (rows, cols):
  float32   (rows, cols) <f4, as is                                          4 * rows * cols bytes
  float16   (rows, cols) <f2, round to nearest even (numpy's cast)           2 * rows * cols bytes
  bfloat16  (rows, cols) <u2, the upper 16 bits of each float32, round to nearest even; a NaN
            stays a NaN (quiet bit set), a value beyond bfloat16's range becomes inf
  q8        rows * nb blocks of 34 bytes, nb = ceil(cols / 32), laid out as GGUF's Q8_0 tensor
            data (row-major: row 0 block 0, row 0 block 1, ...); each block is
              d   <f2        the scale: max|x| / 127 of the block's 32 values, rounded UP to
                             float16, so |x / d| <= 127 and |x - d q| <= d / 2 for the stored d
                             (GGUF rounds d to nearest and divides by the float32 value: its
                             error can reach ~0.56 d); d = 0 for an all-zero block
              qs  i1 (32,)   q = rint(x / d) (half to even), x ~ d * q
            A row whose cols is not a multiple of 32 is padded with zeros to the next block; the
            padding is sent and dropped on decode. A block holding a NaN or inf, or a value beyond
            127 * 65504 (float16's largest scale), is sent with d = NaN and decodes to all NaN.
            Scales below float16's normal range (max|x| < 7.8e-3) keep an absolute step of 2^-24.

Each dtype has a small integer code for the header's `body` field (net/framing.py's `Body`
uses the same numbers).
"""
from __future__ import annotations

import numpy as np

WIRE_DTYPES = ("float32", "float16", "bfloat16", "q8")
WIRE_CODES = {"float32": 0, "float16": 3, "bfloat16": 4, "q8": 5}   # 1, 2: framing's int32, bytes
CODE_WIRES = {code: wire for wire, code in WIRE_CODES.items()}
HEADER_BYTES = 36                   # net/framing.py's HEADER.itemsize (framing checks it)

MSS = 1448                          # TCP payload per segment on these links (Ethernet, timestamps)
Q8_BLOCK = 32                       # values per q8 block, as GGUF's Q8_0
Q8_BLOCK_DTYPE = np.dtype([("d", "<f2"), ("qs", "i1", (Q8_BLOCK,))])    # 34 bytes
Q8_MAX_ABS = np.float32(127 * 65504)    # largest |x| whose scale max|x|/127 fits float16

_INF16 = np.float16(np.inf)
_TINY = np.float32(1e-30)           # divisor for all-zero blocks (any nonzero stored d is >= 2^-24)


def _check(wire: str) -> None:
    if wire not in WIRE_CODES:
        raise ValueError(f"unknown wire dtype {wire!r}: choose one of {', '.join(WIRE_DTYPES)}")


def _q8_blocks(cols: int) -> int:
    return -(-cols // Q8_BLOCK)


def body_nbytes(rows: int, cols: int, wire: str) -> int:
    """Bytes of the body of a (rows, cols) payload sent as `wire`."""
    _check(wire)
    if wire == "q8":
        return rows * _q8_blocks(cols) * Q8_BLOCK_DTYPE.itemsize
    return rows * cols * (4 if wire == "float32" else 2)


def segments(nbytes: int, mss: int = MSS) -> int:
    """TCP segments that carry a message of `nbytes` (an empty message still takes one)."""
    return max(1, -(-nbytes // mss))


def wire_report(dim: int, wire: str, header: int = HEADER_BYTES) -> dict:
    """Sizes of a one-token message (header + (1, dim) body), for the CLI and the bench."""
    body = body_nbytes(1, dim, wire)
    return {"wire": wire, "code": WIRE_CODES[wire], "dim": dim, "body_bytes": body,
            "message_bytes": header + body, "segments": segments(header + body)}


# ---------------------------------------------------------------- encode

def encode_body(x: np.ndarray, wire: str) -> np.ndarray:
    """The body of x (rows, cols) as `wire`: a fresh contiguous uint8 array."""
    x = _as_rows(x)
    out = np.empty(body_nbytes(*x.shape, wire), np.uint8)
    encode_body_into(x, wire, out)
    return out


def encode_body_into(x: np.ndarray, wire: str, out: np.ndarray) -> int:
    """Write the body of x (rows, cols) as `wire` to the start of `out` (a contiguous uint8
    buffer, e.g. a preallocated send buffer after its header); returns the bytes written."""
    x = _as_rows(x)
    rows, cols = x.shape
    n = body_nbytes(rows, cols, wire)
    if out.dtype != np.uint8 or out.ndim != 1 or not out.flags.c_contiguous or out.size < n:
        raise ValueError(f"encode_body_into: out must be a contiguous 1-D uint8 buffer of at least {n}"
                         f" bytes for a ({rows}, {cols}) body as {wire}; got {out.dtype} {out.shape}")
    body = out[:n]
    if n == 0:                        # an empty payload (a STOP): nothing to encode
        return 0
    if wire == "float32":
        body.view(np.float32).reshape(rows, cols)[...] = x
    elif wire == "float16":
        body.view(np.float16).reshape(rows, cols)[...] = x
    elif wire == "bfloat16":
        _bfloat16_into(x, body.view(np.uint16).reshape(rows, cols))
    else:
        _q8_into(x, body.view(Q8_BLOCK_DTYPE).reshape(rows, _q8_blocks(cols)))
    return n


def _as_rows(x: np.ndarray) -> np.ndarray:
    """x as a C-contiguous float32 (rows, cols) array (a 1-D vector is one row); no copy if it is."""
    x = np.ascontiguousarray(x, np.float32)
    return x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x


def _bfloat16_into(x: np.ndarray, out: np.ndarray) -> None:
    bits = x.view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))     # round to nearest, ties to even
    np.right_shift(rounded, 16, out=out, casting="unsafe")
    nan = np.isnan(x)
    if nan.any():       # the carry would turn a NaN into inf (or -0.0): keep it a quiet NaN
        out[nan] = (bits[nan] >> 16) | 0x0040


def _q8_into(x: np.ndarray, out: np.ndarray) -> None:
    rows, cols = x.shape
    nb = out.shape[1]
    if cols != nb * Q8_BLOCK:     # pad the last block with zeros
        x = np.concatenate([x, np.zeros((rows, nb * Q8_BLOCK - cols), np.float32)], axis=1)
    blocks = x.reshape(rows, nb, Q8_BLOCK)                          # (rows, nb, 32)
    amax = np.abs(blocks).max(axis=2)                               # (rows, nb)
    bad = None
    if not amax.max() <= Q8_MAX_ABS:      # NaN, inf or beyond float16: those blocks go as NaN
        bad = ~(amax <= Q8_MAX_ABS)
        amax = np.where(bad, np.float32(0), amax)
        blocks = np.where(bad[:, :, None], np.float32(0), blocks)
    d32 = amax / np.float32(127)                                    # (rows, nb)
    d = d32.astype(np.float16)
    np.nextafter(d, _INF16, out=d, where=d < d32)                   # round the scale up
    if bad is not None:
        d[bad] = np.nan
    divisor = np.fmax(d.astype(np.float32), _TINY)[:, :, None]      # (rows, nb, 1); 0, NaN -> tiny
    q = blocks / divisor                                            # (rows, nb, 32), |q| <= 127
    out["d"] = d
    out["qs"] = np.rint(q, out=q)


# ---------------------------------------------------------------- decode

def decode_body(buf, wire: str, rows: int, cols: int, offset: int = 0) -> np.ndarray:
    """The (rows, cols) float32 payload whose body starts at byte `offset` of `buf` (bytes,
    bytearray, memoryview or uint8 array). Always a fresh array: `buf` may be reused at once."""
    n = body_nbytes(rows, cols, wire)
    size = memoryview(buf).nbytes
    if size < offset + n:
        raise ValueError(f"decode_body: a ({rows}, {cols}) body as {wire} needs {n} bytes from offset"
                         f" {offset}; the buffer holds {size}")
    body = np.frombuffer(buf, np.uint8, count=n, offset=offset)
    if wire == "float32":
        return body.view(np.float32).reshape(rows, cols).copy()
    if wire == "float16":
        return body.view(np.float16).reshape(rows, cols).astype(np.float32)
    if wire == "bfloat16":
        return (body.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(rows, cols)
    blocks = body.view(Q8_BLOCK_DTYPE).reshape(rows, -1)            # (rows, nb)
    x = blocks["qs"].astype(np.float32)                             # (rows, nb, 32)
    x *= blocks["d"].astype(np.float32)[:, :, None]                 # exact: 11 bits times 8 bits
    x = x.reshape(rows, -1)                                         # (rows, nb * 32)
    return x if x.shape[1] == cols else x[:, :cols].copy()
