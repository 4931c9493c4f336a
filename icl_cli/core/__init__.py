"""Shared compute core: model loading (models), hook sites (sites, arch), tasks, prompts, metrics.

Kept import-free so that ``icl --help`` never pulls in torch: import the submodules directly,
e.g. ``from icl_cli.core.sites import HookedModel, Site``.
"""
