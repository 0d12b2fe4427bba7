"""Team-draft interleaving (Radlinski, Kurup and Joachims, CIKM 2008): two rankers' lists
merged into one, each item credited to the ranker ("team") that picked it.

Like captains picking players: in each round the team with fewer picks so far (a coin
decides a tie) adds its highest-ranked item not already shown. So every prefix of the merged
list holds as many items of each team as possible (within one), a ranker's better items
surface near the top in proportion to its quality, and a click on an item is evidence for
the team that contributed it (``offline.ab_interleave`` turns clicks into a preference per
user). The coin is a keyed hash of the request id and the round, so the same request merges
the same way in every process and on a retry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Interleaved:
    items: list[str]
    teams: list[int]  # 0: the first list contributed the item, 1: the second
    positions: list[int]  # the item's position in the list that contributed it


def _coin(key: str, round_: int) -> int:
    return hashlib.blake2b(f"{key}|{round_}".encode(), digest_size=1).digest()[0] & 1


def team_draft(a: Sequence[str], b: Sequence[str], *, k: int, key: str) -> Interleaved:
    """Merge ``a`` and ``b`` (each ranked best first, without repeats) into at most ``k``
    items. A list that runs out leaves the rest of the picks to the other."""
    lists = (a, b)
    shown: set[str] = set()
    cursor = [0, 0]
    picks = [0, 0]
    out = Interleaved([], [], [])
    round_ = 0
    while len(out.items) < k:
        # Skip what the other team already placed: each team's next candidate.
        for t in (0, 1):
            while cursor[t] < len(lists[t]) and lists[t][cursor[t]] in shown:
                cursor[t] += 1
        left = [cursor[t] < len(lists[t]) for t in (0, 1)]
        if not any(left):
            break
        if picks[0] != picks[1]:
            team = 0 if picks[0] < picks[1] else 1
        else:
            team = _coin(key, round_)
            round_ += 1
        if not left[team]:
            team = 1 - team
        item = lists[team][cursor[team]]
        shown.add(item)
        out.items.append(item)
        out.teams.append(team)
        out.positions.append(cursor[team])
        picks[team] += 1
        cursor[team] += 1
    return out
