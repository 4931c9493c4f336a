"""``icl circuit serve``: circuit graphs in a browser, offline, on this machine only.

    docs = load_graphs(store, ["pipeline-circuit-antonyms", "run/circuit.h5"])
    server = make_server(docs, port=8700)     # bound to 127.0.0.1, nothing else
    server.url                                # http://127.0.0.1:8700/
    server.serve_forever()

A graph is given by a circuit artifact of the store (key, key prefix or name), a circuit.h5 file
or an artifact folder holding one (all three exported afresh by export.attribution_graph, so
older artifacts show the current format), or an exported graph.json (shown as it is).

Routes, GET only (the layout circuit-tracer's local server uses, so its frontend reads it too):
    /, /index.html              the viewer page (static/index.html)
    /static/<file>              viewer.js, viewer.css, vendor/d3.min.js, vendor/dagre.min.js
    /data/graph-metadata.json   {"graphs": [one index entry per graph]}
    /graph_data/<slug>.json     one graph
The page loads nothing from elsewhere: d3 and dagre are vendored (static/vendor/VENDOR.json
records their versions, licences and checksums; scripts/vendor_viewer.sh refreshes them).
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from icl_cli.circuit.export import EDGE_THRESHOLD, NODE_THRESHOLD, attribution_graph, index_entry
from icl_cli.core.errors import IclError

logger = logging.getLogger("icl")

HOST = "127.0.0.1"
STATIC = Path(__file__).parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".json": "application/json", ".txt": "text/plain; charset=utf-8"}


def load_graphs(store, refs: list[str], node_threshold: float = NODE_THRESHOLD,
                edge_threshold: float = EDGE_THRESHOLD) -> list[dict]:
    """The attribution-graph documents of ``refs``, one per distinct graph, in the order given."""
    from icl_cli.circuit.graph import read_h5

    docs: dict[str, dict] = {}
    for ref in refs:
        path = Path(ref)
        if path.is_file() and path.suffix == ".json":
            doc = _read_json(path)
        else:
            if path.is_dir() and (path / "circuit.h5").is_file():
                path = path / "circuit.h5"
            if path.is_file():
                doc = attribution_graph(read_h5(path), node_threshold, edge_threshold)
            else:
                art = store.resolve(ref, step="circuit")
                g = read_h5(art.file("circuit.h5"))
                doc = attribution_graph(g, node_threshold, edge_threshold)
                doc["metadata"]["slug"] = f"{'+'.join(g.attrs.get('tasks') or ['circuit'])}-{art.key[:10]}"
        docs.setdefault(doc["metadata"]["slug"], doc)
    if not docs:
        raise IclError("no graphs given: pass circuit artifacts (key, prefix or name), circuit.h5 files or graph.json files")
    return list(docs.values())


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise IclError(f"{path} is not a readable graph.json ({exc})") from None
    if not isinstance(doc, dict) or not {"metadata", "nodes", "links"} <= set(doc) or "slug" not in doc["metadata"]:
        raise IclError(f"{path} is not an attribution graph (metadata with a slug, nodes, links); give an `icl circuit` export")
    doc["metadata"].setdefault("info", {"description": doc["metadata"]["slug"]})
    return doc


class GraphServer(ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 holding the viewer's files and the graphs' JSON in memory."""

    daemon_threads = True

    def __init__(self, docs: list[dict], port: int):
        self.files: dict[str, tuple[bytes, str]] = {}
        for f in sorted(STATIC.rglob("*")):
            if f.is_file():
                self.files["/static/" + f.relative_to(STATIC).as_posix()] = (f.read_bytes(), _type(f))
        page = self.files["/static/index.html"]
        self.files["/"] = self.files["/index.html"] = page
        listing = {"graphs": [index_entry(d) for d in docs]}
        self.files["/data/graph-metadata.json"] = (json.dumps(listing, ensure_ascii=False).encode(), _TYPES[".json"])
        for d in docs:
            self.files[f"/graph_data/{d['metadata']['slug']}.json"] = (json.dumps(d, ensure_ascii=False).encode(),
                                                                      _TYPES[".json"])
        try:
            super().__init__((HOST, port), _Handler)
        except OSError as exc:
            raise IclError(f"cannot listen on {HOST}:{port} ({exc.strerror or exc}); pass another --port "
                           "(0 picks a free one)") from None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/"


def make_server(docs: list[dict], port: int = 8700) -> GraphServer:
    """A GraphServer for ``docs`` on 127.0.0.1:``port`` (0: a free port); call serve_forever()."""
    return GraphServer(docs, port)


def _type(path: Path) -> str:
    return _TYPES.get(path.suffix, "application/octet-stream")


class _Handler(BaseHTTPRequestHandler):
    server: GraphServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        found = self.server.files.get(path)
        if found is None:
            self.send_error(HTTPStatus.NOT_FOUND, "no such file")
            return
        data, ctype = found
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        logger.debug("serve: " + format, *args)
