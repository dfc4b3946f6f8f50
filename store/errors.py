"""Error types raised by the KV store."""


class StoreError(RuntimeError):
    """The store cannot be opened or written (missing, unwritable, disk full); the message says the fix."""


class CorruptEntryError(ValueError):
    """A stored KV entry cannot be decoded (bad magic, other format version, truncated, checksum mismatch)."""
