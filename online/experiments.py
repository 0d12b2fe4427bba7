"""A/B flags in the server: which version and settings each request gets, the
versions kept resident for it, hot reload of the flags file, and shadow variants.

The pieces (``serve --flags FILE``):

- **Routing table** (``online.routing.RoutingTable``): one validated flags file and the
  ``LoadedModel`` of every version its running experiments pin. Its meaning never
  changes after construction (only a memo of assignments fills in), so a batch
  that reads ``router.table`` once sees one consistent set of flags and versions.
  A reload builds a complete new table — file validated, new versions loaded,
  verified, checked in the feature store and warmed — and then switches with one
  reference assignment. Anything that fails leaves the old table serving, with the
  error in ``twotower admin status`` and the logs.
- **Grouping** (``Router.handle``): the batch handler assigns each request
  (``towers.assign.assign``, memoised per user and table), groups the batch by
  (version, overrides), and runs each group through ``RecommendService.run_batch``
  with that version's model: every response is computed from exactly one version
  (its own), and names it and its variant label. ``CURRENT`` resolves to the
  model the batch snapshotted, so a hot swap of CURRENT leaves pinned versions alone.
- **Residency**: the service keeps every pinned version's feature-store arrays
  (``RecommendService.pin``); a version no longer pinned is dropped after its last
  batch, like an old CURRENT. Memory is bounded by ``max_resident_mb`` over
  CURRENT plus the pinned versions, counted from their manifests (the bundles'
  file bytes) *before* anything is loaded, so a file over the limit is refused
  without first paying for it.
- **Shadows**: a variant with ``shadow: rate`` scores a sample of its
  experiment's requests (``towers.assign.shadow_sampled``) after the primary
  results are handed back, in a task the request never awaits, at most
  ``max_shadow_inflight`` batches at a time, only on an idle server, and within a
  budget of ``shadow_time_share`` of wall time: when the bound is reached, requests
  are queued, a primary batch is running when the shadow would start, or the budget
  is spent, the shadow work is dropped and counted: shadows are the first thing shed
  under load. Shadow requests are
  copies: nothing of theirs flows back into a primary response.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from online.lifecycle import LoadedModel
from online.polling import Poller
from online.request import RecRequest, RecResult, budget_deadline
from online.routing import Arm, InterleaveRoute, RoutingTable, Shadow, UserRoute
from online.service import RecommendService
from online.shared_fetch import SharedFetch
from towers import bundle as bundle_mod
from towers.assign import shadow_sampled
from towers.errors import ConfigError, TwoTowerError
from towers.flags import CURRENT, Flags, parse_flags_text
from towers.index import override_problem
from towers.interleave import team_draft

log = logging.getLogger("twotower.experiments")
MB = 1 << 20


@dataclass
class ShadowStats:
    experiment: str
    variant: str
    version: str
    sampled: int = 0
    scored: int = 0
    dropped: int = 0
    errors: int = 0
    overlap_sum: float = 0.0
    latency_sum_ms: float = 0.0
    max_latency_ms: float = 0.0

    def to_status(self) -> dict[str, object]:
        n = max(self.scored, 1)
        return {"experiment": self.experiment, "variant": self.variant, "version": self.version,
                "sampled": self.sampled, "scored": self.scored, "dropped": self.dropped, "errors": self.errors,
                "mean_overlap": self.overlap_sum / n, "mean_latency_ms": self.latency_sum_ms / n,
                "max_latency_ms": self.max_latency_ms}


@dataclass
class FlagsState:
    digest: str = ""
    error: str = ""
    reloads: int = 0
    rejected: int = 0
    rejected_digest: str = ""
    resident_bytes: int = 0
    loaded_at: float = 0.0
    warmed: list[str] = field(default_factory=list)  # pinned versions warmed, in order (status, tests)


def bundle_bytes(path: Path) -> int:
    """A bundle's resident size as its manifest counts it: the bytes of its files (arrays,
    index, vocabularies). Read from the manifest alone, so a version can be refused for
    memory before it is loaded."""
    man = bundle_mod.read_manifest(path)
    return int(sum(int(meta.get("bytes", 0)) for meta in man.get("files", {}).values()))


def _read(path: Path) -> tuple[str, str | None]:
    """(sha256 of the content, the text) of the flags file; (a problem, None) if unreadable
    (the problem stands in for the digest, so the same problem is reported once)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "flags file not found", None
    except OSError as e:
        return f"cannot read the flags file ({e.strerror})", None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"cannot read the flags file ({e})", None
    return hashlib.sha256(data).hexdigest(), text


class TimeBudget:
    """A token bucket of wall time: refilled at ``share`` seconds per second, at most
    ``burst_s`` banked; work runs only while the balance is positive and spends its duration
    (it may overdraw once; the debt is paid back before the next run)."""

    def __init__(self, *, share: float, burst_s: float = 0.025,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.share, self.burst_s, self._clock = share, burst_s, clock
        self._tokens = burst_s if share > 0 else 0.0
        self._at = clock()

    def allow(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst_s, self._tokens + (now - self._at) * self.share)
        self._at = now
        return self.share > 0 and self._tokens > 0

    def spend(self, seconds: float) -> None:
        self._tokens -= seconds


def interleaved(req: RecRequest, first: RecResult, second: RecResult | BaseException,
                route: InterleaveRoute) -> RecResult:
    """``first`` with its items replaced by the team-draft interleaving of both lists (scores
    and titles follow their items), each item credited to its variant in ``teams``. If the
    second list failed, the first alone, uncredited (no impression credits a team), and why."""
    if not isinstance(second, RecResult):
        first.reasons = [*first.reasons, f"interleave: the second list failed ({type(second).__name__})"]
        return first
    lists = (first, second)
    merged = team_draft(first.item_ids, second.item_ids, k=req.k,
                        key=req.request_id or f"{req.user_id}@{req.received!r}")
    first.item_ids = merged.items
    first.scores = [lists[t].scores[p] for t, p in zip(merged.teams, merged.positions, strict=True)]
    if first.titles:
        first.titles = [lists[t].titles[p] if p < len(lists[t].titles) else ""
                        for t, p in zip(merged.teams, merged.positions, strict=True)]
    first.teams = [route.names[t] for t in merged.teams]
    return first


class Router:
    """Owns the flags: the routing table, its resident versions, reloads and shadows."""

    def __init__(self, service: RecommendService, *, registry: Path, flags_file: Path, poll_s: float,
                 max_resident_mb: float = 0.0, max_shadow_inflight: int = 1, cache_size: int = 100_000,
                 shadow_time_share: float = 0.1) -> None:
        self.service = service
        self.registry = registry
        self.flags_file = flags_file
        self.poll_s = poll_s
        self.max_resident_bytes = int(max_resident_mb * MB)
        self.max_shadow_inflight = max_shadow_inflight
        # A token bucket of shadow wall time: refilled at ``shadow_time_share`` seconds per
        # second (at most a quarter second banked), spent by each shadow batch's duration.
        # Idle checks alone still let shadows take half the server's spare time at half peak
        # (p99 x1.4); the bucket bounds what shadows can add however much traffic samples.
        self.shadow_budget = TimeBudget(share=shadow_time_share)
        self.cache_size = cache_size
        self.table: RoutingTable | None = None
        self.state = FlagsState()
        self.shadow_stats: dict[str, ShadowStats] = {}
        self._shadow_inflight = 0
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()  # one reload at a time
        self._poller = Poller(self.reload, every_s=poll_s, name="flags-watcher", log=log)

    # -- reload ----------------------------------------------------------------------------
    async def reload(self, *, force: bool = False) -> bool:
        """Read the flags file; if its content changed (or ``force``), validate it, load and
        warm the versions it newly pins, and switch. False, with the old table serving and
        the error recorded, if any step fails; False too when nothing changed. A refused
        content is not retried until it changes (or ``force``: ``twotower admin reload``)."""
        async with self._lock:
            digest, text = _read(self.flags_file)
            if self.table is not None and digest == self.table.digest and not force:
                return False
            if digest == self.state.rejected_digest and not force:
                return False
            added: list[str] = []
            try:
                if text is None:
                    raise ConfigError(str(self.flags_file), digest)
                flags = parse_flags_text(text, source=str(self.flags_file))
                table = await self._build(flags, digest, added)
            except Exception as e:  # any failure: the old flags serve on
                for v in added:
                    self.service.lifecycle.reject(v)  # prepared, never pinned: the embedded store lets go
                where = "" if str(e).startswith(str(self.flags_file)) else f"{self.flags_file}: "
                self.state.error = f"{where}{e}"
                self.state.rejected += 1
                self.state.rejected_digest = digest
                log.error("refused flags: %s; still serving %s", self.state.error,
                          self.table.digest[:12] if self.table is not None else "no flags")
                return False
            self.table = table  # the switch: one reference assignment, read once per batch
            self.service.lifecycle.pin(frozenset(table.models))
            self.state.digest = digest
            self.state.error = ""
            self.state.rejected_digest = ""
            self.state.reloads += 1
            self.state.loaded_at = time.time()
            for key, sh in table.shadows.items():
                self.shadow_stats.setdefault(key, ShadowStats(experiment=sh.experiment.name, variant=sh.name,
                                                              version=sh.arm.version))
            log.info("flags %s (%s): %d experiment(s), resident %s", self.flags_file, digest[:12],
                     len(table.flags.experiments), sorted(table.models) or "CURRENT only")
            return True

    async def _build(self, flags: Flags, digest: str, added: list[str]) -> RoutingTable:
        """A complete table for ``flags``: every pinned version loaded, verified, in the
        feature store and warmed. Appends the versions it prepares anew to ``added`` (the
        caller rejects them if the build fails)."""
        pinned = sorted(flags.pinned_versions())
        old = self.table.models if self.table is not None else {}
        current = self.service.model
        for v in pinned:
            if not (self.registry / v).is_dir():
                raise TwoTowerError(f"pinned version {v} is not in the registry {self.registry}")
        resident = set(pinned) | ({current.version} if current is not None else set())
        total = sum(bundle_bytes(self.registry / v) for v in resident)
        if self.max_resident_bytes and total > self.max_resident_bytes:
            sizes = ", ".join(f"{v} {bundle_bytes(self.registry / v) / MB:.2f} MB" for v in sorted(resident))
            raise ConfigError("max_resident_mb", f"resident versions would take {total / MB:.2f} MB, over the "
                                                 f"limit of {self.max_resident_bytes / MB:g} MB ({sizes})")
        models: dict[str, LoadedModel] = {}
        for v in pinned:
            if v in old:
                models[v] = old[v]
                continue
            if current is not None and current.version == v:
                models[v] = current  # CURRENT is that version: already prepared and warm, share it
                continue
            model = await self.service.lifecycle.candidate(self.registry / v)  # verified, in the store, warm
            added.append(v)
            if self.service.cfg.warmup:
                self.state.warmed.append(v)
            models[v] = model
        for exp in flags.experiments:  # an override the arm's index cannot take is refused, not ignored
            if exp.status == "stopped":
                continue
            for var in exp.variants:
                arm_model = current if var.version == CURRENT else models.get(var.version)
                if arm_model is None:
                    continue
                o = var.overrides
                problem = override_problem(arm_model.bundle.index_spec, nprobe=o.nprobe, ef_search=o.ef_search)
                if problem is not None:
                    field = "nprobe" if o.nprobe is not None and "nprobe" in problem else "ef_search"
                    raise ConfigError(f"experiments[{exp.name}].variants[{var.name}].overrides.{field}",
                                      f"{problem} ({var.version})")
        self.state.resident_bytes = total
        return RoutingTable(flags=flags, digest=digest, models=models, cache_size=self.cache_size)

    # -- polling ---------------------------------------------------------------------------
    def start(self) -> None:
        self._poller.start()

    async def stop(self) -> None:
        await self._poller.stop()
        for t in list(self._shadow_tasks):
            t.cancel()
        if self._shadow_tasks:
            await asyncio.gather(*self._shadow_tasks, return_exceptions=True)

    def status(self) -> dict[str, object]:
        """Fields of the admin ``StatusResponse``."""
        t, s = self.table, self.state
        current = self.service.model
        resident = sorted({*(t.models if t is not None else ()), *((current.version,) if current else ())})
        return {"flags_file": str(self.flags_file), "flags_sha256": s.digest, "flags_error": s.error,
                "flags_reloads": s.reloads, "flags_rejected": s.rejected, "resident_versions": resident,
                "resident_bytes": s.resident_bytes,
                "shadows": [st.to_status() for st in self.shadow_stats.values()]}

    # -- the batch handler -----------------------------------------------------------------
    async def handle(self, current: LoadedModel, reqs: Sequence[RecRequest],
                     queue_s: Sequence[float]) -> list[RecResult | BaseException]:
        """Assign, group by arm, run each group on its own version, label the results,
        then hand sampled requests to the shadows (not awaited)."""
        table = self.table
        if table is None:
            return await self.service.run_batch(current, reqs, queue_s)
        route_of = table.route
        routes = [route_of(r.user_id) for r in reqs]
        if any(route.arm.adjusts_request for route in routes):
            # An arm's default_k / budget_ms make a copy: requests stay as they arrived.
            reqs = [self._adjusted(r, route.arm) if route.arm.adjusts_request else r
                    for r, route in zip(reqs, routes, strict=True)]
        groups: dict[str, list[int]] = {}
        for i, route in enumerate(routes):
            arm = route.arm
            g = groups.get(arm.key)
            if g is None:
                groups[arm.key] = [i]
            else:
                g.append(i)
        # Interleaved users' second lists: their own groups, run beside the primaries.
        seconds: dict[str, list[int]] = {}
        for i, route in enumerate(routes):
            if route.interleave is not None:
                seconds.setdefault(route.interleave.other.key, []).append(i)
        results: list[RecResult | BaseException]
        second: dict[int, RecResult | BaseException] = {}
        if len(groups) == 1 and not seconds:
            arm = routes[0].arm
            model = table.model_for(arm, current)
            results = list(await self.service.run_batch(model, reqs, queue_s, settings=table.settings(model, arm)))
        else:
            jobs = [(routes[idx[0]].arm, idx) for idx in groups.values()]
            jobs += [(routes[idx[0]].interleave.other, idx) for idx in seconds.values()]  # type: ignore[union-attr]

            # Interleaving's two lists of one version read one feature fetch (online.shared_fetch).
            share = SharedFetch() if seconds else None

            async def run(arm: Arm, idx: list[int]) -> list[RecResult | BaseException]:
                model = table.model_for(arm, current)
                return await self.service.run_batch(model, [reqs[i] for i in idx], [queue_s[i] for i in idx],
                                                    settings=table.settings(model, arm), share=share)

            parts = await asyncio.gather(*(run(arm, idx) for arm, idx in jobs), return_exceptions=True)
            results = [RuntimeError("unanswered")] * len(reqs)
            for j, ((_, idx), part) in enumerate(zip(jobs, parts, strict=True)):
                into: Any = results if j < len(groups) else second
                for m, i in enumerate(idx):
                    into[i] = part if isinstance(part, BaseException) else part[m]
        for i, other in second.items():
            res = results[i]
            if type(res) is RecResult:
                results[i] = interleaved(reqs[i], res, other, routes[i].interleave)  # type: ignore[arg-type]
        for res, route in zip(results, routes, strict=True):
            if type(res) is RecResult:
                res.variant = route.label
        if table.shadows:
            self._sample_shadows(table, reqs, routes, results)
        return results

    def _adjusted(self, r: RecRequest, arm: Arm) -> RecRequest:
        """A copy of ``r`` with the overrides that act on the request itself: default_k (only
        where the request left k unset) and budget_ms (its deadline, still capped by the
        client's)."""
        k, deadline = r.k, r.deadline
        if arm.default_k is not None and r.k_default:
            k = min(arm.default_k, self.service.cfg.max_k)
        if arm.budget_ms is not None:
            b = self.service.cfg.budget
            deadline = budget_deadline(r.received, total_ms=arm.budget_ms, network_ms=b.network_ms,
                                       client_deadline=r.client_deadline)
        return replace(r, k=k, deadline=deadline)

    # -- shadows ---------------------------------------------------------------------------
    def _sample_shadows(self, table: RoutingTable, reqs: Sequence[RecRequest], routes: Sequence[UserRoute],
                        results: Sequence[RecResult | BaseException]) -> None:
        picked: dict[str, list[int]] = {}
        for i, route in enumerate(routes):
            if not route.shadows or not isinstance(results[i], RecResult):
                continue
            r = reqs[i]
            key = r.request_id or f"{r.user_id}@{r.received!r}"
            for sh in route.shadows:
                if shadow_sampled(sh.experiment, sh.name, request_id=key):
                    picked.setdefault(sh.key, []).append(i)
        for skey, idx in picked.items():
            sh = table.shadows[skey]
            st = self.shadow_stats[skey]
            st.sampled += len(idx)
            # Shadows are the first thing shed: at the concurrency bound, whenever requests are
            # waiting for a batch, or another primary batch is running beside this one (the
            # server is busy), the shadow work is dropped; ``_shadow`` checks again when it starts.
            b = self.service.batcher
            if self._shadow_inflight >= self.max_shadow_inflight or b.queued or b.inflight > 1:
                st.dropped += len(idx)
                continue
            now = time.monotonic()
            copies = []
            for i in idx:
                c = copy.copy(reqs[i])  # the shadow's own request: nothing flows back to the primary
                c.deadline = budget_deadline(now, total_ms=sh.arm.budget_ms or self.service.cfg.budget.total_ms,
                                             network_ms=self.service.cfg.budget.network_ms,
                                             client_deadline=float("inf"))
                c.received = now
                c.include_titles = False
                copies.append(c)
            primary = [list(results[i].item_ids) for i in idx]  # type: ignore[union-attr]
            self._shadow_inflight += 1
            task = asyncio.get_running_loop().create_task(self._shadow(table, sh, copies, primary, st))
            self._shadow_tasks.add(task)
            task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, table: RoutingTable, sh: Shadow, reqs: list[RecRequest], primary: list[list[str]],
                      st: ShadowStats) -> None:
        try:
            # Yield first: this task was created inside the batch handler, before the primary
            # results are handed to their callers; their wakeups are queued ahead of this one.
            await asyncio.sleep(0)
            # Measured (bench/ab_shadow.py): a shadow that started while primaries were running
            # or queued raised the primary p99 ~5x at half peak. So it runs only on an idle
            # server: no primary batch in flight, none waiting.
            if self.service.batcher.inflight or self.service.batcher.queued or not self.shadow_budget.allow():
                st.dropped += len(reqs)
                return
            current = self.service.model
            if current is None:
                return
            model = table.model_for(sh.arm, current)
            t0 = time.perf_counter()
            results = await self.service.run_batch(model, reqs, [0.0] * len(reqs),
                                                   settings=table.settings(model, sh.arm))
            ms = (time.perf_counter() - t0) * 1000.0
            self.shadow_budget.spend(ms / 1000.0)
            for res, items in zip(results, primary, strict=True):
                if isinstance(res, BaseException):
                    st.errors += 1
                    continue
                k = len(items) or 1
                st.overlap_sum += len(set(res.item_ids) & set(items)) / k
                st.scored += 1
                st.latency_sum_ms += ms
                st.max_latency_ms = max(st.max_latency_ms, ms)
        except asyncio.CancelledError:
            raise
        except Exception:
            st.errors += len(reqs)
            log.exception("shadow %s failed", sh.key)
        finally:
            self._shadow_inflight -= 1
