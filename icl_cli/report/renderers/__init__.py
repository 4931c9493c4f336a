"""One renderer per artifact step; importing this package fills the registry in report.base.

A renderer whose step's library module is not there yet is skipped (its artifacts get the
generic section: parameters, metrics and lineage).
"""

import importlib

for _name in ("collect", "clean", "train_sae", "top_activations", "steer", "ablate", "circuit", "faithfulness"):
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{_name}":
            raise
