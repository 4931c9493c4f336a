"""Per-model defaults of ``icl pipeline``: which tasks, layers, dictionaries, λ and prompt budgets
the whole paper runs with on a given model (``--model`` picks the profile; each of the pipeline's
options overrides its field).

    p = profile_for("smollm2-135m")
    p.tasks, p.layer, p.suite, p.steps["collect"]

A model without a profile of its own gets GENERIC: the toy profile's tasks and λ, the sweep over
every layer, the task-vector layer from the sweep, and no dictionary suite (SAEs are trained and
no circuits are made unless ``--suite`` names one for that model).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping, Optional

STEPS = ("collect", "train-sae", "clean", "top", "steer", "ablate", "circuit", "faithfulness")
"""The steps whose request fields a profile (and --smoke) may set."""


@dataclass(frozen=True)
class PipelineProfile:
    """The pipeline's defaults for one model. Fields named like an option of ``icl pipeline`` are
    overridden by that option; ``steps`` holds request fields of each step (CollectRequest,
    CleanRequest, ..., FaithOptions for faithfulness) that have no pipeline option."""

    name: str
    """The model preset it is for (GENERIC: any other model)."""
    tasks: str
    """--tasks."""
    sweep_layers: str
    """--sweep-layers: the layers of collect's task-vector sweep (all, 12-26, ...)."""
    layer: Optional[int]
    """--layer: the task-vector (executor) layer l; None: where most tasks' vectors work best."""
    suite: str
    """--suite: dictionary suite for the circuits (and the SAEs when it covers l and l − 1); "" none."""
    circuit_tasks: str
    """--circuit-tasks."""
    circuit_layers: str
    """--circuit-layers (the suite must cover them)."""
    clean_l1: Optional[float]
    """--clean-l1: λ of task vector cleaning; None: auto (clean's per-task search)."""
    detector_l1: Optional[float]
    """--detector-l1: λ of detector vector cleaning; None: auto."""
    sae_tokens: int = 300_000
    """--sae-tokens: training tokens of each SAE when the suite does not cover l and l − 1."""
    executor_scale: Optional[float] = None
    """Steering scale s of the executor heatmap (None: steer's default, the paper's 15)."""
    detector_scale: Optional[float] = None
    """Steering scale s of detector steering (None: steer's default, the paper's 25)."""
    steps: Mapping[str, Mapping] = field(default_factory=dict)
    """Request fields per step (keys of STEPS) that differ from the steps' own defaults."""
    why: str = ""
    """One line: where these numbers come from."""

    def __post_init__(self) -> None:
        unknown = set(self.steps) - set(STEPS)
        if unknown:
            raise ValueError(f"profile {self.name}: unknown steps {sorted(unknown)}")
        object.__setattr__(self, "steps", MappingProxyType({s: MappingProxyType(dict(self.steps.get(s, {})))
                                                            for s in STEPS}))


TOY = PipelineProfile(
    name="toy-icl",
    # two tasks of each group whose task vectors work at the toy model's layer 5 and that it does not
    # already solve at 0 shots (fr_en, es_en, it_en do): the whole pipeline fits in a few minutes
    tasks="antonyms,singular_plural,en_es,en_fr,location_continent,location_religion,algo_last,algo_second",
    sweep_layers="all",
    layer=None,
    suite="toy-icl-suite",
    circuit_tasks="antonyms,en_es,location_continent",
    circuit_layers="2-4",
    # the toy SAEs' activations are larger than Gemma's: the paper's 0.05 prunes the task vectors
    # to a handful of features that no longer carry the task
    clean_l1=0.005,
    detector_l1=0.005,
    sae_tokens=300_000,  # CE recovered ≈ 0.99 at L0 ≈ 200 of 2048; 1M gives L0 ≈ 95
    why="the bundled toy model: every built-in step default, a few minutes on 2 CPU cores",
)

SMOLLM2 = PipelineProfile(
    name="smollm2-135m",
    # one task per group, each learned in context by SmolLM2 (first-token accuracy, 0 → 16 shots,
    # 24 prompts, paper template): present_simple_past_simple 0.00 → 0.92, fr_en 0.00 → 0.33 (the
    # best translation: en_es 0.00 → 0.08, es_en 0.29, it_en 0.29), location_continent 0.00 →
    # 0.75, algo_last 0.21 → 1.00 (algo_first 0.83, algo_second 0.12)
    tasks="present_simple_past_simple,fr_en,location_continent,algo_last",
    sweep_layers="12-26",  # the task vectors work best at 15-25 (SPEC §11); the other layers cost time
    layer=21,  # smollm2-suite's executor layer (its resid SAEs are at 19-21; detectors at 20)
    suite="smollm2-suite",
    circuit_tasks="present_simple_past_simple,location_continent,algo_last",
    circuit_layers="19-21",
    # the paper's λ: on these TopK SAEs 0.05 keeps 10-20 of the reconstruction's 32 features and a lower
    # held-out nll than the raw vector (4 tasks: L0 12.5, nll 3.06 vs 4.19) in 75 s a task; auto (its
    # per-task search) chose 0.1 on present_simple_past_simple (L0 13, nll 2.15) in 190 s, 0.3 collapses.
    # Detector vectors help a 0-shot prompt far less (raw nll 5.98 vs 6.50 at 0 shots), so 0.05 prunes
    # them to 0-1 features and no detector survives; 0.01 keeps 11-30 (nll 4.86)
    clean_l1=0.05,
    detector_l1=0.01,
    sae_tokens=30_000,  # only when --layer leaves the suite: 30k tokens gave CE recovered 0.85 at L0 32 (6 min)
    # The paper's s = 15 is a third of what one kept feature adds to a cleaned SmolLM2 task vector (the
    # largest feature per task adds 38-56 to a vector of norm 210-250 at resid_pre[21]; at s = 15 the
    # best effects were 0.03-0.22 and one task had executors). Executors are steered at that size,
    # 45 (the median over the 4 tasks of the largest kept feature's norm), detectors at 45 × 25/15
    # = 75, the paper's ratio of its two scales.
    executor_scale=45.0,
    detector_scale=75.0,
    steps={
        "train-sae": dict(arch="topk", k=32, width=2048, batch_tokens=512, lr=1e-3, l1=None, eval_tokens=4096),
        "clean": dict(n_train=16),  # the paper's 1000 steps and patience 200 (at 400 steps L0 was still falling)
        "top": dict(tokens=10_000),
        # collect, steer and ablate: the steps' own (the paper's) prompt counts
        "circuit": dict(n_prompts=8, n_shot=12, edge_nodes=200),  # the paper's 12 shots
        # the graphs over 19-21 hold 8-11k feature nodes and the circuits 1.5-4k: curves up to 1000
        # nodes stopped below 0.8, so they go on to 10k (6 more ablated passes per circuit)
        "faithfulness": dict(max_nodes=10_000),
    },
    why="SmolLM2-135M-Instruct with the bundled smollm2-suite; about 28 min of one CPU core (27.5 min measured)",
)

GENERIC = replace(TOY, name="", layer=None, suite="", circuit_tasks="", circuit_layers="",
                  why="a model without a profile: every step's default, the layer from the sweep, SAEs trained")

PROFILES: Mapping[str, PipelineProfile] = MappingProxyType({p.name: p for p in (TOY, SMOLLM2)})


def profile_for(model: str) -> PipelineProfile:
    """The profile of ``model`` (a preset name, or its HF id / folder), else GENERIC."""
    from icl_cli.core.models import same_model

    if model in PROFILES:
        return PROFILES[model]
    return next((p for name, p in PROFILES.items() if same_model(model, name)), GENERIC)
