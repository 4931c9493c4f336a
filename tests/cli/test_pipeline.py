"""The paper pipeline end to end through the CLI on the toy model (tiny settings, a random
dictionary suite): every artifact is made, its lineage leads back to the task vectors and the
dictionaries, the report's index.html shows every figure it lists and each file exists, and a
rerun recomputes nothing."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from icl_cli.cli.app import app

KINDS = ("resid", "attn", "transcoder")


def toy_suite(root: Path, layers=(4, 5)) -> Path:
    """A suite folder of random gated dictionaries for toy-icl (d_model 128), every kind at ``layers``."""
    from icl_cli.dictionaries.base import DictConfig, build
    from icl_cli.dictionaries.io import save_saelens

    root.mkdir(parents=True)
    entries = []
    for layer in layers:
        for kind in KINDS:
            site = {"resid": "resid_pre", "attn": "attn_out", "transcoder": "transcoder"}[kind]
            torch.manual_seed(10 * layer + KINDS.index(kind))
            d = build(DictConfig(d_in=128, d_sae=96, arch="gated", site=site, layer=layer, model="toy-icl"))
            with torch.no_grad():
                for p in d.parameters():
                    p.add_(0.05 * torch.randn_like(p))
                if hasattr(d, "b_mag"):
                    d.b_mag.fill_(0.05)  # many features active on every token
            save_saelens(d, root / f"{kind}.{layer}")
            entries.append({"kind": kind, "layer": layer, "folder": f"{kind}.{layer}", "l0": 40.0, "fvu": 0.5,
                            "ce_recovered": 0.1})
    (root / "manifest.json").write_text(json.dumps({"name": "toy-test-suite", "model": "toy-icl", "dictionaries": entries}))
    return root


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.img, self.links = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.img.append(a["src"])
        elif tag == "a" and not a.get("href", "#").startswith("#"):
            self.links.append(a["href"])


def _ancestors(node: dict) -> set[str]:
    out = {node.get("step")}
    for child in node.get("inputs", {}).values():
        out |= _ancestors(child)
    return out


@pytest.mark.slow
def test_reduced_pipeline_end_to_end(tmp_path):
    suite = toy_suite(tmp_path / "suite")
    store, out = tmp_path / "store", tmp_path / "report"
    args = ["--store", str(store), "--json", "pipeline", "--tasks", "antonyms,en_es", "--layer", "5",
            "--circuit-tasks", "antonyms", "--circuit-layers", "4-5", "--suite", str(suite), "--smoke", "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)

    # every step's artifact, with its lineage
    steps = [a["step"] for a in doc["artifacts"]]
    assert steps.count("clean") == 2 and steps.count("steer") == 2 and steps.count("ablate") >= 4
    assert {"collect", "import-sae", "circuit"} <= set(steps)
    by_name = {}
    from icl_cli.store import Store

    st = Store(store)
    for a in doc["artifacts"]:
        for name in st.get(a["key"]).names:
            by_name[name] = a
    assert {"collect", "import-sae"} <= _ancestors(by_name["pipeline-clean"]["lineage"])
    assert by_name["pipeline-clean-detectors"]["params"]["detectors"] is True
    assert {"steer", "clean", "collect"} <= _ancestors(by_name["pipeline-executors"]["lineage"])
    link = by_name["pipeline-link"]["lineage"]
    assert sorted(c["step"] for c in link["inputs"].values() if c["step"] == "steer") == ["steer", "steer"]
    assert st.get(by_name["pipeline-clean"]["key"]).inputs["sae"] == st.get(by_name["pipeline-executors"]["key"]).inputs["sae"]

    # the report: every figure shown exists, every file it links exists, nothing from the network
    page = (out / "index.html").read_text()
    refs = _Refs()
    refs.feed(page)
    listed = {str(Path(p).relative_to(out.resolve())) for a in doc["artifacts"] for f in a["figures"] for p in f["files"]}
    assert set(refs.img) == {p for p in listed if p.endswith(".png")}
    for rel in set(refs.img) | set(refs.links):
        assert (out / rel).is_file(), rel
    assert not re.search(r"(src|href)=['\"]https?:", page)
    names = " ".join(refs.img)
    for what in ("layer-sweep", "clean-", "executor.png", "executor-normalised", "detector.png", "-mass.png",
                 "cross-task", "-link.png", "faithfulness", "graph"):
        assert what in names, what
    findings = " | ".join(h["finding"] for h in doc["headline"])
    for what in ("L0 reduction", "Executor specificity", "Circuit size at 0.8", "Detector → executor"):
        assert what in findings, what
    assert findings.count("Activation mass of") == 2  # executors (arrows) and detectors (outputs)

    # a rerun computes nothing
    r2 = CliRunner().invoke(app, args)
    assert r2.exit_code == 0, r2.stderr[-3000:]
    assert "computing" not in r2.stderr and "reusing" in r2.stderr
    assert [a["key"] for a in json.loads(r2.stdout)["artifacts"]] == [a["key"] for a in doc["artifacts"]]
