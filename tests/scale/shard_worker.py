"""Run by test_shard_torchrun.py under ``torchrun --nproc-per-node 2``: one `icl collect` command line
as a user would type it; each rank computes its shard, rank 0 assembles and prints the key."""

from __future__ import annotations

import sys


def main() -> None:
    from icl_cli.cli.app import app

    app(sys.argv[1:], standalone_mode=False)


if __name__ == "__main__":
    main()
