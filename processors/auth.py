"""``auth``: Bearer API keys; each key belongs to one project.

Runs on the request's headers before its body is decoded, so an unauthenticated
request costs no parsing. Keys come from the key store that ``calltrace keys`` manages
(an SQLite file; only SHA-256 hashes are stored) and/or are listed in the config, e.g.
from an environment variable for a sidecar with no database::

    auth:
      key_store: null
      keys:
        - {key: "${env:CALLTRACE_KEY}", project: my-project}

Comparisons are made on hashes with ``hmac.compare_digest``.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from collector import (
    ALL_SIGNALS,
    ComponentConfig,
    Host,
    Processor,
    RefusedError,
    RequestInfo,
    UnauthenticatedError,
)
from collector.keys import KeyStore, PostgresKeyStore, hash_key, is_postgres_location


class ConfiguredKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: SecretStr
    project: str = Field(min_length=1)

    @field_validator("key")
    @classmethod
    def _not_empty(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value().strip()) < 8:
            raise ValueError("expected a key of at least 8 characters")
        return value


class AuthConfig(ComponentConfig):
    key_store: str | None = "./data/calltrace.db"
    """Keys managed by ``calltrace keys``: an SQLite file, or ``postgresql://...`` for
    keys shared by every collector of a gateway; null to use only ``keys``."""
    key_store_schema: str = "calltrace"
    """PostgreSQL schema of the ``api_keys`` table (with a ``postgresql://`` key store)."""

    @field_validator("key_store", mode="before")
    @classmethod
    def _path_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, Path) else value

    keys: list[ConfiguredKey] = Field(default_factory=list)
    header: str = "authorization"


def bearer_token(header_value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value."""
    if not header_value:
        return None
    scheme, _, token = header_value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


class AuthProcessor(Processor):
    type_name = "auth"
    Config = AuthConfig
    config: AuthConfig
    signals = ALL_SIGNALS  # it checks requests' headers, whatever they carry

    def __init__(self, component_id: str, config: AuthConfig):
        super().__init__(component_id, config)
        self._configured = [(hash_key(k.key.get_secret_value()), k.project) for k in config.keys]
        self._store: KeyStore | None = None
        self._shared_store: PostgresKeyStore | None = None

    async def start(self, host: Host) -> None:
        location = self.config.key_store
        if location is None or self._store is not None or self._shared_store is not None:
            return
        if is_postgres_location(location):
            store = PostgresKeyStore(location, self.config.key_store_schema)
            try:
                await store.open()
            except Exception as exc:
                raise RuntimeError(f"{self.id}: cannot open key store: {exc}") from None
            self._shared_store = store
        else:
            self._store = KeyStore(Path(location))

    def authenticate(self, token: str) -> str | None:
        """The project a key belongs to, or None for an unknown or revoked key."""
        digest = hash_key(token)
        project = None
        for known, known_project in self._configured:
            # No early exit: the time taken does not depend on which key matched.
            if hmac.compare_digest(known, digest):
                project = known_project
        if project is None and self._store is not None:
            project = self._store.verify(token)
        return project

    async def admit(self, request: RequestInfo) -> None:
        token = bearer_token(request.headers.get(self.config.header.lower()))
        if token is None:
            raise UnauthenticatedError("missing bearer token")
        project = self.authenticate(token)
        if project is None and self._shared_store is not None:
            try:
                project = await self._shared_store.verify(token)
            except Exception as exc:  # the client retries a 503; a 401 it would not
                raise RefusedError(f"key store unavailable: {exc}", retry_after=5.0) from None
        if project is None:
            raise UnauthenticatedError("unknown or revoked API key")
        request.project = project

    async def shutdown(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._shared_store is not None:
            await self._shared_store.close()
            self._shared_store = None
