"""Sparse feature circuits on ICL prompts (SPEC §7): spliced model, node and edge attribution,
node selection, faithfulness, graph IO and exports."""
