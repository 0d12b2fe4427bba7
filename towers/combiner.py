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
    query  = normalize(g * user + (1 - g) * s)

No session → g = 1 (the user alone); unknown user → g = 0 (the session alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PARAM_NAMES = ("W_s", "w_a", "pos_bias", "w_g", "b_g")


@dataclass(frozen=True)
class CombinerParams:
    W_s: np.ndarray  # (d, d)
    w_a: np.ndarray  # (d,)
    pos_bias: np.ndarray  # (N,)
    w_g: np.ndarray  # (2d,)
    b_g: np.ndarray  # (1,)

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

    def arrays(self) -> dict[str, np.ndarray]:
        return {n: np.ascontiguousarray(getattr(self, n), dtype=np.float32) for n in PARAM_NAMES}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> CombinerParams:
        p = cls(**{n: np.asarray(arrays[n], dtype=np.float32) for n in PARAM_NAMES})
        p.validate()
        return p


def combine(
    p: CombinerParams, user: np.ndarray, has_user: np.ndarray, sess: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    """Queries (B, d), float32, unit norm; all-zero rows where there is neither user nor session."""
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
    norm = np.linalg.norm(q, axis=1, keepdims=True)
    return (q / np.maximum(norm, 1e-12)).astype(np.float32)
