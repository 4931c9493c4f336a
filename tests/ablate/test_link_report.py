"""The report and terminal view of a frozen-attention link artifact, on cells written by hand."""

from __future__ import annotations

import pytest
import torch

from icl_cli.ablate.link_frozen import FrozenLinkResult, summary_json, write_h5
from icl_cli.store import StepSpec, Store


def _result() -> FrozenLinkResult:
    eye = torch.eye(2, dtype=torch.bool)
    count = torch.tensor([[[4, 4], [4, 4]], [[2, 2], [2, 2]]])  # [T, D, E]
    total = torch.tensor([[[3.0, 0.4], [0.2, 0.0]], [[0.1, 0.2], [0.0, 1.5]]], dtype=torch.float64)
    half = torch.tensor([[[3, 0], [0, 0]], [[0, 0], [0, 1]]])
    return FrozenLinkResult(["a", "b"], [20, 21], [10, 11], (1, 2), 50.0, torch.ones(2, 2), torch.full((2, 2), 4),
                            count, total, half, torch.tensor([[0.8, 0.1], [0.0, 0.9]]), eye, eye, eye, eye,
                            torch.tensor([0.85, 0.0]), torch.tensor([[0, 1] + [0] * 17 + [5], [5] + [0] * 18 + [1]]))


def test_pairs_pool_their_executor_tasks_by_hand():
    r = _result()
    # T(e10) = {a}, T(e11) = {b}: (20,10) 3.0/4, (21,10) 0.2/4, (20,11) 0.2/2, (21,11) 1.5/2
    torch.testing.assert_close(r.pair_mean, torch.tensor([[0.75, 0.1], [0.05, 0.75]], dtype=torch.float64))
    g = r.own_vs_other()
    assert g["own"]["mean"] == pytest.approx(4.5 / 6) and g["other"]["mean"] == pytest.approx(0.4 / 6)
    assert g["own"]["frac_half"] == pytest.approx(4 / 6) and g["own"]["positions"] == 6 and g["other"]["pairs"] == 2
    rows, cols, tm = r.task_matrix()
    torch.testing.assert_close(tm, torch.tensor([[0.75, 0.1], [0.05, 0.75]], dtype=torch.float64))


def test_report_section_and_terminal_view(tmp_path):
    from rich.console import Console

    from icl_cli.ablate.link_view import frozen_tables
    from icl_cli.report import build_report

    s = Store(tmp_path / "store")
    r = _result()

    def build(st):
        with st.h5("link.h5") as f:
            write_h5(f, r)

    art = s.run(StepSpec("ablate", {"kind": "link", "estimand": "frozen-attention"}, {}, 2), build).artifact
    sec = build_report(s, [art.key], out=tmp_path / "rep").sections[0]
    assert sec.summary["own_pairs"]["mean"] == pytest.approx(0.75)
    assert sec.summary["headline"][0]["match"].startswith("yes")
    assert [f.files[0].name.split("-", 2)[2] for f in sec.figures] == ["link-tasks.png", "link-drops.png", "link.png"]
    assert all(p.exists() for f in sec.figures for p in f.files)
    own_rows = [t for t in sec.tables if t.title.startswith("own-task pairs")][0].rows
    assert [row[:3] for row in own_rows] == [["20 (a)", "10 (a)", "0.750"], ["21 (b)", "11 (b)", "0.750"]]

    console = Console(record=True, width=200)
    for t in frozen_tables(summary_json(art.key, r)):
        console.print(t)
    text = console.export_text()
    assert "own-task" in text and "0.750" in text and "0.067" in text
    assert "20 (a)" in text  # the feature matrix names each feature's task
