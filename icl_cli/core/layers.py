"""Layer specifications on the command line: `all`, `5`, `2-7`, `1,3,5`."""

from __future__ import annotations

from icl_cli.core.errors import IclError


def parse_layers(spec: "str | list[str]", n_layers: int) -> list[int]:
    """`all` | `5` | `2-7` | `1,3,5` (or a list of those) -> sorted layers, checked against the model."""
    spec = ",".join(spec) if isinstance(spec, (list, tuple)) else str(spec)
    spec = spec.strip()
    if spec == "all":
        return list(range(n_layers))
    layers: set[int] = set()
    try:
        for part in spec.split(","):
            if "-" in part.strip()[1:]:
                a, b = part.split("-", 1)
                if int(b) < int(a):
                    raise IclError(f"layer range {part.strip()!r} runs backwards; write it low-high ({b.strip()}-{a.strip()})")
                layers.update(range(int(a), int(b) + 1))
            else:
                layers.add(int(part))
    except ValueError:
        raise IclError(f"cannot read layers {spec!r}; use all, 5, 2-7 or 1,3,5") from None
    if not layers:
        raise IclError(f"no layers in {spec!r}; use all, 5, 2-7 or 1,3,5")
    bad = sorted(l for l in layers if not 0 <= l < n_layers)
    if bad:
        raise IclError(f"layer(s) {bad} out of range: the model has layers 0-{n_layers - 1}")
    return sorted(layers)
