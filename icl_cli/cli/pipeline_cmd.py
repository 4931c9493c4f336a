"""``icl pipeline``: the whole paper on one model, each step an ``icl`` command run in this process.

    icl pipeline                                   # the bundled toy model, every built-in task
    icl pipeline --tasks antonyms,en_es --smoke    # a quick check of an installation (tiny settings)
    icl --store /data/icl pipeline --out report    # then open report/index.html

The steps are the commands of scripts/pipeline.sh with the same settings (the script is the same
chain written as a shell script to copy and adapt; both make the same artifacts): collect →
SAEs at the task-vector layer l and at l − 1 (the bundled toy suite when it is installed, else
train-sae) → clean (task vectors at l, detector vectors at l − 1) → top-activations → steer
(executor heatmap, detector steering) → ablate (activation mass, cross-task matrix,
detector → executor link) → circuit and faithfulness for a few tasks → report. Every step is
an artifact, so a rerun only checks that each exists. It ends with the headline findings beside
the paper's and the path of the report's index.html.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import typer

from icl_cli.cli.context import Globals, g, log
from icl_cli.core.errors import IclError

DEFAULT_TASKS = ("antonyms,singular_plural,en_es,en_fr,location_continent,location_religion,algo_last,algo_second")
"""Two tasks of each group of the paper (linguistic, translation, knowledge, algorithmic), ones whose
task vectors work at the toy model's layer 5 and that the toy model does not already solve at 0
shots (fr_en, es_en, it_en do): the whole pipeline fits in a few minutes on 2 CPU cores."""

SMOKE = {  # tiny settings: every step runs, the numbers mean little
    "collect": ["--n-prompts", "4", "--n-eval", "8", "--n-shot", "8"],
    "train-sae": ["--tokens", "20480", "--width", "256", "--eval-tokens", "1024"],
    "clean": ["--max-steps", "30", "--patience", "10", "--n-train", "6"],
    "top": ["--tokens", "2000"],
    "steer": ["--n-prompts", "6"],
    "ablate": ["--n-prompts", "6"],
    "circuit": ["--n-prompts", "2", "--n-shot", "4", "--edge-nodes", "20"],
    "faithfulness": [],
}


def register(app: typer.Typer) -> None:
    app.command("pipeline")(pipeline_cmd)


class _Runner:
    """Runs ``icl`` subcommands in this process with the pipeline's global options."""

    def __init__(self, gl: Globals):
        self.gl = gl
        self.t0 = time.perf_counter()
        self.base = ["--store", str(gl.store_path), "--device", gl.device, "--dtype", gl.dtype, "--seed", str(gl.seed)]
        if gl.verbose:
            self.base.append("-v")

    def say(self, what: str) -> None:
        log(f"== [{time.perf_counter() - self.t0:.0f}s] {what}", ctx_globals=self.gl, style="bold")

    def json(self, *args: str):
        """Run ``icl --json ARGS`` and return its JSON document (progress stays on stderr)."""
        from icl_cli.cli.app import app

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = app([*self.base, "--json", *args], standalone_mode=False, prog_name="icl")
        if isinstance(code, int) and code != 0:
            raise IclError(f"the pipeline stopped at `icl {' '.join(args)}` (exit {code}); fix the error above and run it again")
        return json.loads(buf.getvalue())

    def key(self, *args: str) -> str:
        doc = self.json(*args)
        return doc["key"] if isinstance(doc, dict) else doc[-1]["key"]


def pipeline_cmd(
    ctx: typer.Context,
    model: str = typer.Option("toy-icl", "--model", help="Preset, HF id or local folder."),
    tasks: str = typer.Option(DEFAULT_TASKS, "--tasks", help="Comma-separated tasks, or all (the 23 built-in ones; about 3× longer)."),
    layer: Optional[int] = typer.Option(None, "--layer", help="Task-vector layer l (default: where most tasks' task vectors work best)."),
    circuit_tasks: str = typer.Option("antonyms,en_es,location_continent", "--circuit-tasks", help="Tasks that get a circuit."),
    circuit_layers: str = typer.Option("2-4", "--circuit-layers", help="Layers of the circuits (the suite must cover them)."),
    suite: str = typer.Option("toy-icl-suite", "--suite", help="Dictionary suite for the circuits (and the SAEs when it covers l and l − 1)."),
    sae_tokens: int = typer.Option(300_000, "--sae-tokens", help="Training tokens of each SAE when no suite is used (toy: 300k gives CE recovered ≈ 0.99 at L0 ≈ 200 of 2048; 1M gives L0 ≈ 95)."),
    clean_l1: float = typer.Option(0.005, "--clean-l1", help="λ of task vector cleaning (toy: 0.005; paper: 0.05 on Gemma)."),
    detector_l1: float = typer.Option(0.005, "--detector-l1", help="λ of detector vector cleaning."),
    sweep_l1: str = typer.Option("", "--sweep-l1", help="Also clean with these λ, for more points in the cleaning sweep figure (e.g. 0.001,0.02; each λ is one more cleaning per task)."),
    out: Path = typer.Option(Path("report"), "--out", help="Folder of the report (figures and index.html)."),
    smoke: bool = typer.Option(False, "--smoke", help="Tiny settings: a quick check that every step runs (numbers are not meaningful)."),
) -> None:
    """Run the paper's pipeline end to end and report what it found beside the paper's numbers."""
    gl = g(ctx)
    run = _Runner(gl)
    x = SMOKE if smoke else {k: [] for k in SMOKE}
    if gl.quiet:
        raise IclError("icl pipeline prints a report, not keys; drop -q (or use --json)")

    run.say(f"collect: task vectors and the layer sweep ({model}, tasks: {tasks})")
    tv_doc = run.json("collect", "--model", model, "--tasks", tasks, "--layers", "all", "--name", "pipeline-tv", *x["collect"])
    tv = tv_doc["key"]
    if layer is None:
        best = Counter(t["best_layer"] for t in tv_doc["tasks"].values())
        layer = best.most_common(1)[0][0]
    if layer < 1:
        raise IclError(f"the task-vector layer is {layer}; detectors need layer l − 1 ≥ 0, so pass --layer ≥ 1")
    prev = layer - 1

    sae, sae_prev, have_suite = _saes(run, gl, model, suite, layer, prev, sae_tokens, x["train-sae"])
    run.say(f"clean: task vectors at layer {layer} (executors)")
    sweep = [] if smoke or not sweep_l1 else ["--sweep-l1", sweep_l1]
    clean_doc = run.json("clean", "--tv", tv, "--sae", sae, "--l1", str(clean_l1), *sweep, "--name", "pipeline-clean", *x["clean"])
    clean = clean_doc["key"]
    run.say(f"clean: detector vectors at layer {prev} (detectors)")
    dclean = run.key("clean", "--tv", tv, "--sae", sae_prev, "--detectors", "--l1", str(detector_l1),
                     "--name", "pipeline-clean-detectors", *x["clean"])

    keys = [tv, sae, sae_prev, clean, dclean]
    top = sorted({f for r in clean_doc["tasks"].values() for f in r["features"][:2]})
    if top:
        run.say("top-activations: contexts of each task's top two cleaned features")
        keys.append(run.key("collect", "top-activations", "--sae", sae, "--features", ",".join(map(str, top)),
                            "--name", "pipeline-top", *x["top"]))

    run.say(f"steer: executor heatmap at layer {layer}")
    ex_doc = run.json("steer", "--clean", clean, "--name", "pipeline-executors", *x["steer"])
    run.say(f"steer: detector steering at layer {prev}")
    det_doc = run.json("steer", "--clean", dclean, "--mode", "detector", "--name", "pipeline-detectors", *x["steer"])
    ex, det = ex_doc["key"], det_doc["key"]
    keys += [ex, det]
    # the executors (detectors) the steering rule selected; a run where the rule selects none for
    # every task (tiny settings, a random suite) falls back to the cleaned vectors' kept features
    sets = {w: ([] if any(d.get(w, {}).values()) else ["--set", "kept"]) for w, d in (("executors", ex_doc), ("detectors", det_doc))}
    for w, extra in sets.items():
        if extra:
            log(f"no task has {w} by the steering rule; measuring the cleaned vectors' kept features instead", ctx_globals=gl)

    run.say("ablate: activation mass by token role (executors, detectors)")
    keys.append(run.key("ablate", "mass", "--features", ex, *sets["executors"], "--name", "pipeline-mass-executors", *x["ablate"]))
    keys.append(run.key("ablate", "mass", "--features", det, *sets["detectors"], "--name", "pipeline-mass-detectors", *x["ablate"]))
    run.say("ablate: cross-task matrix (the executors of task A ablated at the arrows, task B measured)")
    keys.append(run.key("ablate", "--features", ex, *sets["executors"], "--roles", "arrow", "--cross-task",
                        "--name", "pipeline-cross-task", *x["ablate"]))
    run.say("ablate: detector → executor link")
    link_set = ["--set", "kept"] if sets["executors"] or sets["detectors"] else []
    keys.append(run.key("ablate", "link", "--detectors", det, "--executors", ex, *link_set,
                        "--name", "pipeline-link", *x["ablate"]))

    circuits = []
    if not have_suite and circuit_tasks:
        log(f"no dictionary suite {suite!r} (resid, attn and transcoder dictionaries per layer), so no circuits; "
            "scripts/toy_saes.sh trains one for toy-icl, or pass --suite", ctx_globals=gl, style="yellow")
    for task in [t.strip() for t in circuit_tasks.split(",") if t.strip() and have_suite]:
        run.say(f"circuit: {task}")
        circuits.append(run.key("circuit", "--model", model, "--task", task, "--saes", suite, "--layers", circuit_layers,
                                "--name", f"pipeline-circuit-{task}", *x["circuit"]))
    if circuits:
        run.say("faithfulness: curves of each circuit" + (" and the cross-task matrix" if len(circuits) > 1 else ""))
        keys += circuits
        keys.append(run.key("ablate", "--circuit", ",".join(circuits), *(["--cross-task"] if len(circuits) > 1 else []),
                            "--name", "pipeline-faithfulness", *x["faithfulness"]))

    run.say(f"report: figures and {out}/index.html")
    from icl_cli.cli.report_cmd import report_cmd

    report_cmd(ctx, refs=keys, out=out, inputs=False, params=False, brief=True)
    run.say("done")


def _saes(run: _Runner, gl: Globals, model: str, suite: str, layer: int, prev: int, tokens: int, extra: list[str]):
    """(SAE at l, SAE at l − 1, whether the suite exists): the suite's residual SAEs when it is
    for this model and has both, else trained ones."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # no suite is a normal case here, not an error
            doc = run.json("store", "import-suite", suite)
    except IclError:
        doc = None
    have = {(d["kind"], d["layer"]): d["key"] for d in (doc or {}).get("dictionaries", [])}
    if (doc or {}).get("model") == model and ("resid", layer) in have and ("resid", prev) in have:
        run.say(f"SAEs: the residual SAEs of suite {suite} at layers {prev} and {layer}")
        return have[("resid", layer)], have[("resid", prev)], True
    run.say(f"train-sae: gated residual SAEs at layers {prev} and {layer}")
    # toy-sized: 300k tokens in batches of 1024 at lr 1e-3 (the paper's 300M tokens at 4e-4 are for Gemma)
    doc = run.json("train-sae", "--model", model, "--layer", f"{prev},{layer}", "--site", "resid", "--arch", "gated",
                   "--tokens", str(tokens), "--batch-tokens", "1024", "--lr", "1e-3", "--l1", "1", "--dataset", "tasks",
                   "--name", "pipeline-sae", *extra)
    by_layer = {gl.store().get(d["key"]).params["layer"]: d["key"] for d in doc}
    return by_layer[layer], by_layer[prev], bool(have)
