"""`cdt info` and `cdt init`: inspect presets and create random checkpoints."""

from __future__ import annotations

import json

import torch

from model import PRESETS, SPACE_FACTOR, CDTConfig, build_model, read_header, save_pretrained


def register(sub) -> None:
    info = sub.add_parser("info", help="parameter counts and compression of a preset or a checkpoint, counted "
                                       "from the built model")
    which = info.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", choices=sorted(PRESETS))
    which.add_argument("--checkpoint", metavar="DIR", help="a checkpoint directory (its config: grown levels too)")
    info.add_argument("--kind", default="cdt", choices=("cdt", "vae"), help="with --preset (default cdt)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(run=run_info)

    init = sub.add_parser("init", help="write a randomly initialised checkpoint directory")
    init.add_argument("--preset", required=True, choices=sorted(PRESETS))
    init.add_argument("--kind", default="cdt", choices=("cdt", "vae"))
    init.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="storage dtype of the weights")
    init.set_defaults(run=run_init)


def run_info(args) -> int:
    if args.checkpoint:
        header = read_header(args.checkpoint)
        config, kind = CDTConfig.from_dict(header["config"]), header.get("kind", "cdt")
    else:
        config, kind = CDTConfig.from_preset(args.preset), args.kind
    model = build_model(config, kind)
    report = {"preset": config.preset, "kind": kind, **model.parameter_counts(), "levels": len(config.levels),
              "compression": {"txhxw": config.compression, "time": config.time_factor, "space": SPACE_FACTOR,
                              "latent_channels": config.latent_channels},
              "frames_rule": config.frames_rule}
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>20}: {value:,}" if isinstance(value, int) else f"{key:>20}: {value}")
    return 0


def run_init(args) -> int:
    torch.manual_seed(args.seed)
    model = build_model(CDTConfig.from_preset(args.preset), args.kind)
    identity = save_pretrained(model, args.output, dtype=args.dtype)
    print(json.dumps({"checkpoint": args.output, "preset": args.preset, "kind": args.kind,
                      "hash": identity.content_hash}))
    return 0
