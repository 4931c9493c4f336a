"""index.html and the headline on hand-made artifacts: long tables cut with a CSV of every row,
colour scales that follow the data, cell labels that never read 0.00, the headline's set-up and
"matches the paper?" columns ("cannot detect" for a null that could not move), means over the
tasks that count, navigation names, parameters that agree with the lineage, contexts shown once."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from icl_cli.store import StepSpec, Store


def _sae(s):
    """A stand-in for an SAE artifact (only its key and lineage matter here)."""
    def build(st):
        st.path("note.txt").write_text("sae")

    return s.run(StepSpec("import-sae", {"layer": 2}, {}, 1), build).artifact


def _steer(s, mode, sel, ids):
    from icl_cli.steer.heatmaps import SteerResult, write_h5

    n = len(ids)
    r = SteerResult(mode, 2, "toy-icl", list(sel), list(ids), torch.ones(len(sel), n), torch.zeros(len(sel), n),
                    torch.ones(len(sel)), torch.zeros(len(sel)), sel, sel, 15.0, torch.zeros(len(sel), n), None, 0.2, 0.5)

    def build(st):
        with st.h5("steer.h5") as f:
            write_h5(f, r)

    return s.run(StepSpec("steer", {"mode": mode, "layer": 2, "sae": None}, {"sae": _sae(s)}, 1), build).artifact


def _link(s, n: int):
    """A link artifact of n detectors × n executors, every pair of the same task (n² own-task rows)."""
    from icl_cli.ablate.link import LinkResult, write_h5

    dets, exes = list(range(100, 100 + n)), list(range(200, 200 + n))
    sel_d, sel_e = {"a": dets}, {"a": exes}
    det, ex = _steer(s, "detector", sel_d, dets), _steer(s, "executor", sel_e, exes)
    before = torch.full((1, n), 2.0)
    after = (torch.arange(n * n, dtype=torch.float32).reshape(n, 1, n) + 1) / (n * n) * 2.0  # ratio (k + 1) / n²

    def build(st):
        with st.h5("link.h5") as f:
            write_h5(f, LinkResult(["a"], dets, exes, before, after, torch.ones(n, n, dtype=torch.bool),
                                   torch.ones(1, n, dtype=torch.bool)), "project", 25.0, (1, 2))

    return s.run(StepSpec("ablate", {"kind": "link", "sae": None}, {"features0": det, "features1": ex}, 1), build).artifact


def test_a_long_table_shows_its_top_rows_and_links_a_csv_of_all(tmp_path):
    from icl_cli.report import build_report
    from icl_cli.report.html import MAX_ROWS

    s = Store(tmp_path / "store")
    art = _link(s, 9)  # 81 own-task pairs
    out = tmp_path / "rep"
    rep = build_report(s, [art.key], out=out)
    page = (out / "index.html").read_text()
    table = page[page.index("<h4>own-task pairs"):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") == MAX_ROWS + 1  # header + the first 50 rows
    link = re.search(r"href='(tables/[^']+\.csv)'>all 81 rows", page)
    assert link, "no link to the CSV"
    with open(out / link.group(1), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["detector", "executor", "after / before", "own"] and len(rows) == 82
    # every pair, most affected first: ratio (k + 1) / 81 for pair k = d·9 + e, by hand
    ratios = [float(r[2]) for r in rows[1:]]
    assert ratios == sorted(ratios) and ratios[0] == pytest.approx(1 / 81, abs=5e-4) and ratios[-1] == pytest.approx(1.0)
    assert {(r[0].split()[0], r[1].split()[0]) for r in rows[1:]} == {(str(d), str(e)) for d in range(100, 109)
                                                                     for e in range(200, 209)}
    assert out / link.group(1) in rep.written
    # the terminal shows 50 rows too and says where the rest are
    from rich.console import Console

    text = Console(width=200, record=True, file=open("/dev/null", "w"))
    text.print(rep.sections[0].tables[0].to_rich(50))
    assert "first 50 of 81 rows" in text.export_text()


def test_colour_scales_follow_the_data_and_labels_never_read_zero():
    from icl_cli.report.figures import cell_text, data_limits, heatmap, plt

    p = plt()
    fig, ax = p.subplots()
    data = np.array([[0.21, 0.35], [0.30, np.nan]])
    im, _ = heatmap(ax, data, ["a", "b"], ["x", "y"])
    assert im.get_clim() == pytest.approx((0.21, 0.35))  # sequential: the data's range, not 0–1
    im, _ = heatmap(ax, np.array([[-0.1, 0.3], [0.02, 0.0]]), ["a", "b"], ["x", "y"], center=0.0)
    assert im.get_clim() == pytest.approx((-0.3, 0.3))  # diverging: symmetric around 0
    labels = [t.get_text() for t in ax.texts]
    assert "+0.020" in labels and "-0.10" in labels and "0" in labels
    p.close(fig)
    assert data_limits(np.array([0.5, 0.5])) != (0.5, 0.5)  # a constant matrix still gets a scale
    for v in [3e-7, -2e-5, 0.0004, 0.004, 0.04, 0.4, 4.0, 40.0, 4e4, -0.0049]:
        text = cell_text(v, signed=True)
        assert float(text) == pytest.approx(v, rel=0.06), text  # two significant digits, whatever the size
        assert not re.fullmatch(r"[+-]?0(\.0+)?", text)


def test_log_axis_labels_do_not_run_together():
    from icl_cli.report.figures import plain_log_axis, plt

    p = plt()
    fig, ax = p.subplots(figsize=(6, 3))
    ax.plot([1, 30_000], [0, 1])
    plain_log_axis(ax, "x")
    fig.canvas.draw()
    shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text() and ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]]
    assert shown == ["1", "10", "100", "1k", "10k"]  # over four decades: powers of ten only, thousands as k
    ax.set_xscale("linear")
    ax.set_xlim(2, 90)
    plain_log_axis(ax, "x")
    fig.canvas.draw()
    shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text() and 2 <= t.get_position()[0] <= 90]
    assert shown == ["2", "5", "10", "20", "50"]  # under two decades: 1-2-5
    p.close(fig)


def _cross(s, base_apl, ablated_apl, features):
    from icl_cli.ablate.feature_ablation import AblateParams, AblateResult, write_h5

    ex = _steer(s, "executor", {"a": [10], "b": [11]}, (10, 11))
    base = {"nll": -base_apl, "acc": torch.ones(2), "apl": base_apl}
    abl = {"nll": -ablated_apl, "acc": torch.ones(2, 2), "apl": ablated_apl}

    def build(st):
        with st.h5("ablate.h5") as f:
            write_h5(f, AblateResult(["a", "b"], ["a", "b"], base, abl, features), AblateParams(cross_task=True))

    return s.run(StepSpec("ablate", {"kind": "features", "set": "selected", "cross_task": True, "roles": ["arrow"],
                                     "model": "toy-icl", "sae": None}, {"features0": ex}, 1), build).artifact


def test_headline_has_the_setup_and_says_cannot_detect_for_a_loss_at_its_floor(tmp_path):
    from icl_cli.report import build_report
    from icl_cli.report.headline import verdict

    s = Store(tmp_path / "store")
    floor = _cross(s, -torch.tensor([0.01, 0.02]), -torch.tensor([[0.01, 0.02], [0.01, 0.03]]),
                   {"a": {"k": [10]}, "b": {"k": [11]}})
    out = tmp_path / "rep"
    rep = build_report(s, [floor.key], out=out)
    row = rep.headline[0]
    assert row["detectable"] is False and row["match"].startswith("cannot detect:")
    assert "does not reproduce" not in row["match"] and not row["match"].startswith("no")
    assert rep.setup.startswith("toy-icl: 6 layers, d_model 128, 2.0M parameters; trained on every pair")
    page = (out / "index.html").read_text()
    head = page[page.index("<h2 id='headline'>"):page.index("</table>", page.index("<h2 id='headline'>"))]
    assert re.findall(r"<th class='l'>([^<]*)</th>", head)[:1] == ["finding"]
    assert "this run (toy-icl: 6 layers" in head and "matches the paper?" in head and "cannot detect:" in head
    # a row that could not detect reads "cannot detect" whatever its match says
    assert verdict({"match": "no: nothing moved", "detectable": False, "why": "at the floor"}) == "cannot detect: at the floor"
    assert verdict({"match": "partly: half"}) == "partly: half"


def test_cross_task_row_that_can_detect_is_judged(tmp_path):
    from icl_cli.report import build_report

    s = Store(tmp_path / "store")
    # clean losses 1 and 2; own rises 0.5 and 1.0, others 0.1 and 0.2: own far above other, but two
    # own cells only: partly
    art = _cross(s, -torch.tensor([1.0, 2.0]), -torch.tensor([[1.5, 2.1], [1.2, 3.0]]), {"a": {"k": [10]}, "b": {"k": [11]}})
    row = build_report(s, [art.key]).headline[0]
    assert row["match"].startswith("partly:") and "+0.750" in row["match"] and "+0.150" in row["match"]
    assert "too few" in row["match"]
    from icl_cli.report.renderers.ablate import cross_match

    cs = {"own_mean": 0.75, "other_mean": 0.15, "n_own": 3, "cannot_detect": [], "empty_sets": []}
    assert cross_match(cs).startswith("yes:")
    assert cross_match({**cs, "other_mean": 0.5}).startswith("partly:")  # above the others, not twice
    assert cross_match({**cs, "other_mean": 0.9}).startswith("no:")


def test_cleaning_row_means_leave_out_empty_and_worse_than_none(tmp_path):
    from icl_cli.clean.cleaning import CleanResult
    from icl_cli.clean.cleaning import write_h5 as write_clean
    from icl_cli.report import build_report

    results = {  # l0 recon/cleaned, nll zero_shot/tv/cleaned
        "antonyms": ({"recon": 20, "cleaned": 4}, {"zero_shot": 2.0, "tv": 0.5, "recon": 0.9, "cleaned": 0.5}),
        "en_es": ({"recon": 10, "cleaned": 4}, {"zero_shot": 3.0, "tv": 1.0, "recon": 2.0, "cleaned": 1.1}),
        "en_fr": ({"recon": 88, "cleaned": 0}, {"zero_shot": 3.0, "tv": 1.0, "recon": 2.0, "cleaned": 3.0}),  # empty
        "location_religion": ({"recon": 30, "cleaned": 9}, {"zero_shot": 1.0, "tv": 0.8, "recon": 0.9, "cleaned": 1.2}),
    }

    def build(st):
        out = {t: CleanResult(list(range(l0["cleaned"])), [1.0] * l0["cleaned"], l0, nll, {m: 0.5 for m in nll}, 10)
               for t, (l0, nll) in results.items()}
        with st.h5("clean.h5") as f:
            write_clean(f, 2, out)

    s = Store(tmp_path / "store")
    art = s.run(StepSpec("clean", {"l1": 0.05, "layer": 2, "detectors": True}, {}, 1), build).artifact
    row = build_report(s, [art.key]).headline[0]
    # means over antonyms and en_es only: L0 (20 + 10)/2 = 15 → (4 + 4)/2 = 4, 73% fewer
    assert "15.0 → 4.0 features (73% fewer; mean of 2 of 4 tasks)" in row["ours"]
    assert "en_fr (cleaned vector empty (88 → 0 features))" in row["ours"]
    assert "location_religion (worse than no vector" in row["ours"]
    assert "detector vectors" in row["finding"] and row["match"].startswith("no paper figure:")
    assert "50–80%" not in row["paper"]  # the detector row does not borrow the task-vector figure


def test_navigation_parameters_paths_and_contexts(tmp_path):
    from icl_cli.report import Contexts, Section
    from icl_cli.report.html import display_value, nav_label, write_index
    from icl_cli.report.report import Report, build_report

    s = Store(tmp_path / "store")
    art = _link(s, 2)
    out = tmp_path / "rep"
    rep = build_report(s, [art.key], out=out, with_inputs=True)
    page = (out / "index.html").read_text()
    nav = re.search(r"<nav>(.*?)</nav>", page).group(1)
    names = re.findall(r">([^<]+)</a>", nav)
    assert names == ["SAE L2", "steer L2 detector", "steer L2 executor", "ablate link"]  # each named, not "steer steer"
    sae_key = s.resolve(art.inputs["features0"]).inputs["sae"]
    assert "<td class='l'>sae</td><td class='l'>None</td>" not in page  # the lineage has an SAE: so does the table
    assert f"<td class='l'>sae</td><td class='l'>import-sae {sae_key[:12]} (input)</td>" in page  # the steers'
    assert f"<td class='l'>sae</td><td class='l'>import-sae {sae_key[:12]} (an input&#x27;s input)</td>" in page  # the link's
    assert str(tmp_path) not in page
    assert display_value(f"{tmp_path}/x/y.json", {str(tmp_path): "$TMPDIR"}) == "$TMPDIR/x/y.json"
    assert display_value("a" * 64, {}) == "a" * 12
    # parameters: an input found for an unset parameter is shown as that input
    from icl_cli.report.base import Table
    from icl_cli.report.html import params_with_inputs

    t = params_with_inputs(Table("parameters", ["parameter", "value"], [["sae", "None"], ["layer", "2"], ["tv", "None"]]),
                           {"key": "0" * 64, "inputs": {"sae": {"key": "f" * 64, "step": "import-sae"}}})
    assert t.rows == [["sae", f"import-sae {'f' * 12} (input)"], ["layer", "2"], ["tv", "None"]]
    # the same feature's contexts appear once; the second section points back to them
    ctx = Contexts("feature 5: top contexts", [(1.5, ["a", "b"], 1)], feature=5, sae="k")
    secs = [Section("k1" * 32, "clean", "one", {}, contexts=[ctx]), Section("k2" * 32, "clean", "two", {}, contexts=[ctx])]
    page = write_index(tmp_path / "ctx", Report(secs, {}, {}), []).read_text()
    assert page.count("feature 5: top contexts") == 1 and "href='#s0'>5</a>" in page
    assert nav_label(secs[0], {"layer": 4, "detectors": True}) == "clean L4 detector vectors"
