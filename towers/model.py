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
from towers.context import table_shape
from towers.encoders import Encoder
from towers.errors import ConfigError
from towers.features import FeaturePipeline


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 64  # output embedding size (FAISS dimension)
    id_dim: int = 64  # user/item id embedding size
    side_dim: int = 8  # a categorical/bucketized/numeric feature's width (multi-valued and text: twice it)
    hidden: int = 128  # tower MLP width
    dropout: float = 0.1
    max_session: int = 10  # N: recent items the combiner reads, most recent first
    temperature: float = 0.07
    logq: bool = True  # subtract log sampling probability from in-batch logits (Yi et al. 2019)
    user_id_dropout: float = 0.3  # train-time: zero the user id embedding, so the session has to carry signal
    # The user tower reads the user's long-term history: the item tower's embeddings of the
    # last ``history_len`` items before the embedding time, pooled. 0: features (and id) only.
    # A refresh re-embeds users from new history without retraining.
    history_len: int = 50
    # Train-time: the user tower's history ends 0..history_staleness interactions before the
    # target (uniformly), as a served embedding lags the session by up to a refresh. Chosen on
    # validation only (bench/default_sweep.py over ML-100k and the shop example: mean
    # validation Recall@20 0 -> 0.3593, 1 -> 0.3573, 2 -> 0.3683, 4 -> 0.3696; the margin over
    # 2 is within one seed's noise).
    history_staleness: int = 4
    user_id: bool = True  # the user id embedding (off: a user is their features + history)
    item_id: bool = True  # the item id embedding (off: an item is its content features)
    item_id_dropout: float = 0.0  # train-time: zero item ids so content carries signal for new items

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _mlp(inp: int, cfg: ModelConfig) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, cfg.dim))


def _dropout_rows(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p <= 0:
        return x
    return x * (torch.rand(x.shape[0], 1) >= p).to(x.dtype)


def feature_width(enc: Encoder, cfg: ModelConfig) -> int:
    """The width of a feature's layer output: the spec's ``dim``, else by kind."""
    if enc.spec.dim is not None:
        return enc.spec.dim
    return 2 * cfg.side_dim if enc.kind in ("multi_categorical", "text") else cfg.side_dim


class FeatureLayer(nn.Module):
    """One encoded feature (``towers.encoders``) → (B, width)::

        categorical, bucketized   an embedding row
        multi_categorical, text   the rows of its values, pooled (mean over real values, or sum)
        numeric                   a linear map of the standardised value; missing → a learned value
    """

    def __init__(self, enc: Encoder, width: int) -> None:
        super().__init__()
        self.kind = enc.kind
        self.mean = enc.spec.pooling == "mean" or enc.kind == "text"
        if enc.kind == "numeric":
            self.missing = nn.Parameter(torch.zeros(1))
            self.linear = nn.Linear(1, width)
            return
        pad = 0 if enc.kind in ("multi_categorical", "text") else None
        self.table = nn.Embedding(max(enc.table_rows, 1), width, padding_idx=pad)
        if enc.kind == "multi_categorical" and not self.mean:
            # Sum pooling is a linear map of the multi-hot vector: initialise it like one.
            bound = 1.0 / max(enc.table_rows - 1, 1) ** 0.5
            with torch.no_grad():
                nn.init.uniform_(self.table.weight, -bound, bound)
                self.table.weight[0].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "numeric":
            v = torch.where(x[:, 1:2] > 0.5, self.missing.expand(x.shape[0], 1), x[:, 0:1])
            return self.linear(v)
        if x.dim() == 1:
            return self.table(x)
        mask = (x > 0).to(torch.float32)
        pooled = (self.table(x) * mask[..., None]).sum(dim=1)
        return pooled / mask.sum(dim=1, keepdim=True).clamp(min=1.0) if self.mean else pooled


class _Features(nn.Module):
    """The spec's features of one side, concatenated in declaration order."""

    def __init__(self, encoders: list[Encoder], cfg: ModelConfig) -> None:
        super().__init__()
        self.names = [e.name for e in encoders]
        self.layers = nn.ModuleDict({e.name: FeatureLayer(e, feature_width(e, cfg)) for e in encoders})
        self.width = sum(feature_width(e, cfg) for e in encoders)

    def forward(self, f: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [self.layers[n](f[n]) for n in self.names]


class UserTower(nn.Module):
    def __init__(self, cfg: ModelConfig, fp: FeaturePipeline) -> None:
        super().__init__()
        self.cfg = cfg
        self.user = nn.Embedding(fp.user_vocab.size, cfg.id_dim) if cfg.user_id else None
        # Ids past the trained rows (users added by a refresh, unknown ids) read as "no id",
        # the state user_id_dropout trains for, not as an untrained OOV row.
        self.id_rows = fp.user_vocab.id_rows
        self.features = _Features(fp.user_encoders, cfg)
        width = cfg.id_dim * cfg.user_id + self.features.width
        if cfg.history_len > 0:
            # Attention pooling over the history (recency bias + content score), beside a plain
            # mean; both (B, dim) go into the MLP with a log-length feature.
            self.hist_pos = nn.Parameter(-0.02 * torch.arange(cfg.history_len, dtype=torch.float32))
            self.hist_att = nn.Linear(cfg.dim, 1, bias=False)
            width += 2 * cfg.dim + 1
        if width == 0:
            raise ConfigError("model", "the user tower has no inputs: enable the user id, declare user "
                              "features or read history")
        self.mlp = _mlp(width, cfg)
        if self.user is not None:
            nn.init.normal_(self.user.weight, std=0.05)

    def forward(self, f: dict[str, torch.Tensor], hist: torch.Tensor | None = None,
                hist_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``hist``: (B, L, dim) item-tower embeddings of the history, most recent first;
        ``hist_mask``: (B, L) bool. Required when the config reads history (an empty mask row
        is a user with no history)."""
        parts = self.features(f)
        if self.user is not None:
            ids = f["user"]
            uid = self.user(ids) * (ids < self.id_rows).to(torch.float32)[:, None]
            parts.insert(0, _dropout_rows(uid, self.cfg.user_id_dropout, self.training))
        if self.cfg.history_len > 0:
            if hist is None or hist_mask is None:
                raise ValueError("this user tower reads history: pass hist and hist_mask")
            n = hist.shape[1]
            m = hist_mask.to(hist.dtype)
            count = m.sum(dim=1, keepdim=True)
            mean = (hist * m[..., None]).sum(dim=1) / count.clamp(min=1.0)
            logits = self.hist_pos[:n][None, :] + self.hist_att(hist).squeeze(-1)
            logits = logits.masked_fill(~hist_mask, -1e9)
            att = torch.einsum("bl,bld->bd", torch.softmax(logits, dim=1) * m, hist)
            parts += [mean, att, torch.log1p(count) / 4.0]
        return F.normalize(self.mlp(torch.cat(parts, dim=1)), dim=1)


class ItemTower(nn.Module):
    def __init__(self, cfg: ModelConfig, fp: FeaturePipeline) -> None:
        super().__init__()
        self.cfg = cfg
        self.item = nn.Embedding(fp.item_vocab.size, cfg.id_dim) if cfg.item_id else None
        self.id_rows = fp.item_vocab.id_rows  # as in UserTower: a new item is its content
        self.features = _Features(fp.item_encoders, cfg)
        width = cfg.id_dim * cfg.item_id + self.features.width
        if width == 0:
            raise ConfigError("model", "the item tower has no inputs: enable the item id (ids.item) or "
                              "declare item features")
        self.mlp = _mlp(width, cfg)
        if self.item is not None:
            nn.init.normal_(self.item.weight, std=0.05)

    def forward(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = self.features(f)
        if self.item is not None:
            ids = f["item"]
            iid = self.item(ids) * (ids < self.id_rows).to(torch.float32)[:, None]
            parts.insert(0, _dropout_rows(iid, self.cfg.item_id_dropout, self.training))
        return F.normalize(self.mlp(torch.cat(parts, dim=1)), dim=1)


class SessionCombiner(nn.Module):
    """Torch twin of ``towers.combiner.combine``; the formulas must stay identical.

    ``context_encoders`` (the pipeline's): one learned d-dim vector per context feature
    added to the query (``towers.context``), zero-initialised, so that a model starts out
    ranking as if there were no context."""

    def __init__(self, cfg: ModelConfig, context_encoders: list[Encoder] | None = None) -> None:
        super().__init__()
        d = cfg.dim
        self.W_s = nn.Parameter(torch.eye(d))
        self.w_a = nn.Parameter(torch.zeros(d))
        # Recency prior: the latest item weighs most at initialisation.
        self.pos_bias = nn.Parameter(-0.3 * torch.arange(cfg.max_session, dtype=torch.float32))
        self.w_g = nn.Parameter(torch.zeros(2 * d))
        self.b_g = nn.Parameter(torch.zeros(1))
        encs = context_encoders or []
        # A list, not a dict: feature names may hold "." (a column name), which module keys may not.
        self.context_names = [e.name for e in encs]
        self.context = nn.ParameterList(
            [nn.Parameter(torch.zeros(table_shape(e.kind, e.table_rows, d))) for e in encs])

    def context_term(self, context: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(B, d): categorical/bucketized (B,) → a table row; numeric (B, 2) → z * w + missing * m."""
        out: torch.Tensor | None = None
        for name, table in zip(self.context_names, self.context, strict=True):
            x = context[name]
            v = table[x] if x.dim() == 1 else x[:, 0:1] * table[0] + x[:, 1:2] * table[1]
            out = v if out is None else out + v
        return out

    def forward(self, user: torch.Tensor, has_user: torch.Tensor, sess: torch.Tensor,
                mask: torch.Tensor, context: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``context``: the encoded context features (``FeaturePipeline.context_features``)
        by name; None = no context (the term is left out, as for a spec without context)."""
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
        c = self.context_term(context) if context is not None and self.context_names else None
        if c is not None:
            q = q + torch.where((has_user | has_sess)[:, None], c, torch.zeros_like(c))
        return F.normalize(q, dim=1, eps=1e-12)

    def export(self) -> CombinerParams:
        with torch.no_grad():
            p = CombinerParams(
                W_s=self.W_s.numpy().copy(), w_a=self.w_a.numpy().copy(), pos_bias=self.pos_bias.numpy().copy(),
                w_g=self.w_g.numpy().copy(), b_g=self.b_g.numpy().copy(),
                context={n: t.detach().numpy().copy() for n, t in zip(self.context_names, self.context, strict=True)},
            )
        p.validate()
        return p


class TwoTower(nn.Module):
    def __init__(self, cfg: ModelConfig, fp: FeaturePipeline) -> None:
        super().__init__()
        self.cfg = cfg
        self.user_tower = UserTower(cfg, fp)
        self.item_tower = ItemTower(cfg, fp)
        self.combiner = SessionCombiner(cfg, fp.context_encoders)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Weights as plain arrays (saved without pickle)."""
        return {k: v.detach().cpu().numpy().copy() for k, v in self.state_dict().items()}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})


def model_from_arrays(cfg: ModelConfig, fp: FeaturePipeline, arrays: dict[str, np.ndarray]) -> TwoTower:
    """The towers a bundle's ``towers.npz`` holds, in eval mode (the config is the manifest's)."""
    model = TwoTower(cfg, fp)
    model.load_arrays(arrays)
    return model.eval()


def to_tensors(f: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in f.items()}


@torch.no_grad()
def embed_items(model: TwoTower, fp: FeaturePipeline, batch: int = 65536,
                ids: list[str] | None = None) -> np.ndarray:
    """Item embeddings, (n, dim) float32, for ``ids`` (default: every catalog row, in order)."""
    model.eval()
    ids = fp.item_vocab.values if ids is None else ids
    out = [model.item_tower(to_tensors(fp.item_features(ids[i:i + batch]))).numpy() for i in range(0, len(ids), batch)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, model.cfg.dim), np.float32)


def history_inputs(item_emb: torch.Tensor, hist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, dim) embeddings and (B, L) mask of history item rows ``hist`` (-1 padded)."""
    mask = hist >= 0
    return item_emb[hist.clamp(min=0)] * mask[..., None].to(item_emb.dtype), mask


@torch.no_grad()
def embed_users(model: TwoTower, fp: FeaturePipeline, histories: np.ndarray | None = None, *,
                rows: np.ndarray | None = None, item_emb: np.ndarray | None = None,
                batch: int = 16384) -> np.ndarray:
    """User embeddings, (n, dim) float32, for user rows ``rows`` (default: every row).

    ``histories``: (n, L') item rows per user, most recent first, -1 padded (the first
    ``history_len`` columns are read); None = no history for anyone. ``item_emb``: the item
    tower's embeddings of every catalog row, computed here when not given."""
    model.eval()
    rows = np.arange(fp.n_users) if rows is None else np.asarray(rows, dtype=np.int64)
    ids = [fp.user_vocab.values[r] for r in rows.tolist()]
    L = model.cfg.history_len
    items_t = torch.from_numpy(item_emb if item_emb is not None else embed_items(model, fp)) if L > 0 else None
    if L > 0 and histories is not None and len(histories) != len(rows):
        raise ValueError(f"histories has {len(histories)} rows for {len(rows)} users")
    out = []
    for i in range(0, len(ids), batch):
        f = to_tensors(fp.user_features(ids[i:i + batch]))
        if items_t is None:
            out.append(model.user_tower(f).numpy())
            continue
        h = np.full((len(ids[i:i + batch]), L), -1, np.int64)
        if histories is not None:
            part = histories[i:i + batch, :L]
            h[:, :part.shape[1]] = part
        emb, mask = history_inputs(items_t, torch.from_numpy(h))
        out.append(model.user_tower(f, emb, mask).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, model.cfg.dim), np.float32)
