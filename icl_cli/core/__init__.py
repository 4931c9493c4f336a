"""Shared compute core: errors, model loading (models), hook sites (sites, arch), tasks, prompts
and token roles, metrics, steered passes. Reads nothing from the store; every step builds on it.

Kept import-free so that ``icl --help`` never pulls in torch: import the submodules directly,
e.g. ``from icl_cli.core.sites import HookedModel, Site``.
"""
