"""The detector → executor link in batched passes against the per-detector loop it replaces.

    .venv/bin/python benchmarks/link_batched.py                          # toy-icl, toy-icl-suite layers 4 → 5
    .venv/bin/python benchmarks/link_batched.py --detectors 293 --executors 150 --tasks 8 --repeats 1

On the same features and prompts (the toy pipeline's link: detectors at resid_pre[4], executors
at resid_pre[5], 19-shot prompts, 16 per task): the median CPU time of this process (robust to
other jobs on a shared machine; wall-clock ratios printed beside) over --repeats interleaved
rounds of
  loop       the previous version: one pass per detector (an edit at the detector layer,
             blocks l … l_e − 1, the executors' SAE encoded in full), removal "project";
  ablation   the same estimand batched (rows = prompts × detectors, the executors' encoder cut
             down to the executors);
  frozen     the default estimand (frozen attention pattern, the paper's), batched.
Prints each time, the ratios time / time(loop) (target ≤ 0.1), the largest difference between
the ablation estimand batched and looped, the time of block l's MLP alone on the same tokens
(the frozen-attention estimand must run it at every token for every (task, detector): its
floor), and last `link_batched_over_loop: RATIO`, the larger of the two batched ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def loop_link(hm, tokenizer, tasks, det_sae, detectors, exe_sae, executors, p, removal="project", scale=1.0):
    """The link as it was before batching: one pass per (task, detector), the full SAE encoded."""
    import torch

    from icl_cli.ablate.feature_ablation import few_shot_prompts
    from icl_cli.ablate.link import removal_edit
    from icl_cli.core.batch import encode_prompts
    from icl_cli.core.sites import Site

    ld, le = det_sae.cfg.layer, exe_sae.cfg.layer
    exe = torch.as_tensor(list(executors), dtype=torch.long)
    start, read = Site("resid_pre", ld), Site("resid_post", le - 1)
    before = torch.zeros(len(tasks), len(executors))
    after = torch.zeros(len(detectors), len(tasks), len(executors))

    def at_arrows(out, arrows):
        a = exe_sae.encode(out.acts[read])[..., exe].float()
        return (a * arrows[..., None].to(a)).sum((0, 1))

    for j, t in enumerate(tasks):
        batch = encode_prompts(tokenizer, few_shot_prompts(t, p), n_first=p.n_first)
        resid = hm.run(batch.input_ids, batch.attention_mask, read=[start], stop_after=ld).acts[start]
        arrows, outputs = batch.role_mask("arrow"), batch.role_mask("output")
        run = lambda edit: hm.run(batch.input_ids, batch.attention_mask, read=[read], edit=edit,  # noqa: E731
                                  start_at=ld, start_resid=resid, stop_after=le - 1)
        before[j] = at_arrows(run({}), arrows)
        for i, d in enumerate(detectors):
            after[i, j] = at_arrows(run({start: removal_edit(det_sae, d, outputs, removal, scale)}), arrows)
    return before, after


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy-icl")
    ap.add_argument("--saes", default="toy-icl-suite")
    ap.add_argument("--layer", type=int, default=4, help="detector layer (executors at layer + 1)")
    ap.add_argument("--tasks", type=int, default=2, help="the first N tasks of the pipeline's eight")
    ap.add_argument("--detectors", type=int, default=96, help="the detector layer's most active features")
    ap.add_argument("--executors", type=int, default=96, help="the executor layer's most active features")
    ap.add_argument("--n-prompts", type=int, default=16)
    ap.add_argument("--n-shot", type=int, default=19)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of timing")
    a = ap.parse_args()

    import torch

    from icl_cli.ablate.feature_ablation import AblateParams, few_shot_prompts
    from icl_cli.ablate.link import run_link
    from icl_cli.ablate.link_frozen import run_frozen_link
    from icl_cli.core.batch import encode_prompts
    from icl_cli.core.models import load_model
    from icl_cli.core.sites import HookedModel, Site
    from icl_cli.core.tasks import resolve_tasks
    from icl_cli.dictionaries.suite import load_suite

    torch.set_num_threads(a.threads)
    lm = load_model(a.model, device="cpu")
    suite = load_suite(a.saes)
    det_sae, exe_sae = suite[("resid", a.layer)].requires_grad_(False), suite[("resid", a.layer + 1)].requires_grad_(False)
    hm = HookedModel(lm.model)
    names = ["antonyms", "en_es", "location_continent", "singular_plural", "country_capital", "es_en", "algo_first",
             "present_simple_past_simple"][: a.tasks]
    tasks = [resolve_tasks(n)[0] for n in names]
    p = AblateParams(n_shot=a.n_shot, n_eval=a.n_prompts)

    # the most active features of each layer on the first task's prompts (features that fire)
    batch = encode_prompts(lm.tokenizer, few_shot_prompts(tasks[0], p))
    acts = hm.run(batch.input_ids, batch.attention_mask, read=[f"resid_pre.{a.layer}", f"resid_pre.{a.layer + 1}"],
                  stop_after=a.layer + 1).acts
    real = batch.attention_mask.bool()
    top = lambda sae, x, n: sorted(sae.encode(x)[real].mean(0).topk(n).indices.tolist())  # noqa: E731
    dets = top(det_sae, acts[Site("resid_pre", a.layer)], a.detectors)
    exes = top(exe_sae, acts[Site("resid_pre", a.layer + 1)], a.executors)

    from icl_cli.core.arch import locate

    loc = locate(lm.model)
    blk = loc.blocks[a.layer]
    mlp_norm = blk.block.get_submodule(loc.spec.mlp_norm)
    resids = [hm.run(b.input_ids, b.attention_mask, read=[f"resid_pre.{a.layer}"], stop_after=a.layer).acts[f"resid_pre.{a.layer}"]
              for b in (encode_prompts(lm.tokenizer, few_shot_prompts(t, p)) for t in tasks)]

    def mlp_only():  # block l's pre-MLP norm and MLP, once per (task, detector), on that task's tokens
        for x in resids:
            for _ in dets:
                blk.mlp(mlp_norm(x))

    methods = {
        "mlp": mlp_only,
        "loop": lambda: loop_link(hm, lm.tokenizer, tasks, det_sae, dets, exe_sae, exes, p),
        "ablation": lambda: run_link(hm, lm.tokenizer, tasks, det_sae, dets, exe_sae, exes, p),
        "frozen": lambda: run_frozen_link(hm, lm.tokenizer, tasks, det_sae, dets, exe_sae, exes, p),
    }
    times: dict[str, list[float]] = {m: [] for m in methods}  # CPU seconds of this process
    walls: dict[str, list[float]] = {m: [] for m in methods}
    out = {}
    with torch.no_grad():
        for _ in range(a.repeats):
            for m, fn in methods.items():
                t0, w0 = time.process_time(), time.perf_counter()
                out[m] = fn()
                times[m].append(time.process_time() - t0)
                walls[m].append(time.perf_counter() - w0)
    _, after_loop = out["loop"]
    diff = float((out["ablation"].after - after_loop).abs().max() / after_loop.abs().max().clamp(min=1e-30))
    print(f"{a.model}, {a.saes} resid {a.layer} → {a.layer + 1}: {len(tasks)} tasks × {a.n_prompts} prompts × "
          f"{batch.input_ids.shape[1]} tokens ({a.n_shot} shots), {len(dets)} detectors, {len(exes)} executors, "
          f"{a.threads} thread(s), median of {a.repeats} interleaved rounds")
    t_loop = statistics.median(times["loop"])
    ratios = {}
    for m, label in (("loop", "per-detector loop (previous version)"), ("ablation", "ablation estimand, batched"),
                     ("frozen", "frozen-attention estimand, batched"), ("mlp", "floor: block l's MLP alone, same tokens")):
        t = statistics.median(times[m])
        ratios[m] = t / t_loop
        per_round = statistics.median(x / y for x, y in zip(times[m], times["loop"]))
        wall = statistics.median(walls[m]) / statistics.median(walls["loop"])
        print(f"{label:40s} {t:8.2f} s CPU  ratio {ratios[m]:.3f} (per round {per_round:.3f}; wall ratio {wall:.3f})")
    print(f"ablation batched vs loop: max |Δ after| / max |after| = {diff:.1e}")
    print("target: ratio ≤ 0.1")
    print(f"link_batched_over_loop: {max(ratios['ablation'], ratios['frozen']):.3f}")


if __name__ == "__main__":
    main()
