"""Runs ``train_teacher`` / ``distill`` in a process of its own, for tests/test_train.py.

    python tests/_train_worker.py MODE CONFIG_JSON [--slow SECONDS] [--summary PATH]

MODE ``teacher`` or ``distill`` (CONFIG_JSON: that config's fields), or ``both`` (CONFIG_JSON:
``{"teacher": {...}, "distill": {...}}``; the distillation uses the teacher just trained).
``--slow`` sleeps after every optimizer step, so a test can kill the process mid-run.
Rank 0 writes the summaries as JSON to ``--summary``. Works under torchrun.
"""

import argparse
import importlib.util
import json
import os
import sys
import time

if importlib.util.find_spec("ibmd_fast") is None:  # the tests set PYTHONPATH; by hand, use this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

torch.set_num_threads(1)  # the tests compare bit patterns with runs made under one thread

from ibmd_fast.train import distill, optim, train_teacher  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("teacher", "distill", "both"))
    parser.add_argument("config")
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--summary", default="")
    args = parser.parse_args()
    config = json.loads(args.config)

    if args.slow:
        step = optim.OptimizerStep.__call__

        def slow_step(self, loss):
            out = step(self, loss)
            time.sleep(args.slow)
            return out

        optim.OptimizerStep.__call__ = slow_step

    summaries = {}
    if args.mode in ("teacher", "both"):
        summaries["teacher"] = train_teacher(**(config["teacher"] if args.mode == "both" else config))
    if args.mode in ("distill", "both"):
        dconf = dict(config["distill"] if args.mode == "both" else config)
        if args.mode == "both":
            dconf.setdefault("teacher", summaries["teacher"]["release"])
        summaries["distill"] = distill(**dconf)
    if args.summary and int(os.environ.get("RANK", "0")) == 0:
        with open(args.summary, "w") as fh:
            json.dump(summaries, fh)


if __name__ == "__main__":
    main()
