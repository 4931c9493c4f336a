"""Run by test_distributed.py under ``torchrun --nproc-per-node 2``: the train-sae command lines
of RUNS, each as a user would type it (rank 0 prints the artifact keys)."""

from __future__ import annotations

import sys

COMMON = ["--width", "256", "--tokens", str(50 * 128), "--batch-tokens", "128", "--ctx", "32",
          "--eval-tokens", "256", "--checkpoint-every", "0", "--dataset", "tasks", "--layer", "1"]
RUNS = [
    ["--arch", "standard", "--site", "resid", "--l1", "200", "--lr", "3e-2"],  # resampling of dead features at 20/40/60%
    ["--arch", "topk", "--k", "4", "--site", "transcoder", "--lr", "3e-3"],  # AuxK dead masks, separate targets
]


def main() -> None:
    from icl_cli.cli.app import app

    from icl_cli.train_sae.distributed import backend_threads, shutdown

    store, model = sys.argv[1], sys.argv[2]
    for run in RUNS:
        app(["--store", store, "-q", "train-sae", "--model", model, *run, *COMMON], standalone_mode=False)
    # what atexit does: a group that outlives this (gloo threads still running) aborts the rank in
    # interpreter shutdown now and then (test_distributed.py checks the line below)
    shutdown()
    print(f"backend threads after shutdown: {', '.join(backend_threads()) or 'none'}", file=sys.stderr)


if __name__ == "__main__":
    main()
