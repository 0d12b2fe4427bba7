"""int8 user embeddings with a per-dimension symmetric scale, calibrated (numpy only).

Why per dimension: tower outputs are unit vectors whose dimensions have very different
spreads, so one global scale wastes most of the 256 levels on the quiet dimensions.
Why calibrated: the scale is a clipping range; clipping the rare extreme values buys
resolution for the rest. Which percentile is best depends on the data, so candidates
are fitted on one set of users and judged on *held-out* users by what serving cares
about, the error in the scores the queries give the catalog (relative MSE), not the
error in the vectors.

The scale is stored once per version (the bundle manifest, ``quant.user_embeddings``)
and carries a 4-byte tag (a hash of its bytes) that every int8 value in the feature
store starts with, so a value can never be decoded with another version's scale.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Percentiles of |x| per dimension tried as the clipping range (100 = the max: no clipping).
CLIP_PERCENTILES: tuple[float, ...] = (100.0, 99.99, 99.9, 99.5, 99.0, 98.0)
TAG_BYTES = 4


def scale_tag(scale: np.ndarray) -> bytes:
    """The 4-byte identity of a scale vector (first bytes of the sha256 of its float32 bytes)."""
    return hashlib.sha256(np.asarray(scale, dtype="<f4").tobytes()).digest()[:TAG_BYTES]


def int8_scale(vectors: np.ndarray, clip_percentile: float = 100.0) -> np.ndarray:
    """(d,) float32 symmetric per-dimension scale: the clip_percentile of |x| maps to 127."""
    a = np.abs(np.asarray(vectors, dtype=np.float32))
    hi = a.max(axis=0) if clip_percentile >= 100.0 else np.percentile(a, clip_percentile, axis=0)
    return (np.maximum(hi, 1e-12) / 127.0).astype(np.float32)


def quantize_int8(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Round to the nearest level and clip to [-127, 127] (symmetric: no -128, so 0 is exact)."""
    q = np.rint(np.asarray(x, dtype=np.float32) / scale)
    return np.clip(q, -127, 127).astype(np.int8)


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (np.asarray(q, dtype=np.float32) * np.asarray(scale, dtype=np.float32)).astype(np.float32)


def score_rel_mse(queries: np.ndarray, approx: np.ndarray, items: np.ndarray) -> float:
    """||approx·Iᵀ − queries·Iᵀ||² / ||queries·Iᵀ||²: the score error serving would see."""
    ref = queries @ items.T
    err = approx @ items.T - ref
    return float(np.sum(err.astype(np.float64) ** 2) / max(float(np.sum(ref.astype(np.float64) ** 2)), 1e-30))


@dataclass(frozen=True)
class Int8Calibration:
    """The chosen scale, how it was chosen, and the error of every candidate."""

    scale: np.ndarray  # (d,) float32
    clip_percentile: float
    rel_mse: dict[str, float]  # candidate percentile → relative MSE of held-out scores
    fit_users: int
    heldout_users: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> bytes:
        return scale_tag(self.scale)

    def to_manifest(self) -> dict[str, Any]:
        return {"dtype": "int8", "scale": [float(v) for v in self.scale], "scale_tag": self.tag.hex(),
                "clip_percentile": self.clip_percentile, "rel_mse_by_clip": self.rel_mse,
                "rel_mse": self.rel_mse[f"{self.clip_percentile:g}"], "fit_users": self.fit_users,
                "heldout_users": self.heldout_users, "symmetric": True, "per": "dimension", **self.extra}


def calibrate_int8(*, fit: np.ndarray, heldout: np.ndarray, items: np.ndarray,
                   to_queries: Callable[[np.ndarray], np.ndarray] | None = None,
                   clips: Sequence[float] = CLIP_PERCENTILES) -> Int8Calibration:
    """Fit a scale per candidate clipping percentile on ``fit`` users; choose the one whose
    held-out users' scores against ``items`` move least.

    ``to_queries`` maps held-out user vectors to the queries serving would run (the session
    combiner with each user's real session, for trained bundles); by default a user's
    vector is its query.
    """
    to_q = to_queries or (lambda u: u)
    ref_q = to_q(np.asarray(heldout, dtype=np.float32))
    errs: dict[str, float] = {}
    best: tuple[float, float, np.ndarray] | None = None
    for c in clips:
        s = int8_scale(fit, c)
        e = score_rel_mse(ref_q, to_q(dequantize_int8(quantize_int8(heldout, s), s)), items)
        errs[f"{c:g}"] = e
        if best is None or e < best[0]:
            best = (e, c, s)
    assert best is not None, "no clipping candidates"
    return Int8Calibration(scale=best[2], clip_percentile=best[1], rel_mse=errs, fit_users=len(fit),
                           heldout_users=len(heldout))


def calibration_from_manifest(entry: Mapping[str, Any]) -> np.ndarray:
    """The scale recorded in a manifest's ``quant.user_embeddings``, checked against its tag."""
    scale = np.asarray(entry["scale"], dtype=np.float32)
    if scale_tag(scale).hex() != entry.get("scale_tag"):
        raise ValueError("int8 user-embedding scale does not match its recorded tag")
    return scale
