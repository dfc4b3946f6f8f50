"""Bearer-key authentication and the tenant -> chunk-key namespace rule."""
from __future__ import annotations

import hmac
from dataclasses import dataclass

from .settings import ServerSettings


@dataclass(frozen=True)
class Caller:
    """Who sent a request. tenant None: the default tenant (no key given, or a key without a tenant)."""

    tenant: str | None


class Authenticator:
    """Checks the token of `Authorization: Bearer KEY` against the configured keys, in constant time per key."""

    def __init__(self, settings: ServerSettings):
        self._keys = [(key.encode(), tenant) for key, tenant in settings.api_keys.items()]
        self._admin_key = settings.admin_key.encode() if settings.admin_key else None
        self._shared = settings.shared_cache

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def caller(self, token: str | None) -> Caller | None:
        """The caller a bearer token authenticates, or None when it does not (always a Caller without keys)."""
        if not self._keys:
            return Caller(None)
        if not token:
            return None
        given = token.encode()
        found = None
        # NOTE: every key is compared (no early exit) so timing does not say which one was close.
        for key, tenant in self._keys:
            if hmac.compare_digest(given, key):
                found = Caller(tenant)
        return found

    def is_admin(self, token: str | None) -> bool:
        """Whether the bearer token is the admin key (False when none is configured)."""
        if self._admin_key is None or not token:
            return False
        return hmac.compare_digest(token.encode(), self._admin_key)

    def namespace(self, caller: Caller) -> str | None:
        """The chunk-key namespace for this caller's requests; None means the store's own namespace.

        A tenant's `documents` are keyed with its name, so they are never hits for another tenant (cache
        timing cannot reveal what others sent) unless the cache is shared. The store's ingested chunks keep
        the store's namespace for everyone (docs/SECURITY.md).
        """
        if self._shared or caller.tenant is None:
            return None
        return caller.tenant
