"""CPU time of a small fixed workload beside two CPU-bound background jobs, against the same
workload on the (otherwise) idle machine, both measured in this run.

    python benchmarks/cpu_loaded.py                        # 3 rounds of idle / loaded; 1 of the old policy
    python benchmarks/cpu_loaded.py --rounds 5 --before-rounds 0

The workload is a short toy collect (``collect_task`` on toy-icl: one task, every layer, the
paper's prompt counts halved) in a fresh process that starts its threads the way ``icl`` does:

    now      ``icl_cli.core.threads.configure_threads`` (the default thread count, OpenMP workers
             that sleep instead of spinning when idle, one inter-op thread)
    before   only OMP_NUM_THREADS / MKL_NUM_THREADS set to the same count (the policy up to this
             benchmark; GNU OpenMP's default spin-wait)

``--threads`` / ``ICL_THREADS`` / ``OMP_NUM_THREADS`` are removed from the child's environment so it
uses the default count. Each run reports the child's own CPU time (``time.process_time`` over
the workload, all its threads) and wall time. The background jobs are two pure-Python busy
loops (always runnable, one thread each, same priority as the workload). The "idle" machine is
whatever else is running: the CPU used by other processes during the idle runs is measured from
``/proc/stat`` and printed, so a busy "idle" baseline shows. Each round runs idle then loaded;
ratios are of medians. The old policy gets fewer rounds by default (beside the busy loops it
runs for about a minute). The last line is the current policy's ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

_DROP = ("ICL_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY",
         "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def workload(policy: str) -> None:
    """Child process: set threads as ``policy`` says, run the toy collect, print JSON timings."""
    from icl_cli.core.threads import available_cpus, configure_threads

    if policy == "now":
        n = configure_threads(None)
    else:
        n = available_cpus()
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(n)
    import torch

    from icl_cli.collect.artifact import CollectParams
    from icl_cli.collect.vectors import collect_task
    from icl_cli.core.models import load_model
    from icl_cli.core.sites import HookedModel
    from icl_cli.core.tasks import builtin_tasks

    lm = load_model("toy-icl", device="cpu", dtype="float32")
    hm = HookedModel(lm.model)
    task = builtin_tasks()["antonyms"]
    p = CollectParams(n_shot=19, n_prompts=8, n_eval=16)
    layers = list(range(hm.n_layers))
    collect_task(hm, lm.tokenizer, task, layers[:1], p)  # warm-up (allocator, first-call costs)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(2):
        collect_task(hm, lm.tokenizer, task, layers, p)
    print(json.dumps({"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall, "threads": n,
                      "torch_threads": torch.get_num_threads(), "process_cpu": sum(os.times()[:2])}))


def _busy_jiffies() -> int:
    """Machine-wide busy CPU time (all CPUs, every process) from /proc/stat, in clock ticks."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle


def run_once(policy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DROP}
    busy0 = _busy_jiffies()
    out = subprocess.run([sys.executable, __file__, "--workload", policy], env=env, check=True,
                         capture_output=True, text=True)
    busy = (_busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["machine_busy"] = busy
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--before-rounds", type=int, default=1, help="rounds of the old policy (0: skip it)")
    ap.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.workload:
        workload(args.workload)
        return
    rounds = {"before": args.before_rounds, "now": args.rounds}
    policies = [p for p in rounds if rounds[p] > 0]
    runs: dict[tuple[str, str], list[dict]] = {(p, s): [] for p in policies for s in ("idle", "loaded")}
    spin = [sys.executable, "-c", "while True: pass"]
    for i in range(max(rounds.values())):
        for policy in [p for p in policies if rounds[p] > i]:
            runs[(policy, "idle")].append(run_once(policy))
            bg = [subprocess.Popen(spin) for _ in range(2)]
            try:
                time.sleep(0.5)  # let the scheduler see them as CPU-bound
                runs[(policy, "loaded")].append(run_once(policy))
            finally:
                for p in bg:
                    p.kill()
                    p.wait()
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("cpu", "wall", "machine_busy", "process_cpu")} for k, v in runs.items()}
    first = runs[(policies[0], "idle")][0]
    print(f"toy collect (toy-icl, 1 task, all layers, twice); {first['threads']} thread(s) by default on "
          f"{os.cpu_count()} CPU(s) ({len(os.sched_getaffinity(0))} in this process's affinity); background: "
          f"2 pure-Python busy loops")
    for policy in policies:
        idle, loaded = med[(policy, "idle")], med[(policy, "loaded")]
        others = idle["machine_busy"] - idle["process_cpu"]  # the child's start-up included in process_cpu
        print(f"{policy:>7} ({rounds[policy]} round(s)): idle cpu {idle['cpu']:6.2f} s wall {idle['wall']:6.2f} s (other processes used "
              f"{others:5.2f} CPU-s meanwhile) | loaded cpu {loaded['cpu']:6.2f} s wall {loaded['wall']:6.2f} s | "
              f"cpu loaded/idle {loaded['cpu'] / idle['cpu']:.2f}")
    last = policies[-1]
    print(f"cpu_loaded_over_idle: {med[(last, 'loaded')]['cpu'] / med[(last, 'idle')]['cpu']:.2f}")


if __name__ == "__main__":
    main()
