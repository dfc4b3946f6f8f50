"""Check an LMDB `data.mdb` against its own meta pages before it is memory-mapped.

LMDB maps the file and trusts it: touching a page past the end of a truncated file raises SIGBUS, which
kills the process with nothing logged. Reading the two meta pages with plain file I/O first lets us refuse
a truncated or foreign file with an error instead.

Meta page layout (LMDB 0.9, 64-bit, little-endian; offsets from the start of the page):
    0    page header (16 B): pgno u64, pad u16, flags u16 (P_META = 0x08), lower/upper u16 x 2
    16   mm_magic u32 = 0xBEEFC0DE
    20   mm_version u32 = 1
    24   mm_address u64, 32 mm_mapsize u64
    40   mm_dbs[0] (free DB, 48 B); its first field (md_pad u32) holds the page size
    88   mm_dbs[1] (main DB, 48 B)
    136  mm_last_pg u64: last page used by the transaction that wrote this meta
    144  mm_txnid u64
Meta 0 starts at offset 0, meta 1 at offset pagesize; the one with the larger txnid is current.
"""
from __future__ import annotations

import os
import struct

from .errors import DamagedStoreError

LMDB_MAGIC = 0xBEEFC0DE
LMDB_DATA_VERSION = 1
P_META = 0x08
_META = struct.Struct("<QHH4xIIQQI")  # pgno, pad, flags, (lower, upper), magic, version, address, mapsize, psize
_LAST_PG_TXNID = struct.Struct("<QQ")
_LAST_PG_OFFSET = 136
_MIN_PAGE, _MAX_PAGE = 512, 1 << 16


def parse_meta(page: bytes) -> tuple[int, int, int] | None:
    """(page size, last page number, txnid) of one meta page, or None if it is not a valid LMDB meta page."""
    if len(page) < _LAST_PG_OFFSET + _LAST_PG_TXNID.size:
        return None
    _pgno, _pad, flags, magic, version, _address, _mapsize, psize = _META.unpack_from(page)
    if magic != LMDB_MAGIC or version != LMDB_DATA_VERSION or not flags & P_META:
        return None
    if not _MIN_PAGE <= psize <= _MAX_PAGE or psize & (psize - 1):
        return None
    last_pg, txnid = _LAST_PG_TXNID.unpack_from(page, _LAST_PG_OFFSET)
    return psize, last_pg, txnid


def required_size(head: bytes, meta1: bytes | None) -> int:
    """Bytes the file must hold according to its newest valid meta page.

    Args:
        head: the file's first bytes (meta page 0; at least 160).
        meta1: the bytes at offset pagesize (meta page 1), or None if the file is shorter.

    Returns:
        (last_pg + 1) * pagesize of the meta page with the larger txnid.

    Raises:
        DamagedStoreError: neither meta page is valid (not an LMDB file, or another LMDB version).
    """
    metas = [m for m in (parse_meta(head), parse_meta(meta1) if meta1 else None) if m is not None]
    if not metas:
        raise DamagedStoreError("not an LMDB data file of a supported version (no valid meta page)")
    psize, last_pg, _txnid = max(metas, key=lambda m: m[2])
    return (last_pg + 1) * psize


def check_data_file(path: str | os.PathLike) -> None:
    """Refuse a `data.mdb` that LMDB would fault on; a missing file (a new store) passes.

    Raises:
        DamagedStoreError: the file is foreign (no valid meta page) or shorter than its meta pages promise.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_LAST_PG_OFFSET + _LAST_PG_TXNID.size)
            first = parse_meta(head)
            meta1 = None
            if first is not None and size >= 2 * first[0]:
                f.seek(first[0])
                meta1 = f.read(_LAST_PG_OFFSET + _LAST_PG_TXNID.size)
            elif first is None:
                # Meta 0 is damaged: look for meta 1 at every page size LMDB supports.
                for psize in (4096, 8192, 16384, 32768, 65536, 512, 1024, 2048):
                    f.seek(psize)
                    candidate = f.read(_LAST_PG_OFFSET + _LAST_PG_TXNID.size)
                    if parse_meta(candidate) is not None:
                        meta1 = candidate
                        break
    except FileNotFoundError:
        return
    except OSError as e:
        raise DamagedStoreError(f"cannot read {path}: {e}") from e
    try:
        need = required_size(head, meta1)
    except DamagedStoreError as e:
        raise DamagedStoreError(f"{path} ({size} bytes) is {e}; it was not written by chunkcache, or its start "
                                "is destroyed. Restore it from a backup or delete the store directory and "
                                "re-run `chunkcache ingest`") from None
    if size < need:
        raise DamagedStoreError(
            f"{path} is truncated: {size} bytes on disk, its LMDB meta page needs {need}. Opening it would crash "
            "the process (SIGBUS); restore it from a backup, or delete the store directory and re-run "
            "`chunkcache ingest`")
