"""Generate the Python stubs in ``online/proto`` from ``protos/`` (``--check``:
fail if the committed stubs are stale). ``python -m online.protogen [--check]``."""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "online" / "proto"
FILES = ["twotower/v1/recommender.proto"]


def generate(dest: Path) -> list[Path]:
    from grpc_tools import protoc

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTOS}", f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}",
                *[str(PROTOS / f) for f in FILES]]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out = []
        for p in sorted(Path(tmp).rglob("*.py*")):
            text = p.read_text()
            # Generated code imports its siblings absolutely (twotower.v1...); make them package-relative.
            text = text.replace("from twotower.v1 import", "from . import")
            target = dest / p.name
            target.write_text(text)
            out.append(target)
    (dest / "__init__.py").write_text('"""Generated from protos/ by `python -m online.protogen`; do not edit."""\n')
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    if not args.check:
        for p in generate(OUT):
            print(f"wrote {p.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = [p.name for p in fresh if not (OUT / p.name).is_file() or not filecmp.cmp(p, OUT / p.name, False)]
    if stale:
        print(f"stale generated stubs in online/proto: {', '.join(stale)}; run `make protos`", file=sys.stderr)
        return 1
    print("generated stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
