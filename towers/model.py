"""The trainable towers (PyTorch). Imported by offline jobs only: serving runs
on the arrays these produce (``towers.combiner``, ``towers.bundle``).

The model config is a dataclass saved inside every bundle manifest, so a bundle
can rebuild its towers with nothing else (nightly refresh, distillation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from towers.combiner import CombinerParams
from towers.features import FeaturePipeline


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 64  # output embedding size (FAISS dimension)
    id_dim: int = 64  # user/item id embedding size
    side_dim: int = 8  # each categorical side feature's embedding size
    hidden: int = 128  # tower MLP width
    dropout: float = 0.1
    max_session: int = 10  # N: recent items the combiner reads, most recent first
    temperature: float = 0.07
    logq: bool = True  # subtract log sampling probability from in-batch logits (Yi et al. 2019)
    user_id_dropout: float = 0.3  # train-time: zero the user id embedding, so the session has to carry signal

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _mlp(inp: int, cfg: ModelConfig) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, cfg.dim))


class UserTower(nn.Module):
    def __init__(self, cfg: ModelConfig, fp: FeaturePipeline) -> None:
        super().__init__()
        self.cfg = cfg
        self.user = nn.Embedding(fp.user_vocab.size, cfg.id_dim)
        self.age = nn.Embedding(fp.n_age_buckets, cfg.side_dim)
        self.gender = nn.Embedding(fp.gender_vocab.size, cfg.side_dim)
        self.occupation = nn.Embedding(fp.occupation_vocab.size, cfg.side_dim)
        self.zip = nn.Embedding(fp.zip_vocab.size, cfg.side_dim)
        self.mlp = _mlp(cfg.id_dim + 4 * cfg.side_dim, cfg)
        nn.init.normal_(self.user.weight, std=0.05)

    def forward(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        uid = self.user(f["user"])
        if self.training and self.cfg.user_id_dropout > 0:
            keep = (torch.rand(uid.shape[0], 1) >= self.cfg.user_id_dropout).to(uid.dtype)
            uid = uid * keep
        x = torch.cat([uid, self.age(f["age"]), self.gender(f["gender"]), self.occupation(f["occupation"]),
                       self.zip(f["zip"])], dim=1)
        return F.normalize(self.mlp(x), dim=1)


class ItemTower(nn.Module):
    def __init__(self, cfg: ModelConfig, fp: FeaturePipeline) -> None:
        super().__init__()
        self.item = nn.Embedding(fp.item_vocab.size, cfg.id_dim)
        self.year = nn.Embedding(fp.n_year_buckets, cfg.side_dim)
        self.genres = nn.Linear(max(len(fp.genre_vocab), 1), cfg.side_dim * 2, bias=False)
        self.mlp = _mlp(cfg.id_dim + 3 * cfg.side_dim, cfg)
        nn.init.normal_(self.item.weight, std=0.05)

    def forward(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.cat([self.item(f["item"]), self.year(f["year"]), self.genres(f["genres"])], dim=1)
        return F.normalize(self.mlp(x), dim=1)


class SessionCombiner(nn.Module):
    """Torch twin of ``towers.combiner.combine``; the formulas must stay identical."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.W_s = nn.Parameter(torch.eye(d))
        self.w_a = nn.Parameter(torch.zeros(d))
        # Recency prior: the latest item weighs most at initialisation.
        self.pos_bias = nn.Parameter(-0.3 * torch.arange(cfg.max_session, dtype=torch.float32))
        self.w_g = nn.Parameter(torch.zeros(2 * d))
        self.b_g = nn.Parameter(torch.zeros(1))

    def forward(self, user: torch.Tensor, has_user: torch.Tensor, sess: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        _b, n, d = sess.shape
        has_sess = mask.any(dim=1)
        h = sess @ self.W_s
        logits = self.pos_bias[:n][None, :] + sess @ self.w_a
        logits = logits.masked_fill(~mask, float("-inf"))
        # Rows without a session would softmax to NaN; give them a dummy finite row, then zero them.
        logits = torch.where(has_sess[:, None], logits, torch.zeros_like(logits))
        w = torch.softmax(logits, dim=1) * mask.to(sess.dtype)
        s = torch.einsum("bn,bnd->bd", w, h)
        g = torch.sigmoid(user @ self.w_g[:d] + s @ self.w_g[d:] + self.b_g[0])
        g = torch.where(has_sess, g, torch.ones_like(g))
        g = torch.where(has_user, g, torch.zeros_like(g))
        q = g[:, None] * user + (1.0 - g)[:, None] * s
        return F.normalize(q, dim=1, eps=1e-12)

    def export(self) -> CombinerParams:
        with torch.no_grad():
            return CombinerParams.from_arrays({
                "W_s": self.W_s.numpy().copy(), "w_a": self.w_a.numpy().copy(),
                "pos_bias": self.pos_bias.numpy().copy(), "w_g": self.w_g.numpy().copy(),
                "b_g": self.b_g.numpy().copy(),
            })


class TwoTower(nn.Module):
    def __init__(self, cfg: ModelConfig, fp: FeaturePipeline) -> None:
        super().__init__()
        self.cfg = cfg
        self.user_tower = UserTower(cfg, fp)
        self.item_tower = ItemTower(cfg, fp)
        self.combiner = SessionCombiner(cfg)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Weights as plain arrays (saved without pickle)."""
        return {k: v.detach().cpu().numpy().copy() for k, v in self.state_dict().items()}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})


def to_tensors(f: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in f.items()}


@torch.no_grad()
def embed_items(model: TwoTower, fp: FeaturePipeline, batch: int = 65536) -> np.ndarray:
    """Item embeddings for every catalog row, (n_items, dim) float32."""
    model.eval()
    ids = fp.item_vocab.values
    out = [model.item_tower(to_tensors(fp.item_features(ids[i:i + batch]))).numpy() for i in range(0, len(ids), batch)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, model.cfg.dim), np.float32)


@torch.no_grad()
def embed_users(model: TwoTower, fp: FeaturePipeline, batch: int = 65536) -> np.ndarray:
    """User embeddings for every user row, (n_users, dim) float32."""
    model.eval()
    ids = fp.user_vocab.values
    out = [model.user_tower(to_tensors(fp.user_features(ids[i:i + batch]))).numpy() for i in range(0, len(ids), batch)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, model.cfg.dim), np.float32)
