"""The app's API through `gradio_client`: one named endpoint with named parameters, answering what it declares."""

from __future__ import annotations

import shutil

import pytest
from conftest import serve_app

RESULT_TIMEOUT_S = 120  # the shared 2-core machine can be slow; a hung server fails the test instead of hanging it


@pytest.fixture(scope="module")
def studio(tiny_sd_path, sd_adapter_dir, tmp_path_factory):
    """The tiny SD base and one adapter, `dog`, in a studio that chose its own folder (as `app.py` does)."""
    from flatlora_diffusion.app_studio import Studio

    root = tmp_path_factory.mktemp("api_adapters")
    shutil.copytree(sd_adapter_dir, root / "dog")
    studio = Studio.open(str(tiny_sd_path), [root])
    yield studio
    studio.close()


@pytest.fixture(scope="module")
def client(studio, tmp_path_factory):
    """A `gradio_client.Client` of the app serving `studio`."""
    from gradio_client import Client

    with serve_app(studio) as url:
        yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def test_one_named_endpoint_with_named_parameters(client):
    api = client.view_api(print_info=False, return_format="dict")
    assert list(api["named_endpoints"]) == ["/generate"]  # the page's own events are private
    assert not api["unnamed_endpoints"]
    endpoint = api["named_endpoints"]["/generate"]
    assert [p["parameter_name"] for p in endpoint["parameters"]] == [
        "prompt", "negative_prompt", "adapters", "compare", "seed", "randomise_seed", "steps", "guidance_scale",
        "width", "height", "num_images", "scheduler", "scale_0", "scale_1", "scale_2", "scale_3"]
    assert [r["label"] for r in endpoint["returns"]] == ["Images", "Seed", "Summary"]
    assert endpoint["returns"][0]["python_type"]["type"].startswith("list[dict(image: filepath, caption: str | None)")


def test_generate_by_keyword_returns_the_declared_gallery(client, single_thread):
    # As the README shows it: the parameters not given keep the page's defaults (compare, 64 px, ...).
    job = client.submit(prompt="a photo of sks dog", adapters=["dog"], seed=3, steps=2, scale_0=0.5,
                        api_name="/generate")
    gallery, seed, summary = job.result(timeout=RESULT_TIMEOUT_S)
    assert isinstance(gallery, list) and [item["caption"] for item in gallery] == ["base · seed 3", "dog ×0.5 · seed 3"]
    import json

    from PIL import Image

    chunks = []
    for item in gallery:  # each entry is a downloaded PNG, as view_api declares (`image: filepath`)
        with Image.open(item["image"]) as image:
            assert image.size == (64, 64)
            chunks.append(json.loads(image.text["flatlora"]))
    assert [chunk["adapters"] for chunk in chunks] == [{}, {"dog": 0.5}]
    assert seed == 3 and "(base | dog ×0.5); seed 3, 2 steps" in summary


def test_config_names_no_server_path(client, tiny_sd_path, tmp_path_factory):
    import urllib.request

    with urllib.request.urlopen(client.src.rstrip("/") + "/config", timeout=RESULT_TIMEOUT_S) as response:
        config = response.read().decode()
    assert "api_adapters" in config and tiny_sd_path.name in config  # the adapter root and the base, by name
    assert str(tmp_path_factory.getbasetemp()) not in config, "an absolute server path is served to every client"


def test_uploads_are_capped_and_gradio_files_stay_in_the_apps_folder(client, studio, single_thread):
    import httpx

    from flatlora_diffusion.app_ui import GRADIO_DIR

    url = client.src.rstrip("/") + "/gradio_api/upload"
    big = httpx.post(url, files={"files": ("big.bin", b"0" * (2 << 20))}, timeout=RESULT_TIMEOUT_S)
    assert big.status_code == 413, (big.status_code, big.text[:200])  # the page has no upload control
    assert not [p for p in studio.out_dir.rglob("*") if p.is_file() and p.stat().st_size >= 2 << 20]
    gallery, _, _ = client.predict(prompt="a dog", adapters=[], seed=0, steps=1, api_name="/generate")
    cached = list((studio.out_dir / GRADIO_DIR).rglob("*.png"))
    assert cached, "Gradio's copies of the results must be in the app's own folder, which `close` removes"


def test_generation_stops_when_the_client_disconnects(client, studio, monkeypatch, single_thread):
    import json
    import time

    import httpx

    from flatlora_diffusion import app_studio

    images = []
    monkeypatch.setattr(app_studio, "generate", lambda *a, **k: images.append(1) or _generate(*a, **k))
    base = client.src.rstrip("/")
    config = httpx.get(base + "/config", timeout=RESULT_TIMEOUT_S).json()
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "generate")
    data = ["a dog", "", [], False, 0, False, 100, 7.5, 64, 64, 8, "default", 1.0, 1.0, 1.0, 1.0]
    session = "disconnecting-client"
    joined = httpx.post(base + "/gradio_api/queue/join", timeout=RESULT_TIMEOUT_S,
                        json={"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None})
    assert joined.status_code == 200, joined.text[:200]
    with httpx.stream("GET", base + "/gradio_api/queue/data", params={"session_hash": session},
                      timeout=RESULT_TIMEOUT_S) as stream:
        for line in stream.iter_lines():  # wait until the request runs, then hang up
            if line.startswith("data:") and json.loads(line[5:]).get("msg") == "process_starts":
                break
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    time.sleep(1)
    while studio._lock.locked() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not studio._lock.locked(), "the request kept the worker after its client went away"
    assert len(images) < 8, f"{len(images)} of 8 images drawn for a client that had gone"


def _generate(*args, **kwargs):
    from flatlora_diffusion.sampling import generate

    return generate(*args, **kwargs)
