"""Mutation score per module from a mutmut 3 `mutants/` folder (used by scripts/mutation.sh).

    python scripts/mutation_score.py /tmp/icl-mutation/mutants [--survivors]

Score = killed / (killed + survived + no tests). Timeouts (the tests ran past mutmut's limit,
which on a loaded machine is not proof of a kill) and unchecked mutants are counted apart.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

KILLED = {1, 3, -11, -9}
TIMEOUT = {36, 24, -24, 152, 255}


def main(folder: str, survivors: bool = False) -> None:
    rows = []
    for meta in sorted(Path(folder).rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        c = Counter("unchecked" if v is None else "killed" if v in KILLED else "timeout" if v in TIMEOUT else "survived" if v == 0
                    else "no tests" if v in (5, 33) else "other" for v in codes.values())
        if c["killed"] + c["survived"] + c["no tests"] + c["timeout"] == 0:
            continue
        rows.append((str(meta.relative_to(folder))[: -len(".meta")], c))
        if survivors:
            for key, v in sorted(codes.items()):
                if v in (0, 5, 33):
                    print(f"  survived  {key}")
    print(f"{'module':40} {'killed':>7} {'survived':>8} {'no tests':>8} {'score':>6} {'timeout':>7} {'unchecked':>9}")
    for name, c in rows:
        done = c["killed"] + c["survived"] + c["no tests"]
        print(f"{name:40} {c['killed']:7} {c['survived']:8} {c['no tests']:8} {c['killed'] / max(done, 1):6.0%} {c['timeout']:7} {c['unchecked']:9}")


if __name__ == "__main__":
    main(sys.argv[1], "--survivors" in sys.argv)
