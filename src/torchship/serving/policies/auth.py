"""API keys with scopes: who may call what.

A key is a random secret (:func:`new_key`: 256 bits) with a name and scopes:
``inference`` (predictions, model metadata) and ``admin`` (the ``/manage`` API). The
scopes are independent: an operator key that also predicts lists both.

Keys are stored hashed, as ``sha256:<hex>``. SHA-256 and not scrypt/bcrypt, on purpose:
those slow hashes protect low-entropy *passwords* against offline guessing; a 256-bit
random key cannot be guessed however fast the hash, while a slow hash would cost tens of
milliseconds of CPU on every request (a denial-of-service lever). Plain secrets given in
the settings are hashed as they are read and never kept; ones shorter than
:data:`MIN_SECRET_LENGTH` are refused as guessable.

Where keys come from (both may be used):

* ``TORCHSHIP_API_KEYS`` / ``api_keys``: comma-separated ``NAME:SCOPES:SECRET`` or
  ``NAME:SCOPES:sha256:HEX``, SCOPES joined by ``+`` (``ops:inference+admin:...``);
* ``api_keys_file``: YAML or JSON, ``{"keys": [{"name", "scopes", "sha256" | "key"}]}``,
  re-read when it changes, so keys rotate without a restart.

Clients send ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from torchship.errors import ConfigError, ForbiddenError, UnauthorizedError

log = logging.getLogger("torchship.serving")

SCOPES = ("inference", "admin")
MIN_SECRET_LENGTH = 24
HASH_PREFIX = "sha256:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
_RELOAD_EVERY_S = 1.0


@dataclass(frozen=True)
class ApiKey:
    """One known key: its name (logged, never the secret), scopes and SHA-256 digest."""

    name: str
    scopes: frozenset[str]
    digest: bytes

    def spec(self) -> str:
        """``NAME:SCOPES:sha256:HEX`` — the form that is safe to store or pass on."""
        return f"{self.name}:{'+'.join(sorted(self.scopes))}:{HASH_PREFIX}{self.digest.hex()}"


def new_key(prefix: str = "tsk_") -> str:
    """A fresh random key (256 bits, URL-safe), to hand to one client."""
    return prefix + secrets.token_urlsafe(32)


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def make_key(name: str, scopes: Iterable[str], secret: str) -> ApiKey:
    """An :class:`ApiKey` from a plain secret or a ``sha256:HEX`` digest."""
    if not _NAME.match(name):
        raise ConfigError(
            f"API key name {name!r} is not valid.",
            hint="Use 1-64 letters, digits, '.', '_' or '-'.",
        )
    scope_set = frozenset(s.strip() for s in scopes if s.strip())
    unknown = scope_set - set(SCOPES)
    if not scope_set or unknown:
        raise ConfigError(
            f"API key {name!r} has scopes {sorted(scope_set)}; each key needs one or more "
            f"of {', '.join(SCOPES)}.",
        )
    if secret.startswith(HASH_PREFIX):
        hexdigest = secret[len(HASH_PREFIX) :].lower()
        if not _HEX.match(hexdigest):
            raise ConfigError(f"API key {name!r}: sha256 digests are 64 hex digits.")
        return ApiKey(name, scope_set, bytes.fromhex(hexdigest))
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"API key {name!r} is shorter than {MIN_SECRET_LENGTH} characters (guessable).",
            hint="Generate one: python -c 'from torchship.serving.policies import new_key; "
            "print(new_key())'",
        )
    return ApiKey(name, scope_set, digest(secret))


def parse_spec(spec: str) -> ApiKey:
    """``NAME:SCOPES:SECRET`` or ``NAME:SCOPES:sha256:HEX`` (SCOPES joined by ``+``)."""
    name, sep1, rest = spec.strip().partition(":")
    scopes, sep2, secret = rest.partition(":")
    if not (sep1 and sep2 and secret):
        raise ConfigError(
            "API keys look like NAME:SCOPES:SECRET or NAME:SCOPES:sha256:HEX, "
            "e.g. ci:inference:tsk_... (the secret is not shown here).",
        )
    return make_key(name, scopes.split("+"), secret)


def load_file(path: Path) -> list[ApiKey]:
    """Keys from a YAML/JSON file: ``{"keys": [{"name", "scopes", "sha256" | "key"}]}``."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"Cannot read the API keys file {path}: {exc}") from exc
    entries = data.get("keys") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ConfigError(f"{path} must hold {{'keys': [...]}} or a list of keys.")
    keys = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            keys.append(parse_spec(entry))
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"{path}: key #{i + 1} needs a 'name'.")
        scopes = entry.get("scopes", ["inference"])
        if isinstance(scopes, str):
            scopes = parse_scopes(scopes)
        secret = entry.get("key") or (
            HASH_PREFIX + str(entry["sha256"]) if "sha256" in entry else None
        )
        if not isinstance(secret, str) or not isinstance(scopes, list):
            raise ConfigError(f"{path}: key {entry['name']!r} needs 'sha256' (or 'key').")
        keys.append(make_key(entry["name"], [str(s) for s in scopes], secret))
    return keys


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries: ``Authorization: Bearer`` or ``X-API-Key`` (lower-case
    header names)."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


class KeyStore:
    """The known keys; :meth:`authenticate` a request's key, :meth:`authorize` a scope."""

    def __init__(self, keys: Iterable[ApiKey] = (), *, file: Path | None = None) -> None:
        self._static = list(keys)
        self._file = file
        self._file_keys: list[ApiKey] = []
        self._mtime: float | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if file is not None:
            self._reload(force=True)
        self._check_unique(self.keys())

    @classmethod
    def from_specs(cls, specs: Iterable[str], file: Path | None = None) -> KeyStore | None:
        """A store of ``specs`` plus ``file``; None when there are no keys (auth off)."""
        keys = [parse_spec(s) for s in specs]
        if not keys and file is None:
            return None
        return cls(keys, file=file)

    def keys(self) -> list[ApiKey]:
        return [*self._static, *self._file_keys]

    @staticmethod
    def _check_unique(keys: list[ApiKey]) -> None:
        names = [k.name for k in keys]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"API key names must be unique; repeated: {', '.join(dupes)}.")

    def _reload(self, force: bool = False) -> None:
        """Re-read the keys file when it changed (checked at most once a second)."""
        assert self._file is not None
        now = time.monotonic()
        if not force and now - self._checked < _RELOAD_EVERY_S:
            return
        with self._lock:
            self._checked = now
            try:
                mtime = self._file.stat().st_mtime
            except OSError as exc:
                if force:
                    raise ConfigError(f"Cannot read the API keys file {self._file}: {exc}") from exc
                log.warning(
                    "API keys file %s unreadable (%s); keeping the old keys", self._file, exc
                )
                return
            if mtime == self._mtime:
                return
            try:
                keys = load_file(self._file)
                self._check_unique([*self._static, *keys])
            except ConfigError:
                if force:
                    raise
                log.exception("API keys file %s is invalid; keeping the old keys", self._file)
                return
            self._file_keys, self._mtime = keys, mtime
            if not force:
                log.warning("API keys reloaded from %s (%d keys)", self._file, len(keys))

    def authenticate(self, headers: Mapping[str, str]) -> ApiKey:
        """The key the request presents, or :class:`UnauthorizedError` (401).

        Every stored digest is compared in constant time (no early exit), so timing says
        nothing about which key, or how much of one, matched.
        """
        if self._file is not None:
            self._reload()
        secret = presented_key(headers)
        if secret is None:
            raise UnauthorizedError(
                "This endpoint needs an API key.",
                hint="Send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.",
            )
        presented = digest(secret)
        found: ApiKey | None = None
        for key in self.keys():
            if hmac.compare_digest(presented, key.digest) and found is None:
                found = key
        if found is None:
            raise UnauthorizedError(
                "The API key is not valid.",
                hint="Check for a typo or an expired key; ask the operator for a new one.",
            )
        return found

    @staticmethod
    def authorize(key: ApiKey, scope: str) -> None:
        """:class:`ForbiddenError` (403) unless ``key`` has ``scope``."""
        if scope not in key.scopes:
            raise ForbiddenError(
                f"The API key {key.name!r} lacks the {scope!r} scope this endpoint needs.",
                hint=f"Use a key with the {scope!r} scope (it has: "
                f"{', '.join(sorted(key.scopes))}).",
            )

    def describe(self) -> list[dict[str, Any]]:
        """Names and scopes, never digests: for logs and status pages."""
        return [{"name": k.name, "scopes": sorted(k.scopes)} for k in self.keys()]


def normalise_specs(specs: Iterable[str]) -> list[str]:
    """Settings validator: plain secrets become ``sha256:`` digests at once."""
    return [parse_spec(s).spec() for s in specs]


def parse_scopes(text: str) -> list[str]:
    """``"inference+admin"`` (or comma-separated) as a list of scope names."""
    return text.replace("+", ",").split(",")


def file_entry(key: ApiKey) -> dict[str, Any]:
    """A key as a keys file holds it: name, scopes and the digest, never the secret."""
    return {"name": key.name, "scopes": sorted(key.scopes), "sha256": key.digest.hex()}


def keys_file_template(keys: Iterable[ApiKey]) -> str:
    """A keys file (JSON) holding only digests, e.g. to write next to the server."""
    return json.dumps({"keys": [file_entry(k) for k in keys]}, indent=2)
