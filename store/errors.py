"""Error types raised by the KV store."""


class StoreError(RuntimeError):
    """The store cannot be opened or written (missing, unwritable, disk full); the message says the fix."""


class DamagedStoreError(StoreError):
    """The store's files are truncated or foreign: refused at open, before LMDB maps them."""


class DiskFullError(StoreError):
    """A write failed because the disk is full; the store is unchanged and reads keep working."""


class CorruptEntryError(ValueError):
    """A stored entry cannot be decoded (bad magic, other format version, truncated, checksum mismatch)."""


class StoreUnavailableError(StoreError):
    """A remote store (Redis) cannot be reached. Reads degrade to misses where they can; writes raise this."""
