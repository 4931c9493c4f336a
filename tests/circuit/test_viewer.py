"""`icl circuit serve`: the server answers on 127.0.0.1 only with the viewer, its vendored
libraries (unchanged since vendoring) and the graphs; the page loads nothing from elsewhere; in
headless Chromium it draws every graph, clicks, pins (dagre) and filters without a JavaScript error."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from html.parser import HTMLParser

import pytest

from icl_cli.circuit.export import attribution_graph
from icl_cli.circuit.viewer.serve import STATIC, load_graphs, make_server
from icl_cli.core.errors import IclError
from tests.circuit import webdriver
from tests.circuit.test_export import random_graph, small_graph


@pytest.fixture(scope="module")
def docs():
    return [attribution_graph(small_graph()), attribution_graph(random_graph(3, n_layers=3, per_site=6)),
            attribution_graph(small_graph(per_position=True), 1.0, 1.0)]


@pytest.fixture(scope="module")
def server(docs):
    srv = make_server(docs, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, b"", ""


def test_serves_viewer_libraries_and_graphs_on_localhost_only(server, docs):
    assert server.server_address[0] == "127.0.0.1" and server.url.startswith("http://127.0.0.1:")
    status, page, ctype = get(server.url)
    assert status == 200 and ctype.startswith("text/html") and b"viewer.js" in page
    for path in ("static/viewer.js", "static/viewer.css", "static/vendor/d3.min.js", "static/vendor/dagre.min.js"):
        status, body, _ = get(server.url + path)
        assert status == 200 and body == (STATIC / path.removeprefix("static/")).read_bytes()
    status, body, _ = get(server.url + "data/graph-metadata.json")
    listing = json.loads(body)["graphs"]
    assert [g["slug"] for g in listing] == [d["metadata"]["slug"] for d in docs]
    assert all(g["node_threshold"] in (0.8, 1.0) for g in listing)
    status, body, _ = get(server.url + f"graph_data/{docs[1]['metadata']['slug']}.json")
    assert json.loads(body) == json.loads(json.dumps(docs[1]))
    for bad in ("graph_data/nope.json", "static/../serve.py", "..%2F..%2Fetc%2Fpasswd", "static/vendor/"):
        assert get(server.url + bad)[0] == 404


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v is not None]


def test_page_loads_nothing_from_elsewhere():
    parser = _Refs()
    parser.feed((STATIC / "index.html").read_text())
    assert parser.refs and all(not re.match(r"^(https?:)?//", r) for r in parser.refs), parser.refs
    for r in parser.refs:
        assert r.startswith("data:") or (r.startswith("static/") and (STATIC / r.removeprefix("static/")).is_file()), r
    code = (STATIC / "viewer.js").read_text()
    assert not re.search(r"""(fetch|d3\.json|d3\.text|import)\(\s*['"](https?:)?//""", code)


def test_vendored_files_are_the_recorded_ones():
    record = json.loads((STATIC / "vendor" / "VENDOR.json").read_text())
    assert {r["name"] for r in record} == {"d3", "@dagrejs/dagre"}
    for r in record:
        data = (STATIC / "vendor" / r["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"], r["file"]
        assert r["version"] in data.decode()  # d3's banner and dagre's `version` name it
        assert (STATIC / "vendor" / r["license_file"]).read_text().strip()
        assert b"sourceMappingURL" not in data  # no request for a map that is not shipped


def test_refs_graph_json_circuit_h5_and_errors(tmp_path, docs):
    import h5py

    from icl_cli.circuit.graph import write_h5
    from icl_cli.store import Store

    (tmp_path / "a.json").write_text(json.dumps(docs[0]))
    with h5py.File(tmp_path / "circuit.h5", "w") as f:
        write_h5(f, random_graph(3, n_layers=3, per_site=6))
    store = Store(tmp_path / "store")
    got = load_graphs(store, [str(tmp_path / "a.json"), str(tmp_path), str(tmp_path / "a.json")])
    assert [d["metadata"]["slug"] for d in got] == [docs[0]["metadata"]["slug"], docs[1]["metadata"]["slug"]]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(IclError, match="not an attribution graph"):
        load_graphs(store, [str(tmp_path / "bad.json")])
    with pytest.raises(IclError, match="no artifact or name"):
        load_graphs(store, ["no-such-circuit"])


def test_cli_serve_prints_the_url_and_serves(tmp_path, docs):
    (tmp_path / "g.json").write_text(json.dumps(docs[1]))
    proc = subprocess.Popen([sys.executable, "-m", "icl_cli", "--store", str(tmp_path / "store"), "circuit", "serve",
                             str(tmp_path / "g.json"), "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        url = proc.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url), (url, proc.stderr.read() if proc.poll() is not None else "")
        status, body, _ = get(url + "data/graph-metadata.json")
        assert status == 200 and json.loads(body)["graphs"][0]["slug"] == docs[1]["metadata"]["slug"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def visible(doc: dict, threshold: float) -> int:
    return sum(1 for n in doc["nodes"] if not isinstance(n["influence"], float) or n["influence"] <= threshold + 1e-12)


@pytest.mark.skipif(webdriver.available() is not None, reason=str(webdriver.available()))
def test_viewer_in_headless_chromium(server, docs, tmp_path):
    shots = tmp_path / "shots"
    shots.mkdir()
    errors = "return window.__viewerErrors && window.__viewerErrors.length ? window.__viewerErrors : null"
    with webdriver.Browser(width=1400, height=1000) as b:
        wait = lambda script: b.wait_for(script, abort_if=errors)  # noqa: E731
        b.open(server.url)
        for i, doc in enumerate(docs):
            slug = doc["metadata"]["slug"]
            if i:  # the graph menu switches graphs
                b.run("var s = document.getElementById('graph-select'); s.value = arguments[0];"
                      " s.dispatchEvent(new Event('change'));", slug)
            wait(f"return window.__viewerReady === {slug!r}")
            threshold = b.run("return window.iclViewer.state.threshold")
            assert threshold >= max(n["influence"] or 0 for n in doc["nodes"])  # every exported node shows at first
            assert b.run("return document.querySelectorAll('path.node').length") == visible(doc, threshold)
            labels = b.run("return Array.from(document.querySelectorAll('.col-label')).map(e => e.textContent)")
            used = sorted({n["ctx_idx"] for n in doc["nodes"]})
            assert labels == [doc["metadata"]["prompt_tokens"][c] for c in used]  # columns say their role
            rows = b.run("return Array.from(document.querySelectorAll('.row-labels text')).map(e => e.textContent)")
            assert rows == ["roles", *doc["metadata"]["row_labels"], "metric"]  # bottom to top
            # a real click on the metric's node lists its inputs with their weights
            logit = next(n for n in doc["nodes"] if n["feature_type"] == "logit")
            b.click(f'path.node[data-node-id="{logit["node_id"]}"]')
            wait("return document.querySelectorAll('#connections .conn-row').length > 0")
            n_in = sum(1 for lk in doc["links"] if lk["target"] == logit["node_id"])
            assert b.run("return document.querySelectorAll('#connections .conn-row').length") == min(n_in, 40)
            shown = b.run("return Array.from(document.querySelectorAll('.conn-weight')).map(e => e.textContent)")
            assert all(w not in ("+0.000", "−0.000", "+0.00", "−0.00") for w in shown)
            # pin the top nodes: dagre lays out a subgraph with fractional weights
            b.click("#pin-top")
            wait("return document.querySelectorAll('#subgraph-svg .sg-node').length > 0")
            pinned = b.run("return window.iclViewer.state.pinned.length")
            assert b.run("return document.querySelectorAll('#subgraph-svg .sg-node').length") == pinned > 1
            b.screenshot(shots / f"{i}.png")
            # the slider hides the less influential nodes
            b.run("var r = document.getElementById('threshold'); r.value = 0.3; r.dispatchEvent(new Event('input'));")
            pins = set(b.run("return window.iclViewer.state.pinned"))
            want = visible(doc, 0.3) + sum(1 for n in doc["nodes"] if (n["influence"] or 0) > 0.3 and n["node_id"] in pins)
            wait(f"return document.querySelectorAll('path.node').length === {want}")  # pinned nodes stay
            b.click("#clear-pins")
        found = b.run("return window.__viewerErrors") + b.severe_logs()
    assert found == []


def test_port_in_use_is_a_one_line_error(server, docs):
    with pytest.raises(IclError, match="pass another --port"):
        make_server(docs, port=server.server_address[1])
