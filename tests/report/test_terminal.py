"""What the terminal shows: a 30-layer sweep that fits, progress inside a long clean, switches in
--help, commands in workflow order."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from icl_cli.cli.app import app
from icl_cli.collect.vectors import TaskResult
from icl_cli.collect.vectors import write_h5 as write_collect
from icl_cli.store import StepSpec, Store


def _sweep_store(tmp_path, n_layers: int) -> tuple[Store, str]:
    layers = list(range(n_layers))

    def build(st):
        out = {}
        for k, t in enumerate(("antonyms", "en_es", "location_continent")):
            tv = [2.0 - 1.5 * np.exp(-((l - 20 - k) / 3) ** 2) for l in layers]  # best near layer 20 + k
            sweep = {"zero_shot_nll": 2.0, "few_shot_nll": 0.5, "zero_shot_acc": 0.1, "few_shot_acc": 0.9,
                     "tv_nll": tv, "tv_acc": [0.5] * n_layers, "tv_replace_nll": [2.0] * n_layers,
                     "tv_replace_acc": [0.1] * n_layers}
            out[t] = TaskResult(torch.zeros(n_layers, 4), torch.zeros(n_layers, 4), sweep, int(np.argmin(tv)), ["x"], 10, {})
        with st.h5("collect.h5") as f:
            write_collect(f, layers, out)

    s = Store(tmp_path / "store")
    art = s.run(StepSpec("collect", {"model": "toy-icl", "n_shot": 4, "n_prompts": 2}, {}, 1), build).artifact
    return s, art.key


def _render(item, width: int) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None).print(item)
    return buf.getvalue()


def test_a_30_layer_sweep_fits_the_terminal(tmp_path):
    from icl_cli.report import build_report

    s, key = _sweep_store(tmp_path, 30)
    sec = build_report(s, [key]).sections[0]
    fit = sec.terminal[0]
    narrow = _render(fit, 120)
    assert max(len(line) for line in narrow.splitlines()) <= 120
    assert "…" not in narrow and "resid_pre[layer]" in narrow  # no cell cut to "3…", no markup eaten
    rows = {line.split()[0]: line for line in narrow.splitlines() if "**" in line and not line.startswith(("col", "sha"))}
    assert set(rows) == {"antonyms", "en_es", "location_continent"}
    # the star sits in the best layer's two-character column: 20, 21, 22 (blocks start after the name column)
    starts = {t: line.index("**") for t, line in rows.items()}
    assert starts["en_es"] - starts["antonyms"] == 2 and starts["location_continent"] - starts["en_es"] == 2
    for t, layer in (("antonyms", "20"), ("en_es", "21"), ("location_continent", "22")):
        assert rows[t].split("**")[1].split()[0] == layer  # the best layer beside the blocks
    wide = _render(fit, 400)  # a wide terminal gets the numbers themselves
    assert "layer 29" in wide and "**" not in wide
    # the table is not printed a second time as a plain table in the terminal
    assert all(not t.terminal for t in sec.tables if t.title.startswith("nll of 0-shot"))
    r = CliRunner().invoke(app, ["--store", str(s.root), "report", key])
    assert r.exit_code == 0 and "3…" not in r.stdout and "**" in r.stdout


def test_a_6_layer_sweep_keeps_its_table(tmp_path):
    from icl_cli.report import build_report

    s, key = _sweep_store(tmp_path, 6)
    text = _render(build_report(s, [key]).sections[0].terminal[0], 160)
    assert "layer 5" in text and "0-shot" in text


def test_plain_progress_says_where_a_long_task_is(monkeypatch):
    """stderr not a terminal: '…' updates (where a clean optimisation is) print at most every 10 s,
    and are never forced out by the last task."""
    from icl_cli.cli import common

    now = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    buf = io.StringIO()
    monkeypatch.setattr(common, "stderr_console", lambda: Console(file=buf, width=200))
    monkeypatch.setattr(common, "live_progress", lambda: False)
    with common.task_progress(None, 2, "clean") as advance:
        advance("antonyms")  # first line: always
        for step in range(1, 40):  # one step every second
            now[0] += 1.0
            advance(f"… antonyms: step {step}")
        advance("en_es")  # the last task: always
        for step in range(1, 5):
            now[0] += 1.0
            advance(f"… en_es: step {step}")
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("clean  antonyms  1/2")
    where = [line for line in lines if "… antonyms" in line]
    assert [line.split("step ")[1].split()[0] for line in where] == ["10", "20", "30"]  # every 10 s
    assert any(line.startswith("clean  en_es  2/2") for line in lines)
    assert not any("… en_es" in line for line in lines)  # 4 s after the last line: nothing forced


def test_clean_reports_every_optimisation_step(tiny_lm):
    from icl_cli.clean.cleaning import CleanParams, clean_vector, steer_mask
    from icl_cli.core.prompts import sample_prompts
    from icl_cli.core.sites import HookedModel
    from icl_cli.core.steering import BaseCache
    from icl_cli.core.tasks import load_task
    from icl_cli.dictionaries.base import DictConfig, build

    hm = HookedModel(tiny_lm.model)
    torch.manual_seed(0)
    sae = build(DictConfig(d_in=32, d_sae=64, arch="gated", site="resid_pre", layer=1))
    cache = BaseCache.build(hm, tiny_lm.tokenizer, sample_prompts(load_task("antonyms").pairs, 3, 0, seed=5), [1])
    heard = []
    out = clean_vector(hm, sae, cache, 1, torch.randn(32), CleanParams(max_steps=7, patience=100), 0.05,
                       steer_mask(cache.batch, False), heard.append)
    assert len(heard) == out.steps
    assert [h.split("step ")[1].split("/")[0] for h in heard] == [str(k) for k in range(1, out.steps + 1)]
    assert all("λ 0.05" in h and "/7" in h for h in heard)


@pytest.mark.parametrize("args", [["--help"], ["report", "--help"], ["collect", "--help"]])
def test_help_shows_switches_as_switches(args):
    out = CliRunner().invoke(app, args, terminal_width=120).stdout
    assert "<bool>" not in out and "BOOLEAN" not in out
    assert "--json" in out or "--help" in out


def test_help_lists_commands_in_workflow_order():
    out = CliRunner().invoke(app, ["--help"], terminal_width=120).stdout
    names = [line.split()[1] for line in out.splitlines() if line.startswith("│ ") and len(line.split()) > 2
             and line.split()[1] in {"pipeline", "collect", "train-sae", "clean", "steer", "ablate", "circuit", "report",
                                     "store"}]
    assert names == ["pipeline", "collect", "train-sae", "clean", "steer", "ablate", "circuit", "report", "store"]


def test_pipeline_headings_count_steps_and_estimate_the_time_left(monkeypatch):
    from icl_cli.cli import pipeline_cmd as pc

    now, said = [0.0], []
    monkeypatch.setattr(pc.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(pc, "log", lambda text, **kw: said.append(text))
    say = pc._Clock(None, ["collect", "SAEs", "clean", "steer", "mass", "link", "report"])
    say("collect: task vectors")
    now[0] = 20.0  # collect took 20 s, its cost: the rest (SAEs 2, clean 80, steer 9, mass 6, link 170, report 16)
    say("SAEs: the suite's")
    assert said[0] == "== [0s] step 1 of 7: collect: task vectors"
    assert said[1] == f"== [20s] step 2 of 7, about {20 * (2 + 80 + 9 + 6 + 170 + 16) / 20 / 60:.0f} min left: SAEs: the suite's"
    now[0] = 100.0
    say("ablate: detector → executor link")  # steer and mass were skipped: they leave the plan
    assert said[2].startswith("== [100s] step 3 of 4, about ") and said[2].endswith("left: ablate: detector → executor link")
    left = 100 * (170 + 16) / (20 + 2)
    assert f"about {left / 60:.0f} min left" in said[2]
