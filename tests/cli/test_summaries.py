"""What people read from collect and clean: flags, means with and without flagged tasks, the
summary block with every method named, the SAE and λ. Built from hand-made results, so every
expected number is computed here by hand."""

import io

import pytest
from rich.console import Console

from icl_cli.clean.artifact import CleanResult, summary_json as clean_summary
from icl_cli.collect.artifact import SOLVED_NLL, SweepResult, summary_json as collect_summary, task_flags


def _render(tables) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=250, highlight=False, soft_wrap=False)
    for t in tables if isinstance(tables, list) else [tables]:
        console.print(t)
    return buf.getvalue()


def test_flags():
    assert task_flags({"zero_shot_nll": 1.0, "tv_nll": [1.2, 1.0]}) == ["tv_never_helps"]  # equal is no help
    assert task_flags({"zero_shot_nll": 1.0, "tv_nll": [1.2, 0.99]}) == []
    assert task_flags({"zero_shot_nll": SOLVED_NLL - 1e-6, "tv_nll": [0.01]}) == ["solved_zero_shot"]
    assert task_flags({"zero_shot_nll": SOLVED_NLL, "tv_nll": [0.01]}) == []
    assert task_flags({"zero_shot_nll": 0.01, "tv_nll": [0.02, 0.03]}) == ["tv_never_helps", "solved_zero_shot"]


def _sweep(zero, tv, few=0.1):
    return {"zero_shot_nll": zero, "zero_shot_acc": 0.5, "few_shot_nll": few, "few_shot_acc": 0.9,
            "tv_nll": tv, "tv_acc": [0.5] * len(tv), "tv_replace_nll": tv, "tv_replace_acc": [0.5] * len(tv)}


COLLECT = {
    "helped": SweepResult(_sweep(2.0, [1.5, 1.0]), best_layer=5),
    "also_helped": SweepResult(_sweep(1.0, [0.5, 0.8]), best_layer=4),
    "hurt": SweepResult(_sweep(1.0, [1.4, 1.2]), best_layer=5),   # best_layer is still the argmin
    "solved": SweepResult(_sweep(0.01, [0.005, 0.02]), best_layer=4),
}


def test_collect_summary_means_with_and_without_flagged_tasks():
    data = collect_summary("k" * 64, [4, 5], COLLECT)
    assert data["flagged"] == {"tv_never_helps": ["hurt"], "solved_zero_shot": ["solved"]}
    assert data["tasks"]["hurt"]["tv_helps"] is False and data["tasks"]["helped"]["flags"] == []
    assert data["mean"]["all"]["n_tasks"] == 4 and data["mean"]["unflagged"]["n_tasks"] == 2
    assert data["mean"]["all"]["zero_shot_nll"] == pytest.approx((2.0 + 1.0 + 1.0 + 0.01) / 4)
    assert data["mean"]["unflagged"]["zero_shot_nll"] == pytest.approx((2.0 + 1.0) / 2)
    assert data["mean"]["unflagged"]["tv_nll"] == pytest.approx({"4": (1.5 + 0.5) / 2, "5": (1.0 + 0.8) / 2})
    assert data["mean"]["all"]["tv_nll"]["5"] == pytest.approx((1.0 + 0.8 + 1.2 + 0.02) / 4)
    # the overall best layer counts the unflagged tasks only: 5 and 4 tie, the lower wins
    assert data["best_layer"] == 4


def test_collect_table_stars_no_layer_where_the_vector_hurts():
    from icl_cli.cli.collect_cmd import _table

    data = collect_summary("k" * 64, [4, 5], COLLECT)
    text = _render(_table(data))
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.startswith("│")}
    assert "1.00*" in rows["helped"] and "0.50*" in rows["also_helped"]
    assert "*" not in rows["hurt"] and "TV never helps" in rows["hurt"]
    assert "0-shot solved" in rows["solved"]
    assert "1.00" in rows["mean, all (4)"] and "1.50" in rows["mean, unflagged (2)"]  # 0-shot means: 4.01/4, 3/2
    assert "flagged 2 of 4 tasks" in text


def _clean(nll, l0, acc, flags=(), l1=0.01):
    return CleanResult([3, 1][: l0["cleaned"]], [2.0, 1.0][: l0["cleaned"]], l0, nll, acc, 10, l1=l1, flags=list(flags))


def _methods(zero, tv, recon, ito5, ito20, cleaned):
    return {"zero_shot": zero, "tv": tv, "recon": recon, "ito_5": ito5, "ito_20": ito20, "cleaned": cleaned}


CLEAN = {
    "a": _clean(_methods(2.0, 1.0, 1.5, 1.8, 1.2, 0.9), {"recon": 40, "ito_5": 5, "ito_20": 20, "cleaned": 2},
                _methods(0.2, 0.8, 0.6, 0.5, 0.7, 0.9), l1=0.01),
    "b": _clean(_methods(1.0, 0.5, 0.7, 0.9, 0.6, 0.6), {"recon": 20, "ito_5": 5, "ito_20": 18, "cleaned": 1},
                _methods(0.4, 0.9, 0.8, 0.6, 0.8, 0.9), l1=0.005),
    "c": _clean(_methods(0.01, 0.02, 0.03, 0.04, 0.05, 0.02), {"recon": 10, "ito_5": 4, "ito_20": 10, "cleaned": 2},
                _methods(1.0, 1.0, 1.0, 1.0, 1.0, 1.0), flags=["tv_never_helps", "solved_zero_shot"], l1=0.1),
}
META = {"l1": "auto", "l1_tolerance": 0.1, "sae": "f" * 64, "sae_label": "ffffffffffff (pipeline-sae): gated, 2048 features"}


def test_clean_summary_means_every_method_with_and_without_flagged_tasks():
    data = clean_summary("e" * 64, 5, CLEAN, META)
    s_all, s_ok = data["summary"]["all"], data["summary"]["unflagged"]
    assert s_all["n_tasks"] == 3 and s_ok["n_tasks"] == 2 and data["flagged"]["solved_zero_shot"] == ["c"]
    assert list(s_all["methods"]) == ["zero_shot", "tv", "recon", "ito_5", "ito_20", "cleaned"]
    assert s_all["methods"]["ito_5"]["name"] == "gradient pursuit, k = 5"
    assert data["methods"]["ito_20"] == "gradient pursuit, k = 20"
    by_hand = {"nll": {"recon": (1.5 + 0.7 + 0.03) / 3, "cleaned": (0.9 + 0.6 + 0.02) / 3, "ito_20": (1.2 + 0.6 + 0.05) / 3},
               "acc": {"tv": (0.8 + 0.9 + 1.0) / 3, "ito_5": (0.5 + 0.6 + 1.0) / 3},
               "l0": {"recon": (40 + 20 + 10) / 3, "cleaned": 5 / 3, "ito_20": 48 / 3}}
    for metric, values in by_hand.items():
        for m, v in values.items():
            assert s_all["methods"][m][metric] == pytest.approx(v)
    assert s_all["methods"]["tv"]["l0"] is None and s_all["methods"]["zero_shot"]["l0"] is None
    assert s_ok["methods"]["cleaned"]["nll"] == pytest.approx((0.9 + 0.6) / 2)
    assert s_ok["methods"]["zero_shot"]["acc"] == pytest.approx((0.2 + 0.4) / 2)
    assert s_all["l0_fraction"] == pytest.approx((2 / 40 + 1 / 20 + 2 / 10) / 3)
    assert s_ok["loss_delta"] == pytest.approx(((1.0 - 0.9) / 2.0 + (0.5 - 0.6) / 1.0) / 2)
    assert s_all["loss_delta"] == pytest.approx(((1.0 - 0.9) / 2.0 + (0.5 - 0.6) / 1.0 + 0.0 / 0.01) / 3)
    assert data["l1_chosen"] == {"a": 0.01, "b": 0.005, "c": 0.1}
    assert data["mean"]["nll_cleaned"] == pytest.approx((0.9 + 0.6 + 0.02) / 3)  # format-1 keys kept


def test_clean_tables_name_methods_sae_and_lambda():
    from icl_cli.cli.clean_cmd import _tables

    data = clean_summary("e" * 64, 5, CLEAN, META)
    text = _render(_tables(data))
    summary = text[text.index("Summary:"):]
    for name in ("0-shot, no vector", "raw task vector", "SAE reconstruction", "gradient pursuit, k = 5",
                 "gradient pursuit, k = 20", "cleaned"):
        assert name in summary
    assert "ito" not in text.lower()
    assert "pipeline-sae" in summary and "λ auto" in summary and "0.005–0.1" in summary
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in summary.splitlines() if line.startswith("│")}
    # L0, nll, accuracy over all 3 tasks, then nll and accuracy over the 2 unflagged ones
    assert rows["cleaned"] == ["1.7", f"{(0.9 + 0.6 + 0.02) / 3:.3f}", "0.93", f"{0.75:.3f}", "0.90"]
    assert rows["raw task vector"][0] == "–"
    assert "flagged 1 of 3 tasks" in summary
    fixed = _render(_tables(clean_summary("e" * 64, 5, CLEAN, {**META, "l1": 0.05, "l1_tolerance": None})))
    assert "λ = 0.05" in fixed
