"""gRPC server reflection under both of its names, so ``grpcurl``, Postman and Kreya list and
describe the services.

``grpcio-reflection`` (1.85) implements only ``grpc.reflection.v1alpha.ServerReflection``;
newer clients (grpcurl >= 1.9 and the GUI tools) ask for ``grpc.reflection.v1`` first. The two
protocols' messages are the same fields under another package name, so one servicer serves
both: registered as usual for v1alpha, and again, by a generic handler, at the v1 method path
(the bytes on the wire decode identically with the v1alpha message classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE: str = reflection.SERVICE_NAME


def enable_reflection(service_names: Sequence[str], server: Any) -> None:
    """Reflection for ``service_names`` (and itself, both versions) on ``server`` (``grpc.Server``
    or ``grpc.aio.Server``)."""
    names = (*service_names, V1ALPHA_SERVICE, V1_SERVICE)
    servicer = (reflection.aio.ReflectionServicer(names) if isinstance(server, grpc.aio.Server)
                else reflection.ReflectionServicer(names))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    info = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": info}),))
