"""DiT's own sampler (maskdit.ddpm): the respaced schedule, the ancestral steps against an independent float64
recursion of the DDPM posterior, guidance on some channels, and sample.py / maskdit.evaluate choosing it."""

import numpy as np
import pytest
import torch

from maskdit import create_model
from maskdit.ddpm import RespacedSchedule, ddpm_sample, guided_noise, linear_betas, respaced_steps
from maskdit.edm import DDPMPrecond, EDMPrecond
from maskdit.sampling import ImageNoise

from .test_edm import GaussianNoisePredictor

ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))  # DiT's training schedule


def test_respaced_steps_are_dits():
    """One section of DiT's space_timesteps: 0, then (T - 1)/(K - 1) apart, rounded as Python rounds (ties to even,
    e.g. 166.5 -> 166), accumulated; the lists are what facebookresearch/DiT's create_diffusion(str(K)) keeps."""
    steps = respaced_steps(1000, 250)
    assert len(steps) == 250 and steps[:4] == [0, 4, 8, 12] and steps[-1] == 999
    assert steps == [round(i * 999 / 249) for i in range(250)]  # (no ties at 250: the products are exact)
    assert respaced_steps(1000, 7) == [0, 166, 333, 500, 666, 832, 999]
    assert respaced_steps(100, 13) == [0, 8, 16, 25, 33, 41, 50, 58, 66, 74, 82, 91, 99]
    assert respaced_steps(1000, 1000) == list(range(1000)) and respaced_steps(1000, 1) == [0]
    for bad in (0, 1001):
        with pytest.raises(ValueError, match=r"num_steps must be in \[1, 1000\]"):
            respaced_steps(1000, bad)
    with pytest.raises(ValueError, match="0 < beta_start <= beta_end < 1"):
        linear_betas(1000, 0.02, 1e-4)


def test_the_respaced_process_keeps_the_noise_levels_of_its_steps():
    """Skipping steps keeps abar at the kept steps (the respaced betas multiply up to them); all steps: the betas."""
    betas = linear_betas()
    whole = RespacedSchedule(betas, list(range(1000)))
    np.testing.assert_allclose(whole.betas, betas, rtol=1e-9)
    steps = respaced_steps(1000, 250)
    s = RespacedSchedule(betas, steps)
    np.testing.assert_allclose(s.abar, ABAR[steps], rtol=1e-12)
    assert (s.posterior_variance[1:] > 0).all() and (s.posterior_variance <= s.betas).all()
    assert s.posterior_variance[0] == 0 and s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]
    one = RespacedSchedule(betas, [0])  # one step: nothing adds noise
    assert len(one.posterior_log_variance_clipped) == 0 and one.posterior_mean_coef1[0] == 1


class LinearNoisePredictor(torch.nn.Module):
    """eps = a_t x + b_t (per step, fp64-known), with a constant learned-variance output v (learn_sigma) or none:
    every step's update is then an affine map an independent recursion can follow."""

    num_classes = 0

    def __init__(self, v=None):
        super().__init__()
        self.v = v
        self.seen = []

    @staticmethod
    def coefficients(t):
        return 0.5 + t / 2000, 0.1 * np.sin(t / 50)

    def forward(self, x, t, class_labels=None, ids_keep=None):
        assert t.dtype == torch.float32 and torch.equal(t, t.round()) and (t == t[0]).all()
        self.seen.append(int(t[0]))
        a, b = self.coefficients(float(t[0]))
        eps = a * x + b
        return eps if self.v is None else torch.cat([eps, torch.full_like(x, self.v)], dim=1)


@pytest.mark.parametrize("v", [None, -0.4, 0.7])
def test_each_step_samples_the_posterior_of_the_predicted_x0(v):
    """Against a float64 recursion of the DDPM posterior q(x_s | x_t, x_0) between kept steps s < t, written from the
    formulas: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), mean = sqrt(abar_s) beta / (1 - abar_t) x_0 +
    sqrt(1 - beta) (1 - abar_s) / (1 - abar_t) x_t with beta = 1 - abar_t / abar_s; variance beta_tilde =
    beta (1 - abar_s) / (1 - abar_t), or with a learned v exp(f log beta + (1 - f) log beta_tilde), f = (v + 1)/2,
    and without one beta (DiT's fixed "large" variance); the network sees each kept training step."""
    num_steps = 25
    net = DDPMPrecond(LinearNoisePredictor(v))
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    draws = []

    def randn_like(x):
        draws.append(torch.randn(x.shape, generator=gen).to(x.dtype))
        return draws[-1]

    gen = torch.Generator().manual_seed(1)
    out = ddpm_sample(net, noise, None, num_steps=num_steps, randn_like=randn_like)

    steps = respaced_steps(1000, num_steps)
    assert net.model.seen == steps[::-1] and len(draws) == num_steps - 1  # (no noise after the last step)
    x = noise.double()
    for k in reversed(range(num_steps)):
        t, abar_t = steps[k], ABAR[steps[k]]
        abar_s = ABAR[steps[k - 1]] if k else 1.0
        a, b = LinearNoisePredictor.coefficients(float(t))
        eps = a * x + b
        x0 = (x - np.sqrt(1 - abar_t) * eps) / np.sqrt(abar_t)
        beta = 1 - abar_t / abar_s
        x = np.sqrt(abar_s) * beta / (1 - abar_t) * x0 + np.sqrt(1 - beta) * (1 - abar_s) / (1 - abar_t) * x
        if k:
            beta_tilde = beta * (1 - abar_s) / (1 - abar_t)
            f = None if v is None else (v + 1) / 2
            var = beta if f is None else np.exp(f * np.log(beta) + (1 - f) * np.log(beta_tilde))
            x = x + np.sqrt(var) * draws[num_steps - 1 - k].double()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), x, rtol=1e-4, atol=1e-5)


def test_an_exact_noise_predictor_samples_its_data_distribution():
    """DiT's 250 steps with the exact noise predictor of data N(0, 0.5^2) carry N(0, 1) noise to std 0.5."""
    net = DDPMPrecond(GaussianNoisePredictor(0.5))
    noise = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    out = ddpm_sample(net, noise, None, randn_like=lambda x: torch.randn(x.shape, generator=gen))
    assert abs(out.std().item() - 0.5) < 0.01 and abs(out.mean().item()) < 0.01


class LabelledOutput(torch.nn.Module):
    """Output channel c of sample n: x + 10 label + c (2C channels), recording its inputs."""

    num_classes = 5

    def forward(self, x, t, class_labels=None, ids_keep=None):
        self.seen = x, t, class_labels
        c = torch.arange(2 * x.shape[1], dtype=torch.float32).reshape(1, -1, 1, 1)
        return torch.cat([x, x], dim=1) + 10 * class_labels.float().reshape(-1, 1, 1, 1) + c


def test_guidance_is_dits_on_the_first_channels():
    """As DiT's forward_with_cfg: one batch of (x, labels) and (x, null); the first k noise channels guided,
    eps_u + s (eps_c - eps_u), the other noise channels and the variance the conditional output's."""
    model = LabelledOutput()
    x, t, y = torch.randn(2, 4, 3, 3), torch.tensor([7.0, 7.0]), torch.tensor([1, 3])
    for k in (3, 4, 1):
        out = guided_noise(model, x, t, y, 1.5, k, null_label=5)
        seen_x, seen_t, seen_y = model.seen
        assert torch.equal(seen_x, torch.cat([x, x])) and torch.equal(seen_t, torch.cat([t, t]))
        assert torch.equal(seen_y, torch.tensor([1, 3, 5, 5]))
        cond, uncond = model(x, t, y), model(x, t, torch.tensor([5, 5]))
        torch.testing.assert_close(out[:, :k], uncond[:, :k] + 1.5 * (cond[:, :k] - uncond[:, :k]))
        assert torch.equal(out[:, k:], cond[:, k:])
    assert torch.equal(guided_noise(model, x, t, y, 1.0, 3, 5), model(x, t, y))  # scale 1: conditional alone
    # through the sampler: one step (training step 0) gives x_0 = (x - sqrt(1 - abar_0) eps) / sqrt(abar_0)
    net = DDPMPrecond(model)
    out = ddpm_sample(net, x, y, num_steps=1, cfg_scale=1.5, guided_channels=3)
    eps = guided_noise(model, x, torch.zeros(2), y, 1.5, 3, 5)[:, :4]
    torch.testing.assert_close(out, (x - np.sqrt(1 - ABAR[0]) * eps) / np.sqrt(ABAR[0]), rtol=1e-5, atol=1e-5)
    everything = ddpm_sample(net, x, y, num_steps=1, cfg_scale=1.5, guided_channels=None)
    assert torch.equal(everything[:, :3], out[:, :3]) and not torch.equal(everything[:, 3], out[:, 3])


def test_bad_ddpm_sampling_arguments_are_refused():
    model = create_model("DiT-T/2", input_size=8, in_channels=4, num_classes=3, learn_sigma=True).eval()
    noise = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="needs a DDPM denoiser .* got EDMPrecond"):
        ddpm_sample(EDMPrecond(model), noise, None, num_steps=2)
    for bad in (0, 5):
        with pytest.raises(ValueError, match=r"guided_channels must be in \[1, 4\]"):
            ddpm_sample(DDPMPrecond(model), noise, torch.tensor([0, 1]), num_steps=2, guided_channels=bad)
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 3\] .* got values in \[0, 4\]"):
        ddpm_sample(DDPMPrecond(model), noise, torch.tensor([0, 4]), num_steps=2)

    class ThreeChannels(torch.nn.Module):
        def forward(self, x, t, class_labels=None, ids_keep=None):
            return torch.cat([x, x, x], dim=1)

    with pytest.raises(ValueError, match=r"gives 12 channels for 4-channel inputs: expected 4 \(noise\) or 8"):
        ddpm_sample(DDPMPrecond(ThreeChannels()), noise, None, num_steps=2)


def _converted_dit(tmp_path, monkeypatch):
    """A converted facebookresearch/DiT checkpoint (4-channel latents, learn_sigma), and its latents "decoded" by
    taking 3 channels (no VAE here)."""
    from maskdit import latents
    from maskdit.convert import convert_file

    from .test_convert import official_state_dict

    src, dst = tmp_path / "dit.pt", tmp_path / "dit-converted.pt"
    torch.save(official_state_dict("dit", learn_sigma=True), src)
    convert_file(str(src), str(dst), "dit")
    monkeypatch.setattr(latents, "latent_decoder", lambda ckpt, vae, device: lambda z: z[:, :3].clamp(-1, 1))
    return dst


def test_sample_py_samples_dit_weights_with_dits_sampler(tmp_path, monkeypatch):
    """A DDPM noise predictor's default is DiT's protocol (ddpm, DiT's 3 guided channels), with image i's noise of
    ImageNoise(seed, i) whatever the batch; --sampler edm gives EDM's Heun steps instead."""
    import sample
    from maskdit.config import ModelConfig
    from maskdit.images import to_uint8
    from maskdit.models import DiT

    ckpt_file = _converted_dit(tmp_path, monkeypatch)
    common = ["--ckpt", str(ckpt_file), "--labels", "1", "0", "2", "--steps", "6", "--device", "cpu"]
    _, npz = sample.main(common + ["--batch-size", "2", "--out", str(tmp_path / "a")])
    _, npz3 = sample.main(common + ["--batch-size", "3", "--out", str(tmp_path / "b")])
    images = np.load(npz)["images"]
    assert np.array_equal(images, np.load(npz3)["images"])

    ckpt = torch.load(ckpt_file, weights_only=False)
    model = DiT(ModelConfig.from_dict(ckpt["config"]["model"]))
    model.load_state_dict(ckpt["ema"])
    draws = ImageNoise(0, torch.arange(3))
    expected = ddpm_sample(DDPMPrecond(model.eval()), draws.randn((4, model.input_size, model.input_size)),
                           torch.tensor([1, 0, 2]), num_steps=6, cfg_scale=1.5, guided_channels=3,
                           randn_like=draws.randn_like)
    assert np.array_equal(images, to_uint8(expected[:, :3].clamp(-1, 1), "round"))  # (DiT's pixel rounding)
    _, edm_npz = sample.main(common + ["--sampler", "edm", "--out", str(tmp_path / "c")])
    assert not np.array_equal(np.load(edm_npz)["images"], images)


def test_sampler_options_that_cannot_run_are_refused_before_sampling(tmp_path, monkeypatch):
    import sample
    from maskdit import sampling

    dit = _converted_dit(tmp_path, monkeypatch)
    edm_ckpt = tmp_path / "edm.pt"
    model = create_model("DiT-T/2", input_size=8, in_channels=1, num_classes=3)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "config": {"model": model.config.to_dict()}},
               edm_ckpt)
    monkeypatch.setattr(sampling, "ddpm_sample", lambda *a, **k: pytest.fail("sampled before checking its arguments"))
    monkeypatch.setattr(sampling, "edm_sample", lambda *a, **k: pytest.fail("sampled before checking its arguments"))
    for ckpt, extra, message in [
        (edm_ckpt, ["--sampler", "ddpm"], "--sampler ddpm samples a DDPM noise predictor .* this one is 'edm'"),
        (dit, ["--sampler", "edm", "--cfg-channels", "3"], "--cfg-channels applies to --sampler ddpm"),
        (edm_ckpt, ["--cfg-channels", "1"], "--cfg-channels applies to --sampler ddpm"),
        (dit, ["--s-churn", "5"], "--s-churn, --s-min, --s-max and --s-noise are options of EDM's sampler"),
        (dit, ["--steps", "1001"], "--steps with --sampler ddpm must be at most 1000"),
        (dit, ["--cfg-channels", "5"], r"--cfg-channels must be in \[1, 4\]"),
        (dit, ["--steps", "0"], "--steps must be >= 1"),
        (edm_ckpt, ["--steps", "0"], "--steps must be >= 1"),
        (edm_ckpt, ["--cfg-scale", "nan"], "--cfg-scale must be a finite number, got nan"),
        (dit, ["--cfg-scale", "inf"], "--cfg-scale must be a finite number, got inf"),
        (edm_ckpt, ["--s-churn", "-1"], "--s-churn must be a finite number >= 0, got -1"),
        (edm_ckpt, ["--s-churn", "inf"], "--s-churn must be a finite number >= 0, got inf"),
        (edm_ckpt, ["--s-noise", "nan"], "--s-noise must be a finite number >= 0, got nan"),
        (edm_ckpt, ["--s-min", "-0.5"], "--s-min must be a finite number >= 0"),
        (edm_ckpt, ["--s-min", "2", "--s-max", "1"], "--s-max must be >= --s-min, got --s-min 2.0 and --s-max 1.0"),
    ]:
        with pytest.raises(ValueError, match=message):
            sample.main(["--ckpt", str(ckpt), "--labels", "1", "--device", "cpu", "--out", str(tmp_path / "x"),
                         *extra])


def test_non_finite_samples_are_refused_not_made_black(tmp_path):
    import sample

    model = create_model("DiT-T/2", input_size=8, in_channels=1, num_classes=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["final_layer.bias"][0] = float("nan")  # one output channel of every token
    ckpt = tmp_path / "broken.pt"
    torch.save({"model": state, "ema": state, "config": {"model": model.config.to_dict()}}, ckpt)
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\) for images \[0, 1\]"):
        sample.main(["--ckpt", str(ckpt), "--labels", "1", "2", "--steps", "2", "--device", "cpu",
                     "--out", str(tmp_path / "x")])


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    import sample

    model = create_model("DiT-T/2", input_size=8, in_channels=1, num_classes=3)
    other = create_model("DiT-T/2", input_size=8, in_channels=1, num_classes=4)
    ckpt = tmp_path / "mixed.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "config": {"model": other.config.to_dict()}},
               ckpt)
    with pytest.raises(ValueError, match="(?s)the checkpoint's 'ema' weights do not fit its model config .*mismatch"):
        sample.main(["--ckpt", str(ckpt), "--labels", "1", "--steps", "2", "--device", "cpu",
                     "--out", str(tmp_path / "x")])


def test_evaluate_records_the_sampler_of_its_samples(tmp_path, monkeypatch):
    """maskdit.evaluate samples DiT weights as sample.py does (the same images), records the sampler and its guided
    channels with the samples, and does not continue them with another sampler."""
    import json

    import sample
    from maskdit import evaluate

    dit = str(_converted_dit(tmp_path, monkeypatch))
    out = str(tmp_path / "fid")
    common = ["--ckpt", dit, "--steps", "3", "--device", "cpu", "--batch-size", "2"]
    evaluate.main(common + ["--num-samples", "3", "--class-labels", "balanced", "--outdir", out])
    settings = json.load(open(f"{out}/sampling.json"))
    assert (settings["sampler"], settings["cfg_channels"], settings["steps"]) == ("ddpm", 3, 3)
    _, npz = sample.main(common + ["--labels", "0", "1", "2", "--out", str(tmp_path / "s")])
    np.testing.assert_array_equal(evaluate.load_samples(out)[0], np.load(npz)["images"])
    with pytest.raises(ValueError, match=r"other settings .*'--sampler': \('ddpm', 'edm'\)"):
        evaluate.main(common + ["--num-samples", "3", "--class-labels", "balanced", "--outdir", out,
                                "--sampler", "edm"])


def test_compiled_ddpm_sampling_gives_the_eager_images_and_compiles_once(tmp_path, monkeypatch):
    """--compile full with DiT's sampler compiles the network inside the denoiser (the sampler calls it, not the
    denoiser): one graph for every step and batch (the short last batch filled up), the eager images."""
    from torch._dynamo.utils import counters

    import sample

    dit = _converted_dit(tmp_path, monkeypatch)
    common = ["--ckpt", str(dit), "--labels", "0", "1", "2", "--steps", "4", "--device", "cpu", "--batch-size", "2"]
    _, eager = sample.main(common + ["--out", str(tmp_path / "eager")])
    torch._dynamo.reset()
    counters.clear()
    _, compiled = sample.main(common + ["--out", str(tmp_path / "full"), "--compile", "full"])
    assert counters["stats"]["unique_graphs"] == 1
    assert np.abs(np.load(compiled)["images"].astype(int) - np.load(eager)["images"]).max() <= 4
