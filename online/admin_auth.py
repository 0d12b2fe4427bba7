"""Who may use the admin surface (``Status``, ``Reload``).

On loopback (the default, ``admin_host = 127.0.0.1``) only processes on the host can
reach it, so no token is needed. Bound anywhere else it is reachable from the
network, and ``Reload`` makes a worker load whatever ``CURRENT`` names: then a token
is required, and a server refuses to start without one (``ConfigError`` naming
``admin_token_file``) rather than expose it silently.

The token is a bearer token in the call's metadata (``authorization: Bearer <token>``),
compared in constant time (``hmac.compare_digest``) so response timing does not leak
how much of a guess was right. It comes from a file (``admin_token_file``: a mounted
secret) or the ``TWOTOWER_ADMIN_TOKEN`` environment variable, never from the config
JSON or the command line of the server (both are readable by others: ConfigMaps,
``ps``). With TLS configured the admin port uses it too, so the token is not sent in
the clear.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from towers.errors import ConfigError

if TYPE_CHECKING:
    import grpc

    from online.config import ServeConfig

TOKEN_ENV = "TWOTOWER_ADMIN_TOKEN"
HEADER = "authorization"
SCHEME = "Bearer "


def is_loopback(host: str) -> bool:
    """``localhost`` and loopback addresses (127.0.0.0/8, ::1); anything else, including
    ``0.0.0.0``, ``::`` and names, is treated as reachable from the network."""
    h = host.strip().strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def admin_token(cfg: ServeConfig, *, environ: dict[str, str] | None = None) -> str | None:
    """The configured admin token (file first, then the environment), or ``None``."""
    if cfg.admin_token_file:
        p = Path(cfg.admin_token_file)
        try:
            token = p.read_text().strip()
        except FileNotFoundError as e:
            raise ConfigError("admin_token_file", f"{p}: no such file") from e
        except OSError as e:
            raise ConfigError("admin_token_file", f"{p}: cannot read ({e.strerror})") from e
        except UnicodeDecodeError as e:
            raise ConfigError("admin_token_file", f"{p}: not a text token") from e
        if not token:
            raise ConfigError("admin_token_file", f"{p} is empty")
        return _checked(token, "admin_token_file")
    token = (os.environ if environ is None else environ).get(TOKEN_ENV, "").strip()
    return _checked(token, TOKEN_ENV) if token else None


def _checked(token: str, where: str) -> str:
    # gRPC metadata values must be printable ASCII; a short token is guessable.
    if not token.isascii() or not token.isprintable():
        raise ConfigError(where, "the admin token must be printable ASCII")
    if len(token) < 16:
        raise ConfigError(where, f"the admin token is {len(token)} characters; use at least 16")
    return token


def check_admin_exposure(cfg: ServeConfig, *, admin_port: int | None = None,
                         environ: dict[str, str] | None = None) -> str | None:
    """Refuse an admin service off loopback without a token; return the token (or ``None``).
    ``admin_port`` overrides ``cfg.admin_port`` (a worker's slot port)."""
    if (cfg.admin_port if admin_port is None else admin_port) < 0:
        return None
    token = admin_token(cfg, environ=environ)
    if token is None and not is_loopback(cfg.admin_host):
        raise ConfigError("admin_token_file", f"admin_host {cfg.admin_host!r} is not a loopback address, so the "
                                              f"admin service needs a token: set admin_token_file (or "
                                              f"{TOKEN_ENV})")
    return token


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying ``token`` (for the ``twotower admin`` client)."""
    return ((HEADER, SCHEME + token),)


def token_interceptor(token: str) -> grpc.aio.ServerInterceptor:
    """A server interceptor that fails every call without the right bearer token with
    UNAUTHENTICATED (the message does not say which part was wrong)."""
    import grpc

    expected = (SCHEME + token).encode()

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "admin: missing or invalid bearer token "
                                                             "(metadata 'authorization: Bearer <token>')")

    denied = grpc.unary_unary_rpc_method_handler(deny)

    class TokenInterceptor(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                    handler_call_details: grpc.HandlerCallDetails) -> Any:
            got = ""
            for key, value in handler_call_details.invocation_metadata or ():
                if key == HEADER:
                    got = value if isinstance(value, str) else value.decode("latin-1")
            if hmac.compare_digest(got.encode("utf-8", errors="replace"), expected):
                return await continuation(handler_call_details)
            return denied

    return TokenInterceptor()
