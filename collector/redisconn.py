"""Connecting to Redis: one settings block shared by every component that talks to it
(the ``redis_streams`` exporter, the ``correlate`` processor's call store, plugins).

::

    url: rediss://redis.internal:6380/0     # redis://, rediss:// (TLS) or unix://
    password: ${env:REDIS_PASSWORD:-}        # overrides a password in the url; "" = the url's
    tls:                                      # with rediss:// (or to force TLS on redis://)
      ca_file: /etc/calltrace/redis-ca.pem
      cert_file: /etc/calltrace/redis-client.pem   # client certificate, if Redis asks for one
      key_file: /etc/calltrace/redis-client-key.pem
      insecure_skip_verify: false

Connection failures surface quickly (short timeouts, at most one immediate reconnect
attempt), because retrying with backoff is the caller's job (the exporter helper's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, field_validator

from collector.tls import ClientTLSSettings
from collector.units import Duration

if TYPE_CHECKING:
    import redis.asyncio as aioredis

# redis-py is imported where a client is made, not here: these settings are part of
# every config's schema (``correlate``'s store), and importing redis-py (it imports
# OpenTelemetry's metrics SDK) would slow every startup, most of which use no Redis.

__all__ = [
    "CorrelateRedisConfig",
    "RedisSettings",
    "RedisTLSSettings",
    "is_transient",
    "redis_client",
]

_SCHEMES = ("redis", "rediss", "unix")
_TRANSIENT_REPLIES = ("LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "READONLY", "OOM", "CLUSTERDOWN")


RedisTLSSettings = ClientTLSSettings
"""The ``tls`` block of a Redis connection (``collector.tls.ClientTLSSettings``)."""


class RedisSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = "redis://127.0.0.1:6379/0"
    username: str | None = None
    password: str | None = None
    """Overrides a password in ``url``; empty or unset: the url's, if any."""
    tls: RedisTLSSettings | None = None
    connect_timeout: Duration = 2.0
    timeout: Duration = 5.0
    """Socket timeout of one command (a pipelined write counts as one)."""

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        scheme = urlsplit(url).scheme
        if scheme not in _SCHEMES:
            raise ValueError(
                f'expected a url like "redis://host:6379/0" or "rediss://host:6380/0", got {url!r}'
            )
        return url

    @property
    def uses_tls(self) -> bool:
        return self.tls is not None or urlsplit(self.url).scheme == "rediss"

    def describe(self) -> str:
        """The url without credentials, for log lines."""
        parts = urlsplit(self.url)
        host = parts.hostname or parts.path
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path if parts.hostname else ''}"


def redis_client(settings: RedisSettings, **overrides: Any) -> aioredis.Redis:
    """An asyncio Redis client (with its own connection pool) for ``settings``."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError, TimeoutError

    options: dict[str, Any] = {
        "socket_connect_timeout": settings.connect_timeout,
        "socket_timeout": settings.timeout,
        # One immediate reconnect covers a pooled connection that a Redis restart
        # closed; anything longer is the caller's backoff.
        "retry": Retry(NoBackoff(), 1),
        "retry_on_error": [ConnectionError, TimeoutError],
    }
    url = settings.url
    if settings.username:
        options["username"] = settings.username
    if settings.password:
        # redis-py lets credentials in the url win over keyword arguments: drop them.
        options["password"] = settings.password
        url = _without_password(url)
    if settings.uses_tls:
        if url.startswith("redis://"):
            url = "rediss://" + url.removeprefix("redis://")
        tls = settings.tls or RedisTLSSettings()
        options["ssl_cert_reqs"] = "none" if tls.insecure_skip_verify else "required"
        options["ssl_check_hostname"] = not tls.insecure_skip_verify
        if tls.ca_file is not None:
            options["ssl_ca_certs"] = str(tls.ca_file)
        if tls.cert_file is not None and tls.key_file is not None:
            options["ssl_certfile"] = str(tls.cert_file)
            options["ssl_keyfile"] = str(tls.key_file)
    options.update(overrides)
    return aioredis.Redis.from_url(url, **options)


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{user}@{host}" if user else host
    return urlunsplit(parts._replace(netloc=netloc))


def is_transient(exc: BaseException) -> bool:
    """Whether a Redis error may go away by itself (server down, loading, failing over)."""
    from redis.exceptions import BusyLoadingError, ConnectionError, ResponseError, TimeoutError

    if isinstance(exc, ConnectionError | TimeoutError | BusyLoadingError | OSError):
        return True
    if isinstance(exc, ResponseError):
        return str(exc).split(" ", 1)[0].upper() in _TRANSIENT_REPLIES
    return False


class CorrelateRedisConfig(RedisSettings):
    """Where call records shared by every instance live (``url``, ``password``, ``tls``):
    the ``redis`` block of ``correlate`` and of the ``livekit_webhook`` receiver."""

    ttl: Duration = 86400.0
    """A call record expires this long after its last span; 0 keeps records forever."""
    key_prefix: str = "calltrace:call:"
    """Records are hashes ``{key_prefix}{project}:{call_id}``."""
