"""The core benchmark runs end to end on the tiny UNet and reports what the issue asks for."""

from __future__ import annotations

import json
import statistics

import pytest

from flatlora_diffusion.bench import main


def test_core_benchmark_on_tiny_unet(tmp_path):
    out = tmp_path / "bench.json"
    result = main(["--arch", "tiny", "--resolution", "64", "--steps", "2", "--no-memory", "--json", str(out)])
    saved = json.loads(out.read_text())
    for key in ("lora_step_s", "flat_step_s", "reference_step_s", "flat_gaussian_step_s", "ratio",
                "reference_ratio", "base_bit_identical", "machine"):
        assert key in saved, key
    assert saved["base_bit_identical"] is True
    assert result["lora_layers"] == 32 and len(saved["times_s"]["flat"]) == 2
    assert len(saved["times_s"]["lora"]) == 2 * 3  # one paired LoRA step per other variant and round
    assert saved["ratio"] == pytest.approx(statistics.median(saved["paired_ratios"]["flat"]))
    assert saved["ratio"] > 0
