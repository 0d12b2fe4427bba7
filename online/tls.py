"""TLS material for the serving port, the admin port and the clients: read the PEM
files named by the flags, check them, and turn them into gRPC credentials.

Why a module of its own: gRPC's own errors for bad TLS files are vague ("Failed to
add port", or a handshake that never completes), and they surface late (in a worker
process, or at the first call). Here every file is read and checked once, at the
edge, and an error names the flag (or config setting) and the file: missing,
unreadable, not PEM, the wrong kind of PEM, an encrypted key (gRPC cannot use one),
or a key that does not belong to the certificate.

The checks use only the standard library (``ssl``), and ``grpc`` is imported inside
the functions that build credentials: the worker supervisor validates TLS before it
spawns workers and must stay free of gRPC state (``online.supervisor``).
"""

from __future__ import annotations

import argparse
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from towers.errors import ConfigError

if TYPE_CHECKING:
    import grpc

    from online.config import TLSConfig

PEM_CERT = "CERTIFICATE"
PEM_KEY = "PRIVATE KEY"


def read_pem(path: str | Path, *, flag: str, kind: str) -> bytes:
    """The bytes of a PEM file holding at least one ``kind`` block (``CERTIFICATE`` or
    ``PRIVATE KEY``); ``ConfigError`` naming ``flag`` and the file otherwise."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError as e:
        raise ConfigError(flag, f"{p}: no such file") from e
    except IsADirectoryError as e:
        raise ConfigError(flag, f"{p}: is a directory, expected a PEM file") from e
    except OSError as e:
        raise ConfigError(flag, f"{p}: cannot read ({e.strerror})") from e
    if b"-----BEGIN " not in data:
        raise ConfigError(flag, f"{p}: not a PEM file (no '-----BEGIN' line)")
    if kind == PEM_KEY and b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data:
        raise ConfigError(flag, f"{p}: the private key is encrypted; gRPC needs an unencrypted key")
    # "PRIVATE KEY" also matches "RSA PRIVATE KEY" and "EC PRIVATE KEY" blocks.
    if f"{kind}-----".encode() not in data:
        raise ConfigError(flag, f"{p}: holds no PEM {kind} block")
    return data


def _check_certificates(pem: bytes, *, flag: str, path: str | Path) -> None:
    """The certificate blocks must parse: a truncated or garbled PEM fails here, not in a handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cadata=pem.decode("ascii", errors="replace"))
    except (ssl.SSLError, ValueError) as e:
        raise ConfigError(flag, f"{path}: not a valid PEM certificate ({e})") from e


def _check_pair(cert: bytes, key: bytes, *, cert_flag: str, key_flag: str, cert_path: str | Path,
                key_path: str | Path) -> None:
    """The key must belong to the certificate (ssl wants files, so a private temp dir holds copies)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory(prefix="twotower-tls-") as tmp:
        c, k = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        c.write_bytes(cert)
        k.touch(mode=0o600)
        k.write_bytes(key)
        try:
            ctx.load_cert_chain(c, k)
        except ssl.SSLError as e:
            if "KEY_VALUES_MISMATCH" in str(e) or "key values mismatch" in str(e):
                raise ConfigError(key_flag, f"{key_path} is not the private key of {cert_path} "
                                            f"({cert_flag})") from e
            raise ConfigError(key_flag, f"{key_path}: not a usable private key for {cert_path} ({e})") from e


@dataclass(frozen=True)
class ServerTLS:
    """Checked PEM bytes for a TLS (``client_ca`` set: mutual TLS) server port."""

    cert: bytes
    key: bytes
    client_ca: bytes | None

    def credentials(self) -> grpc.ServerCredentials:
        """With a client CA, a client must present a certificate that CA signed (mutual TLS)."""
        import grpc

        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)


def load_server_tls(tls: TLSConfig) -> ServerTLS | None:
    """``None`` when TLS is off (no cert and no key); checked PEM bytes otherwise."""
    names = {"cert": "tls.cert (--tls-cert)", "key": "tls.key (--tls-key)",
             "client_ca": "tls.client_ca (--tls-client-ca)"}
    if not tls.cert and not tls.key:
        if tls.client_ca:
            raise ConfigError(names["client_ca"], "mutual TLS needs a server certificate: set --tls-cert and "
                                                  "--tls-key too")
        return None
    if not tls.cert or not tls.key:
        missing = "cert" if not tls.cert else "key"
        raise ConfigError(names[missing], "TLS needs both --tls-cert and --tls-key")
    cert = read_pem(tls.cert, flag=names["cert"], kind=PEM_CERT)
    _check_certificates(cert, flag=names["cert"], path=tls.cert)
    key = read_pem(tls.key, flag=names["key"], kind=PEM_KEY)
    _check_pair(cert, key, cert_flag=names["cert"], key_flag=names["key"], cert_path=tls.cert, key_path=tls.key)
    ca = None
    if tls.client_ca:
        ca = read_pem(tls.client_ca, flag=names["client_ca"], kind=PEM_CERT)
        _check_certificates(ca, flag=names["client_ca"], path=tls.client_ca)
    return ServerTLS(cert=cert, key=key, client_ca=ca)


def channel_credentials(*, ca: str | Path | None = None, cert: str | Path | None = None,
                        key: str | Path | None = None) -> grpc.ChannelCredentials:
    """Client credentials: trust ``ca`` (the system's roots when ``None``) and, for mutual
    TLS, present ``cert`` with ``key``. Flags in errors are the CLI's ``--tls-*``."""
    import grpc

    if (cert is None) != (key is None):
        raise ConfigError("--tls-cert" if cert is None else "--tls-key",
                          "a client certificate needs both --tls-cert and --tls-key")
    root = None
    if ca is not None:
        root = read_pem(ca, flag="--tls-ca", kind=PEM_CERT)
        _check_certificates(root, flag="--tls-ca", path=ca)
    chain = private = None
    if cert is not None and key is not None:
        chain = read_pem(cert, flag="--tls-cert", kind=PEM_CERT)
        _check_certificates(chain, flag="--tls-cert", path=cert)
        private = read_pem(key, flag="--tls-key", kind=PEM_KEY)
        _check_pair(chain, private, cert_flag="--tls-cert", key_flag="--tls-key", cert_path=cert, key_path=key)
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=private, certificate_chain=chain)


def add_client_tls_flags(p: argparse.ArgumentParser) -> None:
    """``--tls``/``--tls-ca``/``--tls-cert``/``--tls-key``; read by ``client_credentials``."""
    p.add_argument("--tls", action="store_true", help="use TLS, trusting the system's root certificates")
    p.add_argument("--tls-ca", default=None, help="PEM CA bundle to verify the server with (implies --tls)")
    p.add_argument("--tls-cert", default=None, help="PEM client certificate for mutual TLS (implies --tls)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")


def client_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """``grpc.ChannelCredentials`` from the client TLS flags, or ``None`` for plaintext."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    return channel_credentials(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
