"""The README's picture: the base model beside the demo adapter, same prompts and seeds.

    python docs/toy/demo_picture.py outputs/demo docs/toy/demo_base_vs_adapter.png

Every image of the adapter's `validation/final/` is regenerated from the settings in its PNG
(`flatlora` text chunk), once with the base alone and once with the adapter reloaded from disk,
through `flatlora_diffusion.sampling` (the module validation, eval and the app use).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from flatlora_diffusion import adapters, sampling
from flatlora_diffusion.files import save_image
from flatlora_diffusion.toyworld.quality import grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    info = adapters.read_adapter_info(args.adapter)
    pipe = sampling.load_pipeline(info.base_model)
    adapters.load_adapter(pipe, args.adapter, "demo")
    rows, labels = [], []
    for path in sorted((args.adapter / "validation" / "final").glob("*.png")):
        settings = sampling.SampleSettings(**json.loads(Image.open(path).text["flatlora"])["settings"])
        rows.append([sampling.generate(pipe, settings, adapters=run)[0] for run in (None, {"demo": 1.0})])
        labels.append(settings.prompt)
    images = [row[0] for row in rows] + [row[1] for row in rows]
    names = [f"base: {p}" for p in labels] + [f"adapter: {p}" for p in labels]
    per_prompt = len(rows) // len(set(labels))
    # One row per prompt: its base images, then its adapter images.
    order = [i for start in range(0, len(rows), per_prompt)
             for i in [*range(start, start + per_prompt), *range(len(rows) + start, len(rows) + start + per_prompt)]]
    save_image(grid([images[i] for i in order], columns=2 * per_prompt, labels=[names[i] for i in order]), args.out)


if __name__ == "__main__":
    main()
