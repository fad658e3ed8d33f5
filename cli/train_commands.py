"""`cdt train` and `cdt export`: thin entry points over `training.trainer`.

Multi-process data parallel: `torchrun --nproc-per-node N -m cli.main train ...`
(gloo on CPU); every rank runs the same command, rank 0 writes the run directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def register(sub) -> None:
    train = sub.add_parser("train", help="train a tokenizer from a JSON config, or resume a run",
                           description="Start: cdt train --config FILE [section.key=value ...]. "
                                       "Continue: cdt train --resume RUN_DIR.")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="JSON config (see training/configs/)")
    source.add_argument("--resume", metavar="RUN_DIR", help="continue this run exactly where its checkpoint stopped")
    train.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="config overrides for a new run, e.g. optim.lr=3e-4 stages.0.steps=500")
    train.add_argument("--run-dir", help="run directory for a new run (default runs/<name>)")
    train.add_argument("--stop-at", type=int, help="stop after this step (the LR schedule still spans the config)")
    train.add_argument("--threads", type=int, help="CPU threads for this process, overriding train.threads (also "
                       "on --resume: a run may continue on a machine with another core count)")
    train.add_argument("--bf16", choices=("on", "off"), help="bf16 autocast for this process, overriding "
                       "train.bf16 (also on --resume); worth it on GPUs and on CPUs with bf16 arithmetic, "
                       "but check for NaN gradients first: see docs/results.md, 'Speed'")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=run_train)

    export = sub.add_parser("export", help="write a served checkpoint from a run's EMA weights")
    export.add_argument("--run", dest="run_dir", required=True, metavar="RUN_DIR")
    export.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    export.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"), help="storage dtype (default bf16)")
    export.set_defaults(run=run_export)


def run_train(args) -> int:
    from training.config import load_config
    from training.trainer import prepare_run, train

    if args.resume:
        if args.overrides or args.run_dir:
            raise ValueError("--resume continues a run as configured; overrides and --run-dir apply to new runs")
        run_dir = Path(args.resume)
        if not (run_dir / "state.pt").exists():
            raise FileNotFoundError(f"{run_dir}: no checkpoint (state.pt) to resume from")
    else:
        config = load_config(args.config, args.overrides)
        run_dir = Path(args.run_dir or Path("runs") / config["name"])
        prepare_run(run_dir, config)
    bf16 = None if args.bf16 is None else args.bf16 == "on"
    _, stats = train(run_dir, stop_at=args.stop_at, progress=not args.quiet, threads=args.threads, bf16=bf16)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"run": str(run_dir), **stats}))
    return 0


def run_export(args) -> int:
    from training.trainer import export

    print(json.dumps(export(args.run_dir, args.output, dtype=args.dtype)))
    return 0
