"""Reader and writer for the IDX format of MNIST and Fashion-MNIST (gzipped or plain).

IDX layout (big-endian): two zero bytes, one type byte (0x08 uint8, 0x09 int8, 0x0B int16,
0x0C int32, 0x0D float32, 0x0E float64), one byte with the number of dimensions n, n uint32
sizes, then the data in C order. Image files are 3-D (0x00000803: N, rows, cols) and label
files 1-D (0x00000801: N). Gzip is recognised by its magic bytes, not by the file name.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

_GZIP_MAGIC = b"\x1f\x8b"

#: IDX type byte -> big-endian numpy dtype.
IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IdxFormatError(ValueError):
    """An IDX file is malformed (bad magic number, truncated or oversized data)."""


def _read_bytes(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise IdxFormatError(f"{path}: corrupt gzip data ({e})") from e
    return raw


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None) -> np.ndarray:
    """Reads an IDX file (gzipped or plain) into a native-endian numpy array.

    Args:
      path: the file.
      expected_ndim: when given, the number of dimensions the header must declare
        (3 for image files, 1 for label files).

    Raises:
      IdxFormatError: on a bad magic number, an unknown type byte, an unexpected number of
        dimensions, or a data section whose size does not match the header.
    """
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise IdxFormatError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    zero, type_code, ndim = raw[:2], raw[2], raw[3]
    if zero != b"\x00\x00" or type_code not in IDX_DTYPES:
        raise IdxFormatError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000TTNN with type "
            f"TT in {sorted(f'{k:02x}' for k in IDX_DTYPES)})"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise IdxFormatError(
            f"{path}: IDX header declares {ndim} dimensions, expected {expected_ndim} "
            f"(magic 0x{raw[:4].hex()})"
        )
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise IdxFormatError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_end
    if actual != expected:
        raise IdxFormatError(
            f"{path}: IDX data has {actual} bytes, header shape {shape} of {dtype} needs {expected}"
        )
    data = np.frombuffer(raw, dtype, offset=header_end).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Writes `array` as an IDX file; gzip-compressed when `compress` (default: name ends .gz)."""
    array = np.asarray(array)
    codes = {dt.newbyteorder("=").str: code for code, dt in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native.str not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    code = codes[native.str]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + array.astype(IDX_DTYPES[code]).tobytes()
    if compress is None:
        compress = str(path).endswith(".gz")
    if compress:
        payload = gzip.compress(payload)
    with open(path, "wb") as f:
        f.write(payload)
