"""The training loop: examples, the loss both engines share, epochs, early stopping.

Each training interaction is an example: (user, session = the N interactions
before it, most recent first) → target item. Loss: in-batch sampled softmax
with logQ popularity correction (Yi et al., RecSys 2019) and a temperature;
accidental hits (the same item as another row's target) are masked; each
example's cross-entropy weighs its interaction's weight (the spec's event-type
weights; normalised per batch, so unweighted data is the plain mean). AdamW;
early stopping on validation Recall@20 (exact scoring, same combiner).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from offline.datasets import Dataset, Interactions, Split, temporal_split
from offline.evaluate import eval_set, item_counts, metrics_from_ranks
from offline.histories import lagged_items, user_histories
from towers import index as faiss_index
from towers.errors import ConfigError
from towers.features import FeaturePipeline
from towers.model import ModelConfig, TwoTower, embed_items, embed_users, to_tensors
from towers.ranking import RankModel

NEGATIVES = ("in_batch", "full")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 5  # epochs without a validation Recall@20 gain before stopping
    seed: int = 0
    threads: int = 2
    # "in_batch": the softmax is over the batch's targets, logQ-corrected (scales to any
    # catalog). "full": over every catalog item (the item tower runs over the whole catalog
    # each step: affordable at ML-100k's 1,682 items, meant for teachers and small catalogs);
    # no sampling, hence no logQ correction and no accidental hits to mask.
    negatives: str = "in_batch"
    # Validation Recall@20 after each epoch (early stopping, best weights). False: none, the
    # last epoch's weights are the result (the scale bench: exact scoring of every user over a
    # million items would cost more than the epoch it follows).
    validate: bool = True
    # torch's fused AdamW: one pass over each parameter per step. The id tables are dense and
    # catalog-sized, so every step updates every row: at 1M items the default (per-tensor)
    # AdamW is most of an epoch's CPU (bench/train_scale.py), fused ~8x less. Off by default:
    # it rounds differently, so the same seed trains another (equally good) model.
    fused_adam: bool = False
    # Steps per epoch at most (None: the whole epoch). For benchmarks that time a part of an
    # epoch at a scale where the whole one takes an hour.
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.negatives not in NEGATIVES:
            raise ConfigError("negatives", f"must be one of {', '.join(NEGATIVES)}, not {self.negatives!r}")


@dataclass(frozen=True)
class SoftTargets:
    """Distillation hook for ``train_model`` (``offline.distill`` builds one from a teacher).

    ``teacher(example_idx, candidate_rows)`` returns the teacher's logits (B, C) for the
    batch's examples (indices into ``training_examples``) against the candidates the student's
    softmax scores: the batch's targets (``negatives="in_batch"``, C = B) or the whole catalog
    (``negatives="full"`` or ``full_catalog``, C = n_items). The loss becomes
    ``CE + alpha * T**2 * KL(softmax(teacher / T) || softmax(student / T))`` over those
    candidates, where the student logits are its dot products / model temperature without
    the logQ correction (the correction only debiases the sampled CE; both distributions
    are over the same candidates), and accidental hits are masked on both sides. The KL is
    computed even when ``alpha == 0`` (it then adds exact zeros: the same run as without it).
    """

    teacher: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    alpha: float = 1.0
    temperature: float = 2.0
    # The KL over every catalog item instead of the in-batch candidates (the CE stays as
    # ``negatives`` says): the teacher's ranking of the whole catalog, not of 512 targets.
    full_catalog: bool = False

    def kl(self, idx: torch.Tensor, candidates: torch.Tensor, student: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
        """Mean over rows of the KL term (already scaled by ``alpha * T**2``); ``hit``: (B, C)
        True where a candidate is another row's copy of the target (excluded)."""
        t = self.temperature
        with torch.no_grad():
            p_t = torch.softmax(self.teacher(idx, candidates).masked_fill(hit, float("-inf")) / t, dim=1)
        log_s = torch.log_softmax(student.masked_fill(hit, float("-inf")) / t, dim=1)
        # p_t * (log p_t - log p_s), with 0 where p_t == 0 (masked: avoids 0 * -inf).
        terms = torch.where(p_t > 0, p_t * (torch.log(p_t.clamp(min=1e-30)) - log_s), torch.zeros_like(p_t))
        return self.alpha * t * t * terms.sum(dim=1).mean()


def fit_pipeline(ds: Dataset, train: Interactions | None = None) -> FeaturePipeline:
    """The feature pipeline the dataset's spec declares, fitted on its tables and, for the
    context features, on the training interactions ``train`` (default: all of them)."""
    part = train if train is not None else ds.interactions
    ctx: dict[str, Any] = dict(part.context)
    ctx["__time__"] = part.timestamp
    # Users get a row (and a trained id) only with interactions to learn from; a profile alone
    # stays in the user table, so that user arrives later as a new user with known features.
    return FeaturePipeline.fit(
        spec=ds.spec, user_ids=set(ds.interactions.user.tolist()),
        item_ids=set(ds.items.ids.tolist()) | set(ds.interactions.item.tolist()),
        users=(ds.users.ids.tolist(), ds.users.columns) if ds.users.columns else None,
        items=(ds.items.ids.tolist(), ds.items.columns) if ds.items.columns else None,
        context=ctx)


def training_examples(split: Split, fp: FeaturePipeline, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user rows (E,), target rows (E,), history (E, n) most recent first, -1 padded): the
    ``n`` items before each target; its first ``max_session`` columns are the session."""
    users = fp.user_vocab.positions(split.train.user)
    items = fp.item_vocab.positions(split.train.item)
    return users, items, lagged_items(users, items, n)


def _validate(model: TwoTower, fp: FeaturePipeline, split: Split, cfg: ModelConfig) -> float:
    """Validation Recall@20 with exact scoring (flat index over fresh embeddings)."""
    from offline.evaluate import model_ranks

    item_emb = embed_items(model, fp)
    user_emb = embed_users(model, fp, user_histories(fp, split.train, cfg.history_len), item_emb=item_emb)
    rm = RankModel(combiner=model.combiner.export(), item_emb=item_emb, user_emb=user_emb,
                   index=faiss_index.build(item_emb, faiss_index.IndexSpec("flat")), popularity=np.zeros(0, np.int64))
    es = eval_set(split, fp, max_session=cfg.max_session, which="valid")
    return metrics_from_ranks(model_ranks(rm, es))["recall@20"]


def spec_model_config(ds: Dataset, model_cfg: ModelConfig) -> ModelConfig:
    """``model_cfg`` as the dataset's spec allows it: the spec can switch the id embeddings off
    (content-only towers for cold catalogs)."""
    return replace(model_cfg, user_id=model_cfg.user_id and ds.spec.ids.user,
                   item_id=model_cfg.item_id and ds.spec.ids.item)


CTX = "ctx:"  # example_columns' prefix of the context features' columns


def example_columns(split: Split, fp: FeaturePipeline, model_cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The training examples as flat columns of E rows each, what :func:`batch_loss` reads
    (a batch is rows of them): ``user`` and ``target`` rows (E,), ``hist`` (E, n) the items
    before the target (:func:`training_examples`), ``ctx:NAME`` each context feature's
    encoding of the example's own row. The local engine indexes them in memory; ``--engine
    ray`` (``offline.ray_train``) writes them as Parquet and its workers read shards of it."""
    stale = model_cfg.history_staleness if model_cfg.history_len > 0 else 0
    users, targets, hist = training_examples(split, fp, max(model_cfg.max_session, model_cfg.history_len + stale))
    cols = {"user": users, "target": targets, "hist": hist}
    # Each example's own context (its row of split.train: columns + event time), encoded once;
    # the combiner adds what it learns from it to the query, as the server does from a request's.
    for k, v in fp.context_features(split.train.context, split.train.timestamp).items():
        cols[CTX + k] = v
    # Per-example training weights (the spec's event-type weights): a ``weight`` column only
    # when they are not all ones, so unweighted data trains on exactly the unweighted loss.
    w = split.train.weight
    if w is not None and len(w) and not np.all(w == 1.0):
        if not np.all(np.isfinite(w)) or (w < 0).any():
            raise ConfigError("interactions.event_type.weights", "training weights must be finite and >= 0")
        cols["weight"] = np.asarray(w, dtype=np.float32)
    return cols


@dataclass
class LossSetup:
    """What a batch's loss reads beside the batch (built once per run by :func:`loss_setup`):
    every user's and item's encoded features (the towers gather rows of them), the logQ
    correction and the negatives mode."""

    user_features: dict[str, torch.Tensor]
    item_features: dict[str, torch.Tensor]
    log_q: torch.Tensor  # (n_items,) log sampling probability of each item as a target
    n_sess: int
    stale: int
    full: bool  # negatives == "full": the CE is over every catalog item
    whole: bool  # the item tower runs over the whole catalog (full CE, or a full-catalog KL)
    soft_targets: SoftTargets | None = None


def make_optimizer(params: Iterable[torch.nn.Parameter], train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """The engines' optimizer: AdamW (fused when the config asks)."""
    extra: dict[str, Any] = {"fused": True} if train_cfg.fused_adam else {}
    return torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, **extra)


def loss_setup(model_cfg: ModelConfig, train_cfg: TrainConfig, fp: FeaturePipeline, split: Split,
               soft_targets: SoftTargets | None = None) -> LossSetup:
    counts = item_counts([split.train], fp).astype(np.float64)
    full = train_cfg.negatives == "full"
    return LossSetup(
        user_features=to_tensors(fp.user_features(fp.user_vocab.values)),
        item_features=to_tensors(fp.item_features(fp.item_vocab.values)),
        log_q=torch.from_numpy(np.log(np.maximum(counts, 1.0) / counts.sum()).astype(np.float32)),
        n_sess=model_cfg.max_session, stale=model_cfg.history_staleness if model_cfg.history_len > 0 else 0,
        full=full, whole=full or (soft_targets is not None and soft_targets.full_catalog), soft_targets=soft_targets)


def batch_loss(model: TwoTower, setup: LossSetup, batch: dict[str, torch.Tensor],
               gen: torch.Generator) -> torch.Tensor:
    """The training loss of one batch: ``batch`` holds rows of :func:`example_columns` and
    ``idx``, their example indices (what a distillation teacher is asked about). Both engines
    call it (the local loop, and each Ray Train worker on its shard's batches), so they train
    the same model on the same loss. ``gen`` draws the history staleness."""
    cfg = model.cfg
    idx, b_users, b_targets, b_hist = batch["idx"], batch["user"], batch["target"], batch["hist"]
    itf, uf, n_sess, stale, full = setup.item_features, setup.user_features, setup.n_sess, setup.stale, setup.full
    soft_targets = setup.soft_targets
    B = len(b_users)
    all_rows = torch.arange(len(setup.log_q))
    mask = b_hist >= 0
    if setup.whole:
        # Every catalog row is a candidate: (n_items, dim), histories gathered from it.
        emb = model.item_tower(itf)
        h_emb = emb[b_hist.clamp(min=0)] * mask[..., None]
    else:
        # Run the item tower once over the batch's distinct items (targets + histories,
        # which hold the sessions): (B + B*L) rows gathered from at most n_items.
        uniq, inv = torch.unique(torch.cat([b_targets, b_hist.clamp(min=0).reshape(-1)]), return_inverse=True)
        emb = model.item_tower({k: v[uniq] for k, v in itf.items()})
        pos = emb[inv[:B]]
        h_emb = emb[inv[B:]].reshape(B, -1, emb.shape[1]) * mask[..., None]
    s_emb, s_mask = h_emb[:, :n_sess], mask[:, :n_sess]
    if cfg.history_len > 0:
        # A served user embedding is as old as the last refresh, while the session is
        # fresh: the user tower sees the history as of 0..stale interactions earlier.
        L = cfg.history_len
        lag = torch.randint(0, stale + 1, (B, 1), generator=gen)
        cols = lag + torch.arange(L)[None, :]
        h_u = torch.gather(h_emb, 1, cols[..., None].expand(-1, -1, h_emb.shape[2]))
        u = model.user_tower({k: v[b_users] for k, v in uf.items()}, h_u, torch.gather(mask, 1, cols))
    else:
        u = model.user_tower({k: v[b_users] for k, v in uf.items()})
    q = model.combiner(u, torch.ones(B, dtype=torch.bool), s_emb, s_mask,
                       {k[len(CTX):]: v for k, v in batch.items() if k.startswith(CTX)})
    all_logits: torch.Tensor | None = None
    if setup.whole:  # (B, n_items) scored once; the in-batch candidates are its columns
        all_logits = q @ emb.T / cfg.temperature
        student = all_logits if full else all_logits[:, b_targets]
    else:
        student = q @ pos.T / cfg.temperature
    if full:
        labels, cands = b_targets, all_rows
        hit = torch.zeros(student.shape, dtype=torch.bool)
        logits = student
    else:
        labels, cands = torch.arange(B), b_targets
        # Another row's copy of this row's target is not a negative.
        hit = (b_targets[:, None] == b_targets[None, :]) & ~torch.eye(B, dtype=torch.bool)
        logits = student - setup.log_q[b_targets][None, :] if cfg.logq else student
        logits = logits.masked_fill(hit, float("-inf"))
    if "weight" in batch:
        # Weighted CE, normalised by the batch's weights: all ones would be the plain mean.
        w = batch["weight"]
        loss = (F.cross_entropy(logits, labels, reduction="none") * w).sum() / w.sum().clamp(min=1e-12)
    else:
        loss = F.cross_entropy(logits, labels)
    if soft_targets is not None and soft_targets.full_catalog and not full:
        # In-batch CE, KL over the whole catalog: the teacher's view of every item.
        assert all_logits is not None
        no_hits = torch.zeros(all_logits.shape, dtype=torch.bool)
        loss = loss + soft_targets.kl(idx, all_rows, all_logits, no_hits)
    elif soft_targets is not None:  # distillation: + alpha T^2 KL(teacher || student)
        loss = loss + soft_targets.kl(idx, cands, student, hit)
    return loss


def train_model(ds: Dataset, *, model_cfg: ModelConfig, train_cfg: TrainConfig, progress: bool = True,
                split: Split | None = None, fp: FeaturePipeline | None = None,
                init: dict[str, np.ndarray] | None = None,
                soft_targets: SoftTargets | None = None) -> tuple[TwoTower, FeaturePipeline, Split,
                                                                  list[dict[str, float]]]:
    """Fit the pipeline (or use ``fp``) and train; returns the best model by validation
    Recall@20. ``init``: weights to start from (a warm start: the refresh's ``train`` mode
    passes the serving version's towers and its pipeline, extended with new users/items).
    ``soft_targets``: distillation (see :class:`SoftTargets`); None = plain training."""
    torch.manual_seed(train_cfg.seed)
    torch.set_num_threads(train_cfg.threads)
    model_cfg = spec_model_config(ds, model_cfg)
    split = split or temporal_split(ds.interactions)
    fp = fp or fit_pipeline(ds, split.train)
    model = TwoTower(model_cfg, fp)
    if init is not None:
        model.load_arrays(init)
    cols = {k: torch.from_numpy(v) for k, v in example_columns(split, fp, model_cfg).items()}
    setup = loss_setup(model_cfg, train_cfg, fp, split, soft_targets)
    opt = make_optimizer(model.parameters(), train_cfg)
    gen = torch.Generator().manual_seed(train_cfg.seed)
    history: list[dict[str, float]] = []
    best, best_state, bad = -1.0, model.state_dict(), 0
    if init is not None and train_cfg.validate:
        # A warm start competes with where it started: epochs that never beat the initial
        # weights on validation leave them as they were (the refresh's train mode must not
        # swing a serving model on a noisy night).
        best = _validate(model, fp, split, model_cfg)
        best_state = {k: v.clone() for k, v in model.state_dict().items()}
        history.append({"epoch": 0, "val_recall@20": best})
    bar = tqdm(range(1, train_cfg.epochs + 1), desc="train", disable=not progress, unit="epoch")
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(cols["user"]), generator=gen)
        total, batches = 0.0, 0
        t_epoch = time.perf_counter()
        for lo in range(0, len(perm), train_cfg.batch_size):
            if train_cfg.max_steps is not None and batches >= train_cfg.max_steps:
                break
            idx = perm[lo:lo + train_cfg.batch_size]
            loss = batch_loss(model, setup, {"idx": idx, **{k: v[idx] for k, v in cols.items()}}, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
            batches += 1
        train_s = round(time.perf_counter() - t_epoch, 3)
        if not train_cfg.validate:
            history.append({"epoch": epoch, "loss": total / max(batches, 1), "train_s": train_s})
            best_state = model.state_dict()  # the live weights: the last epoch's
            continue
        val = _validate(model, fp, split, model_cfg)
        history.append({"epoch": epoch, "loss": total / max(batches, 1), "val_recall@20": val, "train_s": train_s})
        bar.set_postfix(loss=f"{total / max(batches, 1):.3f}", val_r20=f"{val:.4f}")
        if val > best:
            best, bad = val, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= train_cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return model, fp, split, history


def blend_arrays(new: dict[str, np.ndarray], old: dict[str, np.ndarray], weight: float) -> dict[str, np.ndarray]:
    """Weight averaging of a warm start with where it started: ``weight`` x new + (1 - weight)
    x old, row by row where a table grew (rows past the old table's end, new users and items,
    have only the new weights). Arrays the old model lacks are the new ones."""
    out: dict[str, np.ndarray] = {}
    for k, v in new.items():
        o = old.get(k)
        if o is None or o.ndim != v.ndim or o.shape[1:] != v.shape[1:] or not np.issubdtype(v.dtype, np.floating):
            out[k] = v
            continue
        n = min(len(o), len(v)) if v.ndim else None
        b = v.copy()
        if n is None:
            b = np.asarray(weight * v + (1 - weight) * o, v.dtype)
        else:
            b[:n] = weight * v[:n] + (1 - weight) * o[:n]
        out[k] = b
    return out
