"""Training-step throughput of our SAEs against SAELens's training SAEs, same sizes, same batches.

    python benchmarks/sae_train_speed.py                       # CPU defaults (d_in 256, 16x width)
    python benchmarks/sae_train_speed.py --l0 0 --threads 1    # at initial density, one thread
    python benchmarks/sae_train_speed.py --device cuda --d-in 2048 --batch 4096

For each architecture both implementations run forward + loss + backward + Adam step on the same
activation batches from the same weights (ours copied into SAELens's); steps alternate between
the two (so load on a shared machine hits both alike) and the median step time is compared.
Ratio = SAELens time / our time (> 1: ours faster).

Sparsity: a freshly initialised ReLU-family SAE fires about half its features; a trained one a
few dozen per token. `--l0 N` (default 32) sets the encoder biases (JumpReLU: thresholds; gated:
gate biases) so each feature fires on N/d_sae of a calibration batch, i.e. L0 ≈ N per token, as
after training; `--l0 0` keeps the initial density. Top-k always has L0 = k. The measured L0 is
printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from icl_cli.core.threads import WAIT_POLICY

for _var, _value in WAIT_POLICY.items():  # idle OpenMP workers sleep, as under `icl` (read when torch loads)
    os.environ.setdefault(_var, _value)

import torch  # noqa: E402


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


def batches_for(d_in: int, batch: int, dev: torch.device, n: int = 4) -> list[torch.Tensor]:
    """Structured activations: sparse combinations of random directions plus noise."""
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(4 * d_in, d_in, generator=g)
    out = []
    for _ in range(n):
        codes = torch.relu(torch.randn(batch, 4 * d_in, generator=g) - 2.0)
        out.append((codes @ dirs / 8 + 0.1 * torch.randn(batch, d_in, generator=g)).to(dev))
    return out


@torch.no_grad()
def set_sparsity(sae, x: torch.Tensor, l0: int) -> None:
    """Shift each feature's bias/threshold to its (1 − l0/d_sae) quantile on x: L0 ≈ l0."""
    if l0 <= 0 or sae.arch == "topk":
        return
    q = 1 - l0 / sae.cfg.d_sae
    if sae.arch == "gated":
        proj = (x - sae.b_dec) @ sae.W_enc
        sae.b_gate.copy_(-torch.quantile(proj, q, dim=0))
        return
    pre = (x - sae.b_dec) @ sae.W_enc
    cut = torch.quantile(pre, q, dim=0)
    if sae.arch == "jumprelu":  # pre = proj + b_enc with b_enc = 0.1, θ at the quantile
        sae.b_enc.fill_(0.1)
        sae.threshold.copy_((cut + 0.1).clamp_min(1e-3))
    else:
        sae.b_enc.copy_(-cut)


def make_pair(arch: str, d_in: int, d_sae: int, k: int, device: str, x0: torch.Tensor, l0: int):
    """Our dictionary and SAELens's with the same weights."""
    from icl_cli.dictionaries import DictConfig, build

    ours = build(DictConfig(d_in=d_in, d_sae=d_sae, arch=arch, k=k)).to(device)
    with torch.no_grad():
        ours.b_dec.copy_(x0.mean(0))  # as train-sae starts it
    set_sparsity(ours, x0, l0)
    theirs = saelens_sae(arch, d_in, d_sae, k, device)
    theirs.load_state_dict({n: v.clone() for n, v in ours.state_dict().items()})
    return ours, theirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d-in", type=int, default=256)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--l0", type=int, default=32, help="trained-like L0 for ReLU-family SAEs (0: initial density)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--archs", default="topk,standard,gated,jumprelu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from sae_lens.saes.sae import TrainStepInput

    from icl_cli.train_sae.trainer import make_optimizer

    dev = torch.device(args.device)
    d_in, d_sae = args.d_in, args.d_in * args.expansion
    batches = batches_for(d_in, args.batch, dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    print(f"device {dev}, d_in {d_in}, d_sae {d_sae}, batch {args.batch}, k {args.k}, "
          f"target L0 {args.l0 or 'initial'}, threads {torch.get_num_threads()}")
    print(f"{'arch':10s} {'L0':>7s} {'ours ms':>9s} {'SAELens ms':>11s} {'ratio':>7s}")
    for arch in args.archs.split(","):
        ours, theirs = make_pair(arch, d_in, d_sae, args.k, args.device, batches[0], args.l0)
        opt_o = make_optimizer(list(ours.parameters()), lr=1e-4)
        opt_t = torch.optim.Adam(theirs.parameters(), lr=1e-4)  # SAELens's trainer uses plain Adam
        coeffs = {name: (c.value if hasattr(c, "value") else c) for name, c in theirs.get_coefficients().items()}
        dead = torch.zeros(d_sae, dtype=torch.bool, device=dev)
        dead[: d_sae // 10] = True  # exercise the dead-feature loss of both (AuxK for top-k)
        l0s = []

        def step_ours(x):
            parts = ours.training_loss(x, x, 1.0, dead if arch == "topk" else None)
            opt_o.zero_grad(set_to_none=True)
            parts.loss.backward()
            opt_o.step()
            ours.after_step()
            l0s.append(parts.fired.sum().item() / x.shape[0])

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
        print(f"{arch:10s} {statistics.median(l0s):7.1f} {o * 1e3:9.1f} {t * 1e3:11.1f} {t / o:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
