"""The request path's vocabulary, typed once and used from parsing to metrics.

- ``Rung``: the degradation ladder (DESIGN §3), best first. Values are the proto's
  ``twotower.v1.Rung``: a response's rung goes on the wire as it is.
- ``Source``: where a response's list came from. Where a rung and a source share a name
  (batch, popularity) they share the value, so the two never read as each other's opposite.
- ``Mode``: what the caller asked for; values are the proto's ``twotower.v1.Mode``.

IntEnums: a batch keeps them in numpy int8 arrays (one code per request, no per-request
object), a response holds the member, and metrics and logs print its ``label``
(``str()`` and f-strings give the label too, never the number).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Self


class _Labelled(IntEnum):
    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> Self:
        """The member named ``label`` (``"no_session"`` -> ``NO_SESSION``); KeyError if none."""
        return cls[label.upper()]

    @classmethod
    def labels(cls) -> tuple[str, ...]:
        return tuple(m.label for m in cls)

    def __str__(self) -> str:
        return self.label

    def __format__(self, spec: str) -> str:
        return format(self.label, spec)


class Rung(_Labelled):
    UNSPECIFIED = 0
    FULL = 1  # the user embedding (store or the bundle's copy of the same version) and the session
    NO_SESSION = 2  # the feature store failed or ran late: the user embedding alone
    BATCH = 3  # the nightly precomputed top-K
    POPULARITY = 4  # the most popular items not excluded: the rung that cannot fail


class Source(_Labelled):
    ONLINE = 0  # a search with the user embedding and the session
    SESSION_ONLY = 1  # a search with the session alone (no user embedding)
    USER_ONLY = 2  # a search with the user embedding alone (no session)
    BATCH = 3  # the precomputed list
    POPULARITY = 4  # the popularity list


class Mode(_Labelled):
    AUTO = 0  # online scoring; falls back to batch/popularity when needed
    ONLINE = 1  # online scoring (still degrades rather than fails)
    BATCH = 2  # the precomputed top-K: one lookup
