"""``twotower admin status|reload``: talk to a server's admin surface (a separate,
localhost-bound gRPC port: ``admin_port`` in the serve config)."""

from __future__ import annotations

import argparse
import json
import os

from online.admin_auth import TOKEN_ENV
from online.tls import add_client_tls_flags, client_credentials


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("admin", help="loaded version, load state, last error; trigger a reload")
    p.add_argument("action", choices=["status", "reload"])
    p.add_argument("--target", default="127.0.0.1:50052", help="the admin port (host:port)")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV) or None,
                   help=f"bearer token of a non-loopback admin port (default: ${TOKEN_ENV})")
    add_client_tls_flags(p)
    p.set_defaults(func=cmd_admin)


def cmd_admin(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from online.admin_auth import bearer
    from online.proto import recommender_pb2 as pb
    from online.proto import recommender_pb2_grpc as pb_grpc
    from towers.errors import TwoTowerError

    creds = client_credentials(args)
    metadata = bearer(args.token) if args.token else None
    with grpc.insecure_channel(args.target) if creds is None else grpc.secure_channel(args.target, creds) as ch:
        stub = pb_grpc.AdminStub(ch)
        try:
            if args.action == "status":
                resp = stub.Status(pb.StatusRequest(), timeout=5, metadata=metadata)
            else:
                resp = stub.Reload(pb.ReloadRequest(), timeout=120, metadata=metadata)
        except grpc.RpcError as e:
            raise TwoTowerError(f"{e.code().name}: {e.details()}") from e
    print(json.dumps(MessageToDict(resp, always_print_fields_with_no_presence=True), indent=1))
    return 0
