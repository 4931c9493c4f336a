"""SAEs and transcoders: one module per architecture, SAELens IO, readers for other formats."""

from icl_cli.dictionaries.base import ARCHS, DictConfig, Dictionary, LossParts, build
from icl_cli.dictionaries.io import import_sae, load_dictionary, save_saelens

__all__ = ["ARCHS", "DictConfig", "Dictionary", "LossParts", "build", "import_sae", "load_dictionary", "save_saelens"]
