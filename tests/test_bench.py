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
                "reference_ratio", "base_bit_identical", "machine", "target_ratio", "within_target", "ops_per_step"):
        assert key in saved, key
    assert saved["base_bit_identical"] is True
    assert result["lora_layers"] == 32 and len(saved["times_s"]["flat"]) == 2
    assert len(saved["times_s"]["lora"]) == 2 * 3  # one paired LoRA step per other variant and round
    assert saved["ratio"] == pytest.approx(statistics.median(saved["paired_ratios"]["flat"]))
    assert saved["ratio"] > 0
    assert saved["target_ratio"] == 1.03 and saved["flat_sampler"] == "pooled"
    # Flat-LoRA adds a bounded number of torch operator calls per layer and step (counted, not timed).
    extra = saved["ops_per_step"]["flat"]["torch_ops"] - saved["ops_per_step"]["lora"]["torch_ops"]
    assert 0 < extra <= 16 * result["lora_layers"]


def test_noise_mode_measures_the_pooled_samplers_dependence(tmp_path):
    result = main(["--mode", "noise", "--arch", "tiny", "--json", str(tmp_path / "noise.json")])
    assert json.loads((tmp_path / "noise.json").read_text()) == result
    assert result["layers"] == 32 and result["reuse"] < 1  # the tiny UNet's layers fit in the pool once
    assert result["pairs_above_0.5"] == 0  # no layer shares values with another
    assert result["abs_corr_worst_shift_mean"] < 2 * result["independent_floor_mean"]
