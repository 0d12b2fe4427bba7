"""Distillation: a teacher too expensive to serve online trains the model the server runs.

The teacher is an ensemble of ordinary bundles (members: any towers, any dims, all trained on
the same dataset, hence the same feature pipeline and split). Its score for (query, item) is
the mean over members of their dot products, i.e. one dot product of concatenations::

    Q = [q_1, ..., q_n] / n      (each q_m from member m's user tower + combiner)
    E = [e_1, ..., e_n]          (each e_m from member m's item tower)
    score = Q . E = mean_m q_m . e_m

so serving the teacher needs n combiners and an index of dimension sum(d_m).

The student is the default towers + combiner, trained by ``offline.train.train`` with the
``SoftTargets`` hook: on every batch the teacher's logits over the batch's in-batch
candidates (the examples' targets), or with ``full_catalog`` over every catalog item, are
the soft labels of a temperature-scaled KL term, ``loss = CE + alpha * T^2 * KL``. The
student is a normal bundle, served like any other.

``--teacher`` takes either

* a bundle directory (a one-member teacher) or a directory whose sub-directories are
  bundles (one member each, in name order); or
* a JSON config naming members to train (written as bundles under ``OUT/teacher/``, reused
  when already there, so a second run skips them)::

      {"members": [
          {"model": {"dim": 128, "hidden": 256}, "train": {"epochs": 40}, "seeds": [0, 1]},
          {"model": {}, "seeds": [1, 2]}
      ]}

  ``model``: ``ModelConfig`` fields over the defaults; ``train``: ``TrainConfig`` fields
  (``seed`` comes from ``seeds``); one member per seed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offline.datasets import Dataset, Split, temporal_split
from offline.evaluate import EvalSet, eval_set, metrics_from_ranks, model_ranks, pessimistic_ranks
from offline.train import SoftTargets, TrainConfig, fit_pipeline, train, training_examples
from towers import bundle as bundle_mod
from towers import index as faiss_index
from towers.errors import ConfigError
from towers.features import FeaturePipeline
from towers.model import ModelConfig, TwoTower, history_inputs, model_from_arrays, to_tensors
from towers.ranking import QueryBatch, RankModel, combine_queries, search_batch, select

METRICS = ("recall@10", "recall@20", "ndcg@10", "hr@50")


# -- the teacher ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    path: Path
    cfg: ModelConfig
    model: TwoTower  # eval mode
    rank_model: RankModel  # the bundle's arrays (exact search over its items)


@dataclass(frozen=True)
class Teacher:
    members: list[Member]
    features: FeaturePipeline

    @property
    def dim(self) -> int:
        return sum(m.rank_model.dim for m in self.members)

    def item_matrix(self) -> np.ndarray:
        """E = [e_1, ..., e_n]: (n_items, sum d_m)."""
        return np.ascontiguousarray(np.concatenate([m.rank_model.item_emb for m in self.members], axis=1))

    def ensemble_rank_model(self) -> RankModel:
        """A RankModel over E (exact search) for ``select``/``pessimistic_ranks``; its combiner is
        member 0's and unused: queries come from :meth:`queries`."""
        e = self.item_matrix()
        m0 = self.members[0].rank_model
        return RankModel(combiner=m0.combiner, item_emb=e, user_emb=np.zeros((0, e.shape[1]), np.float32),
                         index=faiss_index.build(e, faiss_index.IndexSpec("flat")), popularity=m0.popularity)

    def queries(self, es: EvalSet, lo: int, hi: int) -> np.ndarray:
        """Q = [q_1, ..., q_n] / n for eval users ``lo:hi``: each member's serving combiner."""
        n = len(self.members)
        return np.concatenate([combine_queries(m.rank_model, es.batch(m.rank_model, lo, hi)) / n
                               for m in self.members], axis=1).astype(np.float32)


def _member_paths(path: Path) -> list[Path]:
    if (path / "manifest.json").is_file():
        return [path]
    subs = sorted(p for p in path.iterdir() if (p / "manifest.json").is_file()) if path.is_dir() else []
    if not subs:
        raise ConfigError("--teacher", f"{path} is neither a bundle nor a directory of bundles")
    return subs


def load_teacher(path: Path) -> Teacher:
    """A teacher from a bundle or a directory of bundles (verified; all must share one pipeline)."""
    members: list[Member] = []
    fp: FeaturePipeline | None = None
    for p in _member_paths(Path(path)):
        b = bundle_mod.load(p)
        if "towers.npz" not in b.manifest["files"]:
            raise ConfigError("--teacher", f"{p} has no towers (a synthetic bundle cannot teach)")
        if fp is not None and b.features.dumps() != fp.dumps():
            raise ConfigError("--teacher", f"{p} was trained on another dataset/pipeline than {members[0].path}")
        fp = fp or b.features
        cfg = ModelConfig.from_dict(b.manifest["model_config"])
        with np.load(p / "towers.npz", allow_pickle=False) as z:
            model = model_from_arrays(cfg, b.features, {k: z[k] for k in z.files})
        members.append(Member(path=p, cfg=cfg, model=model, rank_model=RankModel.from_bundle(b)))
    assert fp is not None
    return Teacher(members=members, features=fp)


def train_teacher(config: dict[str, Any], *, dataset: Dataset, dataset_spec: str, out: Path, threads: int = 1,
                  log: Callable[[str], None] = print) -> Path:
    """Train the members a JSON teacher config names into ``out/mNN-seedS`` (existing verified
    bundles are kept: resumable); returns ``out`` (a directory of bundles)."""
    mfields, tfields = {f.name for f in fields(ModelConfig)}, {f.name for f in fields(TrainConfig)}
    specs = config.get("members")
    if not isinstance(specs, list) or not specs:
        raise ConfigError("--teacher", "the config needs a non-empty 'members' list")
    i = 0
    for spec in specs:
        model_kw, train_kw = dict(spec.get("model", {})), dict(spec.get("train", {}))
        bad = (set(model_kw) - mfields) | (set(train_kw) - tfields) | (set(spec) - {"model", "train", "seeds"})
        if bad:
            raise ConfigError("--teacher", f"unknown fields in a member: {sorted(bad)}")
        for seed in spec.get("seeds", [0]):
            dest = out / f"m{i:02d}-seed{int(seed)}"
            i += 1
            try:
                bundle_mod.verify(dest)
                log(f"teacher member {dest.name}: kept")
                continue
            except Exception:
                pass
            t0 = time.perf_counter()
            man = train(dataset=dataset, dataset_spec=dataset_spec, out=dest, model_cfg=ModelConfig(**model_kw),
                        train_cfg=TrainConfig(**{"threads": threads, **train_kw, "seed": int(seed)}), progress=False)
            log(f"teacher member {dest.name}: val R@20 {man['metrics']['validation']['recall@20']:.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    return out


@torch.no_grad()
def example_queries(teacher: Teacher, split: Split) -> np.ndarray:
    """Q for every training example (``training_examples`` order): (E, sum d_m) float32, each
    member's query from its user tower over the example's history + its combiner over the
    session, scaled by 1 / (n * member temperature) so that Q[e] . E[item] is a logit."""
    fp, n = teacher.features, len(teacher.members)
    width = max(max(m.cfg.max_session, m.cfg.history_len) for m in teacher.members)
    users, _targets, hist = training_examples(split, fp, width)
    uf = to_tensors(fp.user_features(fp.user_vocab.values))
    out = []
    for m in teacher.members:
        items = torch.from_numpy(m.rank_model.item_emb)
        parts = []
        for lo in range(0, len(users), 4096):
            u_rows, h = torch.from_numpy(users[lo:lo + 4096]), torch.from_numpy(hist[lo:lo + 4096])
            emb, mask = history_inputs(items, h)
            f = {k: v[u_rows] for k, v in uf.items()}
            L, s = m.cfg.history_len, m.cfg.max_session
            u = m.model.user_tower(f, emb[:, :L], mask[:, :L]) if L > 0 else m.model.user_tower(f)
            parts.append(m.model.combiner(u, torch.ones(len(u_rows), dtype=torch.bool), emb[:, :s], mask[:, :s]))
        out.append(torch.cat(parts).numpy() / (n * m.cfg.temperature))
    return np.ascontiguousarray(np.concatenate(out, axis=1), dtype=np.float32)


def soft_targets(teacher: Teacher, split: Split, *, alpha: float, temperature: float,
                 full_catalog: bool = False) -> SoftTargets:
    """The ``train_model`` hook: teacher logits (B, C) = Q[example_idx] @ E[candidate_rows].T."""
    q = torch.from_numpy(example_queries(teacher, split))
    e = torch.from_numpy(teacher.item_matrix())

    def logits(idx: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return q[idx] @ e[candidates].T

    return SoftTargets(teacher=logits, alpha=alpha, temperature=temperature, full_catalog=full_catalog)


# -- evaluation and serving cost ---------------------------------------------------------------


def teacher_metrics(teacher: Teacher, split: Split, *, batch: int = 1024) -> dict[str, Any]:
    """DESIGN §6 metrics of the ensemble (test, with ``validation`` inside), through the serving
    path's search/select/pessimistic ranks, queries = Q."""
    ens = teacher.ensemble_rank_model()
    max_session = teacher.members[0].rank_model.max_session
    result: dict[str, Any] = {}
    for which in ("test", "valid"):
        es = eval_set(split, teacher.features, max_session=max_session, which=which)
        ranks = np.empty(len(es), dtype=np.int64)
        for lo in range(0, len(es), batch):
            hi = min(len(es), lo + batch)
            qb = es.batch(teacher.members[0].rank_model, lo, hi)
            q = teacher.queries(es, lo, hi)
            scores, rows = search_batch(ens, qb, q[qb.queried])
            ranks[lo:hi] = pessimistic_ranks(ens, qb, select(ens, qb, q, scores, rows), es.targets[lo:hi])
        m = metrics_from_ranks(ranks)
        if which == "test":
            result.update(m)
        else:
            result["validation"] = m
    return result


def bundle_metrics(path: Path, split: Split) -> dict[str, Any]:
    b = bundle_mod.load(path)
    rm = RankModel.from_bundle(b)
    out: dict[str, Any] = {}
    for which in ("test", "valid"):
        es = eval_set(split, b.features, max_session=rm.max_session, which=which)
        m = metrics_from_ranks(model_ranks(rm, es))
        if which == "test":
            out.update(m)
        else:
            out["validation"] = m
    return out


def serving_cost(combines: list[Callable[[], np.ndarray]], item_emb: np.ndarray, *, k: int = 66, reps: int = 3,
                 synth_items: int = 100_000) -> dict[str, float]:
    """µs per query of the combine stage (``combines``: one call per pre-built batch → its
    queries) and of a batched exact search (flat inner-product index, one FAISS thread) of
    those queries over the catalog, and over a synthetic ``synth_items`` catalog of the same
    dimension; best of ``reps``. Building the batches (feature fetch) is not timed."""
    import faiss

    faiss.omp_set_num_threads(1)
    d = item_emb.shape[1]
    synth = np.random.default_rng(0).standard_normal((synth_items, d)).astype(np.float32)
    synth /= np.linalg.norm(synth, axis=1, keepdims=True)
    out: dict[str, float] = {"dim": float(d), "batch": float(len(combines[0]()))}
    qs: list[np.ndarray] = []
    best = np.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        qs = [np.ascontiguousarray(c()) for c in combines]
        best = min(best, time.perf_counter() - t0)
    n_queries = sum(len(q) for q in qs)
    out["combine_us"] = best / n_queries * 1e6
    for name, emb in (("search_us", item_emb), ("search_100k_us", synth)):
        index = faiss.IndexFlatIP(d)
        index.add(np.ascontiguousarray(emb, dtype=np.float32))
        best = np.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            for q in qs:
                index.search(q, k)
            best = min(best, time.perf_counter() - t0)
        out[name] = best / n_queries * 1e6
    out["total_us"] = out["combine_us"] + out["search_us"]
    out["total_100k_us"] = out["combine_us"] + out["search_100k_us"]
    return out


# -- the job -----------------------------------------------------------------------------------


def distill(*, teacher: Path, out: Path, dataset: Dataset, dataset_spec: str, alpha: float = 1.0,
            temperature: float = 2.0, full_catalog: bool = False, train_cfg: TrainConfig | None = None,
            model_cfg: ModelConfig | None = None, baseline: Path | None = None, report_dir: Path | None = None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Distill a teacher into a servable student bundle at ``out/student``; returns the report.

    Modes:

    * ``teacher`` a bundle, or a directory of bundles: that ensemble teaches as it is.
    * ``teacher`` a ``.json`` file: the members it names are trained first into
      ``out/teacher/`` (kept across runs), then that directory teaches.
    * ``baseline`` a bundle: "today's model" for the comparison; None: the default
      ``ModelConfig`` is trained with ``train_cfg`` (same seed/epochs as the student) into
      ``out/baseline`` (kept across runs).
    * ``report_dir``: also write ``distill.json``, ``distill.md`` and ``distill.png`` there.

    ``alpha`` = 0 trains exactly the plain model (the KL adds zeros); ``temperature`` is the
    distillation temperature T of ``CE + alpha T^2 KL``; ``full_catalog``: the KL is over
    every catalog item (the CE stays in-batch) instead of the in-batch candidates.
    """
    train_cfg = train_cfg or TrainConfig(threads=1)
    model_cfg = model_cfg or ModelConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = Path(teacher)
    if teacher.suffix == ".json" and teacher.is_file():
        config = json.loads(teacher.read_text())
        teacher = train_teacher(config, dataset=dataset, dataset_spec=dataset_spec, out=out / "teacher",
                                threads=train_cfg.threads, log=log)
    t = load_teacher(teacher)
    if t.features.dumps() != fit_pipeline(dataset, temporal_split(dataset.interactions).train).dumps():
        raise ConfigError("--teacher", "the teacher was trained on another dataset than the student's")
    split = temporal_split(dataset.interactions)
    log(f"teacher: {len(t.members)} members, dim {t.dim}")
    t_metrics = teacher_metrics(t, split)
    log(f"teacher val R@20 {t_metrics['validation']['recall@20']:.4f}")
    if baseline is None:
        baseline = out / "baseline"
        try:
            bundle_mod.verify(baseline)
        except Exception:
            train(dataset=dataset, dataset_spec=dataset_spec, out=baseline, model_cfg=ModelConfig(),
                  train_cfg=train_cfg, progress=False)
    st = soft_targets(t, split, alpha=alpha, temperature=temperature, full_catalog=full_catalog)
    t0 = time.perf_counter()
    student = out / "student"
    train(dataset=dataset, dataset_spec=dataset_spec, out=student, model_cfg=model_cfg, train_cfg=train_cfg,
                progress=False, soft_targets=st)
    distill_info = {"teacher": [{"path": str(m.path), "version": bundle_mod.read_manifest(m.path)["version"],
                                 "model_config": m.cfg.to_dict()} for m in t.members],
                    "alpha": alpha, "temperature": temperature, "kl_over": "catalog" if full_catalog else "batch",
                    "train_seconds": round(time.perf_counter() - t0, 1)}
    bundle_mod.update_bundle(student, {}, {"distill": distill_info})
    bundle_mod.verify(student)
    report = report_models(t, student=student, baseline=baseline, split=split, t_metrics=t_metrics)
    report["distill"] = distill_info
    report["train_config"] = {f.name: getattr(train_cfg, f.name) for f in fields(train_cfg)}
    if report_dir is not None:
        write_report(report, Path(report_dir))
    return report


def report_models(t: Teacher, *, student: Path, baseline: Path, split: Split,
                  t_metrics: dict[str, Any] | None = None, batch: int = 64) -> dict[str, Any]:
    """Metrics (test + validation) and serving cost of teacher, student and baseline."""
    es = eval_set(split, t.features, max_session=t.members[0].rank_model.max_session, which="test")
    spans = [(lo, min(len(es), lo + batch)) for lo in range(0, len(es), batch)]
    rows: dict[str, Any] = {}

    def combine_fn(rms: list[RankModel]) -> list[Callable[[], np.ndarray]]:
        """One closure per batch: the members' combiners over pre-built batches, Q = [q_m] / n."""
        def one(qbs: list[tuple[RankModel, QueryBatch]]) -> Callable[[], np.ndarray]:
            return lambda: np.concatenate([combine_queries(rm, qb) / len(qbs) for rm, qb in qbs],
                                          axis=1).astype(np.float32)

        return [one([(rm, es.batch(rm, lo, hi)) for rm in rms]) for lo, hi in spans]

    for name, path in (("today", baseline), ("student", student)):
        rm = RankModel.from_bundle(bundle_mod.load(path))
        rows[name] = {"metrics": bundle_metrics(path, split), "bundle": str(path),
                      "cost": serving_cost(combine_fn([rm]), rm.item_emb)}
    rows["teacher"] = {"metrics": t_metrics or teacher_metrics(t, split),
                       "members": [str(m.path) for m in t.members],
                       "cost": serving_cost(combine_fn([m.rank_model for m in t.members]), t.item_matrix())}
    return {"models": rows, "protocol": "DESIGN §6 (ML-100k, temporal leave-last-out, full ranking)",
            "cost_note": f"µs/query, batches of {batch} test users, combine stage (numpy, n combiners for the "
                         "teacher) + exact inner-product search (FAISS flat, 1 thread, k=66) over the catalog; "
                         "search_100k_us: the same search over 100k random items of the same dimension"}


def format_report(report: dict[str, Any]) -> str:
    models = report["models"]
    head = ["model", "dim"] + [f"test {k}" for k in METRICS] + [f"valid {k}" for k in METRICS] + \
        ["combine µs/q", "search µs/q", "total µs/q", "search 100k µs/q"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in ("teacher", "student", "today"):
        r = models[name]
        m, c = r["metrics"], r["cost"]
        cells = [name, str(int(c["dim"]))] + [f"{m[k]:.4f}" for k in METRICS] + \
            [f"{m['validation'][k]:.4f}" for k in METRICS] + \
            [f"{c['combine_us']:.1f}", f"{c['search_us']:.1f}", f"{c['total_us']:.1f}", f"{c['search_100k_us']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(report: dict[str, Any], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "distill.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (directory / "distill.md").write_text(format_report(report) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = ["today", "student", "teacher"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(METRICS))
    for i, n in enumerate(names):
        m = report["models"][n]["metrics"]
        ax[0].bar(x + (i - 1) * 0.27, [m[k] for k in METRICS], 0.27, label=n)
    ax[0].set_xticks(x, list(METRICS))
    ax[0].set(title="test split (DESIGN §6)")
    ax[0].legend()
    ax[1].bar(names, [report["models"][n]["cost"]["search_100k_us"] + report["models"][n]["cost"]["combine_us"]
                      for n in names], color=["tab:blue", "tab:orange", "tab:green"])
    ax[1].set(title="serving cost, µs/query (combine + exact search, 100k items)")
    fig.tight_layout()
    fig.savefig(directory / "distill.png", dpi=90)
    plt.close(fig)
