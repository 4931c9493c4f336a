"""Run by test_resume: trains a tiny SAE with checkpoints; `slow` sleeps per step so it can be killed."""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sae_helpers import tiny_lm  # noqa: E402

from icl_cli.train_sae.config import TrainConfig  # noqa: E402
from icl_cli.train_sae.trainer import train_dictionaries  # noqa: E402

CFG = dict(model="tiny", dataset="tasks", layers=[0, 1], arch="standard", width=128, tokens=48 * 256, batch_tokens=256, ctx=32,
           buffer_batches=4, eval_tokens=256, checkpoint_every=5, lr=3e-3)


def run(work_dir: Path, resume: bool, slow: bool) -> list:
    torch.set_num_threads(1)
    hook = (lambda info: time.sleep(0.05)) if slow else None
    return train_dictionaries(TrainConfig(**CFG), tiny_lm(), work_dir=work_dir, resume=resume, progress=hook)


if __name__ == "__main__":
    run(Path(sys.argv[1]), resume=False, slow=True)
