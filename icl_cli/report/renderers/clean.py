"""clean: task vector cleaning against its baselines (SPEC §5).

Figures: the cleaning sweep (L0 fraction = L0 / L0 of the SAE reconstruction against loss delta
= (nll_TV − nll_method) / nll_0-shot, for the raw TV, the reconstruction, gradient pursuit and
cleaning at each λ), and the L0 of the reconstruction and of the cleaned vector per task. With
top-activations artifacts of the same SAE, each task's top features come with their contexts.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from icl_cli.report.base import Figure, Renderer, Section, Table, fmt, register

_METHOD_STYLE = {"recon": ("SAE reconstruction", "tab:orange", "s"), "ito_5": ("gradient pursuit, k = 5", "tab:brown", "v"),
                 "ito_20": ("gradient pursuit, k = 20", "tab:pink", "^"), "cleaned": ("cleaning", "tab:blue", "o")}


def method_points(results: dict) -> dict[str, np.ndarray]:
    """method -> [T, 2] (L0 fraction, loss delta) per task, for the methods every task has."""
    out = {}
    for m in _METHOD_STYLE:
        if all(m in r.l0 and m in r.nll for r in results.values()):
            out[m] = np.array([[r.l0[m] / max(r.l0["recon"], 1), r.loss_delta(m)] for r in results.values()])
    return out


def sweep_points(results: dict) -> tuple[list[float], np.ndarray] | None:
    """(λs, [T, K, 2]) of the --sweep-l1 runs, or None when the artifact has none."""
    rs = list(results.values())
    if not rs or not all(r.sweep for r in rs):
        return None
    lams = rs[0].sweep["l1"]
    pts = np.array([[[l0 / max(r.l0["recon"], 1), (r.nll["tv"] - n) / max(r.nll["zero_shot"], 1e-9)]
                     for l0, n in zip(r.sweep["l0"], r.sweep["nll"])] for r in rs])
    return lams, pts


def left_out(results: dict) -> dict[str, str]:
    """task -> why its cleaned vector is left out of the headline's means: empty (L0 0: nothing
    left to compare), a 0-shot loss already at the floor (SPEC §7: nothing a vector could
    recover), or worse than no vector (held-out nll at least the 0-shot one)."""
    from icl_cli.ablate.feature_ablation import FLOOR_NLL

    out = {}
    for t, r in results.items():
        if r.l0["cleaned"] == 0:
            out[t] = f"cleaned vector empty ({r.l0['recon']} → 0 features)"
        elif r.nll["zero_shot"] < FLOOR_NLL:
            out[t] = f"0-shot loss already at the floor (nll {r.nll['zero_shot']:.3f} < {FLOOR_NLL}): nothing to recover"
        elif r.nll["cleaned"] >= r.nll["zero_shot"]:
            out[t] = f"worse than no vector (nll {r.nll['cleaned']:.3f} ≥ 0-shot {r.nll['zero_shot']:.3f})"
    return out


def headline_row(results: dict, what: str, layer: int) -> dict:
    """The headline's cleaning row: means over the tasks whose cleaned vector is neither empty nor
    worse than no vector (the others listed), judged against the paper's 50–80% fewer features at
    the raw vector's loss (task vectors; the paper gives no such figure for detector vectors)."""
    from icl_cli.report.headline import judge

    out = left_out(results)
    kept = [r for t, r in results.items() if t not in out]
    finding = f"L0 reduction at equal loss ({what} vectors, cleaning vs SAE reconstruction, layer {layer})"
    apart = "; left out: " + ", ".join(f"{t} ({why})" for t, why in out.items()) if out else ""
    if what == "detector":
        paper = ("no L0 figure: detector vectors (outputs, layer 11) are cleaned the same way to find detector "
                 "features, then steered")
    else:
        paper = "50–80% fewer features than the reconstruction at the raw TV's loss (layer 12: under 4 vs about 15)"
    if not kept:
        return {"finding": finding, "ours": f"every cleaned vector is empty or worse than no vector{apart}", "paper": paper,
                "match": judge("no paper figure" if what == "detector" else "no",
                               f"no task's cleaned {what} vector is usable")}
    mean = lambda f: float(np.mean([f(r) for r in kept]))  # noqa: E731
    recon, cleaned = mean(lambda r: r.l0["recon"]), mean(lambda r: r.l0["cleaned"])
    nll_c, nll_tv, nll_zs = mean(lambda r: r.nll["cleaned"]), mean(lambda r: r.nll["tv"]), mean(lambda r: r.nll["zero_shot"])
    fewer = 1 - cleaned / max(recon, 1e-9)
    gain = (nll_zs - nll_c) / (nll_zs - nll_tv) if nll_zs - nll_tv > 1e-9 else float("nan")
    ours = (f"{recon:.1f} → {cleaned:.1f} features ({100 * fewer:.0f}% fewer; mean of {len(kept)} of {len(results)} tasks); "
            f"held-out nll {nll_c:.3f} vs raw vector {nll_tv:.3f} (0-shot {nll_zs:.3f}){apart}")
    keeps = f"keeping {100 * gain:.0f}% of the raw vector's gain over 0-shot" if gain == gain else "the raw vector does not beat 0-shot"
    reason = f"{100 * fewer:.0f}% fewer features, {keeps}"
    if what == "detector":
        match = judge("no paper figure", reason)
    else:
        loss_ok = gain == gain and gain >= 0.9
        sparse = fewer >= 0.5
        level = "yes" if sparse and loss_ok else "partly" if sparse or (fewer >= 0.2 and loss_ok) else "no"
        match = judge(level, reason + " (paper: 50–80% fewer at the raw TV's loss)")
    return {"finding": finding, "ours": ours, "paper": paper, "match": match}


@register("clean")
class CleanRenderer(Renderer):
    version = 2

    def build(self, art, out: Path | None) -> Section:
        from icl_cli.clean.artifact import flag_note, l1_text, read_h5, read_meta, summary_json

        layer, results = read_h5(art.file("clean.h5"))
        data = summary_json(art.key, layer, results, read_meta(art.file("clean.h5")))
        lam = l1_text(data)
        m = data["mean"]
        what = "detector" if art.params.get("detectors") else "task"
        summary = {"layer": layer, "detectors": bool(art.params.get("detectors")), "l1": art.params.get("l1"), "mean": m,
                   "l0_reduction": 1 - m["l0_cleaned"] / max(m["l0_recon"], 1e-9),
                   "features": {t: r.features for t, r in results.items()}}
        summary["headline"] = [headline_row(results, what, layer)]
        summary["left_out"] = left_out(results)
        sec = Section(art.key, art.step, f"{what.capitalize()} vector cleaning at layer {layer}", summary)
        sec.notes.append(f"Mean over {len(results)} tasks: L0 {m['l0_recon']:.1f} (SAE reconstruction) → {m['l0_cleaned']:.1f} "
                         f"(cleaned, {lam}), {100 * summary['l0_reduction']:.0f}% fewer features; "
                         f"held-out nll raw TV {m['nll_tv']:.3f}, cleaned {m['nll_cleaned']:.3f}, 0-shot {m['nll_zero_shot']:.3f}; "
                         f"{flag_note(data)}.")
        if summary["left_out"]:
            sec.notes.append("Left out of the headline's means: " + "; ".join(f"{t}: {why}" for t, why in summary["left_out"].items())
                             + ".")
        sec.tables.append(self._table(results))
        sec.contexts += self._contexts(art, results)
        if out is not None:
            sec.figures.append(self._sweep_figure(art, results, out, lam, what))
            sec.figures.append(self._l0_figure(art, results, out, what))
        return sec

    @staticmethod
    def _table(results) -> Table:
        rows = []
        for t, r in results.items():
            feats = ", ".join(f"{f} ({w:.1f})" for f, w in list(zip(r.features, r.weights))[:5]) + (", …" if len(r.features) > 5 else "")
            n = r.nll
            rows.append([t, feats, f"{r.l0['recon']} → {r.l0['cleaned']}", fmt(n["zero_shot"], 2), fmt(n["tv"], 2),
                         fmt(n["recon"], 2), fmt(n.get("ito_5"), 2), fmt(n.get("ito_20"), 2), fmt(n["cleaned"], 2),
                         fmt(r.acc["cleaned"], 2)])
        return Table("cleaned vectors: kept features (activation) and held-out nll of each method",
                     ["task", "kept features", "L0 recon → cleaned", "0-shot", "raw TV", "recon", "ito k=5", "ito k=20",
                      "cleaned", "acc cleaned"], rows, align="llrrrrrrrr",
                     caption="nll in nats over the first answer tokens of held-out 0-shot prompts; ito = gradient pursuit")

    @staticmethod
    def _contexts(art, results, per_task: int = 2):
        from icl_cli.report.contexts import feature_contexts

        sae = art.inputs.get("sae")
        if not sae:
            return []
        wanted = {t: r.features[:per_task] for t, r in results.items()}
        found = feature_contexts(art.store, sae, [f for fs in wanted.values() for f in fs])
        out = []
        for t, fs in wanted.items():
            for f in fs:
                if f in found:
                    out.append(replace(found[f], title=f"{t}: {found[f].title}"))
        return out

    @staticmethod
    def _sweep_figure(art, results, out: Path, lam: str, what: str = "task") -> Figure:
        from icl_cli.report.figures import plt, save

        p = plt()
        fig, ax = p.subplots(figsize=(7.5, 4.8))
        pts = method_points(results)
        ax.axhline(0, color="black", lw=1.2, label=f"raw {what} vector (dense)")
        zs = np.mean([(r.nll["tv"] - r.nll["zero_shot"]) / max(r.nll["zero_shot"], 1e-9) for r in results.values()])
        ax.axhline(zs, color="tab:red", ls=":", lw=1.2, label="0-shot (no vector)")
        sw = sweep_points(results)
        if sw is not None:
            lams, sp = sw
            mean = sp.mean(0)
            ax.plot(mean[:, 0], mean[:, 1], color="tab:blue", lw=1.2, ls="--", marker=".", label="cleaning, λ sweep (mean)")
            for l1v, (x, y) in zip(lams, mean):
                ax.annotate(f"λ = {l1v:g}", (x, y), textcoords="offset points", xytext=(5, -11), fontsize=8, color="tab:blue")
        for m, xy in pts.items():
            label, color, marker = _METHOD_STYLE[m]
            if m == "cleaned":
                label += f" ({lam if len(lam) < 24 else 'λ auto'})"
            ax.scatter(xy[:, 0], xy[:, 1], color=color, marker=marker, s=14, alpha=0.3, lw=0)
            ax.scatter(*xy.mean(0), color=color, marker=marker, s=90, edgecolor="black", lw=0.8, label=label + " — mean", zorder=5)
        ax.set_xlabel("L0 fraction (active features / those of the SAE reconstruction)")
        ax.set_ylabel("loss delta ((nll TV − nll method) / nll 0-shot)")
        ax.set_xscale("log")
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

        lo = min(float(xy[:, 0].min()) for xy in pts.values()) if pts else 0.1
        ax.xaxis.set_major_locator(FixedLocator([t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0) if t >= lo / 2.5]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_title(f"Cleaning {what} vectors at layer {art.params.get('layer')}: {len(results)} tasks (small marks: each task)")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        files = save(fig, out, f"clean-{art.key[:8]}-sweep")
        return Figure(f"Cleaning sweep ({what} vectors)", f"Each method's sparsity against its held-out loss relative to the "
                      f"raw {what} vector (above 0: better than the raw vector). Large marks: means over tasks; small: each "
                      "task (SPEC §5).", files)

    @staticmethod
    def _l0_figure(art, results, out: Path, what: str = "task") -> Figure:
        from icl_cli.report.figures import plt, save, task_label

        p = plt()
        names = list(results)
        apart = left_out(results)
        y = np.arange(len(names))
        fig, ax = p.subplots(figsize=(7, 1.2 + 0.3 * len(names)))
        ax.barh(y + 0.2, [results[t].l0["recon"] for t in names], height=0.4, color="tab:orange", label="SAE reconstruction")
        ax.barh(y - 0.2, [results[t].l0["cleaned"] for t in names], height=0.4, color="tab:blue", label="cleaned")
        ax.set_yticks(y, labels=[task_label(t) + (" ⚑" if t in apart else "") for t in names])
        for k, t in enumerate(names):
            if t in apart:
                ax.get_yticklabels()[k].set_color("tab:red")
        ax.invert_yaxis()
        ax.set_xlabel("active SAE features (L0)")
        ax.set_title(f"Features per {what} vector at layer {art.params.get('layer')}")
        ax.legend(loc="lower right", title="⚑ red: left out (see the note)" if apart else None, title_fontsize=8)
        ax.grid(axis="y", visible=False)
        files = save(fig, out, f"clean-{art.key[:8]}-l0")
        return Figure(f"L0 per task ({what} vectors)", f"Active features of the SAE reconstruction of each {what} vector and of "
                      "its cleaned version" + ("; flagged (red ⚑): a cleaned vector that is empty, worse than no vector or "
                                               "on a task already at the loss floor, left out of the headline's means."
                                               if apart else "; no task is flagged."), files)
