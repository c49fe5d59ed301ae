"""What the tenant plane holds of the platform plane: the JWKS and each tenant's license,
verified offline and cached, in memory and on local disk.

Fetched at most every ``license_refresh_seconds``. When the platform is unreachable the cached
copies keep serving: a license until it expires (then the tenant's submits are refused), the
keys until the platform answers again. A copy on disk survives a restart during an outage: a
process started while the platform database is down serves from it (``DiskCache``, which the
tenant router keeps its routes in as well).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tenantflow.backends import unavailable
from tenantflow.errors import InvalidSignatureError, LicenseError, StoreUnavailableError
from tenantflow.platform.keys import Jwks, public_keys
from tenantflow.platform.licensing import LicenseClaims, verify_license

log = structlog.get_logger(__name__)

UNKNOWN_KID_REFRESH_SECONDS = 1.0  # a flood of made-up key ids costs a lookup a second


class PlatformSource(Protocol):
    """Where the artifacts come from (the platform plane, in process or over a network)."""

    def jwks(self) -> Jwks: ...

    def license_document(self, tenant_id: str) -> str | None: ...


@dataclass
class _Cached:
    document: str | None  # None: the tenant is on no plan (not licensed, not limited)
    claims: LicenseClaims | None
    fetched_at: float


def _of(cached: _Cached, uid: str | None) -> bool:
    """Whether the license is the tenant's ``uid``'s (licenses issued before tenants had an
    identity name none, and are taken as the tenant's)."""
    claims = cached.claims
    return uid is None or claims is None or claims.tenant_uid in (None, uid)


class DiskCache:
    """JSON documents in a folder of this process's own (``0700``, each file ``0600``: the
    tenant router's hold database URLs), each replaced whole; one that is missing or cannot be
    read is None."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def read(self, name: str) -> Any:
        try:
            return json.loads((self.folder / name).read_text())
        except (OSError, ValueError):
            return None

    def write(self, name: str, value: Any) -> None:
        with contextlib.suppress(OSError):
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = self.folder / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(json.dumps(value))
            tmp.replace(self.folder / name)

    def remove(self, name: str) -> None:
        (self.folder / name).unlink(missing_ok=True)


JWKS_FILE = "jwks.json"


def keys_are_cached(cache_dir: Path) -> bool:
    """Whether an earlier start left the platform's keys on disk (so that a process started
    while the platform is down has something to serve from)."""
    return DiskCache(cache_dir).read(JWKS_FILE) is not None


class PlatformArtifacts:
    def __init__(
        self,
        source: PlatformSource,
        cache_dir: Path,
        *,
        refresh_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.cache_dir = cache_dir
        self._disk = DiskCache(cache_dir)
        self.refresh_seconds = refresh_seconds
        self.clock = clock
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._keys_at = -float("inf")
        self._licenses: dict[str, _Cached] = {}
        self._lock = threading.Lock()

    # -- keys --------------------------------------------------------------------------------

    def keys(self, *, kid: str | None = None) -> dict[str, Ed25519PublicKey]:
        """The platform's public keys; refreshed when stale, or when ``kid`` is unknown (a
        rotation), at most every few seconds for the latter."""
        if self._keys_due(kid):
            self._refresh_keys(self.clock())
        return self._keys

    async def keys_async(self, *, kid: str | None = None) -> dict[str, Ed25519PublicKey]:
        """``keys`` for async callers: a refresh (a platform read) runs in a thread."""
        if self._keys_due(kid):
            return await asyncio.to_thread(self.keys, kid=kid)
        return self._keys

    def _keys_due(self, kid: str | None) -> bool:
        now = self.clock()
        stale = now - self._keys_at > self.refresh_seconds
        unknown = kid is not None and kid not in self._keys
        return stale or (unknown and now - self._keys_at > UNKNOWN_KID_REFRESH_SECONDS)

    def invalidate_keys(self) -> None:
        """Fetch the keys on next use (this process rotated them)."""
        self._keys_at = -float("inf")

    def _refresh_keys(self, now: float) -> None:
        with self._lock:
            try:
                jwks = self.source.jwks()
            except Exception as exc:
                log.warning("platform unreachable; keeping cached keys", error=type(exc).__name__)
                if not self._keys:
                    jwks = self._disk.read(JWKS_FILE) or {"keys": []}
                    self._keys = public_keys(jwks)
                self._keys_at = now  # retry after the refresh interval, not on every call
                return
            self._keys = public_keys(jwks)
            self._keys_at = now
            self._disk.write(JWKS_FILE, jwks)

    # -- licenses ----------------------------------------------------------------------------

    def license(self, tenant_id: str, uid: str | None = None) -> LicenseClaims | None:
        """The tenant's verified, unexpired license; None if the tenant is on no plan. A
        ``LicenseError`` if it has none valid (expired through a long platform outage,
        say), or only one issued to another tenant of the same id than ``uid`` (offboarded
        since: fetched again at once, to find the new tenant's)."""
        now = self.clock()
        cached = self._licenses.get(tenant_id)
        if cached is None or self.needs_refresh(tenant_id, uid):
            cached = self._refresh_license(tenant_id, now, cached)
        if cached.document is None:
            return None
        if cached.claims is None or cached.claims.expires_at <= now:
            raise LicenseError("the tenant's license has expired")
        if not _of(cached, uid):
            raise LicenseError("the tenant's license was issued to another tenant of its id")
        return cached.claims

    def needs_refresh(self, tenant_id: str, uid: str | None = None) -> bool:
        """Whether ``license`` would fetch (so an async caller runs it in a thread)."""
        cached = self._licenses.get(tenant_id)
        return (
            cached is None
            or self.clock() - cached.fetched_at > self.refresh_seconds
            or not _of(cached, uid)
        )

    def _refresh_license(self, tenant_id: str, now: float, cached: _Cached | None) -> _Cached:
        name = f"license-{tenant_id}.json"
        try:
            document = self.source.license_document(tenant_id)
        except Exception as exc:
            log.warning(
                "platform unreachable; keeping the cached license",
                tenant=tenant_id,
                error=type(exc).__name__,
            )
            if cached is None:
                stored = self._disk.read(name)
                if stored is None:
                    if unavailable(exc) is not None:  # an outage: asking again will do
                        raise StoreUnavailableError(
                            "the platform database did not answer, and no license is cached"
                        ) from exc
                    raise LicenseError(
                        "the platform is unreachable and no license is cached"
                    ) from exc
                cached = self._verified(tenant_id, stored.get("document"), now)
            cached.fetched_at = now  # retry after the refresh interval
            self._licenses[tenant_id] = cached
            return cached
        fresh = self._verified(tenant_id, document, now)
        self._licenses[tenant_id] = fresh
        self._disk.write(name, {"document": document})
        return fresh

    def _verified(self, tenant_id: str, document: str | None, now: float) -> _Cached:
        if document is None:
            return _Cached(document=None, claims=None, fetched_at=now)
        try:
            claims = verify_license(document, self._keys_for(document), tenant_id=tenant_id)
        except InvalidSignatureError as exc:
            log.warning("license rejected", tenant=tenant_id, reason=str(exc))
            return _Cached(document=document, claims=None, fetched_at=now)
        return _Cached(document=document, claims=claims, fetched_at=now)

    def _keys_for(self, document: str) -> dict[str, Ed25519PublicKey]:
        import jwt

        try:
            kid = jwt.get_unverified_header(document).get("kid")
        except jwt.PyJWTError:
            kid = None
        return self.keys(kid=None if kid is None else str(kid))
