"""How close one SAE training step is to the matrix products it cannot avoid.

    python benchmarks/sae_hardware_bound.py                  # CPU, d_in 256, 16x width, batch 2048
    python benchmarks/sae_hardware_bound.py --threads 1 --d-in 512

For each architecture, three things are timed in turn (interleaved, medians):

* step: our full training step (forward, loss, backward, Adam, decoder renormalisation), the
  same as benchmarks/sae_train_speed.py, without dead features (no AuxK);
* dense products: the five products any dense implementation performs, as plain torch.mm of the
  same shapes: encoder x'W_enc [B,d]@[d,F], decoder AW_dec [B,F]@[F,d], and in backward
  g W_decᵀ [B,d]@[d,F], Aᵀg [F,B]@[B,d], x'ᵀG [d,B]@[B,F] (gated: a second decoder product
  and its input gradient for the auxiliary loss through the gate, 7 in all);
* sparse products: what a step that exploits sparsity cannot avoid: the dense encoder product
  plus, at the step's own active entries, the decoder gather (embedding_bag), the sampled
  product for the activations' gradient, and the two sparse-dense weight-gradient products
  (gated: a second gather and sampled product).

* selection: finding the active entries of a sparse step, which is no product but a pass over
  the [B, F] pre-activations (a compare and ``Pattern.of``: the word-wise nonzero, bincounts and
  the column sort), timed on a [B, F] matrix with the step's own active entries.

Printed ratios: step / dense products and step / sparse products (1.0 would be the hardware
limit of that formulation; element-wise work, selection and Adam make up the rest), and the
selection's share of the step. The last line is the largest step / unavoidable products over the
architectures, the products being the sparse ones where the step is sparse, else the dense ones. Sparsity as
in sae_train_speed.py: `--l0` (default 32) sets biases so L0 ≈ l0; `--l0 0` keeps init density.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

from icl_cli.core.threads import WAIT_POLICY

for _var, _value in WAIT_POLICY.items():  # idle OpenMP workers sleep, as under `icl` (read when torch loads)
    os.environ.setdefault(_var, _value)

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-in", type=int, default=256)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--l0", type=int, default=32, help="trained-like L0 for ReLU-family SAEs (0: initial density)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--archs", default="topk,standard,gated,jumprelu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    from sae_train_speed import batches_for, set_sparsity

    from icl_cli.dictionaries import DictConfig, build
    from icl_cli.dictionaries.sparse_train import SPARSE_MAX_DENSITY, Pattern
    from icl_cli.train_sae.trainer import make_optimizer

    dev = torch.device("cpu")
    d_in, d_sae, B = args.d_in, args.d_in * args.expansion, args.batch
    batches = batches_for(d_in, B, dev)
    print(f"cpu, d_in {d_in}, d_sae {d_sae}, batch {B}, k {args.k}, target L0 {args.l0 or 'initial'}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'arch':10s} {'L0':>7s} {'step ms':>8s} {'dense mm':>9s} {'sparse mm':>10s} {'step/dense':>11s} {'step/sparse':>12s} {'selection':>9s}")
    worst = 0.0
    for arch in args.archs.split(","):
        d = build(DictConfig(d_in=d_in, d_sae=d_sae, arch=arch, k=args.k))
        with torch.no_grad():
            d.b_dec.copy_(batches[0].mean(0))
        set_sparsity(d, batches[0], args.l0)
        opt = make_optimizer(list(d.parameters()), lr=1e-5)
        x = batches[1]
        fired = d.training_loss(x, x, 1.0).fired
        pat = Pattern.of(fired)
        n_dec = 2 if arch == "gated" else 1
        g = torch.Generator().manual_seed(1)
        W_enc, W_dec = d.W_enc.detach().clone(), d.W_dec.detach().clone()
        xin, a, g_out = x - d.b_dec.detach(), torch.rand(B, d_sae, generator=g), torch.randn(B, d_in, generator=g)
        g_pre, vals = torch.randn(B, d_sae, generator=g), torch.rand(len(pat.col), generator=g)

        def step():
            parts = d.training_loss(x, x, 1.0)
            opt.zero_grad(set_to_none=True)
            parts.loss.backward()
            opt.step()
            d.after_step()

        def dense_products():
            torch.mm(xin, W_enc)
            for _ in range(n_dec):
                torch.mm(a, W_dec)
                torch.mm(g_out, W_dec.T)
            torch.mm(a.T, g_out)
            torch.mm(xin.T, g_pre)

        def sparse_products():
            torch.mm(xin, W_enc)
            for _ in range(n_dec):
                torch.nn.functional.embedding_bag(pat.col, W_dec, pat.crow[:-1], mode="sum", per_sample_weights=vals)
                pat.sampled_dot(g_out, W_dec)
            pat.t_times(vals, g_out)
            pat.t_times(vals, xin)

        marked = torch.full((B, d_sae), -1.0)
        marked.view(-1)[pat.row * d_sae + pat.col] = 1.0

        def selection():
            Pattern.of(marked > 0)

        fns = {"step": step, "dense": dense_products, "sparse": sparse_products, "select": selection}
        times = {k: [] for k in fns}
        names = list(fns)
        for i in range(args.repeats + 1):
            for name in names[i % len(names):] + names[: i % len(names)]:  # rotate the order
                t0 = time.perf_counter()
                fns[name]()
                if i:
                    times[name].append(time.perf_counter() - t0)
        s, dn, sp, sel = (statistics.median(times[k]) for k in names)
        l0 = len(pat.col) / B
        sparse_step = len(pat.col) <= SPARSE_MAX_DENSITY * B * d_sae or arch == "topk"
        worst = max(worst, s / (sp if sparse_step else dn))
        print(f"{arch:10s} {l0:7.1f} {s * 1e3:8.1f} {dn * 1e3:9.1f} {sp * 1e3:10.1f} {s / dn:10.2f}x {s / sp:11.2f}x "
              f"{sel / s:9.0%}", flush=True)
    print(f"sae_step_over_products: {worst:.2f}")


if __name__ == "__main__":
    main()
