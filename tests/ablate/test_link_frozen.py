"""Ground truth for the frozen-attention detector → executor link (SPEC §8, the paper's Fig. 8).

(a) a planted link: a head whose values read detector directions and whose output writes them
    into executor encoder directions; the drops are computed here from a plain HF forward;
(b) the frozen pass equals attention written out by hand (clean softmax pattern, values from
    the modified residual) on a tiny random Llama and on GPT-2 (fused ``c_attn``);
(c) batched over detectors equals one detector at a time.
"""

from __future__ import annotations

import math

import pytest
import torch

from icl_cli.ablate.feature_ablation import AblateParams, few_shot_prompts
from icl_cli.ablate.link_frozen import clean_pass, frozen_block, run_frozen_link
from icl_cli.core.batch import encode_prompts
from icl_cli.core.errors import IclError
from icl_cli.core.sites import HookedModel
from icl_cli.core.tasks import load_task
from icl_cli.dictionaries.base import DictConfig, build
from tests.core.tiny_models import FAMILIES, VOCAB, tiny_model

P = AblateParams(n_shot=3, n_eval=4, seed=0)


def _sae(d_in: int, d_sae: int, layer: int, seed: int):
    torch.manual_seed(seed)
    sae = build(DictConfig(d_in=d_in, d_sae=d_sae, arch="standard", site="resid_pre", layer=layer)).requires_grad_(False)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.05, 0.3)
        sae.b_dec.normal_(0, 0.5)
    return sae


def _orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g))
    return q.T  # [k, d] orthonormal rows


# ---------------------------------------------------------------- (a) a planted link

def test_planted_link_reads_a_large_drop_for_the_planted_pairs_and_none_for_the_others(tiny_toy_dir):
    from icl_cli.core.models import load_model

    lm = load_model(str(tiny_toy_dir), device="cpu")
    model, d, l = lm.model, lm.d_model, 1
    u, u2, w, w2 = _orthonormal(d, 4, 0)  # detector directions u, u2 -> executor directions w, w2
    blk = model.model.layers[l]
    with torch.no_grad():
        blk.self_attn.v_proj.weight.zero_()
        blk.self_attn.v_proj.weight[0], blk.self_attn.v_proj.weight[1] = u, u2  # head 0 value dims 0, 1 read u, u2
        blk.self_attn.o_proj.weight.zero_()
        blk.self_attn.o_proj.weight[:, 0], blk.self_attn.o_proj.weight[:, 1] = w, w2  # ... and write w, w2
        blk.mlp.down_proj.weight.zero_()
    blk.input_layernorm = torch.nn.Identity()  # values read the residual itself
    hm = HookedModel(model)
    tasks = [load_task("antonyms"), load_task("person_profession")]  # the second pads its prompts

    det = build(DictConfig(d_in=d, d_sae=3, arch="standard", site="resid_pre", layer=l)).requires_grad_(False)
    exe = build(DictConfig(d_in=d, d_sae=3, arch="standard", site="resid_pre", layer=l + 1)).requires_grad_(False)
    with torch.no_grad():
        for sae in (det, exe):
            sae.W_enc.zero_(), sae.b_enc.zero_(), sae.b_dec.zero_()
        det.W_enc[:, 0], det.W_enc[:, 1] = u, u2
        det.b_enc[:2] = 1.0  # the detectors fire at most tokens
        det.W_dec[0], det.W_dec[1] = 2 * u, 0.5 * u2  # only the unit direction matters
        exe.W_enc[:, 0], exe.W_enc[:, 1] = w, w2

    def states(task):
        batch = encode_prompts(lm.tokenizer, few_shot_prompts(task, P))
        with torch.no_grad():
            hs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True).hidden_states
        return batch.attention_mask.bool(), hs[l], hs[l + 1]

    # the executors' bias: about twice the shift, so the drops are partial and differ per token
    means = {}
    for t, (dirn, k) in zip(tasks, ((u, 0), (u2, 1))):
        real, x, _ = states(t)
        means[t.name] = float(torch.relu(x[real] @ dirn + 1.0).mean())
    with torch.no_grad():
        exe.b_enc[0], exe.b_enc[1] = 100 * means["antonyms"], 100 * means["person_profession"]

    r = run_frozen_link(hm, lm.tokenizer, tasks, det, [0, 1], exe, [0, 1], P, own_pairs=[(0, 0), (1, 1)],
                        executor_tasks={0: ["antonyms"], 1: ["person_profession"]}, detector_tasks={0: ["antonyms"], 1: ["person_profession"]})

    for j, (t, dirn, k) in enumerate(((tasks[0], w, 0), (tasks[1], w2, 1))):
        real, x, y = states(t)
        m = means[t.name]
        assert float(r.mean_act[j, k]) == pytest.approx(m, rel=1e-5)
        pre = y[real] @ dirn + float(exe.b_enc[k])
        clean = torch.relu(pre)
        new = torch.relu(pre - 50 * m)  # the head moves −50·m along u into −50·m along w at every token
        fire = clean > 0
        expect = 1 - torch.clamp(new[fire] / clean[fire], 0, 1)
        assert int(r.pair_count[k, k]) == int(fire.sum()) > 0
        assert float(r.pair_mean[k, k]) == pytest.approx(float(expect.mean()), abs=1e-5)
        assert float(r.pair_frac_half[k, k]) == pytest.approx(float((expect > 0.5).float().mean()), abs=1e-9)
        assert float(r.pair_median[k, k]) == pytest.approx(float(expect.sort().values[(len(expect) - 1) // 2]), abs=2e-5)
        assert float(expect.mean()) > 0.2
    for i, k in ((0, 1), (1, 0)):  # the other pairs: the detector's direction never reaches the executor
        assert int(r.pair_count[i, k]) > 0
        assert float(r.pair_mean[i, k]) < 1e-5
    g = r.own_vs_other()
    assert g["own"]["pairs"] == 2 and g["other"]["pairs"] == 2
    assert g["own"]["mean"] > 0.2 and g["other"]["mean"] < 1e-5
    assert int(r.group_hist[0].sum()) == g["own"]["positions"] and int(r.group_hist[1].sum()) == g["other"]["positions"]
    rows, cols, tm = r.task_matrix()
    assert rows == cols == ["antonyms", "person_profession"]
    assert float(tm[0, 0]) == pytest.approx(float(r.pair_mean[0, 0])) and float(tm[0, 1]) < 1e-5


# ---------------------------------------------------------------- (b) the frozen pass by hand

def _rms(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def _rotate(x, theta: float):
    """Llama's rotary embedding of x [B, H, P, hd] at positions 0 … P−1, written out."""
    hd, n = x.shape[-1], x.shape[-2]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype), torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)
    half = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1)
    return x * cos + half * sin


def _causal_softmax(scores):
    n = scores.shape[-1]
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)


def _llama_block_by_hand(model, l, x_qk, x_v):
    """Block l of a Llama: queries and keys from x_qk, values, residual and MLP from x_v."""
    cfg, blk = model.config, model.model.layers[l]
    a = blk.self_attn
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // nh
    B, n, _ = x_v.shape
    eps = cfg.rms_norm_eps
    hq, hv = _rms(x_qk, blk.input_layernorm.weight, eps), _rms(x_v, blk.input_layernorm.weight, eps)
    q = (hq @ a.q_proj.weight.T).view(B, n, nh, hd).transpose(1, 2)
    k = (hq @ a.k_proj.weight.T).view(B, n, nkv, hd).transpose(1, 2)
    v = (hv @ a.v_proj.weight.T).view(B, n, nkv, hd).transpose(1, 2)
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    q, k = _rotate(q, theta), _rotate(k, theta)
    k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
    pattern = _causal_softmax(q @ k.transpose(-1, -2) / math.sqrt(hd))
    o = (pattern @ v).transpose(1, 2).reshape(B, n, nh * hd) @ a.o_proj.weight.T
    mid = x_v + o
    h = _rms(mid, blk.post_attention_layernorm.weight, eps)
    mlp = blk.mlp
    return mid + (torch.nn.functional.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T


def _gpt2_block_by_hand(model, l, x_qk, x_v):
    """Block l of GPT-2 (fused c_attn: [q | k | v] columns): q, k from x_qk, the rest from x_v."""
    cfg, blk = model.config, model.transformer.h[l]
    nh, D = cfg.n_head, cfg.n_embd
    hd = D // nh
    B, n, _ = x_v.shape

    def ln(x, m):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
        return (x - mu) / torch.sqrt(var + m.eps) * m.weight + m.bias

    def heads(t):
        return t.view(B, n, nh, hd).transpose(1, 2)

    qkv_clean = ln(x_qk, blk.ln_1) @ blk.attn.c_attn.weight + blk.attn.c_attn.bias
    qkv_new = ln(x_v, blk.ln_1) @ blk.attn.c_attn.weight + blk.attn.c_attn.bias
    q, k, v = heads(qkv_clean[..., :D]), heads(qkv_clean[..., D:2 * D]), heads(qkv_new[..., 2 * D:])
    pattern = _causal_softmax(q @ k.transpose(-1, -2) / math.sqrt(hd))
    o = (pattern @ v).transpose(1, 2).reshape(B, n, D) @ blk.attn.c_proj.weight + blk.attn.c_proj.bias
    mid = x_v + o
    h = ln(mid, blk.ln_2) @ blk.mlp.c_fc.weight + blk.mlp.c_fc.bias
    gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    return mid + gelu @ blk.mlp.c_proj.weight + blk.mlp.c_proj.bias


@pytest.mark.parametrize("family, by_hand", [("llama", _llama_block_by_hand), ("gpt2", _gpt2_block_by_hand)])
def test_frozen_pass_is_attention_with_the_clean_pattern_and_modified_values(family, by_hand):
    model = tiny_model(family, dtype=torch.float64, n_layers=3)
    hm, l = HookedModel(model), 1
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    am = torch.ones_like(ids)
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states
    x = hs[l]
    tol = dict(rtol=1e-6, atol=1e-6)  # HF computes the rotary angles in float32
    # the by-hand block is the real one when nothing is modified
    torch.testing.assert_close(by_hand(model, l, x, x), hs[l + 1], **tol)

    resid, post, qk = clean_pass(hm, l, ids, am)
    torch.testing.assert_close(resid, x, rtol=0, atol=0)
    x_new = x + 3.0 * torch.randn(x.shape, generator=g, dtype=x.dtype)  # a different change at every token
    got = frozen_block(hm, l, ids, am, x_new, qk)
    torch.testing.assert_close(got, by_hand(model, l, x, x_new), **tol)
    # the pattern matters: the unfrozen block on x_new differs
    assert (by_hand(model, l, x_new, x_new) - got).abs().max() > 1e-4  # 100 × the tolerance
    # rows = 3 copies of the prompts (a chunk of 3 detectors) give each copy's result
    stack = torch.cat([x_new, x, x_new * 0.5])
    got3 = frozen_block(hm, l, ids, am, stack, qk)
    torch.testing.assert_close(got3[4:], by_hand(model, l, x, x_new * 0.5), **tol)
    torch.testing.assert_close(got3[2:4], hs[l + 1], **tol)


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_pass_leaves_an_unmodified_residual_unchanged_in_every_family(family):
    model = tiny_model(family, dtype=torch.float64, n_layers=2)
    hm = HookedModel(model)
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[1, 6:] = 0  # a padded row
    resid, post, qk = clean_pass(hm, 0, ids, am)
    torch.testing.assert_close(frozen_block(hm, 0, ids, am, resid, qk), post, rtol=1e-10, atol=1e-10)
    x_new = resid + torch.randn(resid.shape, dtype=resid.dtype, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the real block on x_new (its own pattern) differs from the frozen one
        free = hm.run(ids, am, read=["resid_post.0"], start_at=0, start_resid=x_new, stop_after=0).acts["resid_post.0"]
    frozen = frozen_block(hm, 0, ids, am, x_new, qk)
    assert (free - frozen)[am.bool()].abs().max() > 1e-4
    # after the pass the projections compute again
    again = hm.run(ids, am, read=["resid_post.0"], start_at=0, start_resid=x_new, stop_after=0).acts["resid_post.0"]
    torch.testing.assert_close(again, free, rtol=0, atol=0)


# ---------------------------------------------------------------- (c) batched = one at a time

def test_batched_detectors_equal_one_detector_at_a_time(tiny_toy_dir):
    from icl_cli.core.models import load_model

    lm = load_model(str(tiny_toy_dir), device="cpu", dtype="float64")
    hm = HookedModel(lm.model)
    det, exe = _sae(32, 24, 1, 5).double(), _sae(32, 24, 2, 6).double()
    tasks = [load_task("antonyms"), load_task("en_es")]
    dets, exes = [0, 3, 5, 7, 11], [1, 2, 9, 20]
    kw = dict(own_pairs=[(0, 1), (5, 9)], executor_tasks={1: ["antonyms"], 9: ["en_es"]},
              detector_tasks={0: ["antonyms"], 5: ["en_es"]})
    one = run_frozen_link(hm, lm.tokenizer, tasks, det, dets, exe, exes, P, detectors_per_pass=1, **kw)
    assert int(one.cell_count.sum()) > 0 and float(one.cell_sum.sum()) > 0
    for n in (2, 5, None):
        many = run_frozen_link(hm, lm.tokenizer, tasks, det, dets, exe, exes, P, detectors_per_pass=n, **kw)
        assert torch.equal(many.cell_count, one.cell_count) and torch.equal(many.cell_half, one.cell_half)
        torch.testing.assert_close(many.cell_sum, one.cell_sum, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(many.pair_median, one.pair_median, rtol=0, atol=2e-5, equal_nan=True)
        assert torch.equal(many.group_hist, one.group_hist)


def test_pair_statistics_pool_the_executor_tasks(tiny_toy_dir, tiny_lm):
    """Per pair: the drops of T(e)'s prompts, recomputed here from frozen passes one prompt set at a time."""
    hm = HookedModel(tiny_lm.model)
    det, exe = _sae(32, 16, 1, 7), _sae(32, 16, 2, 8)
    tasks = [load_task("antonyms"), load_task("en_es")]
    r = run_frozen_link(hm, tiny_lm.tokenizer, tasks, det, [2, 4], exe, [3, 6], P, scale=5.0,
                        executor_tasks={3: ["antonyms"], 6: ["antonyms", "en_es"]})
    for k, (e, ts) in enumerate(((3, [0]), (6, [0, 1]))):
        for i, dd in enumerate((2, 4)):
            vals = []
            for j in ts:
                batch = encode_prompts(tiny_lm.tokenizer, few_shot_prompts(tasks[j], P))
                real = batch.attention_mask.bool()
                with torch.no_grad():
                    hs = tiny_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                       output_hidden_states=True).hidden_states
                m = float(torch.relu((hs[1][real] - det.b_dec) @ det.W_enc[:, dd] + det.b_enc[dd]).mean())
                u = det.W_dec[dd] / det.W_dec[dd].norm()
                _, _, qk = clean_pass(hm, 1, batch.input_ids, batch.attention_mask)
                y = frozen_block(hm, 1, batch.input_ids, batch.attention_mask, hs[1] - 5.0 * m * u, qk)
                enc = lambda z: torch.relu((z - exe.b_dec) @ exe.W_enc[:, e] + exe.b_enc[e])  # noqa: E731
                a0, a1 = enc(hs[2])[real], enc(y)[real]
                vals.append(1 - torch.clamp(a1[a0 > 0] / a0[a0 > 0], 0, 1))
            v = torch.cat(vals)
            assert int(r.pair_count[i, k]) == v.numel() > 0
            assert float(r.pair_mean[i, k]) == pytest.approx(float(v.mean()), abs=1e-5)
            assert float(r.pair_median[i, k]) == pytest.approx(float(v.sort().values[(v.numel() - 1) // 2]), abs=2e-5)


def test_executor_layer_must_follow_the_detector_layer(tiny_lm):
    hm = HookedModel(tiny_lm.model)
    det, exe = _sae(32, 8, 0, 1), _sae(32, 8, 2, 2)
    with pytest.raises(IclError, match="must be the detectors' \\+ 1"):
        run_frozen_link(hm, tiny_lm.tokenizer, [load_task("antonyms")], det, [0], exe, [1], P)


def test_zero_scale_drops_nothing(tiny_lm):
    hm = HookedModel(tiny_lm.model)
    det, exe = _sae(32, 8, 1, 3), _sae(32, 8, 2, 4)
    r = run_frozen_link(hm, tiny_lm.tokenizer, [load_task("antonyms")], det, [0, 1], exe, [2, 3], P, scale=0.0)
    assert int(r.cell_count.sum()) > 0
    assert float(r.cell_sum.abs().max()) < 1e-5
