"""Listener security: TLS settings, server SSL contexts and the loopback rule.

Every listener (OTLP/HTTP, OTLP/gRPC, webhooks) takes the same ``tls`` block::

    tls:
      cert_file: /etc/calltrace/tls/cert.pem
      key_file: /etc/calltrace/tls/key.pem
      client_ca_file: /etc/calltrace/tls/clients-ca.pem   # optional: require client certs

and follows one rule: a listener on a non-loopback address without TLS refuses to start
unless its config says ``insecure: true``. ``check_listener`` applies the rule at config
load, so ``calltrace validate`` reports it with the YAML path.
"""

from __future__ import annotations

import ipaddress
import ssl

from pydantic import BaseModel, ConfigDict, FilePath, model_validator

__all__ = [
    "ClientTLSSettings",
    "TLSSettings",
    "check_listener",
    "client_ssl_context",
    "is_loopback",
    "parse_endpoint",
    "server_ssl_context",
]


class TLSSettings(BaseModel):
    """Server certificate and key (PEM); ``client_ca_file`` makes client certificates
    signed by that CA mandatory (mutual TLS)."""

    model_config = ConfigDict(extra="forbid")
    cert_file: FilePath
    key_file: FilePath
    client_ca_file: FilePath | None = None


class ClientTLSSettings(BaseModel):
    """How calltrace checks a server it connects to (Redis, an OTLP endpoint) and, if the
    server asks, the client certificate it shows."""

    model_config = ConfigDict(extra="forbid")
    ca_file: FilePath | None = None
    """CA bundle that signed the server's certificate; default: the system's."""
    cert_file: FilePath | None = None
    """Client certificate (PEM) for servers that require one."""
    key_file: FilePath | None = None
    insecure_skip_verify: bool = False
    """Do not verify the server's certificate (testing only)."""

    @model_validator(mode="after")
    def _cert_and_key(self) -> ClientTLSSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("expected both cert_file and key_file, or neither")
        return self


def client_ssl_context(tls: ClientTLSSettings) -> ssl.SSLContext:
    """A client-side context from ``tls`` (the system's CAs unless ``ca_file``)."""
    context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``(host, port)`` of ``"host:port"``, ``"[::1]:4318"`` or ``":4318"`` (every interface).

    Raises ``ValueError`` with the expected form.
    """
    text = endpoint.strip() if isinstance(endpoint, str) else ""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""  # a bare IPv6 address needs brackets to carry a port
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(
            f'expected an endpoint "host:port" like "127.0.0.1:4318", got {endpoint!r}'
        )
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses; an empty host means every interface."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def check_listener(endpoint: str, tls: TLSSettings | None, insecure: bool) -> str:
    """Validate ``endpoint`` and the loopback rule; returns the endpoint for validators."""
    host, _ = parse_endpoint(endpoint)
    if tls is None and not insecure and not is_loopback(host):
        raise ValueError(
            f"{endpoint} is not a loopback address; configure tls or set insecure: true"
        )
    return endpoint


def server_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """A server-side context (TLS 1.2+) from ``tls``; mutual TLS with ``client_ca_file``.

    Raises ``ValueError`` naming the file when a certificate or key cannot be loaded.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"cannot load TLS certificate {tls.cert_file} with key {tls.key_file}: {_reason(exc)}"
        ) from exc
    if tls.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(tls.client_ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"cannot load client CA file {tls.client_ca_file}: {_reason(exc)}"
            ) from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
