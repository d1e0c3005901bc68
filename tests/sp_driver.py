"""Run several sinklora training configs one after another in one process group (a torchrun worker for
tests/test_sequence_parallel.py): ``python -m torch.distributed.run ... tests/sp_driver.py RUNS.json``, where
RUNS.json is a list of ``["train" | "sft", {config overrides}]``."""

from __future__ import annotations

import json
import sys

from sinklora.config import load_config
from sinklora.train import extend, sft
from sinklora.train.configs import ExtendConfig, SFTConfig


def main(path: str) -> None:
    for command, overrides in json.loads(open(path).read()):
        if command == "sft":
            sft.run(load_config(SFTConfig, overrides=overrides))
        else:
            extend.run(load_config(ExtendConfig, overrides=overrides))


if __name__ == "__main__":
    main(sys.argv[1])
