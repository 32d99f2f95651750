"""The smallest Ray Serve service, started as ``imagegen serve`` starts Ray: Serve's own idle CPU.

``--deployments`` deployments whose ``__call__`` returns a string, each at ``/<index>``, with the
same Ray as ``imagegen serve`` (serve_app/cli.py `connect_ray`: its environment, no dashboard, the
same object store). What it costs at idle is the floor under any Serve service on the machine; run it
through the idle measurement: ``python -m benchmarks.idle_cpu --serve-floor 1``.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Sequence

from serve_app.cli import connect_ray

READY_LINE = "serve floor ready"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_floor", description=__doc__)
    parser.add_argument("--deployments", type=int, default=1)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    import ray
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Echo:
        async def __call__(self, request: object) -> str:
            return "ok"

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    connect_ray("local")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        for index in range(args.deployments):
            deployment = Echo.options(name=f"Echo{index}")  # type: ignore[attr-defined]
            serve.run(deployment.bind(), name=f"floor{index}", route_prefix=f"/{index}")
        print(READY_LINE, flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
