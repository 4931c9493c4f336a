"""Content-hashed artifact store: keys, atomic publish, references, verify, gc, import/export.

    from icl_cli.store import Store, StepSpec
    res = Store("artifacts").run(StepSpec("collect", params, inputs), build, name="tv")
"""

from icl_cli.store.artifact import Artifact, StepResult
from icl_cli.store.gc import GcReport
from icl_cli.store.keys import SPEED_PARAMS, StepSpec, canonical_json, compute_key, normalise
from icl_cli.store.staging import Staging
from icl_cli.store.store import Store

__all__ = [
    "Artifact",
    "GcReport",
    "SPEED_PARAMS",
    "Staging",
    "StepResult",
    "StepSpec",
    "Store",
    "canonical_json",
    "compute_key",
    "normalise",
]
