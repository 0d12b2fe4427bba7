"""Malformed request bytes as INVALID_ARGUMENT naming the field, not UNKNOWN.

gRPC Python runs a method's request deserializer before the handler; when it raises
(protobuf's DecodeError: a string that is not UTF-8, a truncated or corrupt message)
the call ends with UNKNOWN ("Unexpected <class 'DecodeError'>"), which breaks DESIGN
§3's "bad input gets a clear error". ``lenient_deserializer`` returns a
``MalformedRequest`` instead, carrying an ``InvalidRequest`` whose field is found by
walking the wire format (``locate``): the servicer raises it like any other
validation error. Protobuf's own message does not say which field is bad.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from towers.errors import InvalidRequest


@dataclass(frozen=True)
class MalformedRequest:
    """What the lenient deserializer hands the servicer for undecodable bytes."""

    error: InvalidRequest


def lenient_deserializer(cls: Any) -> Callable[[bytes], Any]:
    """``cls.FromString``, or a ``MalformedRequest`` naming the field that does not decode."""

    def parse(raw: bytes) -> Any:
        try:
            return cls.FromString(raw)
        except DecodeError as e:
            reason = str(e).rpartition(": ")[2] or "does not decode"
            return MalformedRequest(InvalidRequest(locate(cls.DESCRIPTOR, raw) or "request",
                                                   f"malformed {cls.DESCRIPTOR.name}: {reason}"))

    return parse


def _varint(raw: bytes, pos: int) -> tuple[int, int] | None:
    value = shift = 0
    while pos < len(raw) and shift < 70:
        b = raw[pos]
        value |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not b & 0x80:
            return value, pos
    return None


def locate(descriptor: Descriptor, raw: bytes, path: str = "") -> str | None:
    """The path of the first field of ``raw`` that does not decode (``user_id``,
    ``session.recent_item_ids``, ``events[3].item_id``), or None if every field does."""
    pos = 0
    seen: dict[int, int] = {}  # occurrences of each repeated message field so far
    while pos < len(raw):
        tag = _varint(raw, pos)
        if tag is None:
            return path.rstrip(".") or None
        key, pos = tag
        number, wire_type = key >> 3, key & 7
        field = descriptor.fields_by_number.get(number)
        name = path + (field.name if field is not None else f"<field {number}>")
        if field is not None and field.is_repeated and field.type == FieldDescriptor.TYPE_MESSAGE:
            name += f"[{seen.get(number, 0)}]"
            seen[number] = seen.get(number, 0) + 1
        if wire_type == 0:
            v = _varint(raw, pos)
            if v is None:
                return name
            pos = v[1]
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            if pos > len(raw):
                return name
        elif wire_type == 2:
            n = _varint(raw, pos)
            if n is None or n[1] + n[0] > len(raw):
                return name
            body, pos = raw[n[1]: n[1] + n[0]], n[1] + n[0]
            if field is not None and field.type == FieldDescriptor.TYPE_STRING:
                try:
                    body.decode("utf-8")
                except UnicodeDecodeError:
                    return name
            elif field is not None and field.message_type is not None:
                inner = locate(field.message_type, body, name + ".")
                if inner is not None:
                    return inner
        else:  # groups (3, 4) or an invalid wire type: proto3 has neither
            return name
    return None
