"""How many users A/B testing and interleaving need to tell a fresher model from a frozen
one: ``python -m bench.interleave_power [--frozen-until 1997-12-01] [--fresh-until
1998-01-01] [--days 28] [--out bench/results/interleave_power.json]``.

On ML-100k's own timeline: the frozen model is trained on everything before
``--frozen-until``, the fresh one on everything before ``--fresh-until`` (the nightly
retrain's idea: it saw a month more). Over the ``--days`` after ``--fresh-until``, each user
active then is served each model's top-10 (user-only path, the user's earlier items
excluded; a user a model never saw gets its popularity list). The click model: a served item
is clicked if the user really interacts with it in the window.

- A/B: half the users see one model, half the other; the metric is clicks per user, the test
  Welch's z at 5% (two-sided), counted significant only in the true direction.
- Interleaving: every user sees the team-draft interleaving (``towers.interleave``) of both
  lists; clicks credit the model that contributed the item; a user prefers the model with more
  credits; the sign test at 5% (``offline.ab_interleave``), true direction only.

Power at n users is the share of ``--draws`` resamples (users drawn with replacement from the
active ones, a bootstrap of the population) that reach significance; users needed is the
smallest n on a doubling grid with power >= 0.8. Both orders of the pair are run (the fresh
model as the first and as the second list/arm). Writes JSON and a PNG of power against users.
This is a simulation over the replay's timeline, not the replay server itself: see the README.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

K = 10
GRID = [2 ** j for j in range(4, 17)]  # 16 .. 65,536 users
MERGES = 64  # team-draft coins simulated per user


def served_lists(bundle: Path, users: list[str], seen: dict[str, set[str]]) -> list[list[str]]:
    from offline.batch_score import batch_topk
    from towers import bundle as bundle_mod
    from towers.ranking import RankModel

    b = bundle_mod.load(bundle)
    model = RankModel.from_bundle(b)
    rows = np.array([b.features.user_vocab.known(u) for u in users], dtype=np.int64)
    known = np.flatnonzero(rows >= 0)
    pos = b.features.item_vocab.positions
    excl = [[int(x) for x in pos(np.array(sorted(seen[users[j]]), dtype=str)).tolist() if x >= 0] for j in known]
    top, _ = batch_topk(model, k=K, seen=excl, users=rows[known], progress=False)
    popular = [b.item_ids[int(r)] for r in np.asarray(b.popularity).tolist()]
    out: list[list[str]] = []
    at = {int(j): m for m, j in enumerate(known.tolist())}
    for j, u in enumerate(users):
        if j in at:
            out.append([b.item_ids[int(r)] for r in top[at[j]].tolist() if r >= 0])
        else:
            out.append([i for i in popular if i not in seen[u]][:K])
    return out


def _welch_p(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(difference b - a, two-sided p) by the normal approximation."""
    d = float(b.mean() - a.mean())
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    if se == 0:
        return d, 1.0 if d == 0 else 0.0
    return d, math.erfc(abs(d / se) / math.sqrt(2))


def power_curves(clicks_a: np.ndarray, clicks_b: np.ndarray, pref: np.ndarray, *, draws: int,
                 seed: int) -> dict[str, list[float]]:
    """``clicks_x``: per user, clicks on model x's list; ``pref``: per user, +1 prefers b, -1 a,
    0 none (under interleaving), one column per merge (the coin differs per request: a draw
    takes a random column for each user drawn). Power of each method at each grid size, b the
    truly better."""
    from offline.ab_interleave import sign_test

    rng = np.random.default_rng(seed)
    pref = pref.reshape(len(pref), -1)
    n_pop, n_merges = pref.shape
    ab, il = [], []
    for n in GRID:
        hits_ab = hits_il = 0
        for _ in range(draws):
            half = max(n // 2, 2)
            d, p = _welch_p(clicks_a[rng.integers(0, n_pop, half)], clicks_b[rng.integers(0, n_pop, half)])
            hits_ab += p < 0.05 and d > 0
            s = pref[rng.integers(0, n_pop, n), rng.integers(0, n_merges, n)]
            wins, m = int((s > 0).sum()), int((s != 0).sum())
            hits_il += m > 0 and sign_test(wins, m) < 0.05 and wins * 2 > m
        ab.append(hits_ab / draws)
        il.append(hits_il / draws)
    return {"ab": ab, "interleave": il}


def users_needed(power: list[float], target: float = 0.8) -> int | None:
    return next((n for n, p in zip(GRID, power, strict=True) if p >= target), None)


def run(*, frozen_until: str, fresh_until: str, days: int, draws: int, data_dir: Path, work: Path,
        epochs: int, log: Any = print) -> dict[str, Any]:
    from bench.replay import _day_start, base_bundle
    from offline.datasets import load_dataset
    from towers.interleave import team_draft

    ds = load_dataset("ml-100k", cache_dir=data_dir)
    t1, t2 = _day_start(frozen_until), _day_start(fresh_until)
    frozen = base_bundle(ds, cut=t1, work=work, epochs=epochs)
    fresh = base_bundle(ds, cut=t2, work=work, epochs=epochs)
    i = ds.interactions
    window = (i.timestamp >= t2) & (i.timestamp < t2 + days * 86_400)
    users = sorted(set(i.user[window].tolist()))
    future: dict[str, set[str]] = {u: set() for u in users}
    for u, it in zip(i.user[window].tolist(), i.item[window].tolist(), strict=True):
        future[u].add(it)
    seen: dict[str, set[str]] = {u: set() for u in users}
    before = i.timestamp < t2
    for u, it in zip(i.user[before].tolist(), i.item[before].tolist(), strict=True):
        if u in seen:
            seen[u].add(it)
    lists = {"frozen": served_lists(frozen, users, seen), "fresh": served_lists(fresh, users, seen)}
    clicks = {m: np.array([len(set(lst) & future[u]) for lst, u in zip(lists[m], users, strict=True)], float)
              for m in lists}
    log(f"{len(users)} users active in the {days} days after {fresh_until}: clicks per user "
        f"frozen {clicks['frozen'].mean():.3f}, fresh {clicks['fresh'].mean():.3f}")
    orders: dict[str, Any] = {}
    for first, second in (("frozen", "fresh"), ("fresh", "frozen")):
        fresh_team = 1 if second == "fresh" else 0
        pref_a = np.zeros((len(users), MERGES), dtype=np.int64)
        for j, u in enumerate(users):
            for r in range(MERGES):  # the same user's requests are merged with other coins
                m = team_draft(lists[first][j], lists[second][j], k=K, key=f"{u}|{first}|{r}")
                credit = [0, 0]
                for it, t in zip(m.items, m.teams, strict=True):
                    credit[t] += it in future[u]
                # +1: the user prefers the fresh model, wherever it sat in the draft.
                pref_a[j, r] = 0 if credit[0] == credit[1] else (1 if credit[fresh_team] > credit[1 - fresh_team]
                                                                 else -1)
        curves = power_curves(clicks["frozen"], clicks["fresh"], pref_a, draws=draws,
                              seed=len(orders))
        need = {k: users_needed(v) for k, v in curves.items()}
        ratio = need["ab"] / need["interleave"] if need["ab"] and need["interleave"] else None
        orders[f"{first}-first"] = {"power": curves, "users_needed_80": need, "ab_over_interleave": ratio,
                                    "prefer_fresh_share": round(float((pref_a > 0).mean()), 4),
                                    "prefer_frozen_share": round(float((pref_a < 0).mean()), 4),
                                    "no_preference_share": round(float((pref_a == 0).mean()), 4)}
        log(f"{first} first: users for 80% power: A/B {need['ab']}, interleaving {need['interleave']}")
    return {"frozen_until": frozen_until, "fresh_until": fresh_until, "days": days, "k": K, "draws": draws,
            "active_users": len(users), "clicks_per_user": {m: round(float(c.mean()), 4) for m, c in clicks.items()},
            "grid": GRID, "orders": orders}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report["orders"]), figsize=(11, 4), sharey=True)
    for ax, (name, o) in zip(np.atleast_1d(axes), report["orders"].items(), strict=True):
        for method, style in (("ab", "o-"), ("interleave", "s-")):
            ax.plot(report["grid"], o["power"][method], style, label=method)
        ax.axhline(0.8, color="grey", lw=0.8, ls="--")
        ax.set(xscale="log", title=f"fresh vs frozen ({name})", xlabel="users", ylabel="power at 5%")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from towers.cliargs import default_data_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frozen-until", default="1997-12-01")
    p.add_argument("--fresh-until", default="1998-01-01")
    p.add_argument("--days", type=int, default=28)
    p.add_argument("--draws", type=int, default=300)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    p.add_argument("--work", type=Path, default=None, help="where the two models are trained (kept)")
    p.add_argument("--out", type=Path, default=Path("bench/results/interleave_power.json"))
    a = p.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="ilpower-"))
    report = run(frozen_until=a.frozen_until, fresh_until=a.fresh_until, days=a.days, draws=a.draws,
                 data_dir=a.data_dir, work=work, epochs=a.epochs)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    plot(report, a.out.with_suffix(".png"))
    print(f"written: {a.out} and {a.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
