"""The keys and algorithms access tokens may be verified with.

``HS_ALGORITHMS`` take a shared secret; ``PUBLIC_KEY_ALGORITHMS`` name the public-key types that
verify each asymmetric one; ``load_public_key`` is the one place a PEM public key is read.
"""

from __future__ import annotations

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import load_pem_public_key

HS_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
# Asymmetric algorithms and the public-key types that verify them.
PUBLIC_KEY_ALGORITHMS: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"), (rsa.RSAPublicKey,)),
    **dict.fromkeys(("ES256", "ES384", "ES512"), (ec.EllipticCurvePublicKey,)),
    "EdDSA": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}


def load_public_key(pem: str) -> PublicKeyTypes:
    """The public key a PEM text holds; ValueError when it holds none this library can read."""
    try:
        return load_pem_public_key(pem.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise ValueError("not a PEM public key") from error
