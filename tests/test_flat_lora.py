"""Tests of the Flat-LoRA core: the noise's distribution, exactness, reproducibility and composition."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from flatlora_diffusion import flat_lora
from flatlora_diffusion.flat_lora import (
    SCHEDULES,
    FlatLoraConfig,
    FlatLoraPerturber,
    mixing_matrices,
    resolve_sampler,
)

SAMPLERS = ["pooled", "gaussian"]


@pytest.fixture(autouse=True, params=["kept", "rebuilt"])
def weight_mode(request, monkeypatch) -> str:
    """Every test runs both ways ``W + ε`` is made: kept for the draw (small models, the layers of one
    shape batched) and rebuilt in forward and backward in a shared workspace (large models)."""
    if request.param == "rebuilt":
        monkeypatch.setattr(flat_lora, "KEEP_PERTURBED_BYTES", 0)
    return request.param


class TwoLayer(nn.Module):
    """Two same-shaped linears (for cross-layer checks) and a head."""

    def __init__(self, n: int = 256, m: int = 64) -> None:
        super().__init__()
        self.first = nn.Linear(n, m)
        self.second = nn.Linear(n, m)
        self.head = nn.Linear(m, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.first(x)) + torch.tanh(self.second(x)))


def lora_model(dtype=torch.float32, n: int = 256, m: int = 64, **lora_kwargs) -> nn.Module:
    """A seeded toy model with random (non-zero) LoRA factors on `first` and `second`."""
    torch.manual_seed(0)
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["first", "second"], "init_lora_weights": False}
    model = get_peft_model(TwoLayer(n, m), LoraConfig(**(kwargs | lora_kwargs)))
    model.to(dtype)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model.train()


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name.split(".")[-1]: mod for name, mod in model.named_modules() if hasattr(mod, "lora_A")}


def probe_noise(layer) -> torch.Tensor:
    """ε of a LoRA layer, read through its base layer's forward on the identity matrix."""
    base = layer.get_base_layer()
    eye = torch.eye(base.in_features, dtype=base.weight.dtype)
    with torch.no_grad():
        out = base(eye)  # (n, m): row j is (W + ε)[:, j] + b
    return (out - base.bias).T.double() - base.weight.double()


def expected_sigma(layer, rho: float) -> torch.Tensor:
    """σ_i computed naively from the materialised merged weight."""
    w = layer.get_base_layer().weight.double()
    merged = w + layer.get_delta_weight("default").double()
    return rho * merged.norm(dim=1) / math.sqrt(w.shape[1])


def ks_statistic(samples: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance of standardised samples from N(0, 1)."""
    x = samples.flatten().double().sort().values
    n = x.numel()
    cdf = torch.special.ndtr(x)
    upper = torch.arange(1, n + 1, dtype=torch.double) / n
    return max((upper - cdf).abs().max().item(), (cdf - (upper - 1 / n)).abs().max().item())


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return (torch.dot(a - a.mean(), b - b.mean()) / ((a - a.mean()).norm() * (b - b.mean()).norm())).item()


def train_steps(model, perturber, steps: int, accumulation: int = 1, seed: int = 0) -> torch.Tensor:
    """A few AdamW steps on fixed random data; returns the last loss."""
    gen = torch.Generator().manual_seed(seed)
    n = model.base_model.model.first.in_features
    xs = torch.randn(steps * accumulation, 8, n, generator=gen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        for micro in range(accumulation):
            if perturber is not None:
                perturber.set_step(step)
            x = xs[step * accumulation + micro].to(model.base_model.model.first.weight.dtype)
            loss = model(x).float().square().mean()
            loss.backward()
        opt.step()
        opt.zero_grad()
    return loss.detach()


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def base_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- distribution -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("rslora", [False, True])
def test_noise_rows_are_gaussian_with_sigma_from_merged_row_norms(sampler, rslora):
    model = lora_model(torch.float64, n=1024, use_rslora=rslora)
    perturber = FlatLoraPerturber(model, FlatLoraConfig(rho=0.3, schedule="constant", sampler=sampler))
    perturber.set_step(3)
    for layer in lora_layers(model).values():
        eps = probe_noise(layer)
        sigma = expected_sigma(layer, 0.3)
        n = eps.shape[1]
        row_std = eps.std(dim=1) / sigma
        row_mean = eps.mean(dim=1) / sigma
        assert abs(row_std.mean().item() - 1) < 0.02
        assert (row_std - 1).abs().max() < 0.2  # 64 rows of 1024 samples: s.e. of one row's std is 2.2%
        assert row_mean.abs().max() < 5 / math.sqrt(n)
        assert ks_statistic(eps / sigma[:, None]) < 1.63 / math.sqrt(eps.numel())  # 1% level


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_noise_is_independent_across_layers_and_steps(sampler):
    model = lora_model(torch.float64)
    layers = lora_layers(model)
    perturber = FlatLoraPerturber(model, FlatLoraConfig(rho=0.2, schedule="constant", sampler=sampler))
    perturber.set_step(1)
    first, second = (probe_noise(layers[k]) / expected_sigma(layers[k], 0.2)[:, None] for k in ("first", "second"))
    perturber.set_step(2)
    first_next = probe_noise(layers["first"]) / expected_sigma(layers["first"], 0.2)[:, None]
    bound = 4 / math.sqrt(first.numel())
    assert abs(corr(first, second)) < bound
    assert abs(corr(first, first_next)) < bound
    # Rows within a layer are independent too.
    assert abs(corr(first[:-1], first[1:])) < bound


def test_pooled_layers_are_no_shifted_copies_of_each_other():
    """At the shift where two layers' windows line up, |ε| of one is not a copy of the other's."""
    from flatlora_diffusion.bench import abs_corr_worst_shift

    model = lora_model(torch.float64)
    layers = lora_layers(model)
    perturber = FlatLoraPerturber(model, FlatLoraConfig(rho=0.2, schedule="constant", sampler="pooled"))
    perturber.set_step(1)
    first, second = (probe_noise(layers[k]) / expected_sigma(layers[k], 0.2)[:, None] for k in ("first", "second"))
    assert perturber.sampler.reuse <= 1
    assert abs_corr_worst_shift(first, second) < 0.1  # a shared window gives its overlap fraction, up to 1


def test_mixing_matrices_are_orthogonal_and_mutually_spread():
    mats = mixing_matrices().double()
    for a in range(len(mats)):
        torch.testing.assert_close(mats[a].T @ mats[a], torch.eye(16, dtype=torch.double))
        for b in range(a + 1, len(mats)):  # same group, two blocks: every correlation is ±1/4
            torch.testing.assert_close((mats[a].T @ mats[b]).abs(), torch.full((16, 16), 0.25, dtype=torch.double))


def test_auto_sampler_is_exact_gaussian_on_cuda_and_pooled_on_cpu():
    assert FlatLoraConfig().sampler == "auto"
    assert resolve_sampler("auto", {torch.device("cuda", 0)}) == "gaussian"
    assert resolve_sampler("auto", {torch.device("cpu")}) == "pooled"
    assert resolve_sampler("auto", {torch.device("cpu"), torch.device("cuda", 0)}) == "pooled"
    assert resolve_sampler("gaussian", {torch.device("cpu")}) == "gaussian"
    perturber = FlatLoraPerturber(lora_model(), FlatLoraConfig(rho=0.1, schedule="constant"))
    assert perturber.sampler_name == "pooled"


def test_schedules_at_start_middle_and_end():
    expected = {"cosine": (0.0, 0.5, 1.0), "linear": (0.0, 0.5, 1.0), "constant": (1.0, 1.0, 1.0)}
    for name, values in expected.items():
        got = tuple(SCHEDULES[name](t, 100) for t in (0, 50, 100))
        assert got == pytest.approx(values, abs=1e-12), name
        assert SCHEDULES[name](150, 100) == pytest.approx(1.0)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_perturber_follows_the_schedule_over_optimiser_steps(schedule):
    model = lora_model()
    perturber = FlatLoraPerturber(model, FlatLoraConfig(rho=0.1, schedule=schedule, total_steps=10))
    perturber.set_step(0)
    assert perturber.factor == 0.0
    assert probe_noise(lora_layers(model)["first"]).abs().max() < 1e-6  # no noise at t = 0
    perturber.set_step(5)
    assert perturber.factor == pytest.approx(0.05)
    assert perturber.stats() == {"flat_lora/rho_t": pytest.approx(0.05)}
    perturber.set_step(10)
    assert perturber.factor == pytest.approx(0.1)


def test_one_noise_per_step_shared_by_micro_batches_and_interval():
    model = lora_model(torch.float64)
    layer = lora_layers(model)["first"]
    perturber = FlatLoraPerturber(model, FlatLoraConfig(rho=0.1, schedule="constant", interval=2))
    perturber.set_step(2)
    a = probe_noise(layer)
    perturber.set_step(2)
    assert torch.equal(a, probe_noise(layer))
    perturber.set_step(3)  # same draw within the interval
    assert torch.equal(a, probe_noise(layer))
    perturber.set_step(4)
    assert not torch.equal(a, probe_noise(layer))


def test_state_dict_restores_the_sigma_of_the_draw_in_progress():
    """Inside an interval σ is that of the draw's first forward, also after the LoRA weights moved."""
    config = FlatLoraConfig(rho=0.3, schedule="constant", interval=3)
    model = lora_model(torch.float64)
    perturber = FlatLoraPerturber(model, config)
    train_steps(model, perturber, steps=2)  # steps 0, 1 of the draw of steps 0-2
    state = perturber.state_dict()
    expected = probe_noise(lora_layers(model)["first"])
    perturber.remove()
    for restore in (True, False):
        resumed = FlatLoraPerturber(model, config)
        if restore:
            resumed.load_state_dict(state)
        resumed.set_step(2)
        noise = probe_noise(lora_layers(model)["first"])
        assert torch.equal(noise, expected) == restore  # without the state σ comes from the newer weights
        resumed.remove()


def test_no_noise_in_eval_mode():
    model = lora_model()
    perturber = FlatLoraPerturber(model, FlatLoraConfig(rho=0.5, schedule="constant"))
    perturber.set_step(1)
    model.eval()
    assert probe_noise(lora_layers(model)["first"]).abs().max() < 1e-6


def test_ranks_draw_different_noise_unless_shared():
    noise = {}
    for rank in (0, 1):
        for per_rank in (True, False):
            model = lora_model(torch.float64)
            config = FlatLoraConfig(rho=0.1, schedule="constant", noise_per_rank=per_rank)
            FlatLoraPerturber(model, config, rank=rank).set_step(1)
            noise[rank, per_rank] = probe_noise(lora_layers(model)["first"])
    assert not torch.equal(noise[0, True], noise[1, True])
    assert torch.equal(noise[0, False], noise[1, False])


# --- exactness and reproducibility ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_base_weights_bit_identical_after_training(dtype, sampler):
    model = lora_model(dtype)
    before_base, before_lora = base_state(model), lora_state(model)
    perturber = FlatLoraPerturber(model, FlatLoraConfig(rho=0.1, total_steps=20, sampler=sampler))
    train_steps(model, perturber, steps=20)
    assert_same(before_base, base_state(model))
    assert any(not torch.equal(before_lora[k], v) for k, v in lora_state(model).items())


def test_gradients_match_explicitly_perturbed_weights():
    model = lora_model(torch.float64)
    layer = lora_layers(model)["first"]
    base = layer.get_base_layer()
    perturber = FlatLoraPerturber(model, FlatLoraConfig(rho=0.2, schedule="constant"))
    perturber.set_step(1)
    eps = probe_noise(layer)
    x = torch.randn(5, base.in_features, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(5, base.out_features, dtype=torch.float64)
    (got,) = torch.autograd.grad(base(x), x, grad_out)
    (want,) = torch.autograd.grad(F.linear(x, base.weight + eps, base.bias), x, grad_out)
    torch.testing.assert_close(got, want)


def test_same_seed_same_adapter_different_seed_different():
    adapters = []
    for seed in (0, 0, 1):
        model = lora_model()
        perturber = FlatLoraPerturber(model, FlatLoraConfig(rho=0.2, schedule="constant", seed=seed))
        train_steps(model, perturber, steps=4)
        adapters.append(lora_state(model))
    assert_same(adapters[0], adapters[1])
    assert any(not torch.equal(adapters[0][k], adapters[2][k]) for k in adapters[0])


def test_rho_zero_installs_nothing_and_equals_plain_lora():
    plain, flat = lora_model(), lora_model()
    perturber = FlatLoraPerturber(flat, FlatLoraConfig(rho=0.0))
    assert perturber.layers == []
    assert all("forward" not in layer.get_base_layer().__dict__ for layer in lora_layers(flat).values())
    train_steps(plain, None, steps=3)
    train_steps(flat, perturber, steps=3)
    assert_same(lora_state(plain), lora_state(flat))


def test_global_rng_untouched_by_perturbed_steps():
    model = lora_model()
    perturber = FlatLoraPerturber(model, FlatLoraConfig(rho=0.2, schedule="constant"))
    x = torch.randn(4, 256)
    state = torch.random.get_rng_state()
    perturber.set_step(1)
    model(x).sum().backward()
    perturber.set_step(2)
    assert torch.equal(state, torch.random.get_rng_state())


def test_accumulated_gradients_see_one_noise_sample():
    """Two micro-batches of step k equal one batch of both (the noise is shared)."""
    grads = []
    for accumulation in (1, 2):
        model = lora_model(torch.float64)
        perturber = FlatLoraPerturber(model, FlatLoraConfig(rho=0.2, schedule="constant"))
        x = torch.randn(8, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        for chunk in x.chunk(accumulation):
            perturber.set_step(1)
            (model(chunk).square().sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key])


def test_autocast_bf16_runs_and_keeps_base():
    model = lora_model()
    before = base_state(model)
    perturber = FlatLoraPerturber(model, FlatLoraConfig(rho=0.1, schedule="constant"))
    perturber.set_step(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.base_model.model.first(torch.randn(4, 256))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert_same(before, base_state(model))


# --- composition -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"use_rslora": True},
                                     {"init_lora_weights": "pissa"}, {"init_lora_weights": "olora"},
                                     {"lora_dropout": 0.1}])
def test_composes_with_lora_variants(variant):
    model = lora_model(**variant)
    before = base_state(model)  # after PiSSA/OLoRA rewrote W at init
    perturber = FlatLoraPerturber(model, FlatLoraConfig(rho=0.1, schedule="constant"))
    loss = train_steps(model, perturber, steps=3)
    assert torch.isfinite(loss)
    assert_same(before, base_state(model))


def test_dora_noise_perturbs_the_direction_with_and_without_dropout():
    """DoRA computes m ⊙ (W + ε + sBA)/‖W + sBA‖: the noise reaches the output scaled by m/‖W + sBA‖,
    whether peft reuses the base output (no dropout) or recomputes it from the clean weight (dropout)."""
    x = torch.randn(8, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    effects = {}
    for dropout in (0.0, 0.5):
        model = lora_model(torch.float64, use_dora=True, lora_dropout=dropout)
        layer = lora_layers(model)["first"]
        with torch.no_grad():  # a trained magnitude: no longer the row norm it was initialised to
            magnitude = layer.lora_magnitude_vector["default"].weight
            magnitude.mul_(torch.linspace(0.5, 2.0, magnitude.numel(), dtype=magnitude.dtype))
        perturber = FlatLoraPerturber(model, FlatLoraConfig(rho=0.3, schedule="constant"))
        perturber.set_step(1)
        torch.manual_seed(0)  # the same dropout mask in both passes
        noisy = layer(x)
        eps = probe_noise(layer) if dropout == 0 else None
        perturber.remove()
        torch.manual_seed(0)
        effects[dropout] = (noisy - layer(x)).detach()
        if eps is not None:
            merged = layer.get_base_layer().weight + layer.get_delta_weight("default")
            scale = magnitude / merged.norm(dim=1)
            torch.testing.assert_close(effects[dropout], (x @ eps.T) * scale)
    torch.testing.assert_close(effects[0.5], effects[0.0])


def test_composes_with_loraplus_param_groups():
    from peft.optimizers import create_loraplus_optimizer

    model = lora_model()
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    assert sorted({g["lr"] for g in optimizer.param_groups if g["params"]}) == [1e-3, 16e-3]
    perturber = FlatLoraPerturber(model, FlatLoraConfig(rho=0.1, schedule="constant"))
    before = base_state(model)
    for step in range(2):
        perturber.set_step(step + 1)
        model(torch.randn(4, 256)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert_same(before, base_state(model))


def test_removal_restores_plain_forward():
    model = lora_model()
    with FlatLoraPerturber(model, FlatLoraConfig(rho=0.5, schedule="constant")) as perturber:
        perturber.set_step(1)
        assert probe_noise(lora_layers(model)["first"]).abs().max() > 0
    assert probe_noise(lora_layers(model)["first"]).abs().max() < 1e-6


def test_detach_and_attach_keep_the_draw():
    """`detach` gives the plain forward back without losing the draw; `attach` restores the same noise,
    and refuses while another perturber is attached."""
    model = lora_model()
    perturber = FlatLoraPerturber(model, FlatLoraConfig(rho=0.5, schedule="constant"))
    perturber.set_step(2)
    layer = lora_layers(model)["first"]
    noise = probe_noise(layer)
    perturber.detach()
    assert probe_noise(layer).abs().max() < 1e-6
    other = FlatLoraPerturber(model, FlatLoraConfig(rho=0.5, schedule="constant", seed=9))
    with pytest.raises(ValueError, match="already has a Flat-LoRA perturber"):
        perturber.attach()
    other.remove()
    perturber.attach()
    assert torch.equal(probe_noise(layer), noise)


def test_state_is_o_of_rows():
    model = lora_model(n=512, m=64)
    perturber = FlatLoraPerturber(model, FlatLoraConfig(rho=0.1, schedule="constant"))
    perturber.set_step(1)
    model(torch.randn(2, 512))  # σ is computed on each layer's first forward of the draw
    for noise, cached in zip(perturber._noise, perturber._weight_sq, strict=True):
        assert noise.sigma_as(torch.float32).shape == noise.row_scale.shape == noise.row_sq().shape == cached.shape \
            == (64, 1)
    assert perturber.sampler.fresh == 2 * 64 * 512  # fresh N(0, 1) samples per draw
    assert perturber.sampler.pool_size == perturber.sampler.blocks * perturber.sampler.fresh


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rho": -0.1}, "`rho` must be"),
    ({"rho": 5.0}, "`rho` must be"),
    ({"rho": float("nan")}, "`rho` must be"),
    ({"schedule": "cubic"}, "`schedule` must be one of"),
    ({"sampler": "uniform"}, "`sampler` must be one of"),
    ({"interval": 0}, "`interval` must be"),
    ({"total_steps": 0}, "`total_steps` must be"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlatLoraConfig(**kwargs)


def test_pool_smaller_than_a_layer_is_rejected():
    with pytest.raises(ValueError, match="`pool_size`=1000 is too small"):
        FlatLoraPerturber(lora_model(), FlatLoraConfig(rho=0.1, schedule="constant", sampler="pooled", pool_size=1000))


def test_config_errors_are_reported_together():
    with pytest.raises(ValueError, match=r"(?s)`rho`.*`interval`"):
        FlatLoraConfig(rho=-1, interval=0)


def test_ramp_needs_total_steps():
    with pytest.raises(ValueError, match="needs `total_steps`"):
        FlatLoraPerturber(lora_model(), FlatLoraConfig(rho=0.1, schedule="cosine"))


def test_model_without_lora_is_rejected():
    with pytest.raises(ValueError, match="no peft LoRA layers"):
        FlatLoraPerturber(TwoLayer(), FlatLoraConfig(rho=0.1, schedule="constant"))


def test_unsupported_layer_type_is_rejected_before_anything_changes():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(1))
    model = get_peft_model(conv, LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(TypeError, match="plain linear layers only; `.*0` wraps a Conv2d"):
        FlatLoraPerturber(model, FlatLoraConfig(rho=0.1, schedule="constant"))


def test_second_perturber_on_same_model_is_rejected():
    model = lora_model()
    FlatLoraPerturber(model, FlatLoraConfig(rho=0.1, schedule="constant"))
    with pytest.raises(ValueError, match="already has a Flat-LoRA perturber"):
        FlatLoraPerturber(model, FlatLoraConfig(rho=0.1, schedule="constant"))


def test_several_active_adapters_with_dora_are_rejected():
    model = lora_model(use_dora=True)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["first", "second"]))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="several active adapters, one of them DoRA"):
        FlatLoraPerturber(model, FlatLoraConfig(rho=0.1, schedule="constant"))


@pytest.mark.parametrize("weight_mode", ["kept"], indirect=True)  # it compares both modes itself
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("lora_kwargs", [{}, {"alpha_pattern": {"second": 2}}], ids=["one_scaling", "two_scalings"])
def test_kept_and_rebuilt_perturbed_weights_give_the_same_step(sampler, lora_kwargs, weight_mode, monkeypatch):
    """Small models keep W + ε per draw (same-shaped layers batched); large ones rebuild it in backward.
    Both must give the same outputs and gradients; the kept path builds no custom autograd node."""
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(1)).requires_grad_()  # a gradient into x too
    results = {}
    for mode, budget in (("kept", flat_lora.KEEP_PERTURBED_BYTES), ("rebuilt", 0)):
        monkeypatch.setattr(flat_lora, "KEEP_PERTURBED_BYTES", budget)
        model = lora_model(**lora_kwargs)
        perturber = FlatLoraPerturber(model, FlatLoraConfig(rho=0.3, schedule="constant", sampler=sampler))
        assert perturber.keep_perturbed == (mode == "kept")
        assert len({id(g) for g in perturber._group_of.values()}) == (1 if mode == "kept" else 0)
        perturber.set_step(0)
        x.grad = None
        out = model(x).sum()
        custom_nodes = [node for node in _graph_nodes(out.grad_fn) if "NoisyLinear" in type(node).__name__]
        assert len(custom_nodes) == (0 if mode == "kept" else 2)
        out.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad} | {"x": x.grad.clone()}
        results[mode] = (out.detach(), grads)
        perturber.remove()
    torch.testing.assert_close(results["kept"][0], results["rebuilt"][0], rtol=1e-5, atol=1e-6)
    for name, grad in results["rebuilt"][1].items():
        torch.testing.assert_close(results["kept"][1][name], grad, rtol=1e-5, atol=1e-6)


def _graph_nodes(node, seen=None):
    """Every autograd node reachable from ``node``."""
    seen = set() if seen is None else seen
    if node is None or node in seen:
        return seen
    seen.add(node)
    for parent, _ in node.next_functions:
        _graph_nodes(parent, seen)
    return seen


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_batched_noise_equals_each_layers_noise(sampler):
    """`noise_pieces` (the kept path's batched noise) gives exactly the layers' own noise, each layer once."""
    model = lora_model()
    perturber = FlatLoraPerturber(model, FlatLoraConfig(rho=0.1, schedule="constant", sampler=sampler))
    perturber.set_step(3)
    keys = [noise.key for noise in perturber._noise]
    shape, cpu = torch.Size((64, 256)), torch.device("cpu")
    pieces = perturber.sampler.noise_pieces(keys, shape, cpu, torch.float32)
    layers = [g for part, _ in pieces for g in range(len(keys))[part]]
    assert layers == list(range(len(keys)))
    stacked = torch.cat([noise for _, noise in pieces])
    for g, key in enumerate(keys):
        assert torch.equal(stacked[g], perturber.sampler.noise(key, shape, cpu, torch.float32))


def test_pooled_small_models_hold_every_layer_once_with_runs_side_by_side(monkeypatch):
    """A small model's pool holds every layer once (no value shared between layers), and the layers of
    a run (same-shaped layers, in the perturber) lie next to each other, so their batched noise needs
    no copy. Where the pool is reused (large models), layers are shuffled one by one: equal-sized runs
    would repeat their offsets lap after lap."""
    from flatlora_diffusion.flat_lora import PooledSampler

    cpu = torch.device("cpu")
    sizes, runs = [100] * 80 + [300, 50], [list(range(0, 80, 2)), list(range(1, 80, 2)), [80], [81]]
    sampler = PooledSampler(sizes, runs=runs)  # 2 x 300 fresh values would make 9 x 608 = 5,472 < 8,350
    assert sampler.reuse <= 1 and sampler.fresh == 16 * math.ceil(sum(sizes) / 9 / 16)
    for draw in range(5):
        keys = sampler.begin_draw(torch.Generator().manual_seed(draw), draw, {cpu})
        windows = sorted((keys[i], keys[i] + sizes[i]) for i in range(len(sizes)))
        assert all(a[1] <= b[0] for a, b in zip(windows, windows[1:], strict=False))  # no shared value
        for run in runs:
            shape = torch.Size((1, sizes[run[0]]))
            pieces = sampler.noise_pieces([keys[i] for i in run], shape, cpu, torch.float32)
            assert len(pieces) == 1  # one view of the pool
            assert pieces[0][1].data_ptr() == sampler.noise(keys[run[0]], shape, cpu, torch.float32).data_ptr()
    monkeypatch.setattr(flat_lora, "ONE_LAP_POOL_BYTES", 1000)  # now a "large" model: the pool is reused
    reused = PooledSampler(sizes, runs=runs)
    assert reused.fresh == 608 and reused.reuse > 1  # 2 x the largest layer, in whole groups of 16
    assert reused.runs == [[i] for i in range(len(sizes))]
    keys = reused.begin_draw(torch.Generator().manual_seed(0), 0, {cpu})
    run = [keys[i] for i in runs[0]]
    assert any(b != a + 100 for a, b in zip(run, run[1:], strict=False))  # shuffled one by one
    with pytest.raises(ValueError, match="every layer index exactly once"):
        PooledSampler([100] * 3, runs=[[0, 1]])
