"""Runs several align methods one after another in each process of one ``accelerate launch``.

``accelerate launch --config_file CONFIG tests/align/distributed_runs.py SPEC.json``: SPEC is a list of
``{"method": NAME, "config": {field: value}}``. One launch pays the processes' start-up (imports,
DeepSpeed's set-up) once for every method (tests/align/test_distributed.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec_path: str) -> None:
    from tandemlm.align.config import build_config
    from tandemlm.align.registry import get_method, run_method

    for entry in json.loads(Path(spec_path).read_text()):
        method = entry["method"]
        config = build_config(get_method(method).config_cls, overrides=entry["config"])
        run_method(method, config)


if __name__ == "__main__":
    main(sys.argv[1])
