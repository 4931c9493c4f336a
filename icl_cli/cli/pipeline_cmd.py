"""``icl pipeline``: the whole paper on one model, each step a library step run in this process.

    icl pipeline                                   # the bundled toy model, every built-in task
    icl pipeline --tasks antonyms,en_es --smoke    # a quick check of an installation (tiny settings)
    icl --store /data/icl pipeline --out report    # then open report/index.html

The steps are those of scripts/pipeline.sh with the same settings (the script is the same chain
written as ``icl`` commands to copy and adapt; both make the same artifacts): collect →
SAEs at the task-vector layer l and at l − 1 (the bundled toy suite when it is installed, else
train-sae) → clean (task vectors at l, detector vectors at l − 1) → top-activations → steer
(executor heatmap, detector steering) → ablate (activation mass, cross-task matrix,
detector → executor link) → circuit and faithfulness for a few tasks → report. Every step is
an artifact, so a rerun only checks that each exists. It ends with the headline findings beside
the paper's and the path of the report's index.html.

The defaults come from the model's profile (icl_cli/zoo/profiles.py: tasks, sweep layers, layer,
suite, circuits, λ and each step's prompt budget); every option below overrides its field.

    icl pipeline --model smollm2-135m              # SmolLM2-135M-Instruct offline with smollm2-suite
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from icl_cli.cli.common import run_env, train_progress
from icl_cli.cli.context import Globals, g, log
from icl_cli.core.errors import IclError
from icl_cli.core.runenv import RunEnv
from icl_cli.zoo.profiles import PROFILES, PipelineProfile, profile_for

SMOKE = {  # tiny settings: every step runs, the numbers mean little (fields of each step's request)
    "collect": dict(n_prompts=4, n_eval=8, n_shot=8),
    "train-sae": dict(tokens=20480, width=256, eval_tokens=1024),
    "clean": dict(max_steps=30, patience=10, n_train=6),
    "top": dict(tokens=2000),
    "steer": dict(n_prompts=6, min_effect=0.01),  # a loose rule, so that tiny settings still select executors
    "ablate": dict(n_prompts=6),
    "circuit": dict(n_prompts=2, n_shot=4, edge_nodes=20),
    "faithfulness": {},
}


def pipeline_settings(model: str, *, tasks: Optional[str] = None, sweep_layers: Optional[str] = None,
                      layer: Optional[str] = None, circuit_tasks: Optional[str] = None,
                      circuit_layers: Optional[str] = None, suite: Optional[str] = None,
                      sae_tokens: Optional[int] = None, clean_l1: Optional[str] = None,
                      detector_l1: Optional[str] = None, smoke: bool = False) -> PipelineProfile:
    """The profile of ``model`` with each option that was given (not None) in place of its field,
    and with --smoke the SMOKE request fields over the profile's."""
    from icl_cli.cli.clean_cmd import _l1

    prof = profile_for(model)
    given = dict(tasks=tasks, sweep_layers=sweep_layers, circuit_tasks=circuit_tasks, circuit_layers=circuit_layers,
                 suite=suite, sae_tokens=sae_tokens)
    fields = {k: v for k, v in given.items() if v is not None}
    if layer is not None:
        fields["layer"] = _layer(layer)
    for key, text in (("clean_l1", clean_l1), ("detector_l1", detector_l1)):
        if text is not None:
            try:
                value = _l1(text)
            except IclError:
                value = -1.0
            if value is not None and not value >= 0:  # checked here, not after the collect step
                raise IclError(f"--{key.replace('_', '-')} takes a number ≥ 0 or auto, not {text!r}")
            fields[key] = value
    if smoke:
        fields["steps"] = {k: {**prof.steps[k], **SMOKE.get(k, {})} for k in prof.steps}
    return replace(prof, **fields)


def _layer(text: str) -> Optional[int]:
    """--layer: a layer number, or best (None: the sweep's most common best layer)."""
    if text.strip().lower() == "best":
        return None
    try:
        return int(text)
    except ValueError:
        raise IclError(f"--layer takes a layer number or best, not {text!r}") from None


def _dflt(fld: str) -> str:
    """The end of an option's help: its default in each profile."""
    def text(v) -> str:
        if v is None:
            return {"layer": "best"}.get(fld, "auto")
        return str(v) or "none"

    return "; default from the profile: " + ", ".join(f"{name} {text(getattr(p, fld))}" for name, p in PROFILES.items()) + "."


def register(app: typer.Typer) -> None:
    app.command("pipeline")(pipeline_cmd)


STEP_COST = {"collect": 20, "SAEs": 2, "train-sae": 120, "clean": 80, "top-activations": 5, "steer": 9, "mass": 6,
             "cross": 6, "link": 170, "circuit": 7, "faithfulness": 17, "report": 16}
"""Relative time of each step in the default toy run (README: clean 69 s and 91 s, the link 171 s, …),
to estimate the time left from the time spent so far."""


def _kind(heading: str) -> str:
    """The STEP_COST kind of a heading ("ablate: detector → executor link" -> "link")."""
    head = heading.split(":", 1)[0]
    if head == "ablate":
        return "mass" if "mass" in heading else "link" if "link" in heading else "cross"
    return head


class _Clock:
    """The pipeline's headings on stderr: seconds since the start, "step k of n" (n: the steps
    planned; a step found to be skipped leaves the plan) and an estimate of the time left."""

    def __init__(self, gl: Globals, plan: list[str] | None = None):
        self.gl = gl
        self.t0 = time.perf_counter()
        self.plan, self.done = list(plan or []), []

    def __call__(self, what: str) -> None:
        now = time.perf_counter() - self.t0
        kind = _kind(what)
        if kind in self.plan:  # the planned steps before this one were skipped
            self.plan = self.plan[self.plan.index(kind) + 1:]
        step = ""
        if kind in STEP_COST:
            self.done.append(kind)
            n = len(self.done) + len(self.plan)
            spent = sum(STEP_COST[k] for k in self.done[:-1])
            left = sum(STEP_COST[k] for k in [kind, *self.plan])
            eta = f", about {_duration(now * left / spent)} left" if spent and now > 1 else ""
            step = f" step {len(self.done)} of {n}{eta}:"
        log(f"== [{now:.0f}s]{step} {what}", ctx_globals=self.gl, style="bold")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def pipeline_cmd(
    ctx: typer.Context,
    model: str = typer.Option("toy-icl", "--model", help="Preset, HF id or local folder; picks the profile of defaults (icl_cli/zoo/profiles.py)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated tasks, or all (the 23 built-in ones) (default from the profile: toy-icl two per task group; smollm2-135m one per group)."),
    sweep_layers: Optional[str] = typer.Option(None, "--sweep-layers", help="Layers of the task-vector sweep: all, 12-26, 3,5" + _dflt("sweep_layers")),
    layer: Optional[str] = typer.Option(None, "--layer", help="Task-vector layer l, or best: where most tasks' task vectors work best" + _dflt("layer")),
    circuit_tasks: Optional[str] = typer.Option(None, "--circuit-tasks", help="Tasks that get a circuit (empty: no circuits)" + _dflt("circuit_tasks")),
    circuit_layers: Optional[str] = typer.Option(None, "--circuit-layers", help="Layers of the circuits; the suite must cover them" + _dflt("circuit_layers")),
    suite: Optional[str] = typer.Option(None, "--suite", help="Dictionary suite for the circuits (and the SAEs when it covers l and l − 1)" + _dflt("suite")),
    sae_tokens: Optional[int] = typer.Option(None, "--sae-tokens", help="Training tokens of each SAE when no suite covers l and l − 1" + _dflt("sae_tokens")),
    clean_l1: Optional[str] = typer.Option(None, "--clean-l1", help="λ of task vector cleaning, or auto (clean's per-task search) (the paper: 0.05 on Gemma)" + _dflt("clean_l1")),
    detector_l1: Optional[str] = typer.Option(None, "--detector-l1", help="λ of detector vector cleaning, or auto" + _dflt("detector_l1")),
    sweep_l1: str = typer.Option("", "--sweep-l1", help="Also clean with these λ, for more points in the cleaning sweep figure (e.g. 0.001,0.02; each λ is one more cleaning per task)."),
    out: Path = typer.Option(Path("report"), "--out", help="Folder of the report (figures and index.html)."),
    smoke: bool = typer.Option(False, "--smoke", help="Tiny settings: a quick check that every step runs (numbers are not meaningful)."),
) -> None:
    """Run the paper's pipeline end to end and report what it found beside the paper's numbers."""
    from icl_cli.ablate.step import AblateRequest, LinkRequest, MassRequest, run_ablate, run_link, run_mass
    from icl_cli.circuit.step import CircuitRequest, run_circuit
    from icl_cli.clean.step import CleanRequest, run_clean
    from icl_cli.cli.clean_cmd import _floats
    from icl_cli.collect.step import CollectRequest, TopRequest, run_collect, run_top_activations
    from icl_cli.steer.step import SteerRequest, run_steer

    gl = g(ctx)
    if gl.quiet:
        raise IclError("icl pipeline prints a report, not keys; drop -q (or use --json)")
    s = pipeline_settings(model, tasks=tasks, sweep_layers=sweep_layers, layer=layer, circuit_tasks=circuit_tasks,
                          circuit_layers=circuit_layers, suite=suite, sae_tokens=sae_tokens, clean_l1=clean_l1,
                          detector_l1=detector_l1, smoke=smoke)
    tasks, suite, circuit_tasks, circuit_layers = s.tasks, s.suite, s.circuit_tasks, s.circuit_layers
    x = s.steps
    env = run_env(gl)
    n_circuits = len([t for t in circuit_tasks.split(",") if t.strip()])
    say = _Clock(gl, ["collect", "SAEs", "clean", "clean", "top-activations", "steer", "steer", "mass", "mass", "cross",
                      "link", *["circuit"] * n_circuits, *(["faithfulness"] if n_circuits else []), "report"])
    log(f"profile {s.name or 'generic'}: {s.why}" + (" (--smoke: tiny settings)" if smoke else ""), ctx_globals=gl)

    say(f"collect: task vectors and the layer sweep ({model}, tasks: {tasks})")
    tv_out = run_collect(env, CollectRequest(model=model, tasks=tasks, layers=s.sweep_layers, name="pipeline-tv",
                                             **x["collect"]))
    tv = tv_out.result.artifact.key
    layer = s.layer
    if layer is None:
        best = Counter(t["best_layer"] for t in tv_out.data["tasks"].values())
        layer = best.most_common(1)[0][0]
    if layer < 1:
        raise IclError(f"the task-vector layer is {layer}; detectors need layer l − 1 ≥ 0, so pass --layer ≥ 1")
    prev = layer - 1

    sae, sae_prev, have_suite = _saes(env, gl, say, model, suite, layer, prev, s.sae_tokens, x["train-sae"])
    say(f"clean: task vectors at layer {layer} (executors)")
    sweep = () if smoke or not sweep_l1 else _floats(sweep_l1)
    clean_out = run_clean(env, CleanRequest(tv=tv, sae=sae, l1=s.clean_l1, sweep_l1=sweep, name="pipeline-clean", **x["clean"]))
    clean = clean_out.result.artifact.key
    say(f"clean: detector vectors at layer {prev} (detectors)")
    dclean = run_clean(env, CleanRequest(tv=tv, sae=sae_prev, detectors=True, l1=s.detector_l1,
                                         name="pipeline-clean-detectors", **x["clean"])).result.artifact.key

    keys = [tv, sae, sae_prev, clean, dclean]
    top = sorted({int(f) for r in clean_out.data["tasks"].values() for f in r["features"][:2]})
    if top:
        say("top-activations: contexts of each task's top two cleaned features")
        keys.append(run_top_activations(env, TopRequest(sae=sae, features=tuple(top), name="pipeline-top", **x["top"]))
                    .result.artifact.key)

    say(f"steer: executor heatmap at layer {layer}")
    ex_out = run_steer(env, SteerRequest(clean=clean, scale=s.executor_scale, name="pipeline-executors", **x["steer"]))
    say(f"steer: detector steering at layer {prev}")
    det_out = run_steer(env, SteerRequest(clean=dclean, mode="detector", scale=s.detector_scale, name="pipeline-detectors",
                                          **x["steer"]))
    ex, det = ex_out.result.artifact.key, det_out.result.artifact.key
    keys += [ex, det]
    # the executors (detectors) the steering rule selected. A task without any is not measured and a
    # step whose every set is empty is skipped (no fallback to other features, SPEC §7)
    have = {w: [t for t, v in d.get(w, {}).items() if v] for w, d in (("executors", ex_out.data), ("detectors", det_out.data))}
    for w, tasks_with in have.items():
        if not tasks_with:
            log(f"no task has {w} by the steering rule: the steps that need them are skipped (not measured)",
                ctx_globals=gl, style="yellow")
    skipped = []  # headline rows of what could not be measured, and why
    rule = "the steering rule (large on the task, small on tasks of other groups)"
    if not have["executors"]:
        skipped.append({"finding": "Activation mass of executors on arrow tokens", "paper": "89.8% (layer 12)",
                        "why": f"no task has executors by {rule}"})
    if not have["detectors"]:
        skipped.append({"finding": "Activation mass of detectors on output tokens", "paper": "96.8% (layer 11)",
                        "why": f"no task has detectors by {rule}"})
    if len(have["executors"]) < 2:
        skipped.append({"finding": "Cross-task ablation of executors (few-shot prompts)",
                        "paper": "ablating a task's executors hurts that task most",
                        "why": f"{len(have['executors'])} task(s) with executors; a cross-task matrix needs two"})
    if not (have["executors"] and have["detectors"]):
        skipped.append({"finding": "Detector → executor link (frozen attention, paper Fig. 8)",
                        "paper": "removing a task's detectors lowers its executors far more than other tasks'",
                        "why": "no " + " and no ".join(w for w in ("detectors", "executors") if not have[w])
                               + " by the steering rule"})
    if have["executors"]:
        say(f"ablate: activation mass by token role (executors of {len(have['executors'])} tasks)")
        keys.append(run_mass(env, MassRequest(features=ex, which="selected", name="pipeline-mass-executors",
                                              **x["ablate"])).result.artifact.key)
    if have["detectors"]:
        say(f"ablate: activation mass by token role (detectors of {len(have['detectors'])} tasks)")
        keys.append(run_mass(env, MassRequest(features=det, which="selected", name="pipeline-mass-detectors",
                                              **x["ablate"])).result.artifact.key)
    if len(have["executors"]) >= 2:
        say("ablate: cross-task matrix (the executors of task A ablated at the arrows, task B measured)")
        keys.append(run_ablate(env, AblateRequest(features=ex, which="selected", roles="arrow", cross_task=True,
                                                  name="pipeline-cross-task", **x["ablate"])).result.artifact.key)
    if have["executors"] and have["detectors"]:
        say("ablate: detector → executor link")
        keys.append(run_link(env, LinkRequest(detectors=det, executors=ex, which="selected", name="pipeline-link",
                                              **x["ablate"])).result.artifact.key)

    circuits = []
    if not have_suite and circuit_tasks:
        what = f"dictionary suite {suite!r} of {model}" if suite else f"dictionary suite for {model}"
        log(f"no {what} (resid, attn and transcoder dictionaries per layer), so no circuits; "
            "scripts/toy_saes.sh trains one for toy-icl, or pass --suite", ctx_globals=gl, style="yellow")
    for task in [t.strip() for t in circuit_tasks.split(",") if t.strip() and have_suite]:
        say(f"circuit: {task}")
        circuits.append(run_circuit(env, CircuitRequest(task=task, saes=[suite], model=model, layers=circuit_layers,
                                                        name=f"pipeline-circuit-{task}", **x["circuit"])).keys[0])
    if circuits:
        from icl_cli.circuit.evaluate import FaithOptions
        from icl_cli.circuit.faithfulness_step import FaithRequest, run_faithfulness

        say("faithfulness: curves of each circuit" + (" and the cross-task matrix" if len(circuits) > 1 else ""))
        keys += circuits
        opts = FaithOptions(**{"cross_task": len(circuits) > 1, **x["faithfulness"]})
        keys.append(run_faithfulness(env, FaithRequest(",".join(circuits), options=opts, name="pipeline-faithfulness"))
                    .result.artifact.key)

    say(f"report: figures and {out}/index.html")
    from icl_cli.cli.report_cmd import show_report
    from icl_cli.report import build_report

    rep = build_report(env.store, keys, out=out.resolve(), with_inputs=False,
                       progress=lambda m: log(f"rendering {m}", ctx_globals=gl), not_measured=skipped)
    show_report(gl, rep, brief=True)
    say("done")


def _saes(env: RunEnv, gl: Globals, say: _Clock, model: str, suite: str, layer: int, prev: int, tokens: int, extra: dict):
    """(SAE at l, SAE at l − 1, whether the suite exists): the suite's residual SAEs when it is
    for this model and has both, else trained ones."""
    from icl_cli.dictionaries.suite import import_suite, suite_name
    from icl_cli.train_sae.step import TrainSaeRequest, run_train_sae

    from icl_cli.core.models import same_model

    found = None
    if suite:
        try:  # no suite is a normal case here, not an error: nothing is said about it
            found = import_suite(env.store, suite, name=suite_name(suite))
        except IclError:
            pass
    # a suite of another model is no suite for this one (neither its SAEs nor its circuits)
    have = dict(found.member_keys) if found is not None and same_model(found.model, model) else {}
    if ("resid", layer) in have and ("resid", prev) in have:
        say(f"SAEs: the residual SAEs of suite {suite} at layers {prev} and {layer}")
        return have[("resid", layer)], have[("resid", prev)], True
    # toy-sized: 300k tokens in batches of 1024 at lr 1e-3 (the paper's 300M tokens at 4e-4 are for Gemma)
    req = TrainSaeRequest(**{**dict(model=model, layer=[f"{prev},{layer}"], site="resid", arch="gated", tokens=tokens,
                                    batch_tokens=1024, lr=1e-3, l1=1.0, dataset="tasks", name="pipeline-sae"), **extra})
    say(f"train-sae: {req.arch} residual SAEs at layers {prev} and {layer} ({req.tokens} tokens each)")
    by_layer = {r.layer: r.key for r in run_train_sae(env, req, progress=lambda: train_progress(gl)).results}
    return by_layer[layer], by_layer[prev], bool(have)

