"""Column codecs: a column of raw field bytes → checked, converted numpy arrays.

Each is a whole-array numpy operation on the column's bytes and offsets (no Python per
row) returning the values and a validity mask; the reader turns invalid rows into rejects.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def _array(column: pa.ChunkedArray) -> pa.Array:
    if column.num_chunks == 1:
        return column.chunk(0)
    return column.combine_chunks() if column.num_chunks else pa.array([], column.type)


def column_bytes(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A binary column's value offsets (n + 1 of them, from 0) and its bytes."""
    arr = _array(column)
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset: arr.offset + n + 1]
    data = arr.buffers()[2]
    data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    if n == 0:
        return np.zeros(1, np.int64), data[:0]
    return (offsets - offsets[0]).astype(np.int64), data[offsets[0]:offsets[-1]]


def label_column(offsets: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label fields → (int8 labels, valid): exactly "0" or "1"."""
    first = data[np.minimum(offsets[:-1], data.size - 1)] if data.size else offsets[:-1] * 0
    one = first == ord("1")
    ok = (np.diff(offsets) == 1) & (one | (first == ord("0")))
    return (one & ok).astype(np.int8), ok


def _decimal(offsets: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(valid, negative) of each field: empty, or an optional ``-`` and 1 to 18 decimal
    digits (so that its value fits an int64)."""
    lengths = np.diff(offsets)
    ok = np.ones(lengths.size, bool)
    neg = np.zeros(lengths.size, bool)
    odd = np.flatnonzero((data - np.uint8(ord("0"))) > 9)  # bytes that are not digits
    if odd.size:
        row = np.searchsorted(offsets, odd, side="right") - 1
        sign = (data[odd] == ord("-")) & (odd == offsets[row])  # a leading minus
        ok[row[~sign]] = False
        neg[row[sign]] = True
    ok &= (lengths - neg <= 18) & ~(neg & (lengths == 1))
    return ok, neg


_LOG1P = np.log1p(np.arange(1 << 16, dtype=np.float64)).astype(np.float32)  # small values


def dense_column(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Integer fields → (transformed float32, valid).

    Valid: empty (missing), or an optional ``-`` and 1 to 18 decimal digits. Missing and
    negative values become 0, then ``log1p`` (in float64, then rounded to float32). Only
    the valid non-negative fields are handed to pyarrow's integer parser, so it never
    sees anything else it would accept (such as ``0x10``).
    """
    offsets, data = column_bytes(column)
    lengths = np.diff(offsets)
    ok, neg = _decimal(offsets, data)
    parse = ok & ~neg & (lengths > 0)
    out = np.zeros(lengths.size, np.float32)
    if parse.any():
        text = pc.cast(_array(column), pa.string())
        x = pc.cast(pc.if_else(pa.array(parse), text, None), pa.int64()).fill_null(0).to_numpy()
        small = x < _LOG1P.size
        out[small] = _LOG1P[x[small]]
        out[~small] = np.log1p(x[~small].astype(np.float64)).astype(np.float32)
    return out, ok


_HEX = np.full(256, 255, np.uint8)  # byte → hex digit value, 255: not a hex digit
for _i, _ch in enumerate(b"0123456789abcdef"):
    _HEX[_ch] = _i
    _HEX[bytes([_ch]).upper()[0]] = _i


def _u64(x: int) -> np.uint64:
    return np.uint64(x)


_BYTES = {b: _u64(int.from_bytes(bytes([b]) * 8, "little"))  # the byte in all 8 places
          for b in (0x01, 0x0F, 0x30, 0x76, 0x7F, 0x80)}


def _hex8(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fields of exactly 8 characters, one little-endian uint64 each → (their values as
    hex numbers, valid), with whole-word arithmetic on the 8 bytes at once.

    A byte c becomes the digit ``(c & 0xF) + 9 * bit 6 of c`` (right for 0-9, a-f, A-F);
    it was a hex digit iff that digit is below 16 and spells c back in lower or upper
    case. No step carries from one byte into the next.
    """
    b = _BYTES
    nib = (words & b[0x0F]) + ((words >> _u64(6)) & b[0x01]) * _u64(9)
    letter = ((nib + b[0x76]) & b[0x80]) >> _u64(7)  # 1 in the bytes whose digit is > 9
    lower = nib + b[0x30] + letter * _u64(0x27)
    upper = nib + b[0x30] + letter * _u64(0x07)

    def nonzero_bytes(x: np.ndarray) -> np.ndarray:  # 0x80 in each byte of x that is not 0
        return (((x & b[0x7F]) + b[0x7F]) | x) & b[0x80]

    bad = (nonzero_bytes(words ^ lower) & nonzero_bytes(words ^ upper)) | (nib & ~b[0x0F])
    # Gather the digits: pairs into bytes, bytes into 16-bit halves, halves into 32 bits.
    # The first character is the lowest byte and the most significant digit.
    m = _u64(0x000F000F000F000F)
    x = ((nib & m) << _u64(4)) | ((nib >> _u64(8)) & m)
    m = _u64(0x000000FF000000FF)
    x = ((x & m) << _u64(8)) | ((x >> _u64(16)) & m)
    m = _u64(0xFFFF)
    return ((x & m) << _u64(16)) | ((x >> _u64(32)) & m), bad == 0


def hex_column(offsets: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]:
    """Hex fields → (uint64 values, present, valid), vectorised over the raw bytes.

    Empty is "missing" (present False, valid True); more than 16 digits or a non-hex
    byte is invalid. Criteo's fields all have 8 digits or none: their bytes then lie
    back to back, 8 to a field, and are converted as one uint64 each (``_hex8``). Other lengths
    take a general path: each field's digits are gathered into a 16-digit window,
    right-aligned, and packed two digits a byte.
    """
    n = offsets.size - 1
    lengths = np.diff(offsets)
    present = lengths > 0
    values = np.zeros(n, np.uint64)
    valid = np.ones(n, bool)
    if data.size == 8 * np.count_nonzero(present) and (n == 0 or lengths.max() <= 8):
        values[present], valid[present] = _hex8(data.view("<u8"))
    else:
        pad = np.zeros(16, np.uint8)
        data = np.concatenate([pad, data, pad])
        ends = offsets[1:] + 16
        digits = _HEX[data[ends[:, None] - 16 + np.arange(16)]]
        digits[np.arange(16) < 16 - np.minimum(lengths, 16)[:, None]] = 0
        valid = (lengths <= 16) & ~np.any(digits == 255, axis=1)
        digits[~valid] = 0
        packed = np.ascontiguousarray((digits[:, 0::2] << 4) | digits[:, 1::2])
        values = packed.view(">u8").ravel().astype(np.uint64)
    values[~valid] = 0
    return values, present, valid


# --------------------------------------------------------------------------- any layout

_FLOAT = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"


def number_column(column: pa.ChunkedArray, fill: float, integer: bool,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Numeric fields → (float64 values, valid). Empty fields take ``fill``; ``integer``
    admits decimal integers only, else any decimal number (``1.5``, ``-2e3``; not
    ``nan`` or ``inf``)."""
    offsets, data = column_bytes(column)
    present = np.diff(offsets) > 0
    text = pc.cast(_array(column), pa.string())
    if integer:
        ok = _decimal(offsets, data)[0]
    else:
        ok = pc.match_substring_regex(text, _FLOAT).to_numpy(zero_copy_only=False) | ~present
    parse = ok & present
    out = np.full(present.size, fill, np.float64)
    if parse.any():
        kind = pa.int64() if integer else pa.float64()
        parsed = pc.cast(pc.if_else(pa.array(parse), pc.utf8_trim_whitespace(text), None), kind)
        out[parse] = parsed.to_numpy(zero_copy_only=False)[parse]
    return out, ok


def transform(values: np.ndarray, kind: str) -> np.ndarray:
    """A dense feature's transform, to float32: ``log1p`` of the value with negatives
    taken as 0 (Criteo's); ``none``; or ``standardize``, which the loader applies (from
    the training rows' mean and std, known only once every chunk is read)."""
    if kind == "log1p":
        return np.log1p(np.maximum(values, 0.0)).astype(np.float32)
    return values.astype(np.float32)


_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)
_TOP = np.uint64(1 << 63)
_WINDOW = 64  # fields up to this long are hashed from a window; longer ones byte by byte


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit flips about half the output bits."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _window(starts: np.ndarray, lengths: np.ndarray, data: np.ndarray,
            width: int) -> np.ndarray:
    """[n, width] bytes: each field's last ``width`` bytes, right-aligned, zeros before.
    Fields all ``width`` long lying back to back give a view, no copy."""
    n = lengths.size
    if data.size == n * width and (n == 0 or (lengths.min() == width and starts[0] == 0)):
        return data.reshape(n, width)
    padded = np.concatenate([np.zeros(width, np.uint8), data])
    win = padded[(starts + lengths)[:, None] + np.arange(width)]
    win[np.arange(width) < width - np.minimum(lengths, width)[:, None]] = 0
    return win


def _fnv1a(starts: np.ndarray, lengths: np.ndarray, data: np.ndarray) -> np.ndarray:
    """64-bit FNV-1a of each field's bytes, one step per byte position."""
    h = np.full(lengths.size, _FNV_OFFSET, np.uint64)
    with np.errstate(over="ignore"):
        for i in range(int(lengths.max()) if lengths.size else 0):
            at = np.flatnonzero(lengths > i)
            h[at] = (h[at] ^ data[starts[at] + i].astype(np.uint64)) * _FNV_PRIME
    return h


def _text_hash(starts: np.ndarray, lengths: np.ndarray, data: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each field: its length, then the 8-byte words it occupies, folded
    through the mixer (the same for a value whatever else is in the column); fields
    longer than ``_WINDOW`` bytes by FNV-1a."""
    width = -(-min(int(lengths.max()), _WINDOW) // 8) * 8 if lengths.size else 0
    if width == 0:
        return np.zeros(lengths.size, np.uint64)
    words = np.ascontiguousarray(_window(starts, lengths, data, width)).view("<u8")
    count = words.shape[1]
    first = count - (np.minimum(lengths, _WINDOW) + 7) // 8  # the field's first word
    h = lengths.astype(np.uint64)
    for k in range(count):
        h = np.where(first <= k, _mix(h ^ words[:, k]), h)
    long = np.flatnonzero(lengths > _WINDOW)
    if long.size:
        h[long] = _fnv1a(starts[long], lengths[long], data)
    return h


def text_values(fields: list[bytes]) -> np.ndarray:
    """The uint64 values ``category_values`` (``auto``) gives these fields as text (the
    hash of each with the top bit set), for fields that are no integer's own text."""
    lengths = np.fromiter(map(len, fields), np.int64, len(fields))
    starts = np.zeros(len(fields), np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return _text_hash(starts, lengths, np.frombuffer(b"".join(fields), np.uint8)) | _TOP


def category_values(column: pa.Array | pa.ChunkedArray, kind: str,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Categorical fields (a binary column) → (uint64 values, present, valid). ``hex``:
    Criteo's hex numbers; ``auto``: a decimal integer of up to 18 digits written as itself
    (no leading zero, no ``-0``) stands for itself (a negative one for its two's
    complement), any other text (``01002``) for a 64-bit hash with the
    top bit set (so never an integer's own value, which is below 2**63). Empty is
    "missing". A dictionary-encoded column is converted once per distinct field."""
    if isinstance(column, pa.Array):
        column = pa.chunked_array([column])
    if pa.types.is_dictionary(column.type):
        encoded = _array(column)  # one dictionary for all chunks
        values, present, valid = category_values(encoded.dictionary, kind)
        rows = encoded.indices.to_numpy()
        return values[rows], present[rows], valid[rows]
    offsets, data = column_bytes(column)
    if kind == "hex":
        return hex_column(offsets, data)
    lengths = np.diff(offsets)
    present = lengths > 0
    starts = offsets[:-1]
    # Integers: no byte but digits, bar a leading minus (``_decimal``'s rule); parsed by
    # pyarrow's C++. Counted per field here, not by ``_decimal``, which looks up the field
    # of every non-digit byte: on 6 hex-id columns of 120k rows that took 63-85 ms against
    # 37-48 ms, while on Criteo's 13 integer columns (few such bytes) it is the faster,
    # 3.3 ms against 22 ms for 69k rows.
    non_digit = np.append((data - np.uint8(ord("0"))) > 9, False).astype(np.int32)
    count = np.add.reduceat(non_digit, starts) if starts.size else starts
    count = np.where(present, count, 0)
    lead = data[np.minimum(starts, data.size - 1)] if data.size else np.zeros_like(starts)
    neg = (count == 1) & (lead == ord("-")) & (lengths > 1)
    # Only an integer's own text stands for it: "01002" (a zip code) or "-0" is text, or
    # it would share an id with "1002" or "0".
    first = data[np.minimum(starts + neg, data.size - 1)] if data.size else lead
    canonical = (first != ord("0")) | ((lengths == 1) & ~neg)
    number = present & ((count == 0) | neg) & (lengths - neg <= 18) & canonical
    values = np.zeros(lengths.size, np.uint64)
    if number.any():
        text = pc.cast(_array(column), pa.string())
        parsed = pc.cast(pc.if_else(pa.array(number), text, None), pa.int64())
        values[number] = parsed.fill_null(0).to_numpy()[number].view(np.uint64)
    other = present & ~number
    if other.sum() > lengths.size // 2:  # mostly text: hash the whole column at once
        values = np.where(other, _text_hash(starts, lengths, data) | _TOP, values)
    elif other.any():
        rows = np.flatnonzero(other)
        values[rows] = _text_hash(starts[rows], lengths[rows], data) | _TOP
    return values, present, np.ones(lengths.size, bool)


def bag_values(column: pa.ChunkedArray, separator: str, kind: str, max_length: int,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """List fields (text whose elements are joined by ``separator``, or a list column of
    a Parquet file; empty or null elements dropped) → (uint64 values of all bags, each
    row's bag length, valid, not too long)."""
    column = _array(column)
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        parts = column
    else:
        parts = pc.split_pattern(pc.cast(column, pa.string()), separator)
    per_row = pc.fill_null(pc.list_value_length(parts), 0).to_numpy(zero_copy_only=False)
    flat = pc.cast(pc.cast(pc.list_flatten(parts), pa.string()).fill_null(""), pa.binary())
    values, present, valid = category_values(flat, kind)
    row = np.repeat(np.arange(per_row.size), per_row)
    lengths = np.bincount(row[present], minlength=per_row.size).astype(np.int32)
    ok = np.bincount(row[~valid], minlength=per_row.size) == 0
    short = lengths <= max_length if max_length else np.ones(per_row.size, bool)
    return values[present], lengths, ok, short
