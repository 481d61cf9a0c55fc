"""Conformance: NVIDIA's ``tritonclient`` and KServe's ``InferenceRESTClient``, with their default settings (binary
tensor data on) and with JSON, against a real ``fovea serve`` process; their answers equal /v1/predict's on ten
real photos, as UINT8 pixels and as raw JPEG bytes (BYTES)."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as http
from conftest import train_cnn

import fovea
from fovea import model_registry


@pytest.fixture(scope="module")
def run(tiny_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_cnn(tiny_pets, tmp_path_factory, "oip_clients", image_size=32, epochs=1, widths=(8, 16, 16, 16))


@pytest.fixture(scope="module")
def photos(pets_root: Path) -> list[Path]:
    """Ten held-out photos of the real data set: five cats, five dogs."""
    return [p for cls in ("cat", "dog") for p in sorted((pets_root / "val" / cls).glob("*.jpg"))[:5]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def url(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``fovea serve pets`` (its defaults: predictions logged) on a free port, in a process of its own."""
    home = tmp_path_factory.mktemp("oip_clients_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FOVEA_HOME", str(home))
        model_registry.add(run, "pets")
    port = free_port()
    fovea_cli = Path(sys.executable).with_name("fovea")
    log = (home / "server.log").open("wb")
    server = subprocess.Popen([str(fovea_cli), "serve", "pets", "--port", str(port)], stdout=log,
                              stderr=subprocess.STDOUT, env={**os.environ, "FOVEA_HOME": str(home)})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"fovea serve did not become ready:\n{(home / 'server.log').read_text()[-3000:]}")
            time.sleep(0.2)
        yield base
    finally:
        server.terminate()
        server.wait(30)
        log.close()


@pytest.fixture(scope="module")
def expected(url: str, photos: list[Path]) -> tuple[np.ndarray, list[str]]:
    """/v1/predict's answers for the photos: (probabilities (10, 2) in class order, labels)."""
    r = httpx.post(f"{url}/v1/predict", files=[("file", (p.name, p.read_bytes(), "image/jpeg")) for p in photos],
                   timeout=60)
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    return (np.array([[p["probabilities"][c] for c in ("cat", "dog")] for p in predictions], np.float32),
            [p["label"] for p in predictions])


@pytest.fixture(scope="module")
def pixels(run: Path, photos: list[Path]) -> np.ndarray:
    """The photos as the model's own preprocessing decodes them: uint8 (10, 3, 32, 32)."""
    x, _, _ = fovea.load(run, "cpu").load_images(photos)
    return np.ascontiguousarray(x.numpy())


def same(probabilities: Any, labels: Any, expected: tuple[np.ndarray, list[str]]) -> None:
    got = [s.decode() if isinstance(s, bytes) else str(s) for s in np.asarray(labels).ravel()]
    assert got == expected[1]
    assert np.allclose(np.asarray(probabilities, np.float32).reshape(-1, 2), expected[0], atol=1e-6)


def test_tritonclient_with_its_defaults_and_with_json(url: str, photos: list[Path], pixels: np.ndarray,
                                                      expected: tuple[np.ndarray, list[str]]) -> None:
    c = http.InferenceServerClient(url=url.removeprefix("http://"))
    assert c.is_server_live() and c.is_server_ready()
    assert "binary_tensor_data" in c.get_server_metadata()["extensions"]
    assert c.get_model_metadata("pets")["versions"] == ["1"]
    meta = c.get_model_metadata("pets", "1")
    assert meta["versions"] == ["1"] and {i["name"] for i in meta["inputs"]} == {"images", "image_files"}
    assert c.is_model_ready("pets") and c.is_model_ready("pets", "1") and not c.is_model_ready("pets", "7")

    blobs = np.array([p.read_bytes() for p in photos], dtype=object)
    for binary in (True, False):
        images = http.InferInput("images", list(pixels.shape), "UINT8")
        images.set_data_from_numpy(pixels, binary_data=binary)
        # no outputs named: tritonclient asks for every output binary (binary_data_output)
        r = c.infer("pets", [images]) if binary else c.infer(
            "pets", [images], outputs=[http.InferRequestedOutput(n, binary_data=False) for n in ("probabilities", "label")])
        same(r.as_numpy("probabilities"), r.as_numpy("label"), expected)
    files = http.InferInput("image_files", [len(photos)], "BYTES")
    files.set_data_from_numpy(blobs)  # raw JPEG bytes, binary: the default
    r = c.infer("pets", [files], model_version="1", outputs=[http.InferRequestedOutput("label"),
                                                              http.InferRequestedOutput("probabilities")])
    same(r.as_numpy("probabilities"), r.as_numpy("label"), expected)
    as_text = np.array([base64.b64encode(b) for b in blobs], dtype=object)  # JSON BYTES: base64 strings
    files.set_data_from_numpy(as_text, binary_data=False)
    r = c.infer("pets", [files], outputs=[http.InferRequestedOutput(n, binary_data=False)
                                          for n in ("probabilities", "label")])
    same(r.as_numpy("probabilities"), r.as_numpy("label"), expected)

    wrong = http.InferInput("input_0", list(pixels.shape), "UINT8")
    wrong.set_data_from_numpy(pixels)
    with pytest.raises(Exception, match="unknown input 'input_0'"):
        c.infer("pets", [wrong])
    c.close()


def test_kserve_rest_client_with_its_defaults_and_with_json(url: str, photos: list[Path], pixels: np.ndarray,
                                                            expected: tuple[np.ndarray, list[str]]) -> None:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    def outputs(response: Any) -> tuple[np.ndarray, np.ndarray]:
        by_name = {o.name: o.as_numpy() for o in response.outputs}
        return by_name["probabilities"], by_name["label"]

    async def main() -> None:
        c = InferenceRESTClient(RESTConfig(protocol="v2"))
        try:
            assert await c.is_server_live(url) and await c.is_server_ready(url)
            assert await c.is_model_ready(url, "pets") and not await c.is_model_ready(url, "cats")
            for binary in (True, False):
                images = InferInput("images", list(pixels.shape), "UINT8")
                images.set_data_from_numpy(pixels, binary_data=binary)
                r = await c.infer(url, InferRequest("pets", [images], request_id=f"k{binary}"), model_name="pets")
                assert r.id == f"k{binary}"
                same(*outputs(r), expected)
            files = InferInput("image_files", [len(photos)], "BYTES")
            files.set_data_from_numpy(np.array([p.read_bytes() for p in photos], dtype=object))  # binary: default
            same(*outputs(await c.infer(url, InferRequest("pets", [files]), model_name="pets")), expected)
            files.set_data_from_numpy(np.array([base64.b64encode(p.read_bytes()) for p in photos], dtype=object),
                                      binary_data=False)
            same(*outputs(await c.infer(url, InferRequest("pets", [files]), model_name="pets")), expected)
            b64 = base64.b64encode(photos[0].read_bytes()).decode()
            short = InferInput("image_files", [6], "BYTES", data=[b64] * 5)  # a shape its data does not fill
            with pytest.raises(httpx.HTTPStatusError, match=r"shape \[6\] holds 5 elements"):
                await c.infer(url, InferRequest("pets", [short]), model_name="pets")
        finally:
            await c.close()

    asyncio.run(main())
