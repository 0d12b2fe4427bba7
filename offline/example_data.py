"""``twotower example-data``: a small e-commerce-shaped catalog and event log, with its spec.

The README's "Your own data" walk-through trains, evaluates, publishes and serves it. It is
shaped the way a shop's exports are shaped, not the way MovieLens is:

    items.parquet   item_id, brand, category (categorical), price (numeric), title (text),
                    tags (a list column: multi_categorical)
    users.csv       user_id, country (categorical), age (bucketized by quantiles)
    events.csv      user_id, item_id, timestamp (ISO 8601, UTC), event (view | cart | purchase),
                    order_id (numbered by checkout time, on the purchase and cart rows of an
                    order; empty on views and on visits that bought nothing), device
                    (or events.parquet, with a typed timestamp column)
    spec.yaml       the dataset spec that declares all of the above (``towers.spec``)

What a model can learn from it (and popularity cannot):
- users prefer two or three categories and a few brands, brands of their own country, and a
  price tier that moves with age;
- the device of a visit shifts what is bought (mobile: snacks, drinks, coffee; desktop:
  household, pet and baby supplies, bulk packs; app: the fresh grocery reorder), and so does
  the hour (mornings: coffee, bakery, dairy; evenings: snacks, drinks, frozen food);
- a basket is coherent: most of its items come from the visit's focus category;
- staples are bought again: each user has a few items (milk, coffee, cat litter) that come
  back order after order, so the spec keeps past items as candidates (``exclude_seen: false``)
  and personal frequency is the baseline to beat.

Deterministic by ``seed``: the same arguments give the same tables, byte for byte.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from towers.errors import ConfigError

# category -> (product nouns, base price in EUR, a staple (bought again and again), pack sizes, bulk sizes)
CATEGORIES: dict[str, tuple[tuple[str, ...], float, bool, tuple[str, ...], tuple[str, ...]]] = {
    "coffee": (("Ground Coffee", "Coffee Beans", "Espresso Pods", "Instant Coffee", "Cold Brew"), 7.5, True,
               ("250g", "500g"), ("1kg",)),
    "tea": (("Green Tea", "Black Tea", "Herbal Tea", "Chai", "Rooibos"), 3.9, False, ("20 bags", "40 bags"),
            ("100 bags",)),
    "snacks": (("Crisps", "Pretzels", "Nut Mix", "Granola Bars", "Popcorn", "Crackers"), 2.6, False,
               ("150g", "200g"), ("6-pack",)),
    "dairy": (("Whole Milk", "Greek Yogurt", "Butter", "Cheddar", "Oat Drink", "Skyr"), 2.2, True,
              ("250g", "500g", "1L"), ("6 x 1L",)),
    "bakery": (("Sourdough", "Croissants", "Bagels", "Rye Bread", "Brioche"), 2.9, True, ("400g", "4 pcs"),
               ("12 pcs",)),
    "pasta": (("Spaghetti", "Penne", "Pesto", "Tomato Sauce", "Risotto Rice", "Gnocchi"), 2.4, False,
              ("190g", "500g"), ("3 x 500g",)),
    "beverages": (("Sparkling Water", "Orange Juice", "Cola", "Lemonade", "Iced Tea", "Ginger Beer"), 1.9, True,
                  ("1L", "1.5L"), ("6-pack", "12-pack")),
    "frozen": (("Pizza", "Ice Cream", "Frozen Berries", "Dumplings", "Fish Fingers"), 4.8, False,
               ("400g", "750g"), ("2kg",)),
    "household": (("Dish Soap", "Laundry Detergent", "Paper Towels", "Sponges", "Trash Bags"), 5.5, True,
                  ("500ml", "1L"), ("3L", "XL pack")),
    "personal care": (("Shampoo", "Toothpaste", "Body Wash", "Deodorant", "Hand Cream"), 4.5, False,
                      ("75ml", "250ml"), ("3-pack",)),
    "pet": (("Dog Food", "Cat Food", "Cat Litter", "Dog Treats", "Bird Seed"), 11.0, True, ("1kg", "2kg"),
            ("10kg",)),
    "baby": (("Diapers", "Baby Wipes", "Baby Food", "Baby Shampoo", "Teething Rusks"), 9.5, True,
             ("1 pack", "2 packs"), ("jumbo pack",)),
}
BULK_SHARE = 0.3  # items sold in a bulk size
DEVICES = ("mobile", "desktop", "app")
# What a device shifts: category multipliers (unlisted: 1). Desktop visits also favour bulk packs.
DEVICE_SHIFT: dict[str, dict[str, float]] = {
    "mobile": {"snacks": 3.0, "beverages": 3.0, "coffee": 2.0, "household": 0.3, "pet": 0.3, "baby": 0.3},
    "desktop": {"household": 4.0, "pet": 4.0, "baby": 4.0, "personal care": 2.0, "snacks": 0.5, "beverages": 0.5},
    "app": {"dairy": 3.0, "bakery": 3.0, "frozen": 2.0},
}
HOUR_SHIFT = {"morning": {"coffee": 1.8, "bakery": 1.8, "dairy": 1.5},
              "evening": {"snacks": 1.8, "beverages": 1.6, "frozen": 1.6}}
# Hour-of-day distributions of a visit's start, by device (UTC; the shop's own time zone).
_HOUR_PEAKS: dict[str, tuple[tuple[float, float, float], ...]] = {  # (weight, mean hour, sd)
    "mobile": ((0.45, 8.0, 1.2), (0.55, 20.5, 1.8)),
    "desktop": ((1.0, 13.0, 2.8),),
    "app": ((0.3, 9.0, 1.5), (0.7, 19.5, 1.5)),
}
COUNTRIES = ("DE", "FR", "NL", "IT", "ES")
ADJECTIVES = ("Classic", "Organic", "Original", "Extra", "Light", "Fresh", "Bio", "Premium", "Mild", "Gold",
              "Home", "Pure")
BULK_PREFERENCE = {"desktop": 2.0, "mobile": 0.6, "app": 1.0}  # bulk packs are ordered from a desk
STAPLE_RATE = 0.5  # a staple comes back in about half the orders
TAGS = ("organic", "vegan", "gluten-free", "eco", "bulk", "new", "local")
_SYLLABLES = ("nor", "vik", "bel", "la", "mar", "sol", "ta", "ri", "ko", "fen", "dor", "ba", "li", "ne", "sa",
              "ver", "to", "mi", "lu", "gra")
START = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
DAYS = 120

SPEC_TEMPLATE = """\
# An e-commerce-shaped example, written by `twotower example-data` (offline/example_data.py).
# Train it:  twotower train --dataset THIS_DIR/spec.yaml --out runs/shop/bundle
name: {name}
interactions:
  path: {events_file}
  user: user_id
  item: item_id
  time: timestamp
{time_format}
  event_type:
    column: event
    # Purchases are the interactions. Views and carts stay in the log but are not positives: each
    # purchase follows its own view and cart in the same order, and the repeat-aware protocol
    # removes an order's earlier items from the ranking (they are in the basket), so counting
    # them would make every target one of its own session items.
    positives: [purchase]
    weights: {{purchase: 1.0}}  # per-type training weights, for logs where several types count
  group: order_id  # one order = one basket: the session of the repeat-aware evaluation
  context:
    - {{column: device, kind: categorical}}
    - {{column: timestamp, name: hour, kind: categorical, derive: hour_of_day}}  # UTC hour
items:
  path: items.parquet
  id: item_id
  title: title
  features:
    - {{column: brand, kind: categorical, min_count: 2, oov_buckets: 4}}
    - {{column: category, kind: categorical}}
    - {{column: price, kind: numeric, log: true}}
    - {{column: title, kind: text, max_len: 8, buckets: 2048}}
    - {{column: tags, kind: multi_categorical, pooling: mean}}
users:
  path: users.csv
  id: user_id
  features:
    - {{column: country, kind: categorical}}
    - {{column: age, kind: bucketized, quantiles: 5}}
policies:
  exclude_seen: false  # staples are bought again: past purchases stay candidates
  min_user_interactions: 3  # a test target, a validation target and something to train on
"""


@dataclass(frozen=True)
class ExampleData:
    """What :func:`write_example_data` wrote."""

    directory: Path
    spec: Path
    files: list[Path]
    n_items: int
    n_users: int
    events: dict[str, int]  # rows by event type
    orders: int
    repeat_purchases: int  # purchases of an item the same user had bought before

    def summary(self) -> str:
        total = sum(self.events.values())
        kinds = ", ".join(f"{n:,} {k}" for k, n in sorted(self.events.items()))
        purchases = self.events.get("purchase", 0)
        return (f"{self.n_items:,} items, {self.n_users:,} users, {total:,} events ({kinds}) in {self.orders:,} "
                f"orders; {self.repeat_purchases:,} of {purchases:,} purchases "
                f"({self.repeat_purchases / max(purchases, 1):.0%}) repeat an item the user bought before")


def _brand_names(n: int, rng: np.random.Generator) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        k = 2 if rng.random() < 0.6 else 3
        name = "".join(_SYLLABLES[j] for j in rng.integers(0, len(_SYLLABLES), size=k)).capitalize()
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _event(events: dict[str, list[Any]], user: str, item: str, t: int, kind: str, order: int | None,
           device: str) -> None:
    for key, v in (("user", user), ("item", item), ("timestamp", t), ("event", kind), ("order", order),
                   ("device", device)):
        events[key].append(v)


def _draw(cum: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with the weights whose cumulative sum is ``cum`` (faster than rng.choice(p=))."""
    return min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(cum) - 1)


def _hour(device: str, rng: np.random.Generator) -> float:
    peaks = _HOUR_PEAKS[device]
    _, mean, sd = peaks[_draw(np.cumsum([w for w, _, _ in peaks]), rng)]
    return float(rng.normal(mean, sd)) % 24.0


def generate(*, users: int = 2000, items: int = 1000, seed: int = 0,
             orders_per_user: float = 3.0) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(items, users, events) as pyarrow tables; events sorted by time. See the module doc."""
    if users < 10:
        raise ConfigError("--users", f"at least 10 users, got {users}")
    if items < 2 * len(CATEGORIES):
        raise ConfigError("--items", f"at least {2 * len(CATEGORIES)} items (two per category), got {items}")
    if orders_per_user < 1:
        raise ConfigError("orders_per_user", f"at least 1, got {orders_per_user}")
    rng = np.random.default_rng(seed)
    cats = list(CATEGORIES)
    n_cat = len(cats)

    # --- brands: each sells in 2-4 categories, has a home country and a price tier
    n_brands = max(8, min(60, items // 20))
    brands = _brand_names(n_brands, rng)
    brand_cats = [rng.choice(n_cat, size=int(rng.integers(2, 5)), replace=False) for _ in range(n_brands)]
    brand_country = rng.integers(0, len(COUNTRIES), size=n_brands)
    brand_tier = rng.choice(np.array([0.7, 1.0, 1.6]), size=n_brands, p=[0.3, 0.45, 0.25])
    brand_eco = rng.random(n_brands) < 0.25

    # --- items: every category gets two first, then the brands' categories at random
    item_cat = np.empty(items, np.int64)
    item_brand = np.empty(items, np.int64)
    for i in range(items):
        if i < 2 * n_cat:
            c = i % n_cat
            sellers = [b for b in range(n_brands) if c in brand_cats[b]]
            b = int(rng.choice(sellers)) if sellers else int(rng.integers(0, n_brands))
        else:
            b = int(rng.integers(0, n_brands))
            c = int(rng.choice(brand_cats[b]))
        item_cat[i], item_brand[i] = c, b
    perm = rng.permutation(items)  # ids carry no category order
    item_cat, item_brand = item_cat[perm], item_brand[perm]
    item_ids = np.array([f"SKU{100000 + i}" for i in range(items)])
    titles: list[str] = []
    tags: list[list[str]] = []
    prices, bulk = np.empty(items), np.zeros(items, bool)
    for i in range(items):
        b = int(item_brand[i])
        nouns, base, _, sizes, bulk_sizes = CATEGORIES[cats[int(item_cat[i])]]
        adj = ADJECTIVES[int(rng.integers(0, len(ADJECTIVES)))]
        bulk[i] = rng.random() < BULK_SHARE
        pack = bulk_sizes if bulk[i] else sizes
        size = pack[int(rng.integers(0, len(pack)))]
        titles.append(f"{brands[b]} {adj} {nouns[int(rng.integers(0, len(nouns)))]} {size}")
        prices[i] = round(base * brand_tier[b] * (1.8 if bulk[i] else 1.0) * float(rng.lognormal(0.0, 0.25)), 2)
        item_tags = [name for name, on in (("organic", adj in ("Organic", "Bio")), ("vegan", rng.random() < 0.15),
                                           ("gluten-free", rng.random() < 0.1), ("eco", bool(brand_eco[b])),
                                           ("bulk", bool(bulk[i])), ("new", rng.random() < 0.08),
                                           ("local", rng.random() < 0.12)) if on]
        tags.append(item_tags)
    # Popularity inside a category: a few bestsellers, a long tail.
    item_pop = rng.lognormal(0.0, 1.0, size=items)
    by_cat = [np.flatnonzero(item_cat == c) for c in range(n_cat)]

    # --- users: category and brand preferences, a price tier by age, a main device, staples
    country = rng.integers(0, len(COUNTRIES), size=users)
    age = np.clip(rng.normal(41, 13, size=users), 18, 85).round()
    user_ids = np.array([f"C{10000 + u}" for u in range(users)])
    events: dict[str, list[Any]] = {k: [] for k in ("user", "item", "timestamp", "event", "order", "device")}
    cat_shift = {(d, part): np.array([DEVICE_SHIFT[d].get(c, 1.0) * HOUR_SHIFT.get(part, {}).get(c, 1.0)
                                      for c in cats]) for d in DEVICES for part in ("morning", "day", "evening")}
    bulk_factor = {d: np.where(bulk, BULK_PREFERENCE[d], 1.0) for d in DEVICES}
    n_orders = repeats = 0
    for u in range(users):
        cat_pref = rng.dirichlet(np.full(n_cat, 0.25)) + 1e-3
        brand_boost = np.ones(n_brands)
        brand_boost[rng.choice(n_brands, size=int(rng.integers(2, 5)), replace=False)] = 8.0  # favourites
        brand_boost[brand_country == country[u]] *= 2.0
        tier = 1.6 if age[u] >= 50 else (0.7 if age[u] < 30 else 1.0)
        item_w = item_pop * brand_boost[item_brand] * np.where(brand_tier == tier, 2.0, 1.0)[item_brand]
        dev_cum = np.cumsum(np.where(np.arange(3) == _draw(np.cumsum([0.55, 0.3, 0.15]), rng), 0.75, 0.125))
        cums: dict[tuple[int, str], np.ndarray] = {}

        def pick(c: int, taken: set[int], device: str, _w: np.ndarray = item_w,
                 _cums: dict[tuple[int, str], np.ndarray] = cums) -> int:
            """An item of category ``c`` by this user's taste, not in ``taken`` (-1: none left)."""
            cum = _cums.get((c, device))
            if cum is None:
                cum = _cums[(c, device)] = np.cumsum(_w[by_cat[c]] * bulk_factor[device][by_cat[c]])
            for _ in range(20):
                j = int(by_cat[c][_draw(cum, rng)])
                if j not in taken:
                    return j
            rest = [j for j in by_cat[c].tolist() if j not in taken]
            return rest[0] if rest else -1

        # Staples: items from the user's favourite staple categories, bought again and again.
        staples: list[int] = []
        staple_cats = [c for c in np.argsort(-cat_pref)[:4].tolist() if CATEGORIES[cats[c]][2]]
        for k in range(int(rng.integers(1, 5)) if staple_cats else 0):
            j = pick(staple_cats[k % len(staple_cats)], set(staples), "app")
            if j >= 0:
                staples.append(j)
        bought: set[int] = set()
        k_orders = 1 + int(rng.poisson(orders_per_user - 1))
        k_visits = k_orders + int(rng.poisson(0.3 * k_orders))  # some visits buy nothing
        buys = np.zeros(k_visits, bool)
        buys[rng.choice(k_visits, size=k_orders, replace=False)] = True
        for day, buy in zip(np.sort(rng.uniform(0, DAYS, size=k_visits)).tolist(), buys.tolist(), strict=True):
            device = DEVICES[_draw(dev_cum, rng)]
            hour = _hour(device, rng)
            part = "morning" if 6 <= hour < 11 else ("evening" if hour >= 18 else "day")
            cat_cum = np.cumsum(cat_pref * cat_shift[(device, part)])
            focus = _draw(cat_cum, rng)
            basket: list[int] = []
            reorder: set[int] = set()
            if buy:
                for s in staples:
                    if rng.random() < STAPLE_RATE:
                        basket.append(s)
                        reorder.add(s)
                new = 1 + int(rng.poisson(1.0 if device != "desktop" else 1.8))
                for _ in range(new):  # a coherent basket: mostly the visit's focus category
                    c = focus if rng.random() < 0.75 else _draw(cat_cum, rng)
                    j = pick(c, set(basket), device)
                    if j >= 0:
                        basket.append(j)
            # The visit's events: browse the focus category, view and cart what is bought (a
            # reordered staple, or a "buy now", skips a step), check out at the end.
            steps = [(j, "view") for j in (pick(focus, set(basket), device) for _ in range(int(rng.integers(0, 3))))
                     if j >= 0]
            for j in basket:
                if j not in reorder and rng.random() < 0.5:
                    steps.append((j, "view"))
                if rng.random() < 0.6:
                    steps.append((j, "cart"))
            steps = [steps[int(k)] for k in rng.permutation(len(steps))]
            steps.sort(key=lambda s: s[1] == "cart")  # views first (stable: shuffled otherwise)
            t = int((START + dt.timedelta(days=int(day), hours=hour)).timestamp())
            oid = None
            if basket:
                n_orders += 1
                oid = n_orders  # renumbered in checkout order below
            for j, kind in steps:
                t += int(rng.integers(8, 120))
                _event(events, user_ids[u], item_ids[j], t, kind, oid if kind == "cart" else None, device)
            t += int(rng.integers(20, 300))
            for j in basket:  # one checkout: every line shares its timestamp and order id
                _event(events, user_ids[u], item_ids[j], t, "purchase", oid, device)
                repeats += j in bought
                bought.add(j)
    ts = np.asarray(events["timestamp"], np.int64)
    order_idx = np.argsort(ts, kind="stable")  # an export is in time order, users interleaved
    # Order ids count checkouts in time, as a shop's order numbers do.
    number: dict[int, str] = {}
    for i in order_idx.tolist():
        o = events["order"][i]
        if o is not None and events["event"][i] == "purchase" and o not in number:
            number[o] = f"O{len(number) + 1:07d}"
    ev = pa.table({
        "user_id": pa.array(np.asarray(events["user"])[order_idx]),
        "item_id": pa.array(np.asarray(events["item"])[order_idx]),
        "timestamp": pa.array(ts[order_idx], pa.int64()).cast(pa.timestamp("s", tz="UTC")),
        "event": pa.array(np.asarray(events["event"])[order_idx]),
        "order_id": pa.array([number.get(events["order"][i]) for i in order_idx.tolist()], pa.string()),
        "device": pa.array(np.asarray(events["device"])[order_idx]),
    })
    it = pa.table({
        "item_id": pa.array(item_ids), "title": pa.array(titles),
        "brand": pa.array([brands[int(b)] for b in item_brand]),
        "category": pa.array([cats[int(c)] for c in item_cat]),
        "price": pa.array(prices, pa.float64()), "tags": pa.array(tags, pa.list_(pa.string())),
    })
    us = pa.table({"user_id": pa.array(user_ids), "country": pa.array([COUNTRIES[int(c)] for c in country]),
                   "age": pa.array(age.astype(np.int64))})
    meta = {b"orders": str(n_orders).encode(), b"repeat_purchases": str(repeats).encode()}
    return it, us, ev.replace_schema_metadata(meta)


def write_example_data(out: Path, *, users: int = 2000, items: int = 1000, seed: int = 0,
                       events_format: str = "csv", orders_per_user: float = 3.0) -> ExampleData:
    """Write items.parquet, users.csv, events.csv (or events.parquet) and spec.yaml into ``out``.

    The files are written under temporary names and renamed when all are complete, so a
    failed run leaves no half dataset behind the spec."""
    if events_format not in ("csv", "parquet"):
        raise ConfigError("--events-format", f"csv or parquet, not {events_format!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} exists and is not a directory")
    it, us, ev = generate(users=users, items=items, seed=seed, orders_per_user=orders_per_user)
    meta = ev.schema.metadata or {}
    out.mkdir(parents=True, exist_ok=True)
    events_file = f"events.{events_format}"
    written: dict[str, Path] = {}

    def tmp(name: str) -> Path:
        p = out / f".{name}.tmp"
        written[name] = p
        return p

    pq.write_table(it, tmp("items.parquet"))
    pacsv.write_csv(us, tmp("users.csv"))
    if events_format == "parquet":
        pq.write_table(ev.replace_schema_metadata(None), tmp(events_file))
    else:
        # A CSV export's time is a string: ISO 8601 in UTC, as most shops' exports write it.
        iso = pa.array([dt.datetime.fromtimestamp(s, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                        for s in ev.column("timestamp").cast(pa.int64()).to_pylist()])
        pacsv.write_csv(ev.replace_schema_metadata(None).set_column(2, "timestamp", iso), tmp(events_file))
    spec_text = SPEC_TEMPLATE.format(
        name=f"shop-example-s{seed}", events_file=events_file,
        time_format=("  time_format: iso  # 2024-01-31T08:15:42Z" if events_format == "csv"
                     else "  # a Parquet timestamp column needs no time_format"))
    tmp("spec.yaml").write_text(spec_text, encoding="utf-8")
    files = []
    for name, p in written.items():
        p.replace(out / name)
        files.append(out / name)
    stale = out / ("events.parquet" if events_format == "csv" else "events.csv")
    if stale.is_file():  # a previous run in the other format: the spec no longer names it
        stale.unlink()
    kinds, counts = np.unique(np.asarray(ev.column("event").to_pylist()), return_counts=True)
    return ExampleData(directory=out, spec=out / "spec.yaml", files=files, n_items=it.num_rows,
                       n_users=us.num_rows, events={str(k): int(n) for k, n in zip(kinds, counts, strict=True)},
                       orders=int(meta.get(b"orders", b"0")), repeat_purchases=int(meta.get(b"repeat_purchases", b"0")))
