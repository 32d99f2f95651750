"""How Serve runs our replicas and proxy: environment variables they read as they start.

`imagegen config build` (and so `imagegen serve`) puts ``REPLICA_ENVIRONMENT`` in the application's
runtime environment, so replicas on any cluster run this way. ``PROXY_ENVIRONMENT`` is for the
processes Ray itself starts (the proxy): `imagegen serve` sets it for the local Ray it starts, and
the integration suite for its own; on a cluster of your own, set it where `ray start` runs.
A value already set in the environment wins.
"""

from __future__ import annotations

REPLICA_ENVIRONMENT = {
    # By default a replica runs our code on an event loop of its own thread, and its handles route
    # calls on yet another loop, so every request and every handle call crosses threads twice.
    # Run both on the replica's main loop (our blocking work already goes to threads of its own):
    # benchmarks/frontend_cpu.py, A B A B, front-end CPU per request 27.8/24.6 -> 25.0/22.9 ms.
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    # The objects a replica made while starting (modules, the weights' Python wrappers) are never
    # garbage; frozen, no collection walks them again.
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
    # Handle calls (ingress -> scheduler, ingress -> model replica) go straight to the replica's
    # gRPC server, by value, instead of as Ray actor tasks through the core worker and the object
    # store. With the proxy's below, benchmarks/frontend_cpu.py A B A B: CPU per request outside
    # the model 22.7/25.2 -> 17.5/21.0 core-ms, 1-client p50 317/280 -> 290/275 ms. A stage
    # deployed apart (`colocate: false`) then gets its input through its caller, not the store.
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
}
"""Serve's threading, GC and transport settings for our replicas."""

PROXY_ENVIRONMENT = {
    **REPLICA_ENVIRONMENT,  # the proxy routes to the ingress through a handle too
    "RAY_SERVE_PROXY_USE_GRPC": "1",  # and reaches it over gRPC as well
}
"""Serve's settings for the proxy (and for every process of a Ray that runs only this service)."""


def direct_ingress_environment(port: int) -> dict[str, str]:
    """Serve's settings for a Ray whose one ingress replica listens on ``port`` itself
    (``stages.ingress.direct``): Serve's direct ingress, on one port. Serve still starts a proxy on
    the head node; `imagegen serve` gives it a free port, where nothing calls it."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # the range excludes its end
        # A released port waits out HAProxy's stale workers by default; there are none, and a
        # replacement ingress (after a crash) must get the one port back at once.
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        # A stopping ingress stays open so a load balancer can deregister it; there is none. It
        # still finishes the requests it holds.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    }
