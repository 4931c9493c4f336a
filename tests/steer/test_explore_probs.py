"""``steer explore``'s next-token probabilities: equal to a forward pass steered by a plain PyTorch
hook written here (the vector added to the input of block l at the last position), and the answer
token found after the prompt. On the bundled toy model: a random tiny model passes its residual
almost unchanged from block to block, so it could not tell the layers apart."""

import pytest
import torch

from icl_cli.core.sites import HookedModel
from icl_cli.steer.explore import answer_token, next_token_probs


def _by_hand(model, ids: torch.Tensor, layer: int, vector: torch.Tensor) -> torch.Tensor:
    """Next-token distribution with ``vector`` added to resid_pre[layer] (the input of decoder
    block ``layer``) at the last position, through a forward pre-hook."""
    block = model.model.layers[layer]

    def add(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        h = h.clone()
        h[:, -1] += vector
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    handle = block.register_forward_pre_hook(add, with_kwargs=True)
    try:
        with torch.no_grad():
            return model(ids).logits[0, -1].float().softmax(-1)
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def toy():
    from icl_cli.core.models import load_model

    return load_model("toy-icl", device="cpu")


def test_probabilities_equal_a_hand_steered_forward(toy):
    model, tok = toy.model, toy.tokenizer
    ids = tok("Follow the pattern:\nhot ->", return_tensors="pt").input_ids
    torch.manual_seed(0)
    vector = 8.0 * torch.nn.functional.normalize(torch.randn(model.config.hidden_size), dim=0)
    answer = answer_token(tok, "Follow the pattern:\nhot ->", "cold")
    assert tok.decode([answer]) == "cold"
    rows = next_token_probs(HookedModel(model), ids, 1, vector, "last", answer, top=3)
    with torch.no_grad():
        plain = model(ids).logits[0, -1].float().softmax(-1)
    steered = _by_hand(model, ids, 1, vector)
    assert (steered - _by_hand(model, ids, 2, vector)).abs().max() > 1e-3  # the layer matters here
    got = {i: (a, b) for i, a, b in rows}
    assert answer in got  # the answer is always reported, likely or not
    assert set(plain.topk(3).indices.tolist()) | set(steered.topk(3).indices.tolist()) <= set(got)
    for i, (a, b) in got.items():  # relative: a random model's probabilities are all small
        assert abs(a - float(plain[i])) <= 1e-4 * float(plain[i])
        assert abs(b - float(steered[i])) <= 1e-4 * float(steered[i])
        assert abs((b - a) - float(steered[i] - plain[i])) <= 1e-3 * abs(float(steered[i] - plain[i]))
    changes = [abs(b - a) for _, a, b in rows]
    assert changes == sorted(changes, reverse=True)  # largest change first
    assert max(changes) > 1e-2  # the steering moved something
