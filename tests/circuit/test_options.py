"""Circuit options of issue 21 item 8: single-token pairs, one ``prompt`` node per instruction
position; and the circuit package's imports (library code never reaches up into the CLI)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from icl_cli.circuit.attribution import node_scores
from icl_cli.core.prompts import ROLE_CODE
from icl_cli.core.sites import HookedModel
from icl_cli.core.tasks import resolve_tasks
from tests.circuit.helpers import tiny_suite, toy_batch

WORD = re.compile(r"\n|->|[,:]|[^\s,:>\-]+|[>\-]")
"""The toy tokenizer's pre-tokenizer (its tokenizer.json): one match = one token of its word-level vocabulary."""


def test_single_token_pairs_keeps_exactly_the_one_token_words(tiny_lm):
    from icl_cli.circuit.compute import single_token_pairs

    task = resolve_tasks("location_continent")[0]
    want = [(x, y) for x, y in task.pairs if len(WORD.findall(x)) == 1 and len(WORD.findall(y)) == 1]
    got = single_token_pairs(tiny_lm.tokenizer, task.pairs, "paper")
    assert got == want
    assert 0 < len(got) < len(task.pairs)  # the task has multi-word places, and one-word ones
    algo = resolve_tasks("algo_last")[0]  # inputs are four words joined by ", "
    assert single_token_pairs(tiny_lm.tokenizer, algo.pairs, "paper") == []


def test_single_token_circuit_prompts_hold_only_such_pairs(tiny_lm):
    from icl_cli.circuit.compute import CircuitParams, prompt_batch
    from icl_cli.core.errors import IclError

    task = resolve_tasks("location_continent")[0]
    prompts, batch = prompt_batch(tiny_lm.tokenizer, task, CircuitParams(n_prompts=4, n_shot=5, single_token=True), None)
    for pr in prompts:
        assert all(len(WORD.findall(x)) == 1 and len(WORD.findall(y)) == 1 for x, y in pr.pairs)
    # one token per input and per output: every input/output token is the whole word
    for b in range(len(batch)):
        assert int((batch.roles[b] == ROLE_CODE["input"]).sum()) == len(prompts[b].pairs)
    with pytest.raises(IclError, match="single-token"):
        prompt_batch(tiny_lm.tokenizer, resolve_tasks("algo_last")[0], CircuitParams(single_token=True), None)


def test_prompt_positions_split_the_instruction_node(tiny_lm):
    """One group per instruction token; by linearity of attribution patching their IEs sum to the
    single ``prompt`` node's IE, and the other roles are unchanged."""
    from icl_cli.circuit.splice import Groups

    batch = toy_batch(tiny_lm, n_prompts=3, n_shot=3)
    g = Groups.of(batch, prompt_positions=True)
    prompt_tokens = (batch.roles == ROLE_CODE["prompt"]).sum(1)
    K = int(prompt_tokens.max())
    assert K == 5 and bool((prompt_tokens == K).all())  # "Follow the pattern : \n"
    assert g.names == [f"prompt:{k}" for k in range(K)] + ["input", "arrow", "output", "newline"]
    for b in range(len(batch)):
        pos = torch.nonzero(batch.roles[b] == ROLE_CODE["prompt"]).flatten().tolist()
        assert [int(g.index[b, p]) for p in pos] == list(range(K))
        for role in ("input", "arrow", "output", "newline"):
            at = batch.roles[b] == ROLE_CODE[role]
            assert bool((g.index[b][at] == g.names.index(role)).all())
    hm = HookedModel(tiny_lm.model)
    dicts = tiny_suite(tiny_lm.d_model, range(tiny_lm.n_layers), d_sae=16, seed=2)
    whole = node_scores(hm, batch, dicts, "atp", "zero")
    split = node_scores(hm, batch, dicts, "atp", "zero", prompt_positions=True)
    for k in dicts:
        torch.testing.assert_close(split.ie[k][:K].sum(0), whole.ie[k][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(split.ie[k][K:], whole.ie[k][1:], atol=1e-6, rtol=1e-5)


def test_prompt_positions_circuit_names_its_nodes(tiny_lm):
    from icl_cli.circuit.compute import CircuitParams, compute_circuit

    hm = HookedModel(tiny_lm.model)
    dicts = tiny_suite(tiny_lm.d_model, range(tiny_lm.n_layers), d_sae=16, seed=2)
    g = compute_circuit(hm, tiny_lm.tokenizer, resolve_tasks("antonyms")[0], dicts,
                        CircuitParams(n_prompts=2, n_shot=3, edge_nodes=3, prompt_positions=True), model="tiny")
    roles = set(g.role.tolist())
    assert "prompt" not in roles and {f"prompt:{k}" for k in range(5)} <= roles
    assert g.attrs["prompt_positions"] is True and g.attrs["single_token"] is False


def test_the_circuit_package_does_not_import_the_cli():
    root = Path(__file__).resolve().parents[2] / "icl_cli" / "circuit"
    bad = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{path.name}: {n}" for n in names if n.startswith("icl_cli.cli")]
    assert bad == []


def test_same_model_lives_in_core():
    from icl_cli.core.models import same_model

    assert same_model("gemma-1-2b", "google/gemma-2b") and same_model("google/gemma-2b", "/models/gemma-2b/")
    assert not same_model("gemma-1-2b", "gemma-1-2b-it")
