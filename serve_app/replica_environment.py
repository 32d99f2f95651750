"""How Serve runs our replicas: environment variables every replica of the application gets.

`imagegen config build` (and so `imagegen serve`) puts them in the application's runtime
environment, so replicas on any cluster run this way; `imagegen serve` also sets them for the
local Ray it starts (its proxy routes through a handle too), and the integration suite for its own.
A value already set in the environment wins.
"""

from __future__ import annotations

SERVE_ON_MAIN_LOOP = {
    # By default a replica runs our code on an event loop of its own thread, and its handles route
    # calls on yet another loop, so every request and every handle call crosses threads twice.
    # Run both on the replica's main loop (our blocking work already goes to threads of its own):
    # benchmarks/frontend_cpu.py, A B A B, front-end CPU per request 27.8/24.6 -> 25.0/22.9 ms.
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    # The objects a replica made while starting (modules, the weights' Python wrappers) are never
    # garbage; frozen, no collection walks them again.
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
}
"""Serve's threading and GC settings for our replicas (each replica reads them as it starts)."""
