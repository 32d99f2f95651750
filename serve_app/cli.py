"""The ``imagegen`` command: ``serve`` runs the service on a local Ray instance; ``config build``
writes its Serve config and ``config apply`` changes a running service to a new config (no
downtime; serve_app/deploy.py); ``report`` reads
the generation log; ``bench`` runs the benchmarks (benchmarks/run.py); ``eval`` scores variants'
images (benchmarks/quality.py); ``batch`` generates images for a Parquet of prompts on Ray Data
(serve_app/batch.py); ``train`` trains the embedded digit models (training/digits.py)."""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from serve_app.replica_environment import PROXY_ENVIRONMENT, direct_ingress_environment

PORT_WAIT_S = 90.0  # past Linux's 60 s TIME_WAIT
PORT_POLL_S = 1.0
LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2  # images are small; keep Ray's shared memory modest
LOCAL_RAY_ENVIRONMENT = {
    # Serve's controller loop runs every 0.1 s by default; a single-node service needs no faster
    # reaction than a replica takes to start (benchmarks/idle_cpu.py: 3.8% -> 1.3% of a core idle).
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1.0",
    # Every replica exports its cached metrics each 100 ms by default; Prometheus scrapes each 10 s+.
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    # Ray's log monitor lists the log folder every 0.1 s while it holds under 1,000 files, to
    # forward new workers' output to this terminal: every 5 s is soon enough (1.05% -> 0.45%).
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "5",
    # The agent samples every process for the dashboard each 5 s; `imagegen serve` runs none
    # (1.1% -> 0.75%; our own metrics go out as before). Together, idle 9.8/10.5% -> 8.9/9.3%.
    "REPORTER_UPDATE_INTERVAL_MS": "60000",
    # The proxy's transport and loop settings (the replicas also get theirs from the application).
    **PROXY_ENVIRONMENT,
}
"""The environment of the local Ray instance ``imagegen serve`` starts (its processes inherit
it); a value already in the environment wins. Joined clusters keep their own."""
APP_NAME = "imagegen"


def connect_ray(address: str, direct_ingress_port: int | None = None) -> None:
    """Ray as ``imagegen serve`` runs on it: ``local`` starts an instance of its own, with
    `LOCAL_RAY_ENVIRONMENT` and a modest object store, and with its ingress listening on
    ``direct_ingress_port`` itself when one is given; any other address joins that cluster."""
    import ray

    if address == "local":
        for name, value in LOCAL_RAY_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
        if direct_ingress_port is not None:
            os.environ.update(direct_ingress_environment(direct_ingress_port))
    ray.init(
        address=address,
        include_dashboard=False,
        object_store_memory=LOCAL_OBJECT_STORE_BYTES if address == "local" else None,
        logging_level=logging.WARNING,
    )


def serve_command(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from serve_app.config import load_config
    from serve_app.deploy import deploy, wait_until_running

    config = load_config(args.config)
    direct = config.stages.ingress.direct
    if direct:
        if args.address != "local":
            print(
                "imagegen serve: stages.ingress.direct needs a Ray of its own (--address local); a "
                "cluster's ingress runs behind Serve's proxies",
                file=sys.stderr,
            )
            return 2
        try:
            wait_until_bindable(config.host, config.port)
        except OSError as failure:  # TimeoutError included
            print(f"imagegen serve: {failure}", file=sys.stderr)
            return 1
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    connect_ray(args.address, config.port if direct else None)
    try:
        # From a Serve config, as `serve deploy` would: the backlog policy comes with one only,
        # and `imagegen config apply` changes a service deployed from one. A direct ingress
        # holds the port, so Serve's proxy (started all the same) gets a free one.
        deploy(args.config, APP_NAME, proxy_port=free_local_port(config.host) if direct else None)
        try:
            if not wait_until_running(APP_NAME, stop):
                return 0  # stopped before it was ready
        except RuntimeError as failure:
            print(f"imagegen-serve did not start: {failure}", file=sys.stderr, flush=True)
            return 1
        print(f"imagegen-serve ready on http://{config.host}:{config.port} (Ctrl-C stops)", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def wait_until_bindable(host: str, port: int, timeout_s: float = PORT_WAIT_S) -> None:
    """Wait while ``port`` is held only by closed connections, then return; raise OSError at once
    if a server listens on it, TimeoutError past ``timeout_s``.

    Serve's direct ingress binds its port without SO_REUSEADDR, so a connection the last server
    on it closed (TIME_WAIT: 60 s on Linux) fails the bind, and Serve then never tries that port
    again: a restart within the minute would not start.
    """
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
                return
            except OSError as failure:
                if failure.errno != errno.EADDRINUSE:
                    raise
        with socket.socket() as client:
            client.settimeout(1.0)
            if client.connect_ex((host, port)) == 0:
                raise OSError(errno.EADDRINUSE, f"another server listens on {host}:{port}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} was still held by closed connections after {timeout_s:.0f}s")
        if not announced:
            print(
                f"waiting for {host}:{port}: the last server's closed connections still hold it", flush=True
            )
            announced = True
        time.sleep(PORT_POLL_S)  # TIME_WAIT ends by the clock; there is nothing to wait on


def free_local_port(host: str) -> int:
    """A port nothing on ``host`` listens on now (the OS's choice)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def config_build_command(args: argparse.Namespace) -> int:
    import yaml

    from serve_app.deploy import serve_config

    try:
        text = yaml.safe_dump(serve_config(args.config, args.app), sort_keys=False)
    except ValueError as refused:
        print(f"imagegen config build: {refused}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(text)
        print(f"Serve config written to {args.out} (deploy it: serve deploy {args.out})")
    else:
        print(text, end="")
    return 0


def config_apply_command(args: argparse.Namespace) -> int:
    import ray

    from serve_app.deploy import apply

    ray.init(address=args.address, logging_level=logging.WARNING)
    try:
        removed = apply(args.config, args.app)
    except ValueError as refused:  # nothing was changed
        print(f"imagegen config apply: {refused}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    drained = f"; removed after their work finished: {', '.join(removed)}" if removed else ""
    print(f"application {args.app!r} runs the new configuration{drained}")
    return 0


def report_command(args: argparse.Namespace) -> int:
    from deployments.storage import ObjectStore
    from serve_app.config import load_config
    from serve_app.log_report import (
        format_report,
        parse_duration,
        plot_report,
        read_generation_log,
        summarize,
    )

    config = load_config(args.config)
    since = dt.datetime.now(dt.UTC) - parse_duration(args.since) if args.since else None
    summaries = summarize(read_generation_log(ObjectStore(config.storage), since))
    print(format_report(summaries))
    if args.plot:
        plot_report(summaries, Path(args.plot))
        print(f"plot written to {args.plot}")
    return 0


def bench_command(args: argparse.Namespace) -> int:
    from benchmarks.run import main as bench_main

    return bench_main(args.passed_args)


def eval_command(args: argparse.Namespace) -> int:
    from benchmarks.quality import main as eval_main

    return eval_main(args.passed_args)


def batch_command(args: argparse.Namespace) -> int:
    from serve_app.batch import main as batch_main

    return batch_main(args.passed_args)


def train_command(args: argparse.Namespace) -> int:
    from training.digits import main as train_main

    return train_main(args.passed_args)


PASS_THROUGH = ("bench", "eval", "train", "batch")
"""Commands that take their own options (``imagegen <command> --help``)."""


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

    config_parser = commands.add_parser("config", help="the Serve config: build it, or apply it live")
    config_commands = config_parser.add_subparsers(dest="config_command", required=True)
    build_parser_ = config_commands.add_parser(
        "build", help="write the Serve config for `serve deploy` (variants, aliases, autoscaling policy)"
    )
    apply_parser = config_commands.add_parser(
        "apply", help="change the running service to the config, without downtime; removed variants drain"
    )
    for sub in (build_parser_, apply_parser):
        sub.add_argument(
            "--config",
            default=os.environ.get("IMAGEGEN_CONFIG"),
            help="YAML config (default: the embedded one)",
        )
        sub.add_argument("--app", default=APP_NAME, help=f"Serve application name (default: {APP_NAME})")
    build_parser_.add_argument("--out", help="write it to this file (default: print it)")
    build_parser_.set_defaults(handler=config_build_command)
    apply_parser.add_argument("--address", default="auto", help="Ray address of the running cluster")
    apply_parser.set_defaults(handler=config_apply_command)

    report_parser = commands.add_parser(
        "report", help="latency, throughput and errors from the generation log"
    )
    report_parser.add_argument("--config", default=os.environ.get("IMAGEGEN_CONFIG"), help="YAML config")
    report_parser.add_argument("--since", help="only the last 90s, 15m, 1h, 2d, ... (default: everything)")
    report_parser.add_argument("--plot", help="also write a PNG of latency by stage here")
    report_parser.set_defaults(handler=report_command)
    bench_parser = commands.add_parser(
        "bench",
        add_help=False,
        help="benchmark against peers, or load a running server (options: imagegen bench --help)",
    )
    bench_parser.set_defaults(handler=bench_command)
    eval_parser = commands.add_parser(
        "eval", add_help=False, help="score variants' digits with an independent classifier, beside speed"
    )
    eval_parser.set_defaults(handler=eval_command)
    batch_parser = commands.add_parser(
        "batch", add_help=False, help="generate images for a Parquet of prompts offline, on Ray Data"
    )
    batch_parser.set_defaults(handler=batch_command)
    train_parser = commands.add_parser("train", add_help=False, help="train the embedded digit models")
    train_parser.set_defaults(handler=train_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in PASS_THROUGH:
        args.passed_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
