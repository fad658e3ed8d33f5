"""`cdt train` and `cdt export`: thin entry points over `training.trainer`.

One process: `cdt train ...`. Data parallel over GPUs or processes, on one machine or
many: `torchrun --nproc-per-node N [--nnodes M --rdzv-backend c10d --rdzv-endpoint
HOST:PORT] -m cli.main train ...`, the same arguments on every rank (NCCL on CUDA, gloo
on CPU); rank 0 writes the run directory and the export.
"""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    train = sub.add_parser("train", help="train a tokenizer from a JSON config, or resume a run",
                           description="Start: cdt train --config FILE [section.key=value ...] (a run directory "
                                       "holding the same config is continued). Continue: cdt train --resume "
                                       "RUN_DIR. Under torchrun every rank runs the same command.")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="JSON config (see training/configs/)")
    source.add_argument("--resume", metavar="RUN_DIR", help="continue this run exactly where its checkpoint stopped "
                        "(with another world size too: docs/training.md)")
    train.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="config overrides for a new run, e.g. optim.lr=3e-4 stages.0.steps=500")
    train.add_argument("--run-dir", help="run directory for a new run (default runs/<name>)")
    train.add_argument("--stop-at", type=int, help="stop after this step (the LR schedule still spans the config)")
    train.add_argument("--export", metavar="DIR", help="when the run reaches its last (or --stop-at) step, write "
                       "the served checkpoint of its EMA weights here (as `cdt export`)")
    # The options below describe this process and machine, so --resume may change them.
    train.add_argument("--device", help="cuda (under torchrun: cuda:LOCAL_RANK), cuda:N or cpu "
                       "(default: cuda when available)")
    train.add_argument("--threads", type=int, help="CPU threads per machine, overriding train.threads (split "
                       "between the machine's ranks)")
    train.add_argument("--bf16", choices=("on", "off"), help="bf16 autocast over fp32 weights, overriding "
                       "train.bf16 (default: on for CUDA, off on CPUs; on a CPU check for NaN gradients first: "
                       "see docs/results.md, 'Speed')")
    train.add_argument("--compile", action="store_true", help="torch.compile the model's parts")
    train.add_argument("--activation-checkpointing", action="store_true",
                       help="recompute ResnetBlock activations in the backward pass: less memory, more compute")
    train.add_argument("--profile", action="store_true", help="write a torch.profiler trace of steps 3-5 of "
                       "this process to RUN_DIR/profile/ (rank 0)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=run_train)

    export = sub.add_parser("export", help="write a served checkpoint from a run's EMA weights")
    export.add_argument("--run", dest="run_dir", required=True, metavar="RUN_DIR")
    export.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    export.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"), help="storage dtype (default bf16)")
    export.set_defaults(run=run_export)


def run_train(args) -> int:
    from training.config import load_config
    from training.distributed import init_distributed, resolve_device, shutdown_distributed
    from training.trainer import Options, Run, prepare_run

    # A missing GPU is reported (one line) before anything is written.
    options = Options(device=args.device, threads=args.threads, bf16=None if args.bf16 is None else args.bf16 == "on",
                      compile=args.compile, activation_checkpointing=args.activation_checkpointing,
                      profile=args.profile, progress=not args.quiet)
    rank, _ = init_distributed(resolve_device(args.device))
    try:
        if args.resume:
            if args.overrides or args.run_dir:
                raise ValueError("--resume continues a run as configured; overrides and --run-dir apply to new runs")
            run_dir = Path(args.resume)
            if not (run_dir / "state.pt").exists():
                raise FileNotFoundError(f"{run_dir}: no checkpoint (state.pt) to resume from")
        else:
            config = load_config(args.config, args.overrides)
            run_dir = prepare_run(Path(args.run_dir or Path("runs") / config.name), config)
        stats = Run(run_dir, options).train(stop_at=args.stop_at, export_to=args.export)
    finally:
        shutdown_distributed()
    if rank == 0:
        print(json.dumps({"run": str(run_dir), **stats}))
    return 0


def run_export(args) -> int:
    from training.export import export

    print(json.dumps(export(args.run_dir, args.output, dtype=args.dtype)))
    return 0
