"""The service as the README starts it: `imagegen serve` (what `make serve` runs), then curl's request."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import free_port

STARTUP_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "IMAGEGEN_PORT": str(port),
        "IMAGEGEN_STORAGE__URL": f"file://{tmp_path_factory.mktemp('store')}",
        "PYTHONUNBUFFERED": "1",
    }
    executable = Path(sys.executable).with_name("imagegen")
    process = subprocess.Popen(
        [str(executable), "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output: list[str] = []
    ready = threading.Event()

    def drain() -> None:  # keeps the pipe empty and signals the ready line (or the end of output)
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if "imagegen-serve ready" in line:
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        assert ready.wait(STARTUP_TIMEOUT_S), f"not ready in {STARTUP_TIMEOUT_S}s:\n{''.join(output)[-3000:]}"
        assert process.poll() is None, f"imagegen serve exited:\n{''.join(output)[-3000:]}"
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, "".join(output)[-3000:]


def test_readme_curl_returns_a_png(served: str) -> None:
    response = httpx.post(
        f"{served}/v1/images/generations",
        headers={"Content-Type": "application/json"},
        json={"prompt": "a lighthouse at dusk", "size": "64x64"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
    assert image.format == "PNG" and image.size == (64, 64)
    assert httpx.get(f"{served}/readyz", timeout=30).json()["ready"] is True
