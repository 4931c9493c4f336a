"""Ground truth for feature-set ablation, activation mass and the detector → executor link.

Every expected value is computed here independently: a plain HF forward with a hand-written hook,
SAE activations from the raw weights, token roles written out by hand.
"""

from __future__ import annotations

import pytest
import torch

from icl_cli.ablate.feature_ablation import AblateParams, few_shot_prompts, run_ablation
from icl_cli.ablate.link import run_link
from icl_cli.ablate.mass import MassResult, set_mass
from icl_cli.core.batch import encode_prompts
from icl_cli.core.prompts import Prompt
from icl_cli.core.sites import HookedModel
from icl_cli.core.tasks import load_task
from icl_cli.dictionaries.base import DictConfig, build

P = AblateParams(n_shot=3, n_eval=4, seed=0)


def _standard_sae(d_in: int, d_sae: int, layer: int, seed: int, site: str = "resid_pre"):
    torch.manual_seed(seed)
    sae = build(DictConfig(d_in=d_in, d_sae=d_sae, arch="standard", site=site, layer=layer)).requires_grad_(False)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.05, 0.3)  # many features active on random inputs
        sae.b_dec.normal_(0, 0.5)
    return sae


def _manual_acts(sae, x):
    """relu((x − b_dec) W_enc + b_enc): the standard SAE, from its raw weights."""
    return torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)


def _nll_by_hand(logits, batch):
    lp = torch.log_softmax(logits.float(), -1)
    total = torch.zeros(len(batch))
    for b in range(len(batch)):
        for j in range(batch.answer_pos.shape[1]):
            if batch.answer_pos[b, j] >= 0:
                total[b] -= lp[b, batch.answer_pos[b, j], batch.answer_ids[b, j]]
    return float(total.mean())


def _hf_logits_with_site_replaced(model, batch, layer, fn):
    """Plain HF forward; block ``layer``'s input hidden states replaced by fn(x) via a raw hook."""
    block = model.model.layers[layer]

    def pre(module, args, kwargs):
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
        return (fn(args[0]), *args[1:]), kwargs

    h = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    finally:
        h.remove()


@pytest.fixture(scope="module")
def task():
    return load_task("antonyms")


def test_ablating_nothing_changes_nothing(tiny_lm, task):
    hm = HookedModel(tiny_lm.model)
    sae = _standard_sae(32, 64, 1, 0)
    sets = {"antonyms": {"s": []}, "given": {"s": [3, 5]}}
    p = AblateParams(n_shot=3, n_eval=4, roles=("output",))
    r = run_ablation(hm, tiny_lm.tokenizer, [task], sets, {"s": sae}, p)
    for m in ("nll", "acc", "apl"):
        assert r.ablated[m][0, 0] == r.base[m][0]  # bit for bit
    # the clean metric is the plain model's, computed without any hook
    batch = encode_prompts(tiny_lm.tokenizer, few_shot_prompts(task, p))
    with torch.no_grad():
        logits = tiny_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert float(r.base["nll"][0]) == pytest.approx(_nll_by_hand(logits, batch), abs=1e-5)
    # features whose roles never occur in the prompts change nothing either
    r2 = run_ablation(hm, tiny_lm.tokenizer, [task], {"antonyms": {"s": list(range(64))}}, {"s": sae},
                      AblateParams(n_shot=3, n_eval=4, roles=("prompt",), template="hendel"))
    assert r2.ablated["nll"][0, 0] == pytest.approx(float(r2.base["nll"][0]), abs=1e-6)


@pytest.mark.parametrize("roles", [("all",), ("arrow", "output")])
def test_zero_ablating_every_feature_leaves_bias_plus_error(tiny_lm, task, roles):
    hm = HookedModel(tiny_lm.model)
    layer = 1
    sae = _standard_sae(32, 64, layer, 1)
    p = AblateParams(n_shot=3, n_eval=4, roles=roles)
    r = run_ablation(hm, tiny_lm.tokenizer, [task], {"antonyms": {"s": list(range(64))}}, {"s": sae}, p)
    batch = encode_prompts(tiny_lm.tokenizer, few_shot_prompts(task, p))
    if roles == ("all",):  # every real token but BOS
        where = batch.attention_mask.bool() & (batch.input_ids != tiny_lm.tokenizer.bos_token_id)
    else:
        where = (batch.roles == 3) | (batch.roles == 4)

    def bias_plus_error(x):
        recon = _manual_acts(sae, x) @ sae.W_dec + sae.b_dec
        new = sae.b_dec + (x - recon)
        return torch.where(where[..., None], new, x)

    logits = _hf_logits_with_site_replaced(tiny_lm.model, batch, layer, bias_plus_error)
    expected = _nll_by_hand(logits, batch)
    assert float(r.ablated["nll"][0, 0]) == pytest.approx(expected, abs=1e-5)
    assert abs(expected - float(r.base["nll"][0])) > 1e-3  # the ablation really did something


def test_mean_ablation_uses_the_mean_activation_of_the_role(tiny_lm, task):
    hm = HookedModel(tiny_lm.model)
    layer, feats = 1, [2, 7, 11]
    sae = _standard_sae(32, 64, layer, 2)
    p = AblateParams(n_shot=3, n_eval=4, roles=("arrow",), mode="mean")
    other = load_task("en_fr")
    r = run_ablation(hm, tiny_lm.tokenizer, [task, other], {"antonyms": {"s": feats}}, {"s": sae}, p)
    # a′ = mean clean activation at arrow tokens over both tasks' prompts, by a loop over tokens
    acts_at_arrows = []
    batches = {}
    for t in (task, other):
        batch = encode_prompts(tiny_lm.tokenizer, few_shot_prompts(t, p))
        with torch.no_grad():
            hs = tiny_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               output_hidden_states=True).hidden_states[layer]
        for b in range(len(batch)):
            for pos in range(batch.input_ids.shape[1]):
                if batch.roles[b, pos] == 3:
                    acts_at_arrows.append(_manual_acts(sae, hs[b, pos])[feats])
        batches[t.name] = batch
    mean = torch.stack(acts_at_arrows).mean(0)
    batch = batches["antonyms"]
    arrows = batch.roles == 3

    def swap(x):
        a = _manual_acts(sae, x)[..., feats]
        return x + (arrows[..., None] * (mean - a)) @ sae.W_dec[feats]

    logits = _hf_logits_with_site_replaced(tiny_lm.model, batch, layer, swap)
    assert float(r.ablated["nll"][0, 0]) == pytest.approx(_nll_by_hand(logits, batch), abs=1e-5)
    assert torch.isnan(r.ablated["nll"][0, 1])  # without --cross-task the set is measured on its task only


def test_cross_task_matrix_and_transcoder_ablation(tiny_lm, task):
    hm = HookedModel(tiny_lm.model)
    other = load_task("en_fr")
    tc = _standard_sae(32, 48, 2, 3, site="transcoder")
    sets = {"antonyms": {"t": [1, 2, 3]}, "en_fr": {"t": list(range(48))}}
    p = AblateParams(n_shot=3, n_eval=4, roles=("all",), cross_task=True)
    r = run_ablation(hm, tiny_lm.tokenizer, [task, other], sets, {"t": tc}, p)
    assert not torch.isnan(r.ablated["nll"]).any()
    # zero-ablating every transcoder feature: mlp_out ← b_dec + (mlp_out − transcoder(mlp_in))
    batch = encode_prompts(tiny_lm.tokenizer, few_shot_prompts(task, p))
    where = batch.attention_mask.bool() & (batch.input_ids != tiny_lm.tokenizer.bos_token_id)
    mlp = tiny_lm.model.model.layers[2].mlp
    seen = {}
    h1 = mlp.register_forward_pre_hook(lambda m, args: seen.__setitem__("in", args[0]))

    def out_hook(m, args, out):
        recon = torch.relu(seen["in"] @ tc.W_enc + tc.b_enc) @ tc.W_dec + tc.b_dec
        return torch.where(where[..., None], tc.b_dec + (out - recon), out)

    h2 = mlp.register_forward_hook(out_hook)
    try:
        with torch.no_grad():
            logits = tiny_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    finally:
        h1.remove()
        h2.remove()
    assert float(r.ablated["nll"][1, 0]) == pytest.approx(_nll_by_hand(logits, batch), abs=1e-5)


def test_activation_mass_on_a_hand_built_prompt(tiny_lm):
    hm = HookedModel(tiny_lm.model)
    layer, feats = 2, [0, 5, 9, 30]
    sae = _standard_sae(32, 40, layer, 4)
    prompt = Prompt([("hot", "cold")], ("big", "small"))
    # <bos> Follow the pattern : \n hot -> cold \n big -> small
    hand_roles = [None, "prompt", "prompt", "prompt", "prompt", "prompt", "input", "arrow", "output", "newline",
                  "input", "arrow", "output"]
    ids = tiny_lm.tokenizer(prompt.text)["input_ids"]
    assert len(ids) == len(hand_roles)
    with torch.no_grad():
        hs = tiny_lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
    acts = _manual_acts(sae, hs)[:, feats]  # [13, 4]
    expected = {r: 0.0 for r in ("none", "prompt", "input", "arrow", "output", "newline")}
    for pos, role in enumerate(hand_roles):
        if role is not None:  # BOS carries no mass
            expected[role] += float(acts[pos].sum())
    total = sum(expected.values())
    got = set_mass(hm, tiny_lm.tokenizer, [prompt], sae, feats)
    pct = MassResult(["t"], {"t": feats}, {"t": got}).percent("t")
    for role, v in expected.items():
        assert pct[role] == pytest.approx(100 * v / total, abs=1e-3)
    # per feature, the arrow row is the sum over the two arrow tokens
    torch.testing.assert_close(got[3], acts[7] + acts[11], rtol=1e-5, atol=1e-5)


def _linear_block(lm_dir, layer: int):
    """The tiny toy model with block ``layer`` made linear: uniform causal attention with O·V = I,
    no input norm, no MLP. Then resid_pre[layer+1][p] = x_p + mean_{j≤p} x_j."""
    from icl_cli.core.models import load_model

    lm = load_model(str(lm_dir), device="cpu")
    blk = lm.model.model.layers[layer]
    attn = blk.self_attn
    d = lm.d_model
    with torch.no_grad():
        attn.q_proj.weight.zero_()
        attn.k_proj.weight.zero_()
        attn.v_proj.weight.copy_(torch.eye(d))
        attn.o_proj.weight.copy_(torch.eye(d))
        blk.mlp.down_proj.weight.zero_()
    blk.input_layernorm = torch.nn.Identity()
    return lm


def test_link_ratio_is_one_for_a_direction_orthogonal_to_the_executor(tiny_toy_dir, task):
    lm = _linear_block(tiny_toy_dir, 1)
    hm = HookedModel(lm.model)
    det, exe = _standard_sae(32, 16, 1, 5), _standard_sae(32, 16, 2, 6)
    e = 4
    w = exe.W_enc[:, e].clone()
    with torch.no_grad():
        exe.b_enc[e] = 50.0  # the executor fires at every arrow, well above zero
        u = torch.randn(32)
        det.W_dec[0] = 3 * (u - (u @ w) / (w @ w) * w)  # detector 0: orthogonal to the executor's encoder
        det.W_dec[1] = 2 * w  # detector 1: along it
    p = AblateParams(n_shot=3, n_eval=4)
    for removal in ("project", "feature", "steer"):
        r = run_link(hm, lm.tokenizer, [task], det, [0], exe, [e], p, removal=removal, scale=7.0)
        assert r.before[0, 0] > 0
        assert float(r.ratio[0, 0]) == pytest.approx(1.0, abs=1e-5), removal

    # along the encoder the activation drops exactly as the linear block predicts:
    # Δpre at arrow p = −s·⟨w, û⟩·#{outputs before p}/(p + 1)
    s = 7.0
    r = run_link(hm, lm.tokenizer, [task], det, [1], exe, [e], p, removal="steer", scale=s)
    batch = encode_prompts(lm.tokenizer, few_shot_prompts(task, p))
    with torch.no_grad():
        hs = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      output_hidden_states=True).hidden_states[2]
    shift = s * float(w @ w / w.norm())
    before = after = 0.0
    for b in range(len(batch)):
        n_out = 0
        for pos in range(int(batch.attention_mask[b].sum())):
            if batch.roles[b, pos] == 4:
                n_out += 1
            if batch.roles[b, pos] == 3:
                pre = float((hs[b, pos] - exe.b_dec) @ w + exe.b_enc[e])
                before += max(pre, 0.0)
                after += max(pre - shift * n_out / (pos + 1), 0.0)
    assert float(r.before[0, 0]) == pytest.approx(before, rel=1e-5)
    assert float(r.ratio[0, 0]) == pytest.approx(after / before, rel=1e-4)
    assert after / before < 0.99


def test_own_and_other_pairs(tiny_lm, task):
    hm = HookedModel(tiny_lm.model)
    det, exe = _standard_sae(32, 16, 0, 7), _standard_sae(32, 16, 2, 8)
    r = run_link(hm, tiny_lm.tokenizer, [task], det, [1, 2], exe, [3, 4], P, own_pairs=[(1, 4)],
                 executor_tasks={3: ["antonyms"], 4: ["antonyms"]})
    assert r.own.tolist() == [[False, True], [False, False]]
    own, other, n_own, n_other = r.own_vs_other()
    ratio = r.ratio
    ok = ~torch.isnan(ratio)
    assert n_own + n_other == int(ok.sum())
    if ok[0, 1]:
        assert own == pytest.approx(float(ratio[0, 1]))
    torch.testing.assert_close(ratio, torch.where(r.before[0] > 0, r.after[:, 0] / r.before[0], torch.nan), equal_nan=True)


def test_own_worst_share_counts_columns_whose_own_row_is_largest():
    from icl_cli.ablate.feature_ablation import AblateResult, own_worst_share

    nan = float("nan")
    base = torch.tensor([1.0, 2.0, 3.0])
    nll = torch.tensor([[1.5, 2.1, 3.0],   # set a
                        [1.2, 2.5, nan],   # set b
                        [1.1, 2.0, 3.2]])  # set c
    r = AblateResult(["a", "b", "c"], ["a", "b", "c"], {"nll": base}, {"nll": nll})
    # column a: own +0.5 is largest ✓; b: own +0.5 ✓; c: own +0.2 vs 0.0 ✓ -> 3/3
    assert own_worst_share(r) == 1.0
    nll[2, 2] = 2.9
    assert own_worst_share(r) == pytest.approx(2 / 3)


def test_word_roles_cover_every_token_of_multi_token_inputs_and_outputs():
    """SPEC §8: inputs and outputs as whole words. With one token per character, 'hot' is three
    input tokens and 'cold' four output tokens; the arrow and the spaces keep their own roles."""
    from icl_cli.ablate.mass import word_roles
    from icl_cli.core.batch import encode_prompts
    from icl_cli.core.prompts import ROLE_CODE

    from tests.core.char_tokenizer import CharTokenizer

    tok = CharTokenizer()
    prompt = Prompt([("hot", "cold")], ("big", "small"))
    text = prompt.text  # 'Follow the pattern:\nhot -> cold\nbig -> small'
    batch = encode_prompts(tok, [prompt])
    rows = word_roles(tok, [prompt], batch)[0].tolist()
    want = [0] * len(text)
    for i in range(0, 20):
        want[i] = ROLE_CODE["prompt"]
    for word, role in (("hot", "input"), ("cold", "output"), ("big", "input"), ("small", "output")):
        start = text.index(word, 20)
        for i in range(start, start + len(word)):
            want[i] = ROLE_CODE[role]
    want[text.index("->") + 1] = ROLE_CODE["arrow"]
    want[text.index("->", 30) + 1] = ROLE_CODE["arrow"]
    want[text.index("\n", 20)] = ROLE_CODE["newline"]
    assert rows == want
    # the last-token roles of core.batch mark only one token of each word
    assert int((batch.roles[0] == ROLE_CODE["output"]).sum()) == 2


def test_per_feature_share_is_the_mean_of_each_tasks_best_feature_not_the_pooled_share():
    """The paper's figure averages one best feature's role shares over tasks; the pooled share sums
    every feature's mass first (a large feature dominates it). Written out by hand."""
    rows = len(("none", "prompt", "input", "arrow", "output", "newline"))
    a = torch.zeros(rows, 2)
    a[3, 0], a[4, 0] = 9.0, 1.0      # task a's best feature: 90% arrow
    a[4, 1] = 90.0                   # a big second feature on outputs
    b = torch.zeros(rows, 1)
    b[3, 0], b[1, 0] = 1.0, 1.0      # task b's best feature: 50% arrow, 50% prompt
    r = MassResult(["a", "b"], {"a": [7, 8], "b": [3]}, {"a": a, "b": b}, empty=["c"])
    per = r.per_feature()
    assert per["arrow"] == pytest.approx((90.0 + 50.0) / 2)
    assert per["output"] == pytest.approx((10.0 + 0.0) / 2)
    pooled = r.percent()
    assert pooled["arrow"] == pytest.approx(100 * 10 / 102) and pooled["output"] == pytest.approx(100 * 91 / 102)


def test_cross_task_summary_leaves_out_floor_tasks_and_empty_sets():
    """SPEC §7: a task whose clean loss is under 0.05 nats reads "cannot detect" (not +0.000) and a set
    without features is listed apart; neither enters a mean. Means written out by hand."""
    from icl_cli.ablate.feature_ablation import AblateParams, AblateResult, cross_summary, summary_json

    sets, tasks = ["a", "b", "c"], ["a", "b", "c"]
    base = {"nll": torch.tensor([0.01, 1.0, 2.0]), "acc": torch.ones(3), "apl": torch.tensor([-0.5, -0.02, -1.0])}
    abl_nll = torch.tensor([[0.02, 1.1, 2.2],
                            [0.5, 1.6, 2.1],
                            [0.01, 1.0, 2.0]])
    abl = {"nll": abl_nll, "acc": torch.ones(3, 3), "apl": torch.tensor([[-0.9, -0.03, -1.2],
                                                                         [-0.6, -0.5, -1.1],
                                                                         [-0.5, -0.02, -1.0]])}
    feats = {"a": {"sae": [1]}, "b": {"sae": [2, 3]}, "c": {"sae": []}}
    r = AblateResult(sets, tasks, base, abl, feats)
    nll = cross_summary(r, "nll")
    assert nll["cannot_detect"] == ["a"] and nll["empty_sets"] == ["c"]
    # measurable cells: columns b, c; rows a, b. own: (b,b) 0.6; other: (a,b) 0.1, (a,c) 0.2, (b,c) 0.1
    assert nll["own_mean"] == pytest.approx(0.6) and nll["other_mean"] == pytest.approx((0.1 + 0.2 + 0.1) / 3)
    assert nll["n_own"] == 1 and nll["n_other"] == 3
    apl = cross_summary(r, "apl")  # the all-pairs loss: task b's 0.02 is at the floor, task a's 0.5 is not
    assert apl["cannot_detect"] == ["b"]
    # own: (a,a) 0.4; other: (a,c) 0.2, (b,a) 0.1, (b,c) 0.1
    assert apl["own_mean"] == pytest.approx(0.4) and apl["other_mean"] == pytest.approx(0.4 / 3)
    data = summary_json("k" * 64, r, AblateParams(cross_task=True), metric="nll")
    assert data["ablated"]["b"]["measured"]["a"]["loss_rise"] == "cannot detect"
    assert data["ablated"]["b"]["measured"]["b"]["loss_rise"] == pytest.approx(0.6)
    assert data["empty_sets"] == ["c"] and data["summary"]["own_mean"] == pytest.approx(0.6)
