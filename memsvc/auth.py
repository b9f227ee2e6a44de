"""API keys, tenants and their session namespaces.

An API key belongs to one tenant. Keys reach the server from a keys file or
the MEMSVC_API_KEYS environment variable as `TENANT=SECRET` entries, where
SECRET is `sha256:<64 hex digits>` (the key's SHA-256; the only form a keys
file accepts, so no key is stored in clear) or, in the environment only, the
key itself, hashed as soon as it is read. Clients send
`authorization: Bearer <key>` as gRPC metadata.

Each tenant sees only its own sessions: the session a tenant calls `chat` is
stored as `TENANT:chat`. Tenant names hold no ':' so the split is unique.
With auth off there is one namespace, the raw store ids (the operator's view,
the same one `memsvc sessions ls` shows).

Knows nothing about gRPC, models or LMDB.
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidArgument

ENV_VAR = "MEMSVC_API_KEYS"
MIN_KEY_CHARS = 16
MAX_ID_CHARS = 128  # the store's limit on a session id
_TENANT = re.compile(r"[A-Za-z0-9_-]{1,32}")
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]+")
_HASH = re.compile(r"sha256:([0-9a-f]{64})")


def hash_key(key: str) -> str:
    """The at-rest form of an API key: 'sha256:<hex>'."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random API key (256 bits)."""
    return "msk_" + secrets.token_urlsafe(32)


def check_tenant(name: str) -> str:
    if not isinstance(name, str) or not _TENANT.fullmatch(name):
        raise ValueError(f"tenant name {name!r} is invalid: use 1 to 32 characters from A-Z a-z 0-9 _ -")
    return name


class KeyRing:
    """key hash -> tenant. Holds only hashes."""

    def __init__(self, hashes: dict[str, str] | None = None):
        self._by_hash: dict[str, str] = {}
        for h, tenant in (hashes or {}).items():
            m = _HASH.fullmatch(h)
            if not m:
                raise ValueError(f"{h!r} is not a key hash (sha256:<64 lowercase hex digits>)")
            self._by_hash[m.group(1)] = check_tenant(tenant)

    def __len__(self) -> int:
        return len(self._by_hash)

    @property
    def tenants(self) -> set[str]:
        return set(self._by_hash.values())

    def tenant_for(self, key: str) -> str | None:
        """The tenant that owns `key`, or None."""
        if not key:
            return None
        # Looked up by the key's SHA-256: timing can tell at most something about a
        # hash, never about a stored key.
        return self._by_hash.get(hashlib.sha256(key.encode("utf-8", "replace")).hexdigest())

    def merge(self, other: "KeyRing") -> "KeyRing":
        out = KeyRing()
        out._by_hash = {**self._by_hash, **other._by_hash}
        return out

    @classmethod
    def parse(cls, text: str, *, source: str, allow_plain: bool) -> "KeyRing":
        """Entries `TENANT=SECRET`, one per line (or comma-separated); '#' starts a comment."""
        hashes: dict[str, str] = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0]
            for entry in line.split(","):
                entry = entry.strip()
                if not entry:
                    continue
                where = f"{source} line {lineno}"
                tenant, sep, secret = entry.partition("=")
                tenant, secret = tenant.strip(), secret.strip()
                if not sep or not secret:
                    raise ValueError(f"{where}: expected TENANT=sha256:<hex>, got an entry without '='")
                try:
                    check_tenant(tenant)
                except ValueError as exc:
                    raise ValueError(f"{where}: {exc}") from None
                if _HASH.fullmatch(secret):
                    h = secret
                elif secret.startswith("sha256:"):
                    raise ValueError(f"{where}: a key hash is 'sha256:' and 64 lowercase hex digits")
                elif not allow_plain:
                    raise ValueError(f"{where}: keys are stored hashed; write TENANT=sha256:<hex> "
                                     f"(`memsvc keys new TENANT` prints the line)")
                elif len(secret) < MIN_KEY_CHARS:
                    raise ValueError(f"{where}: the key for tenant {tenant!r} is shorter than "
                                     f"{MIN_KEY_CHARS} characters")
                else:
                    h = hash_key(secret)
                if h in hashes and hashes[h] != tenant:
                    raise ValueError(f"{where}: one key is given to two tenants ({hashes[h]!r} and {tenant!r})")
                hashes[h] = tenant
        return cls(hashes)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> "KeyRing":
        """Keys from the file at `path` (hashes only) and from $MEMSVC_API_KEYS (hashes or keys)."""
        ring = cls()
        if path:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"cannot read the API keys file {path}: {exc}") from exc
            ring = ring.merge(cls.parse(text, source=str(path), allow_plain=False))
        value = (os.environ if env is None else env).get(ENV_VAR, "")
        if value.strip():
            ring = ring.merge(cls.parse(value, source=ENV_VAR, allow_plain=True))
        return ring


def bearer_key(metadata) -> str | None:
    """The key in `authorization: Bearer <key>` among (name, value) pairs, else None."""
    for name, value in metadata or ():
        if name.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, key = value.strip().partition(" ")
        if scheme.lower() == "bearer" and key.strip():
            return key.strip()
        return None
    return None


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IPs; any other name or address (0.0.0.0, ::) is not."""
    h = host.strip().strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Tenant:
    """A caller's namespace. name "" is the single namespace of a server without auth."""

    name: str = ""

    @property
    def prefix(self) -> str:
        return f"{self.name}:" if self.name else ""

    def inner(self, sid: str, what: str = "session id") -> str:
        """The store id of the client's `sid` (validated when namespaced)."""
        if not self.name:
            return sid
        room = MAX_ID_CHARS - len(self.prefix)
        if not _CLIENT_ID.fullmatch(sid) or len(sid) > room:
            raise InvalidArgument(f"{what} {sid[:200]!r} is invalid: use 1 to {room} characters from "
                                  f"A-Z a-z 0-9 . _ : -")
        return self.prefix + sid

    def owns(self, inner_id: str) -> bool:
        return len(inner_id) > len(self.prefix) and inner_id.startswith(self.prefix)

    def outer(self, inner_id: str) -> str:
        return inner_id[len(self.prefix):] if self.name and inner_id.startswith(self.prefix) else inner_id

    def scrub(self, message: str) -> str:
        """Say the client's ids in a message about store ids."""
        return message.replace("'" + self.prefix, "'") if self.name else message
