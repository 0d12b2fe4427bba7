"""A/B subcommands: ``twotower ab validate FILE`` and ``twotower ab assign --flags FILE --user U``.

Both read only the flags file (no registry, no Redis), so an operator can check a
file and a QA engineer a user before the file reaches a server. Errors are one
line on stderr and exit code 2, with or without the ``twotower`` front's handler.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from towers.errors import ConfigError

if TYPE_CHECKING:
    from towers.flags import Experiment, Flags


def register(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Adds ``twotower ab validate|assign``; returns the ``ab`` subcommands, so the offline
    package can add ``ab report`` (it reads the logs) without online importing offline."""
    p = sub.add_parser("ab", help="A/B flags: validate a flags file, show a user's assignment, report outcomes")
    asub = p.add_subparsers(dest="ab_command", required=True, parser_class=type(p))

    v = asub.add_parser("validate", help="check a flags file and summarise its experiments")
    v.add_argument("file", type=Path)
    v.add_argument("--json", action="store_true", help="print the validated flags as JSON")
    v.set_defaults(func=cmd_validate)

    a = asub.add_parser("assign", help="print a user's variant in every experiment")
    a.add_argument("--flags", required=True, type=Path)
    a.add_argument("--user", required=True)
    a.add_argument("--json", action="store_true", help="print one JSON object")
    a.set_defaults(func=cmd_assign)
    return asub


def _load(path: Path, command: str) -> Flags | None:
    from towers.flags import load_flags

    try:
        return load_flags(path)
    except ConfigError as e:
        # The field alone may not say which file; the path does.
        where = "" if e.field == str(path) else f"{path}: "
        print(f"twotower ab {command}: error: {where}{e}", file=sys.stderr)
        return None


def _reach(flags: Flags, e: Experiment) -> float:
    """Expected share of all users allocated to ``e``: its allocation times the share
    not taken by earlier running experiments that set a common parameter (the hashes
    are independent, so the shares multiply; forced users are ignored)."""
    if not e.running:
        return 0.0
    share = e.allocation
    for other in flags.experiments[:flags.experiments.index(e)]:
        if other.running and flags.exclusive(other, e):
            share *= 1.0 - other.allocation
    return share


def _summary(flags: Flags) -> list[str]:
    lines = [f"{len(flags.experiments)} experiment(s), "
             f"{sum(e.running for e in flags.experiments)} running"]
    for e in flags.experiments:
        sets = ", ".join(sorted(e.sets)) or "nothing"
        lines.append(f"{e.name}: {e.status}, allocation {e.allocation:g} (reach {_reach(flags, e):.1%}), "
                     f"salt {e.salt!r}, sets {sets}")
        for i, v in enumerate(e.variants):
            share = f"shadow {v.shadow:g}" if v.shadow is not None else f"weight {v.weight:g}"
            role = " (control)" if i == 0 else ""
            ov = v.overrides.model_dump(exclude_none=True)
            extra = " " + " ".join(f"{k}={val}" for k, val in ov.items()) if ov else ""
            lines.append(f"  {v.name}{role}: {share}, version {v.version}{extra}")
        if e.force:
            lines.append(f"  forced: {len(e.force)} user(s)")
        excl = [o.name for o in flags.experiments if o is not e and flags.exclusive(o, e)]
        if excl:
            lines.append(f"  mutually exclusive with: {', '.join(excl)}")
    pinned = sorted(flags.pinned_versions())
    lines.append(f"pinned versions: {', '.join(pinned) if pinned else 'none'}")
    return lines


def cmd_validate(args: argparse.Namespace) -> int:
    flags = _load(args.file, "validate")
    if flags is None:
        return 2
    if args.json:
        print(json.dumps({"valid": True, "pinned_versions": sorted(flags.pinned_versions()),
                          **flags.model_dump(mode="json")}, indent=2))
    else:
        print(f"{args.file}: valid")
        print("\n".join(_summary(flags)))
    return 0


def cmd_assign(args: argparse.Namespace) -> int:
    from towers.assign import assign

    flags = _load(args.flags, "assign")
    if flags is None:
        return 2
    result = assign(flags, args.user)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    print(f"user {args.user}: version {result.version}, variant {result.label}")
    ov = result.overrides.model_dump(exclude_none=True)
    print("overrides: " + (" ".join(f"{k}={v}" for k, v in ov.items()) if ov else "none"))
    for a in result.experiments:
        why = f"{a.reason} by {a.excluded_by}" if a.excluded_by else a.reason
        shadows = f", shadows {','.join(a.shadows)}" if a.shadows else ""
        print(f"  {a.experiment}: {a.variant or '-'} ({why}; allocation bucket {a.allocation_bucket}, "
              f"variant bucket {a.variant_bucket}; version {a.version}{shadows})")
    return 0
