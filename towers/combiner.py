"""The session combiner as serving runs it: a few numpy operations over
precomputed user and item embeddings. ``towers.model.SessionCombiner`` is the
trainable torch twin; a test checks both give the same query.

Shapes (B = batch, N = session length, d = embedding dim)::

    user  (B, d)    precomputed user-tower output (zeros for an unknown user)
    sess  (B, N, d) precomputed item-tower outputs of the recent items,
                    most recent first, zero-padded
    mask  (B, N)    True where ``sess`` holds a real item

    logits = pos_bias[:N] + sess @ w_a          (B, N)     recency + content attention
    s      = (softmax(logits | mask) · sess) @ W_s  (B, d) W_s: asymmetric "what comes next"
    g      = sigmoid([user, s] @ w_g + b_g)     (B,)       how much to trust the user vs session
    c      = request-time context term          (B, d)     ``towers.context.context_term``
    query  = normalize(g * user + (1 - g) * s + c)

No session → g = 1 (the user alone); unknown user → g = 0 (the session alone). The
context term is a sum of learned d-dim vectors, one per declared context feature (a table
row for a categorical/bucketized value, ``z * w + missing * m`` for a numeric one), kept
in ``CombinerParams.context`` by feature name; it only shifts a query that exists (a
request with neither user nor session still gets no query).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

PARAM_NAMES = ("W_s", "w_a", "pos_bias", "w_g", "b_g")
# Context arrays are stored beside the core ones as ``context.<feature name>``: (rows, d) for a
# categorical/bucketized feature's table, (2, d) = [w; m] for a numeric one. Bundles whose spec
# declares no context features have none.
CONTEXT_PREFIX = "context."


@dataclass(frozen=True)
class CombinerParams:
    W_s: np.ndarray  # (d, d)
    w_a: np.ndarray  # (d,)
    pos_bias: np.ndarray  # (N,)
    w_g: np.ndarray  # (2d,)
    b_g: np.ndarray  # (1,)
    context: Mapping[str, np.ndarray] = field(default_factory=dict)  # feature name -> (rows, d) float32

    @property
    def dim(self) -> int:
        return int(self.W_s.shape[0])

    @property
    def max_session(self) -> int:
        return int(self.pos_bias.shape[0])

    def validate(self) -> None:
        d = self.dim
        expected = {"W_s": (d, d), "w_a": (d,), "pos_bias": (self.max_session,), "w_g": (2 * d,), "b_g": (1,)}
        for name, shape in expected.items():
            got = getattr(self, name).shape
            if got != shape:
                raise ValueError(f"combiner {name} has shape {got}, expected {shape}")
        for name, a in self.context.items():
            # Which features and how many rows is the pipeline's business (towers.context.check).
            if a.ndim != 2 or a.shape[1] != d or a.shape[0] < 1:
                raise ValueError(f"combiner context array {name!r} has shape {a.shape}, expected (rows, {d})")

    def arrays(self) -> dict[str, np.ndarray]:
        out = {n: np.ascontiguousarray(getattr(self, n), dtype=np.float32) for n in PARAM_NAMES}
        out.update({CONTEXT_PREFIX + k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.context.items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> CombinerParams:
        unknown = sorted(k for k in arrays if k not in PARAM_NAMES and not k.startswith(CONTEXT_PREFIX))
        if unknown:
            raise ValueError(f"unknown combiner array {unknown[0]!r}")
        context = {k[len(CONTEXT_PREFIX):]: np.asarray(v, dtype=np.float32)
                   for k, v in arrays.items() if k.startswith(CONTEXT_PREFIX)}
        p = cls(**{n: np.asarray(arrays[n], dtype=np.float32) for n in PARAM_NAMES}, context=context)
        p.validate()
        return p


def combine(
    p: CombinerParams, user: np.ndarray, has_user: np.ndarray, sess: np.ndarray, mask: np.ndarray,
    context: np.ndarray | None = None,
) -> np.ndarray:
    """Queries (B, d), float32, unit norm; all-zero rows where there is neither user nor session.
    ``context``: the (B, d) context term (``towers.context.context_term``); None = no context."""
    _, n, d = sess.shape
    has_sess = mask.any(axis=1)
    logits = p.pos_bias[:n][None, :] + sess @ p.w_a
    logits = np.where(mask, logits, -np.inf)
    mx = np.where(has_sess, logits.max(axis=1, initial=-np.inf), 0.0)
    w = np.where(mask, np.exp(logits - mx[:, None]), 0.0)
    w /= np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
    # W_s is linear, so pool first and transform once: (B,d)@(d,d) instead of (B*N,d)@(d,d).
    # Tiny GEMMs are where BLAS threading overhead dominates on a busy 2-core server.
    pooled = (w.astype(np.float32)[:, None, :] @ sess)[:, 0]
    s = pooled @ p.W_s
    z = user @ p.w_g[:d] + s @ p.w_g[d:] + p.b_g[0]
    g = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid without overflow warnings for large |z|
    g = np.where(has_sess, g, 1.0)
    g = np.where(has_user, g, 0.0)
    q = g[:, None] * user + (1.0 - g)[:, None] * s
    if context is not None:
        q = q + np.where((has_user | has_sess)[:, None], context, 0.0)
    norm = np.linalg.norm(q, axis=1, keepdims=True)
    return (q / np.maximum(norm, 1e-12)).astype(np.float32)
