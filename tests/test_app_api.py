"""The app's API through `gradio_client`: one named endpoint with named parameters, answering what it declares."""

from __future__ import annotations

import shutil

import pytest
from conftest import serve_app

RESULT_TIMEOUT_S = 120  # the shared 2-core machine can be slow; a hung server fails the test instead of hanging it


@pytest.fixture(scope="module")
def client(tiny_sd_path, sd_adapter_dir, tmp_path_factory):
    """A `gradio_client.Client` of the app serving the tiny SD base and one adapter, `dog`."""
    from gradio_client import Client

    from flatlora_diffusion.app_studio import Studio

    root = tmp_path_factory.mktemp("api_adapters")
    shutil.copytree(sd_adapter_dir, root / "dog")
    studio = Studio.open(str(tiny_sd_path), [root])
    with serve_app(studio) as url:
        yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
    studio.close()


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
