"""Signing keys of the platform plane, and verification anywhere.

The platform signs two kinds of documents with Ed25519 (JWS, ``alg`` EdDSA), each naming its
key by ``kid``: short-lived access tokens and tenant licenses. The public keys are published
as a JWKS (``/.well-known/jwks.json``), so a tenant plane verifies both offline.

Rotation: a new key signs from the moment it is created; the retired key stays published
(and so keeps verifying) until everything it signed has expired.
"""

from __future__ import annotations

import base64
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tenantflow.errors import InvalidSignatureError
from tenantflow.platform.schema import signing_keys

ISSUER = "tenantflow"
ALGORITHM = "EdDSA"
LEEWAY_SECONDS = 5.0

Jwks = dict[str, list[dict[str, str]]]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class _Key:
    kid: str
    private: Ed25519PrivateKey


class SigningKeys:
    """The platform's key ring, kept in the platform database (private keys never leave it)."""

    def __init__(self, engine: sa.Engine, *, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.clock = clock
        self._current: _Key | None = None
        self._lock = threading.Lock()

    def _load_current(self) -> _Key | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(signing_keys.c.kid, signing_keys.c.private_pem)
                .where(signing_keys.c.retired_at.is_(None))
                .order_by(signing_keys.c.created_at.desc())
            ).first()
        if row is None:
            return None
        private = serialization.load_pem_private_key(row.private_pem.encode(), password=None)
        assert isinstance(private, Ed25519PrivateKey)
        return _Key(row.kid, private)

    def current(self) -> _Key:
        """The key that signs now; the first one is made on first use."""
        with self._lock:
            if self._current is None:
                self._current = self._load_current() or self._create()
            return self._current

    def _create(self) -> _Key:
        private = Ed25519PrivateKey.generate()
        kid = secrets.token_hex(8)
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        public = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        with self.engine.begin() as conn:
            conn.execute(
                signing_keys.insert().values(
                    kid=kid, private_pem=pem, public_x=_b64(public), created_at=self.clock()
                )
            )
        return _Key(kid, private)

    def rotate(self, *, verify_for: float, revoke_tokens: bool = False) -> str:
        """Sign with a new key from now on; the old ones stay published for ``verify_for``
        seconds (at least the lifetime of what they signed). ``revoke_tokens``: the access
        tokens the old ones signed are refused from now on (licenses still verify). Returns
        the new key's id."""
        now = self.clock()
        with self._lock:
            with self.engine.begin() as conn:
                conn.execute(
                    signing_keys.update()
                    .where(signing_keys.c.retired_at.is_(None))
                    .values(retired_at=now, verify_until=now + verify_for)
                )
                if revoke_tokens:
                    conn.execute(
                        signing_keys.update()
                        .where(signing_keys.c.retired_at.is_not(None))
                        .values(tokens_revoked=True)
                    )
            self._current = self._create()
            return self._current.kid

    def jwks(self) -> Jwks:
        """The public keys that verify: the signing one and retired ones still in their
        verification window."""
        self.current()
        now = self.clock()
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(signing_keys.c.kid, signing_keys.c.public_x)
                .where(
                    sa.or_(
                        signing_keys.c.retired_at.is_(None),
                        signing_keys.c.verify_until > now,
                    )
                )
                .order_by(signing_keys.c.created_at.desc())
            ).all()
        return {
            "keys": [
                {
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": row.public_x,
                    "kid": row.kid,
                    "use": "sig",
                    "alg": ALGORITHM,
                }
                for row in rows
            ]
        }

    def sign(self, claims: Mapping[str, Any], *, typ: str) -> str:
        key = self.current()
        return jwt.encode(
            {"iss": ISSUER, **claims},
            key.private,
            algorithm=ALGORITHM,
            headers={"kid": key.kid, "typ": typ},
        )


def public_keys(jwks: Jwks) -> dict[str, Ed25519PublicKey]:
    out: dict[str, Ed25519PublicKey] = {}
    for jwk in jwks.get("keys", []):
        if jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519" and "kid" in jwk:
            out[jwk["kid"]] = Ed25519PublicKey.from_public_bytes(_unb64(jwk["x"]))
    return out


def verify(
    document: str,
    keys: Mapping[str, Ed25519PublicKey],
    *,
    typ: str,
    audience: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The claims of a document signed by one of ``keys``, of type ``typ``, not expired, not
    issued in the future, and for ``audience`` when one is given; anything else is an
    ``InvalidSignatureError`` (which says why, never echoing input)."""
    try:
        header = jwt.get_unverified_header(document)
    except jwt.PyJWTError:
        raise InvalidSignatureError("malformed token") from None
    if header.get("typ") != typ:
        raise InvalidSignatureError(f"not a {typ} document")
    key = keys.get(str(header.get("kid")))
    if key is None:
        raise InvalidSignatureError("signed by an unknown key")
    try:
        claims: dict[str, Any] = jwt.decode(
            document,
            key,
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            audience=audience,
            leeway=LEEWAY_SECONDS,
            options={
                "require": ["exp", "iat", "iss", *(["aud"] if audience else [])],
                "verify_aud": audience is not None,
            },
        )
    except jwt.ExpiredSignatureError:
        raise InvalidSignatureError("expired") from None
    except jwt.PyJWTError:
        raise InvalidSignatureError("invalid signature or claims") from None
    if now is not None and claims["exp"] + LEEWAY_SECONDS < now:
        raise InvalidSignatureError("expired")
    return claims
