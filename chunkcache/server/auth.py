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

    def namespace(self, caller: Caller) -> str | None:
        """The chunk-key namespace for this caller's requests; None means the store's own namespace.

        A tenant's chunk keys are salted with its name, so its cached chunks are never hits for another
        tenant (and cache timing cannot reveal what others asked about) unless the cache is shared.
        """
        if self._shared or caller.tenant is None:
            return None
        return caller.tenant
