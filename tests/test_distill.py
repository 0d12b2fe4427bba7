"""Distillation (offline/distill.py + the SoftTargets hook in offline/train.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from offline.datasets import Dataset, Split, load_dataset, temporal_split, write_grouplens
from offline.distill import distill, example_queries, load_teacher, soft_targets
from offline.evaluate import eval_set, model_ranks
from offline.histories import user_histories
from offline.train import SoftTargets, TrainConfig, train, train_model, training_examples
from towers import bundle as bundle_mod
from towers import index as faiss_index
from towers.errors import ConfigError
from towers.features import FeaturePipeline
from towers.model import ModelConfig, TwoTower, embed_items, embed_users, history_inputs, to_tensors
from towers.ranking import QueryBatch, RankModel, rank

SMALL = ModelConfig(dim=16, id_dim=16, hidden=32, history_len=10)
FAST = TrainConfig(epochs=1, patience=1, batch_size=256, threads=1)


def test_kl_term_value_and_gradient() -> None:
    """alpha T^2 KL(softmax(t/T) || softmax(s/T)), mean over rows; masked entries excluded."""
    g = torch.Generator().manual_seed(0)
    t_logits, s0 = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    hit = torch.zeros(4, 4, dtype=torch.bool)
    hit[0, 1] = True
    st = SoftTargets(teacher=lambda idx, tg: t_logits, alpha=0.5, temperature=2.0)
    s = s0.clone().requires_grad_(True)
    loss = st.kl(torch.arange(4), torch.arange(4), s, hit)
    loss.backward()
    keep = ~hit
    p_t = torch.softmax(t_logits.masked_fill(hit, -torch.inf) / 2, 1)
    p_s = torch.softmax(s0.masked_fill(hit, -torch.inf) / 2, 1)
    want = 0.5 * 4 * (torch.where(keep, p_t * (p_t.log() - p_s.log()), 0.0)).sum(1).mean()
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)
    # d/ds of alpha T^2 KL / B = alpha T (p_s - p_t) / B: pulls the student toward the teacher.
    assert s.grad is not None
    assert torch.allclose(s.grad, 0.5 * 2 * (p_s - p_t) / 4, atol=1e-6)
    assert float(s.grad[0, 1]) == 0.0
    same = SoftTargets(teacher=lambda idx, tg: s0, alpha=1.0, temperature=2.0)
    assert float(same.kl(torch.arange(4), torch.arange(4), s0, hit)) == pytest.approx(0.0, abs=1e-6)


class Small:
    """A GroupLens slice of ML-100k (150 users) and two tiny teacher members."""

    def __init__(self, root: Path, ds: Dataset) -> None:
        i = ds.interactions
        users = sorted(set(i.user.tolist()), key=int)[:150]
        sub = i.take(np.flatnonzero(np.isin(i.user, users)))
        self.spec = str(write_grouplens(replace(ds, interactions=sub), root / "ml-slice",
                                        keep_users=set(users)))
        self.ds = load_dataset(self.spec, cache_dir=root)
        self.root = root
        self.teacher_dir = root / "teacher"
        for n, seed in enumerate((0, 1)):
            train(dataset=self.ds, dataset_spec=self.spec, out=self.teacher_dir / f"m{n:02d}-seed{seed}",
                  model_cfg=SMALL if n == 0 else replace(SMALL, dim=24, hidden=48),
                  train_cfg=replace(FAST, seed=seed), progress=False)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, ml100k: Dataset) -> Small:
    return Small(tmp_path_factory.mktemp("distill"), ml100k)


def _weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_alpha_zero_is_plain_training_and_alpha_changes_it(small: Small) -> None:
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    teacher = load_teacher(small.teacher_dir)
    split = temporal_split(small.ds.interactions)
    st = soft_targets(teacher, split, alpha=0.0, temperature=2.0)

    def recording(idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append((idx.clone(), targets.clone()))
        return st.teacher(idx, targets)

    plain, fp, _, _ = train_model(small.ds, model_cfg=SMALL, train_cfg=FAST, progress=False)
    zero, _, _, _ = train_model(small.ds, model_cfg=SMALL, train_cfg=FAST, progress=False,
                                soft_targets=replace(st, teacher=recording))
    assert calls, "the hook was not called"
    a, b = _weights(plain), _weights(zero)
    assert all(np.array_equal(a[k], b[k]) for k in a), "alpha=0 must be plain training, bit for bit"
    # The hook gets the batch's example indices and their target rows (training_examples order).
    _, targets, _ = training_examples(split, fp, SMALL.history_len)
    for idx, tg in calls:
        assert torch.equal(tg, torch.from_numpy(targets)[idx])
    distilled, _, _, _ = train_model(small.ds, model_cfg=SMALL, train_cfg=FAST, progress=False,
                                     soft_targets=replace(st, alpha=1.0))
    c = _weights(distilled)
    assert any(not np.array_equal(a[k], c[k]) for k in a), "alpha>0 must change training"


@pytest.mark.slow
def test_soft_targets_are_the_teacher_ensemble_scores(small: Small) -> None:
    """Teacher logits = mean over members of their query . item dot products / temperature,
    the queries recomputed here straight from each member's towers."""
    teacher = load_teacher(small.teacher_dir)
    assert len(teacher.members) == 2 and teacher.dim == 16 + 24
    split = temporal_split(small.ds.interactions)
    fp = teacher.features
    st = soft_targets(teacher, split, alpha=1.0, temperature=2.0)
    users, targets, hist = training_examples(split, fp, 10)
    idx = torch.tensor([0, 5, 17, len(users) - 1])
    got = st.teacher(idx, torch.from_numpy(targets)[idx])
    want = torch.zeros(4, 4)
    uf = to_tensors(fp.user_features(fp.user_vocab.values))
    with torch.no_grad():
        for m in teacher.members:
            items = torch.from_numpy(m.rank_model.item_emb)
            emb, mask = history_inputs(items, torch.from_numpy(hist)[idx])
            u = m.model.user_tower({k: v[torch.from_numpy(users)[idx]] for k, v in uf.items()}, emb, mask)
            q = m.model.combiner(u, torch.ones(4, dtype=torch.bool), emb[:, :m.cfg.max_session],
                                 mask[:, :m.cfg.max_session])
            want += q @ items[torch.from_numpy(targets)[idx]].T / m.cfg.temperature / 2
    assert torch.allclose(got, want, atol=1e-5)
    assert example_queries(teacher, split).shape == (len(users), 40)


@pytest.mark.slow
def test_distilled_bundle_verifies_and_serves(small: Small) -> None:
    out = small.root / "run"
    report = distill(teacher=small.teacher_dir, out=out, dataset=small.ds, dataset_spec=small.spec, alpha=1.0,
                     temperature=2.0, train_cfg=FAST, model_cfg=SMALL,
                     baseline=small.teacher_dir / "m00-seed0", report_dir=out / "report", log=lambda *_: None)
    man = bundle_mod.verify(out / "student")
    assert man["distill"]["alpha"] == 1.0 and len(man["distill"]["teacher"]) == 2
    assert man["model_config"] == SMALL.to_dict() and man["shapes"]["dim"] == 16
    b = bundle_mod.load(out / "student")
    rm = RankModel.from_bundle(b)
    qb = QueryBatch.from_lists(rm, user_rows=[0, 1], sessions=[[0, 1], []], excludes=[[2], []], k=10)
    ranked = rank(rm, qb)
    assert ranked.counts.tolist() == [10, 10] and 2 not in ranked.rows[0].tolist()
    assert set(report["models"]) == {"teacher", "student", "today"}
    assert report["models"]["teacher"]["cost"]["dim"] == 40
    for name in ("distill.json", "distill.md"):
        assert (out / "report" / name).is_file()


def _recall_at_20(model: TwoTower, fp: FeaturePipeline, split: Split) -> float:
    """Recall@20 over the validation and test targets together (300 targets on the slice),
    through the serving path's ranks."""
    ie = embed_items(model, fp)
    ue = embed_users(model, fp, user_histories(fp, split.train, SMALL.history_len), item_emb=ie)
    rm = RankModel(combiner=model.combiner.export(), item_emb=ie, user_emb=ue,
                   index=faiss_index.build(ie, faiss_index.IndexSpec("flat")), popularity=np.zeros(0, np.int64))
    ranks = np.concatenate([model_ranks(rm, eval_set(split, fp, max_session=SMALL.max_session, which=w))
                            for w in ("valid", "test")])
    return float(np.mean(ranks < 20))


@pytest.mark.slow
def test_distillation_improves_the_student_over_training_without_the_teacher(small: Small) -> None:
    """A measured comparison on a fixed-seed run: a teacher trained 8 epochs (two members)
    teaches a student trained 2 epochs; the same student trained without it scores less."""
    teacher_dir = small.root / "strong-teacher"
    for n, seed in enumerate((0, 1)):
        train(dataset=small.ds, dataset_spec=small.spec, out=teacher_dir / f"m{n:02d}-seed{seed}", model_cfg=SMALL,
              train_cfg=replace(FAST, seed=seed, epochs=8, patience=8), progress=False)
    split = temporal_split(small.ds.interactions)
    teacher = load_teacher(teacher_dir)
    short = replace(FAST, epochs=2, patience=2)
    plain, fp, _, _ = train_model(small.ds, model_cfg=SMALL, train_cfg=short, progress=False)
    candidates: list[torch.Tensor] = []
    st = soft_targets(teacher, split, alpha=1.0, temperature=1.0, full_catalog=True)

    def recording(idx: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
        candidates.append(cands)
        return st.teacher(idx, cands)

    taught, _, _, _ = train_model(small.ds, model_cfg=SMALL, train_cfg=short, progress=False,
                                  soft_targets=replace(st, teacher=recording))
    # The KL ran over the whole catalog, not the batch's targets.
    assert candidates and all(torch.equal(c, torch.arange(len(fp.item_vocab.values))) for c in candidates)
    r_plain, r_taught = _recall_at_20(plain, fp, split), _recall_at_20(taught, fp, split)
    assert r_taught > r_plain, (r_taught, r_plain)


@pytest.mark.slow
def test_full_catalog_negatives_score_every_item(small: Small) -> None:
    seen: list[tuple[int, int]] = []
    teacher = load_teacher(small.teacher_dir)
    st = soft_targets(teacher, temporal_split(small.ds.interactions), alpha=1.0, temperature=1.0)

    def recording(idx: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
        seen.append((len(idx), len(cands)))
        return st.teacher(idx, cands)

    _, fp, _, hist = train_model(small.ds, model_cfg=SMALL, train_cfg=replace(FAST, negatives="full"),
                                 progress=False, soft_targets=replace(st, teacher=recording))
    n_items = len(fp.item_vocab.values)
    assert seen and all(c == n_items for _, c in seen)  # CE and KL over the catalog
    assert np.isfinite(hist[0]["loss"]) and hist[0]["loss"] > 0
    with pytest.raises(ConfigError, match="negatives"):
        TrainConfig(negatives="sampled")


def test_cli_registers_distill() -> None:
    from twotower.cli import build_parser

    args = build_parser().parse_args(["distill", "--teacher", "t.json", "--out", "o", "--alpha", "0.5"])
    assert args.alpha == 0.5 and args.kd_temperature == 2.0 and args.kl_over == "batch"
