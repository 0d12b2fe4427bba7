"""``python -m online.health_probe --target HOST:PORT``: exit 0 when the standard gRPC
health service says SERVING, 1 otherwise (NOT_SERVING, no answer, refused, TLS failure).

Why this and not ``grpc_health_probe``: the container's Docker ``HEALTHCHECK`` (and the
compose health check) need a gRPC health client inside the image. The serving image
already has grpcio and grpcio-health-checking, so a few lines of Python do it without
downloading and pinning another binary, and it speaks the same TLS flags as the other
clients (``--tls-ca``, ``--tls-cert``, ``--tls-key``). Kubernetes does not need it: its
native ``grpc`` probes call the same health service (plaintext only; a pod serving TLS
uses this module as an ``exec`` probe instead).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from online.tls import add_client_tls_flags, client_credentials
from towers.errors import TwoTowerError

if TYPE_CHECKING:
    import grpc


def probe(target: str, *, service: str = "", timeout: float = 2.0,
          credentials: grpc.ChannelCredentials | None = None) -> str:
    """The serving status name (``SERVING``, ``NOT_SERVING``, ...) or ``UNREACHABLE: <code>``."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
    with channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=timeout)
        except grpc.RpcError as e:
            return f"UNREACHABLE: {e.code().name}"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m online.health_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="127.0.0.1:50051", help="host:port of the serving port")
    ap.add_argument("--service", default="", help="health service name ('' = the whole server)")
    ap.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    add_client_tls_flags(ap)
    args = ap.parse_args(argv)
    try:
        status = probe(args.target, service=args.service, timeout=args.timeout, credentials=client_credentials(args))
    except TwoTowerError as e:  # a bad TLS flag
        print(f"health_probe: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.target}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
