"""Training-step throughput of our SAEs against SAELens's training SAEs, same sizes, same batches.

    python benchmarks/sae_train_speed.py                       # CPU defaults (d_in 256, 16x width)
    python benchmarks/sae_train_speed.py --device cuda --d-in 2048 --batch 4096

For each architecture both implementations run forward + loss + backward + Adam step on the same
activation batches; steps alternate between the two (so load on a shared machine hits both
alike) and the median step time is compared. Ratio = SAELens time / our time (> 1: ours faster).
Targets: ≥ 1.5 for top-k (our sparse decoder), ≥ 1.0 for the others.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def saelens_sae(arch: str, d_in: int, d_sae: int, k: int, device: str):
    from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    common = dict(d_in=d_in, d_sae=d_sae, device=device)
    if arch == "standard":
        return StandardTrainingSAE(StandardTrainingSAEConfig(**common))
    if arch == "gated":
        return GatedTrainingSAE(GatedTrainingSAEConfig(**common))
    if arch == "jumprelu":
        return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(**common))
    # SAELens's default dense path (its use_sparse_activations option fails in backward on CPU in 6.x)
    return TopKTrainingSAE(TopKTrainingSAEConfig(**common, k=k, use_sparse_activations=device != "cpu"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d-in", type=int, default=256)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--archs", default="topk,standard,gated,jumprelu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from sae_lens.saes.sae import TrainStepInput

    from icl_cli.dictionaries import DictConfig, build

    dev = torch.device(args.device)
    d_in, d_sae = args.d_in, args.d_in * args.expansion
    g = torch.Generator().manual_seed(0)
    # structured activations: sparse combinations of random directions plus noise
    dirs = torch.randn(4 * d_in, d_in, generator=g)
    batches = []
    for _ in range(4):
        codes = torch.relu(torch.randn(args.batch, 4 * d_in, generator=g) - 2.0)
        batches.append((codes @ dirs / 8 + 0.1 * torch.randn(args.batch, d_in, generator=g)).to(dev))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    print(f"device {dev}, d_in {d_in}, d_sae {d_sae}, batch {args.batch}, k {args.k}, threads {torch.get_num_threads()}")
    print(f"{'arch':10s} {'ours ms':>9s} {'SAELens ms':>11s} {'ratio':>7s}")
    for arch in args.archs.split(","):
        ours = build(DictConfig(d_in=d_in, d_sae=d_sae, arch=arch, k=args.k)).to(dev)
        theirs = saelens_sae(arch, d_in, d_sae, args.k, args.device)
        opt_o = torch.optim.Adam(ours.parameters(), lr=1e-4)
        opt_t = torch.optim.Adam(theirs.parameters(), lr=1e-4)
        coeffs = {name: (c.value if hasattr(c, "value") else c) for name, c in theirs.get_coefficients().items()}
        dead = torch.zeros(d_sae, dtype=torch.bool, device=dev)
        dead[: d_sae // 10] = True  # exercise the dead-feature loss of both (AuxK for top-k)

        def step_ours(x):
            parts = ours.training_loss(x, x, 1.0, dead if arch == "topk" else None)
            opt_o.zero_grad(set_to_none=True)
            parts.loss.backward()
            opt_o.step()
            ours.after_step()

        def step_theirs(x):
            out = theirs.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coeffs, dead_neuron_mask=dead,
                                                              n_training_steps=0, is_logging_step=False))
            opt_t.zero_grad(set_to_none=True)
            out.loss.backward()
            opt_t.step()

        times = {"ours": [], "theirs": []}
        for i in range(args.steps + 2):
            x = batches[i % len(batches)]
            for name, fn in (("ours", step_ours), ("theirs", step_theirs)) if i % 2 == 0 else (("theirs", step_theirs), ("ours", step_ours)):
                sync()
                t0 = time.perf_counter()
                fn(x)
                sync()
                if i >= 2:  # warm-up
                    times[name].append(time.perf_counter() - t0)
        o, t = statistics.median(times["ours"]), statistics.median(times["theirs"])
        print(f"{arch:10s} {o * 1e3:9.1f} {t * 1e3:11.1f} {t / o:7.2f}x")


if __name__ == "__main__":
    main()
