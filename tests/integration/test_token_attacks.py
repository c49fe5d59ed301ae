"""Forged and misused access tokens, on both backends: each is refused with the same
``401 invalid-token`` problem, which never echoes the token, while the genuine token it was
made from goes on working."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tenantflow import Runtime
from tenantflow.platform.identity import Role
from tenantflow.platform.keys import ISSUER
from tenantflow.platform.licensing import LICENSE_TYP
from tenantflow.platform.service import ACCESS_AUDIENCE, ACCESS_TYP
from tests.integration.test_api import bearer, http, member, platform_call

__all__ = ["http"]  # the fixture, used by name

Forge = Callable[[str, dict[str, Any], dict[str, Any], Runtime], str]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header = jwt.get_unverified_header(token)
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return header, claims


def _real_sign(runtime: Runtime, claims: dict[str, Any], typ: str = ACCESS_TYP) -> str:
    """Signed by the installation's own current key: only the claims are wrong."""
    return runtime.platform.keys.sign(claims, typ=typ)


def _edited(token: str, **changes: Any) -> str:
    """The genuine signature over claims changed afterwards."""
    head, body, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims.update(changes)
    return f"{head}.{_b64(json.dumps(claims).encode())}.{signature}"


def _hs256(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    """By hand: PyJWT itself refuses to key HMAC with something that looks like a public key."""
    signed = (
        f"{_b64(json.dumps({**header, 'alg': 'HS256'}).encode())}."
        f"{_b64(json.dumps(claims).encode())}"
    )
    mac = hmac.new(secret, signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{_b64(mac)}"


def _foreign_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


FORGERIES: dict[str, Forge] = {
    # No signature at all, as alg=none allows.
    "alg none": lambda token, header, claims, rt: (
        f"{_b64(json.dumps({**header, 'alg': 'none'}).encode())}."
        f"{_b64(json.dumps(claims).encode())}."
    ),
    # HMAC keyed with the published public key: the classic algorithm confusion.
    "HS256 with the public key": lambda token, header, claims, rt: _hs256(
        header, claims, base64.urlsafe_b64decode(rt.platform.keys.jwks()["keys"][0]["x"] + "==")
    ),
    "HS256 with the JWK as text": lambda token, header, claims, rt: _hs256(
        header, claims, json.dumps(rt.platform.keys.jwks()["keys"][0]).encode()
    ),
    "a foreign key under the real kid": lambda token, header, claims, rt: jwt.encode(
        claims, _foreign_key(), algorithm="EdDSA", headers={"kid": header["kid"], "typ": ACCESS_TYP}
    ),
    "a foreign key under its own kid": lambda token, header, claims, rt: jwt.encode(
        claims, _foreign_key(), algorithm="EdDSA", headers={"kid": "attacker", "typ": ACCESS_TYP}
    ),
    "a foreign key embedded in the header": lambda token, header, claims, rt: jwt.encode(
        claims,
        (key := _foreign_key()),
        algorithm="EdDSA",
        headers={
            "kid": header["kid"],
            "typ": ACCESS_TYP,
            "jwk": {
                "kty": "OKP",
                "crv": "Ed25519",
                "x": _b64(
                    key.public_key().public_bytes(
                        serialization.Encoding.Raw, serialization.PublicFormat.Raw
                    )
                ),
            },
        },
    ),
    "no kid": lambda token, header, claims, rt: jwt.encode(
        claims, _foreign_key(), algorithm="EdDSA", headers={"typ": ACCESS_TYP}
    ),
    "expired": lambda token, header, claims, rt: _real_sign(
        rt, {**claims, "iat": int(time.time()) - 3600, "exp": int(time.time()) - 600}
    ),
    "not valid yet (nbf)": lambda token, header, claims, rt: _real_sign(
        rt, {**claims, "nbf": int(time.time()) + 600}
    ),
    "issued in the future": lambda token, header, claims, rt: _real_sign(
        rt, {**claims, "iat": int(time.time()) + 600, "exp": int(time.time()) + 1200}
    ),
    "no expiry": lambda token, header, claims, rt: _real_sign(
        rt, {k: v for k, v in claims.items() if k != "exp"}
    ),
    "wrong audience": lambda token, header, claims, rt: _real_sign(
        rt, {**claims, "aud": "another-service"}
    ),
    "no audience": lambda token, header, claims, rt: _real_sign(
        rt, {k: v for k, v in claims.items() if k != "aud"}
    ),
    "wrong issuer": lambda token, header, claims, rt: _real_sign(
        rt, {**claims, "iss": "https://attacker.example"}
    ),
    # A genuine signed document of another kind: a license is not an access token.
    "a license as a token": lambda token, header, claims, rt: _real_sign(
        rt, claims, typ=LICENSE_TYP
    ),
    "edited role": lambda token, header, claims, rt: _edited(token, role="tenant_admin"),
    "edited tenant": lambda token, header, claims, rt: _edited(token, tid="globex"),
    "edited to platform admin": lambda token, header, claims, rt: _edited(token, adm=True),
    "edited expiry": lambda token, header, claims, rt: _edited(token, exp=claims["exp"] + 86400),
    "signature cut off": lambda token, header, claims, rt: token.rsplit(".", 1)[0] + ".",
    "signature of another token": lambda token, header, claims, rt: (
        token.rsplit(".", 1)[0] + "." + _real_sign(rt, {**claims, "jti": "other"}).rsplit(".", 1)[1]
    ),
    "not a JWT": lambda token, header, claims, rt: "not-a-token",
    "empty": lambda token, header, claims, rt: "",
}


@pytest.fixture
async def viewer(runtime: Runtime, http: httpx.AsyncClient) -> str:
    headers = await member(runtime, http, "val@acme.test", "acme", Role.VIEWER)
    return headers["Authorization"].removeprefix("Bearer ")


def test_every_forgery_is_named() -> None:
    assert len(FORGERIES) >= 20


async def test_the_genuine_token_names_its_audience_and_issuer(
    viewer: str, http: httpx.AsyncClient
) -> None:
    _, claims = _parts(viewer)
    assert claims["aud"] == ACCESS_AUDIENCE and claims["iss"] == ISSUER
    assert (await http.get("/v1/runs", headers=bearer(viewer))).status_code == 200


async def test_every_forged_token_is_refused_everywhere(
    runtime: Runtime, http: httpx.AsyncClient, viewer: str
) -> None:
    header, claims = _parts(viewer)
    # A tenant-plane read, a tenant-plane write, a tenant admin's platform route and a
    # platform admin's: none takes a forgery, and each answers alike.
    calls = [
        ("GET", "/v1/runs", None),
        ("POST", "/v1/runs", {"workflow": "greet", "args": ["x"]}),
        ("POST", "/platform/v1/tenants/acme/api-keys", {"name": "k", "role": "viewer"}),
        ("GET", "/platform/v1/tenants", None),
    ]
    accepted: list[str] = []
    for forgery, forge in sorted(FORGERIES.items()):
        forged = await platform_call(forge, viewer, header, claims, runtime)
        assert forged != viewer, forgery
        signature = forged.rsplit(".", 1)[-1]
        for method, path, body in calls:
            reply = await http.request(method, path, json=body, headers=bearer(forged))
            problem = reply.json()
            if reply.status_code != 401 or problem["type"] not in {
                "urn:tenantflow:problem:invalid-token",
                "urn:tenantflow:problem:unauthenticated",  # the empty one: no token at all
            }:
                accepted.append(f"{forgery}: {method} {path} -> {reply.status_code} {reply.text}")
            assert not forged or forged not in reply.text, reply.text  # never echoed
            assert len(signature) < 16 or signature not in reply.text, reply.text
    assert not accepted, "\n".join(accepted)
    # Nothing was made with them, and the genuine token still works.
    keys = await http.get("/platform/v1/tenants/acme/api-keys", headers=bearer(viewer))
    assert keys.status_code == 403  # a viewer's own token: refused by role, not by signature
    assert (await http.get("/v1/runs", headers=bearer(viewer))).json()["runs"] == []


async def test_a_token_in_another_scheme_is_refused(http: httpx.AsyncClient, viewer: str) -> None:
    for value in (f"Basic {viewer}", viewer, f"Bearer  {viewer} extra", "Bearer"):
        reply = await http.get("/v1/runs", headers={"Authorization": value})
        assert reply.status_code == 401, (value[:12], reply.text)
