"""The README's circuit figures on toy-icl: per task the circuit's size at faithfulness 0.95 and
0.8, and whether output → arrow edges join consecutive sites (the detector → executor shape).

    .venv/bin/python benchmarks/circuit_toy.py --store /tmp/circ --tasks antonyms,en_es,...

Runs `icl circuit` (reused when the artifact exists) and reads each circuit.h5.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TASKS = "antonyms,en_es,country_capital,singular_plural,present_simple_past_simple,location_continent"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="artifacts")
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--saes", default="toy-icl-suite")
    ap.add_argument("--extra", default="", help="more `icl circuit` options, space-separated")
    a = ap.parse_args()
    from icl_cli.circuit.graph import read_h5
    from icl_cli.store import Store

    icl = [sys.executable, "-m", "icl_cli", "--store", a.store, "--json", "circuit", "--saes", a.saes, *a.extra.split()]
    print("| task | nodes at F ≥ 0.95 (F) | nodes at F ≥ 0.8 | edges | output → arrow edges (share of |weight|) |")
    print("|---|---|---|---|---|")
    for t in a.tasks.split(","):
        out = subprocess.run([*icl, "--task", t], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"| {t} | failed: {out.stderr.strip().splitlines()[-1]} | | | |")
            continue
        key = json.loads(out.stdout)["key"]
        g = read_h5(Store(a.store).resolve(key).file("circuit.h5"))
        ok8 = g.sweep_n_nodes[g.sweep_faithfulness >= 0.8]
        src, dst = g.edge_src, g.edge_dst
        oa = (g.role[src] == "output") & (g.role[dst] == "arrow")
        share = np.abs(g.edge_weight[oa]).sum() / max(np.abs(g.edge_weight).sum(), 1e-12)
        kinds = sorted({f"{g.site[s]}{g.layer[s]}→{g.site[d]}{g.layer[d]}" for s, d in zip(src[oa], dst[oa])})
        print(f"| {t} | {g.attrs['n_selected']} ({g.attrs['faithfulness']:.2f}) | ≤ {ok8.min()} | {g.n_edges} | "
              f"{int(oa.sum())} ({share:.1%}; {', '.join(kinds[:4])}{', …' if len(kinds) > 4 else ''}) |")


if __name__ == "__main__":
    main()
