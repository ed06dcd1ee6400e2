"""The README's picture: the base model beside the demo adapter, same prompts and seeds.

    python docs/toy/demo_picture.py outputs/demo docs/toy/demo_base_vs_adapter.png

The adapter's side is its `validation/final/` images (sampled with the adapter reloaded from
disk); the base side regenerates each one from the settings in its PNG (`flatlora` text chunk)
with the base alone, through `flatlora_diffusion.sampling` (the module validation, eval and the
app use). One row per prompt: its base images, then its adapter images.
"""

from __future__ import annotations

import argparse
import json
from itertools import groupby
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
    pipe = sampling.load_pipeline(adapters.read_adapter_info(args.adapter).base_model)
    shots = []
    for path in sorted((args.adapter / "validation" / "final").glob("*.png")):
        image = Image.open(path)
        settings = sampling.SampleSettings(**json.loads(image.text["flatlora"])["settings"])
        shots.append((settings.prompt, sampling.generate(pipe, settings)[0], image.convert("RGB")))
    cells, labels, columns = [], [], 0
    for prompt, group in groupby(shots, key=lambda shot: shot[0]):
        group = list(group)
        cells += [base for _, base, _ in group] + [tuned for _, _, tuned in group]
        labels += [f"base: {prompt}"] * len(group) + [f"adapter: {prompt}"] * len(group)
        columns = 2 * len(group)
    save_image(grid(cells, columns=columns, labels=labels), args.out)


if __name__ == "__main__":
    main()
