"""``twotower quantize``: calibrate int8 user embeddings for the feature store, and measure
what quantization costs end to end (the figure ``publish`` gates on).

Calibration data (never the defaults):
- *queries*: what serving would search with. Trained bundles: the combined user+session
  queries of the validation split (``offline.evaluate.eval_set`` →
  ``towers.ranking.combine_queries``); synthetic bundles: held-out user vectors.
- *int8 scales*: per-dimension, symmetric; candidates fitted on 80% of the users, the
  clipping percentile chosen on the other 20% by the relative MSE of their queries' scores.

End to end: Recall@20 (DESIGN §6 protocol, test and validation) of the bundle as it would
serve, i.e. its index and its declared user-embedding dtype, against the same bundle with
exact search and float32 users, both through ``towers.ranking.rank``.

Offline int8 towers (:func:`int8_embedding_report`): the batch embedding step can run the
towers' Linear layers with PyTorch dynamic int8 quantization (per-channel weight scales;
activation ranges are measured per batch at run time, which is dynamic quantization's own
calibration); the report compares users/s and the top-100 overlap of the recommendations.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from towers import bundle as bundle_mod
from towers import index as faiss_index
from towers.bundle import Bundle
from towers.quant import calibrate_int8, dequantize_int8, quantize_int8
from towers.ranking import QueryBatch, RankModel, combine_queries
from towers.store_format import EMBEDDING_DTYPES, embedding_nbytes

MAX_RELATIVE_DROP = 0.01  # the publish gate's bound on quantized vs float32 Recall@20 (relative)


def is_trained(man: dict[str, Any]) -> bool:
    """Trained bundles (towers + a real dataset) have an end-to-end metric to protect."""
    return "towers.npz" in man.get("files", {}) and not str(man.get("dataset", "")).startswith("synthetic")


@dataclass(frozen=True)
class Calibration:
    """Calibration queries and where they came from."""

    queries: np.ndarray  # (Q, d) float32 unit rows
    source: str
    user_rows: np.ndarray  # (Q,) the users behind the queries (-1: none)
    sessions: list[list[int]]  # each query's session (empty for synthetic)


def calibration_queries(b: Bundle, *, cache_dir: Path | None, n: int = 1000, seed: int = 0) -> Calibration:
    """Validation-split user+session queries (trained) or held-out user vectors (synthetic)."""
    model = RankModel.from_bundle(b)
    rng = np.random.default_rng(seed)
    if is_trained(b.manifest) and cache_dir is not None:
        from offline.datasets import load_dataset, temporal_split
        from offline.evaluate import eval_set

        split = temporal_split(load_dataset(b.manifest["dataset"], cache_dir=cache_dir).interactions)
        es = eval_set(split, b.features, max_session=b.combiner.max_session, which="valid")
        pick = np.sort(rng.choice(len(es), size=min(n, len(es)), replace=False))
        sessions = [es.sessions[i] for i in pick.tolist()]
        qb = QueryBatch.from_lists(model, user_rows=es.user_rows[pick], sessions=sessions,
                                   excludes=[[] for _ in pick], k=1)
        q = combine_queries(model, qb)[qb.queried]
        return Calibration(q.astype(np.float32), "validation split: user + session queries",
                           es.user_rows[pick][qb.queried], [sessions[i] for i in qb.queried.tolist()])
    users = np.sort(rng.choice(len(b.user_emb), size=min(n, len(b.user_emb)), replace=False))
    qb = QueryBatch.from_lists(model, user_rows=users, sessions=[[] for _ in users], excludes=[[] for _ in users], k=1)
    q = combine_queries(model, qb)[qb.queried]
    return Calibration(q.astype(np.float32), "held-out user vectors", users[qb.queried], [[] for _ in qb.queried])


def _user_queries(model: RankModel, sessions: list[list[int]]) -> Any:
    """user vectors → the queries serving would build with these users' sessions."""

    def to_queries(u: np.ndarray) -> np.ndarray:
        qb = QueryBatch.from_lists(model, user_rows=np.zeros(len(u), np.int64), user_vectors=u, sessions=sessions,
                                   excludes=[[] for _ in sessions], k=1)
        return combine_queries(model, qb)

    return to_queries


def serving_model(b: Bundle, *, index: Any = None, user_dtype: str = "float32",
                  scale: np.ndarray | None = None) -> RankModel:
    """The bundle as serving sees it: its (or the given) index, user embeddings round-tripped
    through the feature store's encoding."""
    user = np.asarray(b.user_emb, dtype=np.float32)
    if user_dtype == "int8":
        if scale is None:
            raise ValueError("int8 needs a scale")
        user = dequantize_int8(quantize_int8(user, scale), scale)
    elif user_dtype == "float16":
        user = user.astype(np.float16).astype(np.float32)
    return RankModel(combiner=b.combiner, item_emb=b.item_emb, user_emb=user,
                     index=b.index if index is None else index, popularity=b.popularity)


def recall20(b: Bundle, model: RankModel, *, cache_dir: Path | None, dataset: Any = None) -> dict[str, float]:
    """Test and validation Recall@20 through ``towers.ranking.rank`` (DESIGN §6); the bundle's
    dataset is reloaded from ``cache_dir`` unless given."""
    from offline.datasets import load_dataset, temporal_split
    from offline.evaluate import eval_set, metrics_from_ranks, model_ranks

    if dataset is None:
        if cache_dir is None:
            raise ValueError("recall20 needs the dataset or its cache_dir")
        dataset = load_dataset(b.manifest["dataset"], cache_dir=cache_dir)
    split = temporal_split(dataset.interactions)
    out = {}
    for which in ("test", "valid"):
        es = eval_set(split, b.features, max_session=b.combiner.max_session, which=which)
        out[which] = metrics_from_ranks(model_ranks(model, es))["recall@20"]
    return out


def end_to_end(b: Bundle, *, cache_dir: Path | None, index: Any = None, spec: faiss_index.IndexSpec | None = None,
               user_dtype: str | None = None, scale: np.ndarray | None = None, dataset: Any = None) -> dict[str, Any]:
    """Recall@20 of the quantized serving path vs the same bundle in float32 with exact search:
    the record the publish gate reads (``quant.e2e``). It names the index and user dtype it
    was measured for, so a later change makes it stale rather than silently reused."""
    spec = spec or b.index_spec
    user_dtype = user_dtype or str(b.manifest.get("quant", {}).get("user_embeddings", {}).get("dtype", "float32"))
    scale = scale if scale is not None else b.user_scale
    exact = faiss_index.build(np.asarray(b.item_emb, dtype=np.float32), faiss_index.IndexSpec("flat"))
    ref = recall20(b, serving_model(b, index=exact), cache_dir=cache_dir, dataset=dataset)
    got = recall20(b, serving_model(b, index=index, user_dtype=user_dtype, scale=scale), cache_dir=cache_dir,
                   dataset=dataset)
    drop = (ref["test"] - got["test"]) / ref["test"] if ref["test"] > 0 else 0.0
    return {"recall@20": {"float32": ref["test"], "quantized": got["test"]},
            "valid_recall@20": {"float32": ref["valid"], "quantized": got["valid"]},
            "relative_drop": drop, "max_relative_drop": MAX_RELATIVE_DROP,
            "index": spec.label(), "user_dtype": user_dtype, "split": "test"}


def calibrate_user_embeddings(bundle_dir: Path, *, cache_dir: Path | None, dtype: str = "int8", seed: int = 0,
                              write: bool = True, log: Any = print) -> dict[str, Any]:
    """Fit the int8 scale (or declare float16/float32) for the feature store's user embeddings;
    for trained bundles measure Recall@20 at every dtype and record the end-to-end figure of
    the declared one. Writes ``quant`` into the manifest (a new version id)."""
    if dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(EMBEDDING_DTYPES)}")
    b = bundle_mod.load(bundle_dir)
    model = RankModel.from_bundle(b)
    users = np.asarray(b.user_emb, dtype=np.float32)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(users))
    n_held = max(1, len(users) // 5)
    # Bounded work at 1M users: the score MSE of 2k held-out users, scales from 200k users.
    held, fit = np.sort(perm[:min(n_held, 2000)]), np.sort(perm[n_held:][:200_000])
    trained = is_trained(b.manifest) and cache_dir is not None
    sessions: list[list[int]] = [[] for _ in held]
    if trained:  # held-out users' own validation sessions make their queries; synthetic: no session
        cal = calibration_queries(b, cache_dir=cache_dir, n=len(users), seed=seed)
        sess_of = {int(u): s for u, s in zip(cal.user_rows.tolist(), cal.sessions, strict=True)}
        sessions = [sess_of.get(int(u), []) for u in held.tolist()]
    items = np.asarray(b.item_emb, dtype=np.float32)
    if len(items) > 20_000:  # the score MSE needs a sample of the catalog, not all of it
        items = items[rng.choice(len(items), size=20_000, replace=False)]
    c = calibrate_int8(fit=users[fit], heldout=users[held], items=items, to_queries=_user_queries(model, sessions))
    d = b.dim
    report: dict[str, Any] = {
        "int8": c.to_manifest(),
        "bytes_per_user": {t: embedding_nbytes(d, t) for t in EMBEDDING_DTYPES},
        "calibration_queries": "held-out users' validation user + session queries" if trained
        else "held-out user vectors",
    }
    report["bytes_ratio_int8"] = embedding_nbytes(d, "float32") / embedding_nbytes(d, "int8")
    fp16 = users[held].astype(np.float16).astype(np.float32)
    to_q = _user_queries(model, sessions)
    from towers.quant import score_rel_mse

    report["rel_mse_float16"] = score_rel_mse(to_q(users[held]), to_q(fp16), items)
    log(f"int8 scale: clip at the {c.clip_percentile:g}th percentile per dimension; relative score MSE "
        + ", ".join(f"p{k}={v:.2e}" for k, v in c.rel_mse.items()) + f"; float16 {report['rel_mse_float16']:.2e}")
    if trained:
        assert cache_dir is not None
        by_dtype = {}
        for t in EMBEDDING_DTYPES:
            by_dtype[t] = recall20(b, serving_model(b, user_dtype=t, scale=c.scale), cache_dir=cache_dir)
        report["recall@20_by_user_dtype"] = by_dtype
        log("Recall@20 (test) by user-embedding dtype: "
            + ", ".join(f"{t} {v['test']:.4f} ({embedding_nbytes(d, t)} B/user)" for t, v in by_dtype.items()))
    entry = c.to_manifest() if dtype == "int8" else {"dtype": dtype}
    quant = dict(b.manifest.get("quant", {}))
    quant["user_embeddings"] = entry
    quant["user_calibration_report"] = report
    if trained:
        assert cache_dir is not None
        quant["e2e"] = end_to_end(b, cache_dir=cache_dir, user_dtype=dtype, scale=c.scale)
        e = quant["e2e"]
        log(f"end to end ({e['index']}, users {dtype}): Recall@20 {e['recall@20']['quantized']:.4f} vs float32 "
            f"{e['recall@20']['float32']:.4f} (relative drop {e['relative_drop']:+.2%}, gate {MAX_RELATIVE_DROP:.0%})")
    if write:
        man = bundle_mod.update_bundle(bundle_dir, {}, {"quant": quant})
        report["version"] = man["version"]
    return report


# -- offline int8 towers (torch) ----------------------------------------------------------------


def int8_embedding_report(bundle_dir: Path, *, n_users: int = 1_000_000, batch: int = 65536, k: int = 100,
                          threads: int = 1, cache_dir: Path | None = None, calibrated: bool = True,
                          log: Any = print) -> dict[str, Any]:
    """Users/s of the user tower in float32 vs dynamic int8 (on ``n_users`` rows built by
    repeating the bundle's users' features), and the top-``k`` overlap of real users'
    recommendations from int8 towers (users and items) vs float32. ``calibrated``: balance
    each Linear's input channels on 80% of the users (at most 4,096) first (:func:`int8_towers`); False: plain
    dynamic quantization. The overlap is on the held-out users either way.
    Needs torch."""
    import torch

    from towers.model import ModelConfig, TwoTower, embed_items, embed_users, history_inputs, to_tensors

    b = bundle_mod.load(bundle_dir)
    if "towers.npz" not in b.manifest["files"]:
        raise ValueError(f"{bundle_dir}: no towers (synthetic bundle): nothing to quantize")
    torch.set_num_threads(threads)
    cfg = ModelConfig.from_dict(b.manifest["model_config"])
    model = TwoTower(cfg, b.features)
    with np.load(bundle_dir / "towers.npz", allow_pickle=False) as z:
        model.load_arrays({k_: z[k_] for k_ in z.files})
    model.eval()
    fp = b.features
    # A tower that reads history gets each user's train history (the bundle's dataset, from
    # ``cache_dir``); without the dataset, every user's history is empty (said in the report).
    hist = None
    if cfg.history_len > 0 and cache_dir is not None:
        from offline.datasets import load_dataset, temporal_split
        from offline.histories import user_histories

        split = temporal_split(load_dataset(str(b.manifest["dataset"]), cache_dir=cache_dir).interactions)
        hist = user_histories(fp, split.train, cfg.history_len)
    # Calibration: the float towers over the catalog and 80% of the real users (at most
    # 4,096), with their histories (what the batch step feeds the towers); the overlap is
    # reported on the other users, whom the calibration never saw.
    perm = np.random.default_rng(0).permutation(len(fp.user_vocab.values))
    n_cal = min(4096, max(1, int(0.8 * len(perm))))
    cal_rows, held_rows = np.sort(perm[:n_cal]), np.sort(perm[n_cal:])

    def calibrate(m: Any) -> None:
        embed_users(m, fp, None if hist is None else hist[cal_rows], rows=cal_rows, item_emb=embed_items(m, fp))

    q8 = int8_towers(model, calibrate) if calibrated else int8_towers(model)
    # Throughput: the user tower over n_users feature rows (the real users' features, repeated).
    feats = fp.user_features(fp.user_vocab.values)
    reps = -(-n_users // len(fp.user_vocab.values))
    big = {name: np.concatenate([v] * reps)[:n_users] for name, v in feats.items()}
    big_hist = None
    if cfg.history_len > 0:
        h = hist if hist is not None else np.full((len(fp.user_vocab.values), cfg.history_len), -1, np.int64)
        big_hist = torch.from_numpy(np.concatenate([h] * reps)[:n_users])
    rates = {}
    with torch.no_grad():
        for name, m in (("float32", model), ("int8", q8)):
            items_t = torch.from_numpy(embed_items(m, fp)) if big_hist is not None else None

            def run(lo: int, hi: int, m: Any = m, items_t: Any = items_t) -> None:
                f = to_tensors({n: v[lo:hi] for n, v in big.items()})
                if items_t is None or big_hist is None:
                    m.user_tower(f)
                else:
                    m.user_tower(f, *history_inputs(items_t, big_hist[lo:hi]))

            run(0, batch)  # warm up
            t0 = time.perf_counter()
            for lo in range(0, n_users, batch):
                run(lo, lo + batch)
            rates[name] = n_users / (time.perf_counter() - t0)
    # Quality: top-k of every real user (user-only queries, exact search) int8 vs float32. The
    # headline is int8 users with float32 items: the users are the million-row batch step, the
    # items a small catalog whose embeddings also feed the index; both-int8 is reported beside it.
    i32, i8 = embed_items(model, fp), embed_items(q8, fp)
    # The same held-out users whether or not the towers were calibrated: comparable figures.
    rows = held_rows if len(held_rows) else np.arange(len(fp.user_vocab.values))
    h_rows = None if hist is None else hist[rows]
    u32 = embed_users(model, fp, h_rows, rows=rows, item_emb=i32)
    u8 = embed_users(q8, fp, h_rows, rows=rows, item_emb=i32)
    kk = min(k, i32.shape[0])
    top32 = np.argsort(-(u32 @ i32.T), axis=1, kind="stable")[:, :kk]

    def overlap(u: np.ndarray, i: np.ndarray) -> float:
        top = np.argsort(-(u @ i.T), axis=1, kind="stable")[:, :kk]
        return float(np.mean([len(set(a) & set(c)) / kk for a, c in zip(top32.tolist(), top.tolist(), strict=True)]))

    rel = float(np.mean(np.sum((u8 - u32) ** 2, axis=1) / np.maximum(np.sum(u32 ** 2, axis=1), 1e-12)))
    users_only, both = overlap(u8, i32), overlap(u8, i8)
    out = {"users_per_s": rates, "speedup": rates["int8"] / rates["float32"], "n_users_timed": n_users,
           "threads": threads, f"top{kk}_overlap": users_only, f"top{kk}_overlap_both_towers_int8": both,
           "user_embedding_rel_mse": rel, "history": "train split" if hist is not None else (
               "empty (no dataset given)" if cfg.history_len > 0 else "the tower reads none"),
           "quantization": "torch.ao.quantization.quantize_dynamic(nn.Linear, qint8, per-channel weights)"
                           + (f", input channels smoothed on {n_cal:,} calibration users (SmoothQuant, alpha 0.8)"
                              if calibrated else ", uncalibrated"),
           "overlap_users": len(rows),
           "overlap_on": "users held out of the calibration (at least 20%)"}
    log(f"user tower: float32 {rates['float32']:,.0f} users/s, int8 {rates['int8']:,.0f} users/s "
        f"({out['speedup']:.2f}x) over {n_users:,} users; top-{kk} overlap {users_only:.4f} "
        f"(items int8 too: {both:.4f})")
    return out


def int8_towers(model: Any, calibrate: Callable[[Any], None] | None = None, *, alpha: float = 0.8) -> Any:
    """A dynamically quantized copy of the towers: Linear weights int8 with per-output-channel
    scales, activations quantized per batch from their observed range.

    ``calibrate(model)`` runs the float copy on calibration inputs. With it, each Linear's
    input channels are first balanced (SmoothQuant, Xiao et al. 2023): the calibration's
    per-channel activation maximum ``a_j`` and weight maximum ``w_j`` give
    ``s_j = a_j**alpha / w_j**(1 - alpha)``, the input is divided by ``s`` (a float
    multiply before the Linear) and the weight's column ``j`` multiplied by it. The float
    function is unchanged, but one per-tensor activation scale then fits every channel.
    Why it matters here: the user tower's first layer reads id, side-feature and pooled-history
    embeddings of very different ranges. Quantized per tensor, the small ones round away, and
    top-100 overlap with float32 falls to 0.965-0.972. Smoothed, it is 0.987 / 0.989 / 0.992
    at alpha 0.3 / 0.5 / 0.8 (ML-100k's history tower, every user), so alpha 0.8, which
    favours evening out the activations over the weights; 0.991 on users held out of the
    calibration."""
    import copy
    import warnings

    import torch
    from torch import nn

    m = copy.deepcopy(model)
    if calibrate is not None:
        _smooth_linears(m, calibrate, alpha=alpha)
    with warnings.catch_warnings():
        # torch 2.13 marks torch.ao.quantization deprecated in favour of torchao (not installed
        # here); the eager dynamic path still works and is what this step uses.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_channel.*")
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        return torch.ao.quantization.quantize_dynamic(m, {nn.Linear: qconfig}, dtype=torch.qint8)


def _smooth_linears(model: Any, calibrate: Callable[[Any], None], *, alpha: float) -> None:
    """In place: every ``nn.Linear`` becomes ``Sequential(InputScale(1/s), Linear(W * s))``
    with ``s`` from the activation maxima ``calibrate`` observes (see :func:`int8_towers`)."""
    import torch
    from torch import nn

    class InputScale(nn.Module):
        inv: torch.Tensor

        def __init__(self, inv: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("inv", inv)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.inv

    linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    amax: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(_mod: Any, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            if len(x) == 0:
                return
            a = x.abs().amax(dim=0)
            amax[name] = torch.maximum(amax[name], a) if name in amax else a
        return record

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in linears.items()]
    try:
        with torch.no_grad():
            calibrate(model)
    finally:
        for h in handles:
            h.remove()
    for name, lin in linears.items():
        if name not in amax:
            continue  # not reached by the calibration: left as plain dynamic int8
        w = lin.weight.detach().abs().amax(dim=0).clamp(min=1e-5)
        a = amax[name]
        scale = (a.clamp(min=1e-5) ** alpha / w ** (1 - alpha)).clamp(min=1e-5)
        # A channel the calibration never saw move (all zeros there) keeps scale 1: smoothing
        # it by its calibration range would blow up any value it takes later.
        scale = torch.where(a > 1e-6 * float(a.max().clamp(min=1e-30)), scale, torch.ones_like(scale))
        with torch.no_grad():
            lin.weight.mul_(scale[None, :])
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, nn.Sequential(InputScale(1.0 / scale), lin))
