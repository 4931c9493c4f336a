"""Load circuit graphs in the viewer of `icl circuit serve` with headless Chromium, exercise it
(every graph; click the metric's node; pin the top nodes, which runs dagre) and save screenshots;
exit 1 on any JavaScript error or failed load.

    .venv/bin/python scripts/viewer_screenshots.py --out shots REF [REF...]
    .venv/bin/python scripts/viewer_screenshots.py --store /tmp/store --out shots pipeline-circuit-antonyms

REF as for `icl circuit serve`: a circuit artifact (key, prefix, name), a circuit.h5 or a graph.json.
Needs Debian's chromium and chromium-driver (tests/circuit/webdriver.py drives them).
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "circuit")]

from webdriver import Browser, available  # noqa: E402

from icl_cli.circuit.viewer.serve import load_graphs, make_server  # noqa: E402
from icl_cli.store import Store  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("refs", nargs="+")
    ap.add_argument("--store", default="artifacts")
    ap.add_argument("--out", default="viewer-shots")
    ap.add_argument("--width", type=int, default=1600)
    args = ap.parse_args()
    why = available()
    if why:
        print(f"skipped: {why}", file=sys.stderr)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    docs = load_graphs(Store(args.store), args.refs)
    server = make_server(docs, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    errors: list[str] = []
    try:
        with Browser(width=args.width, height=1300) as b:
            for doc in docs:
                slug = doc["metadata"]["slug"]
                b.open(f"{server.url}?slug={slug}")
                b.wait_for(f"return window.__viewerReady === {slug!r}")
                b.screenshot(out / f"{slug}-1-graph.png")
                b.run("var s = window.iclViewer.state; s.clickedId = s.data.nodes.find(d => d.feature_type === 'logit').id;"
                      " window.iclViewer.update();")
                b.screenshot(out / f"{slug}-2-metric-clicked.png")
                b.click("#pin-top")
                b.wait_for("return window.iclViewer.state.pinned.length > 0")
                b.resize(args.width, max(1300, b.full_page_height() + 120))
                b.screenshot(out / f"{slug}-3-pinned.png")
                b.resize(args.width, 1300)
                page = b.run("return window.__viewerErrors") or []
                errors += [f"{slug}: {e}" for e in page + b.severe_logs()]
    finally:
        server.shutdown()
        server.server_close()
    for e in errors:
        print("ERROR", e, file=sys.stderr)
    print(f"{len(docs)} graph(s), screenshots in {out}, {len(errors)} error(s)", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
