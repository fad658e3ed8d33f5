"""`cdt serve`: the HTTP service under uvicorn.

Flags given here are exported as their CDT_* variables before uvicorn starts, so
every worker process reads the same settings from its environment, once.
"""

from __future__ import annotations

import os


def register(sub) -> None:
    serve = sub.add_parser("serve", help="run the HTTP service (FastAPI under uvicorn)",
                           description="Settings come from CDT_* environment variables (docs/settings.md); "
                                       "the flags below override them.")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--workers", type=int, default=1,
                       help="uvicorn processes, each with its own models and worker pool, on CPU devices only: one "
                            "process drives every GPU it is given (default 1)")
    serve.add_argument("--checkpoint", help="checkpoint directory (CDT_CHECKPOINT)")
    serve.add_argument("--models", help="several models: name=path,name=path or a directory of checkpoints; the "
                                        "first is the default (CDT_MODELS)")
    serve.add_argument("--devices", help="comma-separated cuda, cuda:N, cpu (CDT_DEVICES)")
    serve.add_argument("--dtype", choices=("fp32", "bf16"), help="compute dtype (CDT_DTYPE)")
    serve.add_argument("--redis-url", help="session store (CDT_REDIS_URL)")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    serve.set_defaults(run=run_serve)


def run_serve(args) -> int:
    # Imported here so the other `cdt` commands start without the web stack.
    import uvicorn

    from service.catalog import model_sources
    from service.devices import DeviceSetupError, resolve
    from service.settings import Settings

    overrides = {"checkpoint": args.checkpoint, "models": args.models, "devices": args.devices, "dtype": args.dtype,
                 "redis_url": args.redis_url}
    names = Settings.env_names()
    for field, value in overrides.items():
        if value is not None:
            os.environ[names[field]] = str(value)
    settings = Settings.from_env()  # fail here, with one line, rather than in each worker
    model_sources(settings)
    devices = resolve(settings.devices)
    if args.workers > 1 and any(device.type == "cuda" for device in devices):
        # Every process would load a model onto every GPU and budget the same free memory.
        raise DeviceSetupError(f"--workers {args.workers} with CUDA devices: one process drives every GPU "
                               "(CDT_DEVICES); run one process, or one `cdt serve` per set of GPUs, each with its own CDT_DEVICES and port")
    # No graceful-shutdown timeout: a stop waits for the requests in flight, and the lifespan
    # shutdown for the session drain (CDT_DRAIN_S); the deploy files' stop grace bounds both.
    uvicorn.run("service.app:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_level=args.log_level, timeout_graceful_shutdown=None)
    return 0

