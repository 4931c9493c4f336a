"""icl report on hand-made artifacts: the numbers shown equal ones computed here by hand, the
figures are real images that index.html references, lineage and parameters are shown."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from icl_cli.cli.app import app
from icl_cli.clean.cleaning import CleanResult
from icl_cli.clean.cleaning import write_h5 as write_clean
from icl_cli.collect.vectors import TaskResult
from icl_cli.collect.vectors import write_h5 as write_collect
from icl_cli.store import StepSpec, Store

LAYERS = [0, 1, 2]
SWEEP = {  # task -> 0-shot nll, few-shot nll, TV nll per layer
    "antonyms": (2.0, 0.0, [1.8, 1.0, 0.5]),
    "en_es": (3.0, 1.0, [3.2, 2.0, 1.5]),
}


def _collect(st) -> None:
    out = {}
    for t, (zs, fs, tv) in SWEEP.items():
        sweep = {"zero_shot_nll": zs, "few_shot_nll": fs, "zero_shot_acc": 0.1, "few_shot_acc": 0.9,
                 "tv_nll": tv, "tv_acc": [0.2, 0.5, 0.8], "tv_replace_nll": [2.5, 2.4, 2.3], "tv_replace_acc": [0.1, 0.1, 0.2]}
        mass = torch.zeros(6, 8)
        mass[3, :4] = 3.0  # arrow
        mass[4, :4] = 1.0  # output
        out[t] = TaskResult(torch.zeros(3, 4), torch.zeros(3, 4), sweep, LAYERS[int(np.argmin(tv))], ["x"], 10, {"sae" * 3: mass})
    with st.h5("collect.h5") as f:
        write_collect(f, LAYERS, out)


CLEAN = {  # task -> (l0 by method, nll by method)
    "antonyms": ({"recon": 20, "cleaned": 4, "ito_5": 5, "ito_20": 20},
                 {"zero_shot": 2.0, "tv": 0.5, "recon": 0.9, "cleaned": 0.4, "ito_5": 1.1, "ito_20": 0.7}),
    "en_es": ({"recon": 10, "cleaned": 5, "ito_5": 5, "ito_20": 10},
              {"zero_shot": 3.0, "tv": 1.5, "recon": 2.1, "cleaned": 1.2, "ito_5": 2.4, "ito_20": 1.8}),
}


def _clean(st) -> None:
    out = {t: CleanResult([3, 1, 7][: l0["cleaned"]], [2.0, 1.0, 0.5][: l0["cleaned"]], l0, nll, {m: 0.5 for m in nll}, 100,
                          {"l1": [0.01, 0.1], "l0": [l0["cleaned"] + 2, l0["cleaned"]], "nll": [nll["cleaned"], nll["cleaned"] + 0.2]})
           for t, (l0, nll) in CLEAN.items()}
    with st.h5("clean.h5") as f:
        write_clean(f, 2, out)


@pytest.fixture()
def store(tmp_path):
    s = Store(tmp_path / "store")
    tv = s.run(StepSpec("collect", {"model": "toy-icl", "n_shot": 4, "n_prompts": 2}, {}, 1), _collect, name="tv").artifact
    cl = s.run(StepSpec("clean", {"l1": 0.05, "layer": 2}, {"tv": tv}, 1), _clean, name="cl").artifact
    return s, tv, cl


def test_collect_and_clean_numbers_are_the_hand_computed_ones(store):
    from icl_cli.report import build_report

    s, tv, cl = store
    rep = build_report(s, ["cl"], with_inputs=True)
    assert [sec.step for sec in rep.sections] == ["collect", "clean"]  # ancestors first
    col, cln = rep.sections
    # mean TV nll per layer, by hand
    assert col.summary["mean"]["tv_nll"] == pytest.approx([(1.8 + 3.2) / 2, 1.5, 1.0])
    assert col.summary["most_common_best_layer"] == 2
    # L0 reduction: mean cleaned L0 4.5 against mean recon L0 15
    assert cln.summary["l0_reduction"] == pytest.approx(1 - 4.5 / 15)
    from icl_cli.clean.cleaning import read_h5
    from icl_cli.report.renderers.clean import method_points, sweep_points

    _, results = read_h5(cl.file("clean.h5"))
    pts = method_points(results)
    # L0 fraction = L0/L0_recon; loss delta = (nll_TV − nll_m)/nll_0shot
    np.testing.assert_allclose(pts["cleaned"], [[4 / 20, (0.5 - 0.4) / 2.0], [5 / 10, (1.5 - 1.2) / 3.0]])
    np.testing.assert_allclose(pts["ito_5"], [[5 / 20, (0.5 - 1.1) / 2.0], [5 / 10, (1.5 - 2.4) / 3.0]])
    assert pts["recon"][:, 0].tolist() == [1.0, 1.0]
    lams, sp = sweep_points(results)
    assert lams == [0.01, 0.1]
    np.testing.assert_allclose(sp[0], [[6 / 20, 0.1 / 2.0], [4 / 20, (0.5 - 0.6) / 2.0]])
    # the activation mass table: 3 of every 4 units on the arrow
    mass = [t for t in col.tables if t.title.startswith("activation mass")][0]
    assert mass.rows[0][mass.columns.index("arrow")] == "75.0"
    assert mass.rows[0][mass.columns.index("output")] == "25.0"


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src, self.href = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.src.append(a["src"])
        if tag == "a" and "href" in a and not a["href"].startswith("#"):
            self.href.append(a["href"])


def test_cli_writes_figures_that_index_html_references(store, tmp_path):
    s, tv, cl = store
    out = tmp_path / "rep"
    r = CliRunner().invoke(app, ["--store", str(s.root), "--json", "report", "cl", "--inputs", "--out", str(out)])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert Path(doc["index"]) == out.resolve() / "index.html"
    page = (out / "index.html").read_text()
    refs = _Refs()
    refs.feed(page)
    shown = set(refs.src)
    figures = {str(Path(p).relative_to(out.resolve())) for a in doc["artifacts"] for f in a["figures"] for p in f["files"]}
    assert {p for p in figures if p.endswith(".png")} == shown  # every figure is shown, nothing else
    for rel in shown | set(refs.href):
        assert (out / rel).is_file(), rel
    for rel in shown:
        assert (out / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / rel).with_suffix(".svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert len([p for p in shown if "collect" in p]) == 2 and len([p for p in shown if "clean" in p]) == 2
    assert not re.search(r"(src|href)=['\"]https?:", page)  # offline: nothing from the network
    # lineage and parameters of each artifact
    assert cl.key[:12] in page and tv.key[:12] in page
    assert doc["artifacts"][1]["lineage"]["inputs"]["tv"]["key"] == tv.key
    assert "Parameters" in page and "n_prompts" in page
    # headline: the L0 reduction beside the paper's
    assert any("L0 reduction" in h["finding"] and "15.0 → 4.5" in h["ours"] for h in doc["headline"])


def test_rerun_keeps_unchanged_figures(store, tmp_path):
    s, _, _ = store
    out = tmp_path / "rep"
    run = lambda: CliRunner().invoke(app, ["--store", str(s.root), "-q", "report", "cl", "--inputs", "--out", str(out)])  # noqa: E731
    assert run().exit_code == 0
    pngs = sorted((out / "figures").glob("*.png"))
    stamp = {p: p.stat().st_mtime_ns for p in pngs}
    r = run()
    written = r.stdout.split()  # -q: every path written, index.html first
    assert r.exit_code == 0 and written[0] == str((out / "index.html").resolve())
    assert set(written[1:]) == {str(p.resolve()) for p in (out / "figures").iterdir()}
    assert {p: p.stat().st_mtime_ns for p in pngs} == stamp
    (out / "figures" / pngs[0].name).unlink()  # a lost figure is drawn again
    assert run().exit_code == 0 and (out / "figures" / pngs[0].name).exists()


def test_terminal_report_and_errors(store):
    s, _, _ = store
    r = CliRunner().invoke(app, ["--store", str(s.root), "report", "cl", "tv"])
    assert r.exit_code == 0, r.stderr
    assert "resid_pre[layer]" in r.stdout  # markup-like text is shown as written
    assert "L0 recon → cleaned" in r.stdout and "20 → 4" in r.stdout
    assert "collect" in r.stdout and "tv:" in r.stdout  # the lineage tree names the input
    r = CliRunner().invoke(app, ["--store", str(s.root), "report", "nosuchthing"])
    assert r.exit_code == 1 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_steer_heatmaps_and_specificity(tmp_path):
    from icl_cli.report import build_report
    from icl_cli.steer.heatmaps import SteerResult, write_h5

    nll = torch.tensor([[0.5, 2.0, 1.5, 2.0],   # task a: feature 10 halves its loss
                        [1.0, 0.8, 1.0, 1.0],   # task b: feature 11 lowers its loss by 20%
                        [3.0, 3.0, 3.0, 2.9]])  # task c: feature 13 barely helps
    base = torch.tensor([1.0, 1.0, 3.0])
    effect = (base[:, None] - torch.minimum(nll, base[:, None])) / base[:, None]  # by hand: SPEC §6
    r = SteerResult("executor", 2, "toy-icl", ["a", "b", "c"], [10, 11, 12, 13], nll, torch.zeros(3, 4), base,
                    torch.zeros(3), {"a": [10], "b": [11], "c": [13]}, {"a": [10], "b": [11], "c": []}, 15.0, effect,
                    None, 0.2, 0.5)
    s = Store(tmp_path / "store")

    def build(st):
        with st.h5("steer.h5") as f:
            write_h5(f, r)

    art = s.run(StepSpec("steer", {"mode": "executor"}, {}, 1), build).artifact
    rep = build_report(s, [art.key], out=tmp_path / "rep")
    sec = rep.sections[0]
    # best features: a -> 10 (0.5 on a, 0 elsewhere), b -> 11 (0.2 on b, 0 elsewhere), c -> 13 (0.033 on c, 0 elsewhere)
    assert sum(sec.summary["specificity"]["specific"].values()) == 3
    assert rep.headline[0]["ours"].startswith("3/3 tasks") and "2/3 tasks have executors" in rep.headline[0]["ours"]
    names = [f.files[0].name for f in sec.figures]
    assert names == [f"steer-{art.key[:8]}-executor.png", f"steer-{art.key[:8]}-executor-normalised.png"]


def _steer_art(s, mode="executor", ids=(10, 11)):
    from icl_cli.steer.heatmaps import SteerResult, write_h5

    sel = {"a": [ids[0]], "b": [ids[1]]}
    r = SteerResult(mode, 2, "toy-icl", ["a", "b"], list(ids), torch.ones(2, 2), torch.zeros(2, 2), torch.ones(2),
                    torch.zeros(2), sel, sel, 15.0, torch.eye(2), None, 0.2, 0.5)

    def build(st):
        with st.h5("steer.h5") as f:
            write_h5(f, r)

    return s.run(StepSpec("steer", {"mode": mode}, {}, 1), build).artifact


def test_ablate_mass_cross_task_and_link(tmp_path):
    from icl_cli.ablate.feature_ablation import AblateParams, AblateResult
    from icl_cli.ablate.feature_ablation import write_h5 as write_ablate
    from icl_cli.ablate.link import LinkResult
    from icl_cli.ablate.link import write_h5 as write_link
    from icl_cli.ablate.mass import MassResult
    from icl_cli.ablate.mass import write_h5 as write_mass
    from icl_cli.report import build_report

    s = Store(tmp_path / "store")
    ex = _steer_art(s)
    mass_a, mass_b = torch.zeros(6, 1), torch.zeros(6, 1)
    mass_a[3, 0], mass_a[4, 0] = 9.0, 1.0  # task a: arrow 9, output 1
    mass_b[3, 0], mass_b[4, 0] = 1.0, 1.0  # task b: arrow 1, output 1

    def mass(st):
        with st.h5("mass.h5") as f:
            write_mass(f, MassResult(["a", "b"], {"a": [10], "b": [11]}, {"a": mass_a, "b": mass_b}))

    nan = float("nan")
    base = {"nll": torch.tensor([1.0, 2.0]), "acc": torch.ones(2), "apl": -torch.tensor([1.0, 2.0])}
    abl = {"nll": torch.tensor([[1.5, 2.1], [1.2, 3.0]]), "acc": torch.ones(2, 2), "apl": -torch.tensor([[1.5, 2.1], [1.2, 3.0]])}

    def cross(st):
        with st.h5("ablate.h5") as f:
            write_ablate(f, AblateResult(["a", "b"], ["a", "b"], base, abl, {}), AblateParams(cross_task=True))

    before = torch.tensor([[4.0, 0.0], [0.0, 2.0]])  # [T, E]
    after = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[4.0, 0.0], [0.0, 0.5]]])  # [D, T, E]

    def link(st):
        with st.h5("link.h5") as f:
            write_link(f, LinkResult(["a", "b"], [20, 21], [10, 11], before, after, torch.eye(2, dtype=torch.bool),
                                     torch.eye(2, dtype=torch.bool)), "project", 25.0, (1, 2))

    m = s.run(StepSpec("ablate", {"kind": "mass", "set": "selected"}, {"features0": ex}, 1), mass).artifact
    c = s.run(StepSpec("ablate", {"kind": "features", "set": "selected", "cross_task": True, "roles": ["arrow"]},
                       {"features0": ex}, 1), cross).artifact
    det = _steer_art(s, "detector", (20, 21))
    lk = s.run(StepSpec("ablate", {"kind": "link"}, {"features0": det, "features1": ex}, 1), link).artifact
    rep = build_report(s, [m.key, c.key, lk.key], out=tmp_path / "rep")
    mass_sec, cross_sec, link_sec = rep.sections
    # the paper's figure: the mean of each task's best-feature share (90% and 50%); pooled: summed first
    assert mass_sec.summary["per_feature_percent"]["arrow"] == pytest.approx((90 + 50) / 2)
    assert mass_sec.summary["pooled_percent"]["arrow"] == pytest.approx(100 * 10 / 12)
    assert mass_sec.summary["headline"][0]["ours"].startswith("70.0% (one best feature of each of 2 tasks; pooled 83.3%)")
    assert "89.8%" in mass_sec.summary["headline"][0]["paper"]
    # own-task rise of the all-pairs loss: a on a +0.5, b on b +1.0; others: a on b +0.1, b on a +0.2
    assert cross_sec.summary["own_mean_rise"] == pytest.approx(0.75)
    assert cross_sec.summary["other_mean_rise"] == pytest.approx(0.15)
    assert cross_sec.summary["cannot_detect"] == [] and cross_sec.summary["headline"][0]["detectable"]
    # ratio[d, e] over e's own task: d20 on e10 = 1/4, d21 on e11 = 0.5/2 (own); d20 on e11 = 2/2, d21 on e10 = 4/4
    assert link_sec.summary["own_mean_ratio"] == pytest.approx(0.25)
    assert link_sec.summary["other_mean_ratio"] == pytest.approx(1.0)
    assert [f.files[0].name.split("-", 2)[2] for s_ in rep.sections for f in s_.figures] == ["mass.png", "cross-task.png", "link.png"]
    assert "20 (a)" in [t for t in link_sec.tables if t.title.startswith("own-task")][0].rows[0][0]  # detector named by its task


def test_circuit_sweep_size_and_graph(tmp_path, monkeypatch):
    from icl_cli.circuit.graph import CircuitGraph, write_h5
    from icl_cli.report import build_report

    g = CircuitGraph(site=np.array(["resid", "attn", "resid", "transcoder", "resid"]), layer=np.array([1, 1, 2, 2, 2]),
                     role=np.array(["output", "arrow", "arrow", "arrow", "arrow"]), feature=np.array([5, 7, 9, 3, -1]),
                     ie=np.array([0.5, -0.2, 0.9, 0.1, 0.05], dtype=np.float32), act=np.ones(5, dtype=np.float32),
                     selected=np.array([True, True, True, False, True]),
                     edge_src=np.array([0, 1]), edge_dst=np.array([2, 2]), edge_weight=np.array([0.4, -0.1], dtype=np.float32),
                     sweep_threshold=np.array([1.0, 0.5, 0.2, 0.0]), sweep_n_nodes=np.array([0, 1, 2, 4]),
                     sweep_faithfulness=np.array([0.0, 0.6, 0.85, 1.0]),
                     prompts=["x -> y"], attrs={"model": "toy-icl", "tasks": ["antonyms"], "faithfulness": 0.85,
                                                "threshold": 0.2, "metric": "all_pairs_logprob", "m_full": -1.0, "m_empty": -5.0})
    s = Store(tmp_path / "store")

    def build(st):
        with st.h5("circuit.h5") as f:
            write_h5(f, g)

    art = s.run(StepSpec("circuit", {"tasks": ["antonyms"]}, {}, 1), build).artifact
    monkeypatch.setattr("shutil.which", lambda name: None)  # no Graphviz: the drawn layout
    rep = build_report(s, [art.key], out=tmp_path / "rep")
    sec = rep.sections[0]
    assert sec.summary["nodes_at_0.8"] == 2  # the smallest swept size with F ≥ 0.8
    assert sec.summary["n_feature_nodes"] == 4 and sec.summary["n_selected"] == 3
    assert [f.files[0].name for f in sec.figures] == [f"circuit-{art.key[:8]}-faithfulness.png", f"circuit-{art.key[:8]}-graph.png"]
    assert sec.tables[0].rows[0][:4] == ["resid", "2", "arrow", "9"]  # largest |IE| first


def test_not_measured_findings_are_headline_rows_that_cannot_detect(tmp_path):
    """A pipeline step skipped for want of features is a headline row saying why, never a silent gap
    and never "no"; it appears in the terminal and in index.html."""
    from icl_cli.report import build_report

    s = Store(tmp_path / "store")
    ex = _steer_art(s)
    skipped = [{"finding": "Detector → executor link", "paper": "own pairs drop far more",
                "why": "no detectors by the steering rule"}]
    rep = build_report(s, [ex], out=tmp_path / "rep", not_measured=skipped)
    row = [r for r in rep.headline if r["finding"] == "Detector → executor link"]
    assert len(row) == 1
    assert row[0]["match"] == "cannot detect: no detectors by the steering rule"
    assert row[0]["ours"] == "not measured: no detectors by the steering rule"
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "no detectors by the steering rule" in page
