import math

import numpy as np
import pytest
import torch

from maskdit import EDMLoss, EDMPrecond, create_model, edm_sample, random_mask
from maskdit.edm import DDPMPrecond, edm_sigma_steps, guided_denoise, make_denoiser
from maskdit.ops import patchify
from maskdit.sampling import ImageNoise, sampling_precision
from tests.conftest import randomize


class Recorder(torch.nn.Module):
    """A stand-in network that returns a fixed output and records what it was called with."""

    def __init__(self, out, patch_size=2, num_classes=10):
        super().__init__()
        self.out, self.patch_size, self.num_classes = out, patch_size, num_classes

    def forward(self, x, noise_labels, class_labels, ids_keep=None):
        self.seen = (x, noise_labels, class_labels, ids_keep)
        return self.out


def test_preconditioning_formulas():
    n, sd = 3, 0.5
    f = torch.randn(n, 2, 4, 4)
    net = EDMPrecond(Recorder(f), sigma_data=sd)
    x = torch.randn(n, 2, 4, 4)
    sigma = torch.tensor([0.01, 0.7, 40.0])
    d = net(x, sigma, torch.tensor([1, 2, 3]))
    seen_x, seen_noise, _, _ = net.model.seen
    for i, s in enumerate(sigma.tolist()):
        c_skip = sd ** 2 / (s ** 2 + sd ** 2)
        c_out = s * sd / math.sqrt(s ** 2 + sd ** 2)
        c_in = 1 / math.sqrt(sd ** 2 + s ** 2)
        torch.testing.assert_close(seen_x[i], c_in * x[i])
        assert seen_noise[i].item() == pytest.approx(math.log(s) / 4, rel=1e-6)
        torch.testing.assert_close(d[i], c_skip * x[i] + c_out * f[i])


def test_precond_uses_first_channels_of_learn_sigma_output():
    f = torch.randn(2, 4, 4, 4)
    d = EDMPrecond(Recorder(f))(torch.zeros(2, 2, 4, 4), torch.ones(2), torch.tensor([0, 1]))
    c_out = 0.5 / math.sqrt(1.25)
    torch.testing.assert_close(d, c_out * f[:, :2])


def hand_loss(D, y, n, sigma, mask, p, mae_coef, sd=0.5):
    """The loss spelled out token by token, straight from the reference formulas."""
    N, C, H, W = y.shape
    out = []
    for i in range(N):
        lam = (sigma[i] ** 2 + sd ** 2) / (sigma[i] * sd) ** 2
        dsm, mae, nv, nm = 0.0, 0.0, 0, 0
        for r in range(H // p):
            for c in range(W // p):
                t = r * (W // p) + c
                sl = (i, slice(None), slice(r * p, r * p + p), slice(c * p, c * p + p))
                if mask is None or not mask[i, t]:
                    dsm += (lam * (D[sl] - y[sl]) ** 2).mean().item()
                    nv += 1
                else:
                    pred = D[sl].permute(1, 2, 0).flatten()  # the (row, col, channel) patch order
                    target = (y[sl] + n[sl]).permute(1, 2, 0).flatten()
                    target = (target - target.mean()) / math.sqrt(target.var(unbiased=True).item() + 1e-6)
                    mae += ((pred - target) ** 2).mean().item()
                    nm += 1
        out.append(dsm / nv + (mae_coef * mae / nm if nm else 0.0))
    return torch.tensor(out)


@pytest.mark.parametrize("masked", [False, True])
def test_loss_against_hand_computation(masked):
    N, C, H, p = 3, 2, 6, 2
    y, eps = torch.randn(N, C, H, H), torch.randn(N, C, H, H)
    sigma = torch.tensor([0.3, 1.1, 7.0])
    f = torch.randn(N, C, H, H)
    net = EDMPrecond(Recorder(f, patch_size=p))
    mk = random_mask(N, 9, 0.5, generator=torch.Generator().manual_seed(2)) if masked else None
    loss = EDMLoss(mae_coef=0.1)(net, y, torch.tensor([0, 1, 2]), mk.ids_keep if masked else None,
                                 sigma=sigma, noise=eps)
    D = net(y + eps * sigma.view(-1, 1, 1, 1), sigma, None)
    expect = hand_loss(D, y, eps * sigma.view(-1, 1, 1, 1), sigma, mk.mask if masked else None, p, 0.1)
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-5)


def test_mae_target_normalisation_near_its_eps():
    """Masked patches whose variance is of the order of the MAE target's eps (1e-6), one of them constant: the
    target (t - mean) / sqrt(var + 1e-6) is then far from what another eps, or the eps outside the root, gives."""
    N, C, H, p = 2, 2, 4, 2
    g = torch.Generator().manual_seed(6)
    y = 0.3 + 1e-3 * torch.randn(N, C, H, H, generator=g)
    y[0, :, :2, :2] = 0.3  # token 0 of sample 0: a constant patch
    noise, sigma = torch.zeros_like(y), torch.tensor([0.5, 2.0])
    net = EDMPrecond(Recorder(torch.randn(N, C, H, H, generator=g), patch_size=p))
    ids_keep = torch.tensor([[3], [1]])  # 3 of 4 tokens masked, token 0 of sample 0 among them
    loss = EDMLoss(mae_coef=1.0)(net, y, torch.tensor([0, 1]), ids_keep, sigma=sigma, noise=noise)
    mask = torch.ones(N, 4, dtype=torch.bool).scatter(1, ids_keep, False)
    expect = hand_loss(net(y, sigma, None), y, noise, sigma, mask, p, 1.0)
    torch.testing.assert_close(loss, expect, rtol=1e-4, atol=0)


def _loss_grad_wrt_output(ids_keep, mae_coef):
    N, C, H, p = 2, 2, 8, 2
    g = torch.Generator().manual_seed(5)
    y, eps = torch.randn(N, C, H, H, generator=g), torch.randn(N, C, H, H, generator=g)
    f = torch.randn(N, C, H, H, generator=g, requires_grad=True)
    net = EDMPrecond(Recorder(f, patch_size=p))
    loss = EDMLoss(mae_coef=mae_coef)(net, y, None, ids_keep, sigma=torch.tensor([0.5, 2.0]), noise=eps)
    (grad,) = torch.autograd.grad(loss.sum(), f)
    return patchify(grad, p).abs().sum(-1)  # (N, L): gradient mass per token


def test_dsm_ignores_masked_and_mae_ignores_visible_tokens():
    mk = random_mask(2, 16, 0.5, generator=torch.Generator().manual_seed(4))
    # DSM only (mae_coef 0): no gradient at masked tokens
    g_dsm = _loss_grad_wrt_output(mk.ids_keep, 0.0)
    assert (g_dsm[mk.mask] == 0).all() and (g_dsm[~mk.mask] > 0).all()
    # the MAE part alone: total minus DSM has gradient only at masked tokens
    g_both = _loss_grad_wrt_output(mk.ids_keep, 0.1)
    torch.testing.assert_close(g_both[~mk.mask], g_dsm[~mk.mask])
    assert (g_both[mk.mask] > 0).all()


def test_loss_without_mask_is_plain_dsm():
    y, eps, sigma = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.tensor([0.2, 3.0])
    f = torch.randn(2, 1, 4, 4)
    net = EDMPrecond(Recorder(f))
    loss = EDMLoss()(net, y, None, sigma=sigma, noise=eps)
    D = net(y + eps * sigma.view(-1, 1, 1, 1), sigma, None)
    lam = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(loss, lam * (D - y).square().mean((1, 2, 3)))


def test_sigma_distribution():
    s = EDMLoss().sample_sigma(200_000, "cpu", torch.Generator().manual_seed(0)).log()
    assert s.mean().item() == pytest.approx(-1.2, abs=0.02)
    assert s.std().item() == pytest.approx(1.2, abs=0.02)


def _rho_7_steps(num_steps):
    """EDM's noise levels (eq. 5) from sigma 80 to 0.002 with rho = 7, the paper's and the official samplers'."""
    return [(80 ** (1 / 7) + i / (num_steps - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(num_steps)]


def test_sigma_steps():
    t = edm_sigma_steps(40)
    assert len(t) == 41 and t[0].item() == pytest.approx(80) and t[39].item() == pytest.approx(0.002)
    assert t[40] == 0 and (t[:-1] > t[1:]).all()
    assert t[:40].tolist() == pytest.approx(_rho_7_steps(40), rel=1e-12)  # every step, by default


def test_sampler_evaluates_the_network_at_the_rho_7_steps():
    """edm_sample's own defaults (no schedule argument passed) visit EDM's rho = 7 noise levels, each step's
    sigma then (Heun's correction) the next one's."""
    seen = []

    class Denoiser(torch.nn.Module):
        model = Recorder(None)

        def forward(self, x, sigma, class_labels=None, ids_keep=None):
            seen.append(float(torch.as_tensor(sigma).reshape(-1)[0]))
            return torch.zeros_like(x)

    edm_sample(Denoiser(), torch.randn(1, 1, 2, 2), num_steps=6, cfg_scale=None)
    steps = _rho_7_steps(6)
    want = [s for i in range(5) for s in (steps[i], steps[i + 1])] + [steps[5]]
    assert seen == pytest.approx(want, rel=1e-6)


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser E[y | y + sigma eps] for data y ~ N(mu, s^2) per element."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s = mu, s
        self.model = Recorder(None)

    def forward(self, x, sigma, class_labels=None, ids_keep=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return self.mu + self.s ** 2 / (self.s ** 2 + sigma ** 2) * (x - self.mu)


def test_sampler_with_exact_denoiser_recovers_the_data_distribution():
    mu, s = 0.3, 0.6
    noise = torch.randn(4000, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x = edm_sample(GaussianDenoiser(mu, s), noise, None, num_steps=40)
    assert x.mean().item() == pytest.approx(mu, abs=0.01)
    assert x.std().item() == pytest.approx(s, rel=0.01)


def _algorithm_2(denoise, noise, num_steps, s_churn, s_min, s_max, s_noise, randn_like):
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) written out step by step, for comparison."""
    t = edm_sigma_steps(num_steps)
    x = noise.double() * t[0]
    for i in range(num_steps):
        gamma = min(s_churn / num_steps, math.sqrt(2) - 1) if s_min <= t[i] <= s_max else 0.0
        t_hat = t[i] + gamma * t[i]
        x_hat = x + math.sqrt(t_hat ** 2 - t[i] ** 2) * s_noise * randn_like(x)
        d = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x = x_hat + (t[i + 1] - t_hat) * d
        if t[i + 1] != 0:
            d2 = (x - denoise(x, t[i + 1])) / t[i + 1]
            x = x_hat + (t[i + 1] - t_hat) * (d + d2) / 2
    return x.float()


@pytest.mark.parametrize("s_churn,s_min,s_max", [(0.0, 0.0, float("inf")), (10.0, 0.05, 50.0), (80.0, 0.0, 1e9)])
def test_stochastic_sampler_follows_edm_algorithm_2(s_churn, s_min, s_max):
    """s_churn > 0: noise added back at the steps with s_min <= sigma <= s_max (gamma capped at sqrt(2) - 1),
    from ``randn_like`` (per-image generators), as EDM's Algorithm 2; s_churn 0 is the deterministic sampler."""
    mu, s = 0.3, 0.6
    den = GaussianDenoiser(mu, s)
    idx = torch.arange(5)
    draws_a, draws_b = ImageNoise(7, idx), ImageNoise(7, idx)
    noise = draws_a.randn((1, 4, 4))
    assert torch.equal(noise, draws_b.randn((1, 4, 4)))
    got = edm_sample(den, noise, None, num_steps=12, s_churn=s_churn, s_min=s_min, s_max=s_max, s_noise=1.007,
                     randn_like=draws_a.randn_like)
    want = _algorithm_2(lambda x, t: den(x.float(), t.float()).double(), noise, 12, s_churn, s_min, s_max, 1.007,
                        draws_b.randn_like)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    if s_churn > 0:  # a draw at every step, as the official sampler makes (also where gamma is 0)
        assert torch.equal(draws_a.randn((1,)), draws_b.randn((1,)))
    else:
        assert torch.equal(got, edm_sample(den, noise, None, num_steps=12))


def test_stochastic_sampler_recovers_the_data_distribution():
    """With the exact denoiser of Gaussian data the churned sampler's samples have the data's mean and spread
    (its discretisation error is larger than the deterministic one's: 200 steps here; at 40 steps and this
    churn the spread came out 4% high, 1.3% at 100 steps)."""
    mu, s = 0.3, 0.6
    g = torch.Generator().manual_seed(0)
    x = edm_sample(GaussianDenoiser(mu, s), torch.randn(8000, 1, 4, 4, generator=g), None, num_steps=200,
                   s_churn=100, s_min=0.05, s_max=50, randn_like=lambda v: torch.randn(v.shape, generator=g,
                                                                                   dtype=v.dtype))
    assert x.mean().item() == pytest.approx(mu, abs=0.01)
    assert x.std().item() == pytest.approx(s, rel=0.01)


def test_stochastic_sampler_rejects_bad_options_and_is_batch_independent():
    den = GaussianDenoiser(0.0, 0.5)
    noise = torch.randn(2, 1, 4, 4)
    for bad in (dict(s_churn=-1), dict(s_noise=-0.5), dict(s_min=2.0, s_max=1.0)):
        with pytest.raises(ValueError, match="s_churn >= 0"):
            edm_sample(den, noise, None, num_steps=3, **bad)
    for bad in (dict(sigma_min=0.0), dict(sigma_min=2.0, sigma_max=1.0), dict(rho=0.0), dict(sigma_max=float("inf"))):
        with pytest.raises(ValueError, match="need 0 < sigma_min <= sigma_max < inf and 0 < rho < inf"):
            edm_sample(den, noise, None, num_steps=3, **bad)
    with pytest.raises(ValueError, match="cfg_scale must be a finite number or None, got nan"):
        edm_sample(den, noise, torch.zeros(2, dtype=torch.long), num_steps=3, cfg_scale=float("nan"), null_label=1)
    with pytest.raises(ValueError, match="x holds 2 images, these generators 3"):
        ImageNoise(0, torch.arange(3)).randn_like(noise)

    def run(index):
        draws = ImageNoise(3, index)
        return edm_sample(den, draws.randn((1, 4, 4)), None, num_steps=6, s_churn=20, randn_like=draws.randn_like)

    whole = run(torch.arange(4))
    torch.testing.assert_close(torch.cat([run(torch.arange(2)), run(torch.arange(2, 4))]), whole, atol=0, rtol=0)


def test_sampler_is_deterministic_for_a_seed():
    model = randomize(create_model("MaskDiT-T/2", input_size=8, in_channels=1, num_classes=3), std=0.02)
    net = EDMPrecond(model).eval()
    labels = torch.tensor([0, 1, 2])

    def run(seed):
        return edm_sample(net, torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(seed)), labels,
                          num_steps=4)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_cfg():
    model = randomize(create_model("DiT-T/2", input_size=8, in_channels=1, num_classes=3), std=0.05)
    net = EDMPrecond(model).eval()
    x, sigma, y = torch.randn(3, 1, 8, 8), torch.tensor(1.3), torch.tensor([0, 1, 2])
    with torch.no_grad():
        cond = net(x, sigma, y)
        uncond = net(x, sigma, torch.full_like(y, 3))
        # the batched guided evaluation at scale 1 is the conditional model
        torch.testing.assert_close(guided_denoise(net, x, sigma, y, 1.0 + 1e-12, 3), cond, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(guided_denoise(net, x, sigma, y, 2.5, 3), uncond + 2.5 * (cond - uncond),
                                   rtol=1e-5, atol=1e-5)
        assert not torch.allclose(cond, uncond)
        # a sigma per sample: each sample guided at its own noise level
        sigmas = torch.tensor([0.3, 1.3, 7.0])
        guided = guided_denoise(net, x, sigmas, y, 2.5, 3)
        for i in range(3):
            one = guided_denoise(net, x[i:i + 1], sigmas[i], y[i:i + 1], 2.5, 3)
            torch.testing.assert_close(guided[i:i + 1], one, rtol=1e-5, atol=1e-5)
    noise = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(edm_sample(net, noise, y, num_steps=3, cfg_scale=1.0),
                               edm_sample(net, noise, y, num_steps=3, cfg_scale=None))


def test_sampling_precisions():
    """bf16 runs the network under autocast (its matrix products in bfloat16: close to fp32, not equal), the
    preconditioning and the Heun updates in fp32/fp64; fp32 turns TF32 off inside and restores the flags;
    tf32 needs CUDA."""
    model = randomize(create_model("MaskDiT-T/2", input_size=8, in_channels=1, num_classes=3), std=0.05)
    net = EDMPrecond(model).eval()
    noise, labels, cpu = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2]), torch.device("cpu")
    seen = []
    forward = model.forward

    def spy(x, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), x.dtype))
        return forward(x, *args, **kwargs)

    model.forward = spy
    with sampling_precision("fp32", cpu):
        full = edm_sample(net, noise, labels, num_steps=3)
    assert seen and set(seen) == {(False, torch.float32)}
    seen.clear()
    with sampling_precision("bf16", cpu):
        half = edm_sample(net, noise, labels, num_steps=3)
    assert seen and set(seen) == {(True, torch.float32)}  # the network's input stays fp32; autocast casts inside
    assert half.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    assert not torch.equal(half, full)
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.05)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with sampling_precision("fp32", cpu):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    with pytest.raises(ValueError, match="--precision tf32 needs a CUDA device"), sampling_precision("tf32", cpu):
        pass
    with pytest.raises(ValueError, match="--precision must be one of"), sampling_precision("fp16", cpu):
        pass


def test_ddpm_preconditioning_is_dits_schedule_and_noise_prediction():
    """DiT's 1000 linear-beta steps as noise levels sigma_t = sqrt((1 - abar_t)/abar_t); the network sees the DDPM
    input x_t = x / sqrt(1 + sigma_t^2) and its step t; D = x - sigma eps (first C of a learn_sigma output)."""
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    eps = torch.randn(3, 4, 4, 4)  # (learn_sigma: 2C = 4 channels for C = 2)
    net = DDPMPrecond(Recorder(eps))
    np.testing.assert_allclose(net.sigmas.numpy(), np.sqrt((1 - abar) / abar), rtol=1e-6)
    steps = torch.tensor([0, 1, 17, 500, 998, 999])
    assert torch.equal(net.timestep(net.sigmas[steps]), steps)
    between = (net.sigmas[:-1] * 0.3 + net.sigmas[1:] * 0.7)  # nearer the upper step
    assert torch.equal(net.timestep(between), torch.arange(1, 1000))
    assert net.round_sigma(torch.tensor(1e-5)) == net.sigmas[0] and net.round_sigma(torch.tensor(1e4)) == net.sigmas[-1]
    x, t = torch.randn(3, 2, 4, 4), torch.tensor([3, 250, 990])
    sigma = net.sigmas[t]
    d = net(x, sigma, torch.tensor([1, 2, 3]))
    seen_x, seen_t, seen_y, _ = net.model.seen
    a = torch.from_numpy(abar[t.numpy()]).float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(seen_x, a.sqrt() * x, rtol=1e-5, atol=1e-6)
    assert torch.equal(seen_t, t.float()) and torch.equal(seen_y, torch.tensor([1, 2, 3]))
    torch.testing.assert_close(d, x - sigma.reshape(-1, 1, 1, 1) * eps[:, :2], rtol=1e-6, atol=1e-6)
    assert isinstance(make_denoiser(Recorder(eps), "ddpm-eps"), DDPMPrecond)
    with torch.device("meta"):  # the noise levels live on the network's device (no host copies per call on CUDA)
        on_meta = DDPMPrecond(create_model("DiT-T/2", input_size=8, in_channels=1, num_classes=3))
    assert on_meta.sigmas.device.type == "meta" and on_meta.sigma_max == net.sigma_max
    assert isinstance(make_denoiser(Recorder(eps)), EDMPrecond)
    with pytest.raises(ValueError, match="parameterization must be one of"):
        make_denoiser(Recorder(eps), "v-prediction")


class GaussianNoisePredictor(torch.nn.Module):
    """The exact DDPM noise predictor for data N(0, s^2): E[eps | x_t] = sqrt(1 - abar) x_t / (abar s^2 + 1 - abar)."""

    num_classes = 0

    def __init__(self, s):
        super().__init__()
        self.s = s
        self.abar = 1 / (1 + DDPMPrecond(torch.nn.Identity()).sigmas.double() ** 2)

    def forward(self, x, t, class_labels=None, ids_keep=None):
        assert torch.equal(t, t.round())  # whole steps
        a = self.abar[t.long()].reshape(-1, 1, 1, 1)
        return ((1 - a).sqrt() * x / (a * self.s ** 2 + 1 - a)).float()


def test_heun_sampling_of_a_ddpm_noise_predictor_gives_its_data_distribution():
    """Through DDPMPrecond, EDM's Heun steps (rounded to the model's noise levels) carry N(0, sigma_max^2) noise
    to the data distribution of an exact DDPM model: data N(0, 0.5^2) comes out with std 0.5."""
    net = DDPMPrecond(GaussianNoisePredictor(0.5))
    noise = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    out = edm_sample(net, noise, None, num_steps=40, cfg_scale=None)
    assert abs(out.std().item() - 0.5) < 0.01 and abs(out.mean().item()) < 0.01


def test_bad_loss_settings_and_sampling_labels_are_refused():
    with pytest.raises(ValueError, match="mae_coef >= 0"):
        EDMLoss(mae_coef=-1)
    with pytest.raises(ValueError, match="P_std > 0"):
        EDMLoss(P_std=0)
    net = EDMPrecond(create_model("DiT-T/2", input_size=8, in_channels=1, num_classes=3)).eval()
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 3\] .* got values in \[0, 7\]"):
        edm_sample(net, torch.randn(2, 1, 8, 8), torch.tensor([0, 7]), num_steps=1)


def test_the_sampler_steps_through_the_denoisers_own_noise_levels():
    """With a discrete-time denoiser (round_sigma, sigma_min, sigma_max) every noise level the Heun sampler
    evaluates, the raised ones of stochastic steps too, is one of the denoiser's, within its range."""
    class Spy(DDPMPrecond):
        def forward(self, x, sigma, class_labels=None, ids_keep=None):
            self.seen.append(torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)[0])
            return super().forward(x, sigma, class_labels, ids_keep)

    net = Spy(GaussianNoisePredictor(0.5))
    for churn in (0.0, 40.0):
        net.seen = []
        noise = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
        edm_sample(net, noise, None, num_steps=8, cfg_scale=None, s_churn=churn, s_min=0.05, s_max=50.0)
        seen = torch.stack(net.seen)
        assert len(seen) == 15 and torch.isin(seen, net.sigmas).all(), seen
        assert seen[0] == net.round_sigma(torch.tensor(80.0)) and seen.min() >= net.sigma_min  # (80: rounded)
