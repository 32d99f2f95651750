"""The ``imagegen`` command: ``imagegen serve`` runs the service on a local Ray instance;
``imagegen bench`` runs the benchmarks (benchmarks/run.py)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2  # images are small; keep Ray's shared memory modest
APP_NAME = "imagegen"


def serve_command(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from serve_app.app import build_app
    from serve_app.config import load_config

    config = load_config(args.config)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    ray.init(
        address=args.address,
        include_dashboard=False,
        object_store_memory=LOCAL_OBJECT_STORE_BYTES if args.address == "local" else None,
        logging_level=logging.WARNING,
    )
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        print(f"imagegen-serve ready on http://{config.host}:{config.port} (Ctrl-C stops)", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def bench_command(args: argparse.Namespace) -> int:
    from benchmarks.run import main as bench_main

    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagegen", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the service (Ray Serve) in the foreground")
    serve_parser.add_argument(
        "--config", default=os.environ.get("IMAGEGEN_CONFIG"), help="YAML config (default: the embedded one)"
    )
    serve_parser.add_argument(
        "--address", default="local", help="Ray address: 'local' starts a private instance, 'auto' joins one"
    )
    serve_parser.set_defaults(handler=serve_command)
    bench_parser = commands.add_parser(
        "bench",
        add_help=False,
        help="benchmark against peers, or load a running server (options: imagegen bench --help)",
    )
    bench_parser.set_defaults(handler=bench_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `bench` takes its own options (benchmarks/run.py); every other command takes only its own.
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
