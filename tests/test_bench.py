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


def test_sd3_benchmark_on_the_real_width_at_depth_one(tmp_path):
    """`--arch sd3`: the SD3.5 Medium transformer config, built on the meta device, one block deep."""
    result = main(["--arch", "sd3", "--depth", "1", "--resolution", "32", "--steps", "1", "--no-memory",
                   "--variants", "lora,flat", "--json", str(tmp_path / "sd3.json")])
    assert result["arch"] == "sd3" and result["depth"] == 1 and result["dtype"] == "bfloat16"
    # The last joint block has no text-stream output (`context_pre_only`): 7 projections, plus the
    # second (dual) attention's to_q/k/v/out.
    assert result["lora_layers"] == 7 + 4
    assert result["base_bit_identical"] and result["lora_step_s"] > 0 and result["flat_step_s"] > 0


@pytest.mark.parametrize(("arch", "layers"), [("sd3", 24 * 8 - 1 + 13 * 4), ("flux", 19 * 8 + 38 * 3)])
def test_transformer_configs_are_the_real_ones(arch, layers):
    """The full architectures on the meta device (no memory): every LoRA target of SD3.5 Medium / FLUX.1-dev."""
    from flatlora_diffusion.bench import target_shapes

    sizes = [rows * cols for rows, cols in target_shapes(arch)]
    assert len(sizes) == layers
    assert max(sizes) == {"sd3": 1536 * 1536, "flux": 3072 * 3072}[arch]
