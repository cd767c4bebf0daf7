import json
import os
import socket
import sys
import types
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sample
import train
from maskdit import create_model, evaluate, sampling
from maskdit.checkpoint import atomic_save
from maskdit.fid import (
    InceptionFeatures,
    InceptionUnavailableError,
    StatsAccumulator,
    feature_statistics,
    frechet_distance,
    load_reference_stats,
    save_stats,
)

FAST = ["--image-size", "8", "--batch-size", "16", "--log-every", "2", "--grid-per-class", "0", "--device", "cpu"]
SAMPLE = ["--steps", "2", "--seed", "3", "--device", "cpu"]  # 2 Heun steps: 3 network evaluations


def scipy_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """The usual reference formula (pytorch-fid / ADM): scipy's sqrtm of sigma1 sigma2."""
    linalg = pytest.importorskip("scipy.linalg")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real)


def random_stats(rng, n, d, rank=None, scale=1.0, offset=0.0):
    x = rng.normal(size=(n, rank or d))
    if rank is not None:
        x = x @ rng.normal(size=(rank, d))
    x = x * scale + offset
    return x.mean(axis=0), np.cov(x, rowvar=False)


# --- the Frechet distance ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("d, rank", [(8, None), (64, None), (64, 10), (96, 30)])
def test_frechet_distance_matches_scipy(d, rank):
    pytest.importorskip("scipy")
    rng = np.random.default_rng(d + (rank or 0))
    mu1, s1 = random_stats(rng, 4 * d, d, rank)
    mu2, s2 = random_stats(rng, 4 * d, d, rank, scale=1.3, offset=0.2)
    expected = scipy_frechet(mu1, s1, mu2, s2)
    got = frechet_distance(mu1, s1, mu2, s2)
    # scipy's sqrtm of a singular product is itself only accurate to about 1e-8 relative
    assert got == pytest.approx(expected, rel=1e-9 if rank is None else 1e-6)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-8)  # symmetric


@pytest.mark.parametrize("rank", [None, 5])
def test_identical_statistics_give_zero(rank):
    mu, sigma = random_stats(np.random.default_rng(0), 200, 32, rank, offset=3.0)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    assert frechet_distance(torch.from_numpy(mu), torch.from_numpy(sigma), mu, sigma) < 1e-8  # tensors too


def test_gaussian_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert frechet_distance([0.5], [[4.0]], [-1.0], [[0.25]]) == pytest.approx(1.5 ** 2 + 1.5 ** 2, rel=1e-12)
    # diagonal covariances: the sum over the dimensions
    m1, m2 = np.array([1.0, 2.0, 0.0]), np.array([0.0, 2.0, 3.0])
    v1, v2 = np.array([1.0, 9.0, 0.0]), np.array([4.0, 1.0, 0.0])
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_rejects_bad_inputs():
    mu, sigma = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(mu, sigma, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(mu, sigma * np.nan, mu, sigma)


# --- statistics and reference files ------------------------------------------------------------------------------

def test_feature_statistics_match_numpy():
    x = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32) * 0.01 + 1000  # large mean, small spread
    mu, sigma = feature_statistics(x)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mu, x64.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x64, rowvar=False), rtol=1e-9, atol=1e-15)
    assert mu.dtype == sigma.dtype == np.float64
    mu_t, sigma_t = feature_statistics(torch.from_numpy(x))
    np.testing.assert_array_equal(mu_t, mu)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(x[:1])


def test_accumulator_chunks_and_merged_sums_match():
    x = np.random.default_rng(1).normal(size=(101, 8)) + 0.5
    whole = StatsAccumulator(8)
    whole.update(x, chunk_size=7)
    a, b = StatsAccumulator(8), StatsAccumulator(8)  # two "processes": rows r, r+2, ...
    a.update(x[0::2])
    b.update(x[1::2])
    merged = StatsAccumulator(8)
    merged.load_tensors(a.tensors() + b.tensors())  # what all_reduce does
    for acc in (whole, merged):
        mu, sigma = acc.statistics()
        np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-14)
    assert merged.count == 101
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        whole.update(x[:, :3])


def test_reference_stats_files(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = random_stats(rng, 50, 6)
    adm = tmp_path / "VIRTUAL_like.npz"  # ADM's layout: images as arr_0, plus mu and sigma
    np.savez(adm, arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu.astype(np.float32), sigma=sigma)
    ref = load_reference_stats(str(adm))
    np.testing.assert_allclose(ref.mu, mu, rtol=1e-6)
    assert ref.mu.dtype == ref.sigma.dtype == np.float64 and ref.sigma.shape == (6, 6)
    save_stats(str(tmp_path / "sub" / "mine.npz"), mu, sigma)
    again = load_reference_stats(str(tmp_path / "sub" / "mine.npz"))
    np.testing.assert_array_equal(again.mu, mu)
    np.testing.assert_array_equal(again.sigma, sigma)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reference_stats(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "images_only.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"lacks \['mu', 'sigma'\].*arr_0"):
        load_reference_stats(str(tmp_path / "images_only.npz"))
    np.savez(tmp_path / "no_sigma.npz", mu=mu)
    with pytest.raises(ValueError, match=r"lacks \['sigma'\]"):
        load_reference_stats(str(tmp_path / "no_sigma.npz"))
    np.savez(tmp_path / "bad_shape.npz", mu=mu, sigma=sigma[:3])
    with pytest.raises(ValueError, match="shapes"):
        load_reference_stats(str(tmp_path / "bad_shape.npz"))
    (tmp_path / "text.npz").write_text("not a zip file")
    with pytest.raises(ValueError, match="cannot read"):
        load_reference_stats(str(tmp_path / "text.npz"))
    np.save(tmp_path / "array.npy", mu)
    with pytest.raises(ValueError, match="single array"):
        load_reference_stats(str(tmp_path / "array.npy"))


# --- Inception: clear errors without torch-fidelity or its weights -----------------------------------------------

def fake_torch_fidelity(monkeypatch, error):
    """Install a stand-in torch_fidelity whose Inception extractor raises ``error`` when built (as offline)."""
    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.URL_INCEPTION_V3 = "https://example.invalid/weights-inception.pth"

    class FeatureExtractorInceptionV3:
        def __init__(self, name, features_list, feature_extractor_weights_path=None):
            raise error

    module.FeatureExtractorInceptionV3 = FeatureExtractorInceptionV3
    package = types.ModuleType("torch_fidelity")
    package.feature_extractor_inceptionv3 = module
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)


def tiny_images_npz(path, n=4, size=8, channels=3):
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    np.savez(path, arr_0=images)
    return str(path)


def test_missing_torch_fidelity_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(InceptionUnavailableError, match="pip install torch-fidelity"):
        InceptionFeatures()
    with pytest.raises(SystemExit) as e:  # the CLI: one line, no stack trace
        evaluate.cli(["--write-stats", tiny_images_npz(tmp_path / "imgs.npz"), "--out", str(tmp_path / "s.npz"),
                      "--device", "cpu"])
    assert str(e.value).startswith("error: FID needs the optional package torch-fidelity")
    assert "\n" not in str(e.value) and not (tmp_path / "s.npz").exists()


def test_offline_inception_weights_are_a_clear_error(tmp_path, monkeypatch):
    fake_torch_fidelity(monkeypatch, urllib.error.URLError("[Errno -2] Name or service not known"))
    with pytest.raises(InceptionUnavailableError, match="offline") as e:
        InceptionFeatures()
    assert "--inception-weights" in str(e.value) and "weights-inception-2015-12-05" in str(e.value)
    with pytest.raises(InceptionUnavailableError, match="does not exist"):
        InceptionFeatures(weights_path=str(tmp_path / "nope.pth"))
    with pytest.raises(SystemExit, match="^error: cannot obtain torch-fidelity's Inception-v3 weights offline"):
        evaluate.cli(["--write-stats", tiny_images_npz(tmp_path / "imgs.npz"), "--out", str(tmp_path / "s.npz"),
                      "--device", "cpu"])


def test_inception_features_with_torch_fidelity(monkeypatch):
    """Only where torch-fidelity is installed: the real network (random weights: nothing is downloaded)."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    features = InceptionFeatures()
    gray = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)
    out = features(gray)
    assert out.shape == (2, 2048) and out.dtype == np.float32
    np.testing.assert_array_equal(out, features(np.repeat(gray, 3, axis=-1)))  # gray = RGB with equal channels
    with pytest.raises(ValueError, match="uint8"):
        features(gray.astype(np.float32))


# --- evaluate: sampling, statistics and FID ----------------------------------------------------------------------

class StubFeatures:
    """A deterministic stand-in for InceptionFeatures: 2x2 average-pooled RGB values and their squares."""

    dim = 24

    def __init__(self, device="cpu", weights_path=None):
        pass

    def __call__(self, images):
        x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).expand(-1, 3, -1, -1).double() / 255
        f = F.adaptive_avg_pool2d(x, 2).flatten(1)
        return torch.cat([f, f.square()], dim=1).float().numpy()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A MaskDiT-T/2 on 8x8 digits (10 classes) after 2 training steps."""
    run = tmp_path_factory.mktemp("run")
    train.main(FAST + ["--out", str(run), "--steps", "2", "--batch-size", "8", "--ckpt-every", "1000"])
    return str(run)


def test_samples_do_not_depend_on_batch_size(ckpt, tmp_path):
    for bs in (3, 5):
        evaluate.main(["--ckpt", ckpt, "--num-samples", "7", "--batch-size", str(bs), "--outdir",
                       str(tmp_path / f"bs{bs}"), *SAMPLE])
    images, labels = evaluate.load_samples(str(tmp_path / "bs3"))
    images5, labels5 = evaluate.load_samples(str(tmp_path / "bs5"))
    assert images.shape == (7, 8, 8, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, images5)
    # uniform random classes drawn from the seed (the official protocol), whatever the batches
    np.testing.assert_array_equal(labels, evaluate.sample_labels(7, 10, 3).numpy())  # (SAMPLE: seed 3)
    np.testing.assert_array_equal(labels5, labels)
    assert len(np.unique(images.reshape(7, -1), axis=0)) == 7
    # the same images as sample.py with those labels and the same seed
    _, npz = sample.main(["--ckpt", ckpt, "--labels", *map(str, labels), "--out", str(tmp_path / "s"), *SAMPLE])
    np.testing.assert_array_equal(np.load(npz)["images"], images)
    # and in bf16, the same in both scripts again (close to the fp32 images, not equal)
    evaluate.main(["--ckpt", ckpt, "--num-samples", "7", "--outdir", str(tmp_path / "bf16"), "--precision", "bf16",
                   *SAMPLE])
    _, npz = sample.main(["--ckpt", ckpt, "--labels", *map(str, labels), "--out", str(tmp_path / "s16"),
                          "--precision", "bf16", *SAMPLE])
    images16 = evaluate.load_samples(str(tmp_path / "bf16"))[0]
    np.testing.assert_array_equal(np.load(npz)["images"], images16)
    assert not np.array_equal(images16, images)
    assert np.abs(images16.astype(int) - images).mean() < 8  # of 255


@pytest.mark.parametrize("mode", ["regional", "full"])
def test_compiled_sampling_gives_the_eager_images_and_compiles_once(ckpt, tmp_path, mode):
    """--compile: the same images as eager (up to Inductor's float rounding, a few of 255 steps at most), one
    compilation for the whole run: the last, short batch (7 = 3 + 3 + 1) is filled up to --batch-size."""
    from torch._dynamo.utils import counters

    def graphs_compiled(num_samples: int, outdir: str, compile_mode: str) -> int:
        torch._dynamo.reset()
        counters.clear()
        evaluate.main(["--ckpt", ckpt, "--num-samples", str(num_samples), "--batch-size", "3", "--outdir",
                       str(tmp_path / outdir), "--compile", compile_mode, *SAMPLE])
        return counters["stats"]["unique_graphs"]

    graphs_compiled(7, "eager", "none")
    one_batch = graphs_compiled(3, "one-batch", mode)  # (short last batches compiled anew: 2, 7 graphs, not 1, 3)
    assert one_batch >= 1 and graphs_compiled(7, mode, mode) == one_batch
    images, labels = evaluate.load_samples(str(tmp_path / mode))
    eager_images, eager_labels = evaluate.load_samples(str(tmp_path / "eager"))
    np.testing.assert_array_equal(labels, eager_labels)
    assert images.shape == eager_images.shape == (7, 8, 8, 1)
    assert np.abs(images.astype(int) - eager_images).max() <= 4
    # a run of fewer images than --batch-size is drawn as one batch of them, eager runs are never filled up
    from maskdit.sampling import sampling_fill
    fill = [sampling_fill(sample.parse_args(["--ckpt", ckpt, "--batch-size", "3", *flags]), n)
            for flags, n in (([], 7), (["--compile", mode], 7), (["--compile", mode], 2))]
    assert fill == [0, 3, 2]
    # sample.py takes the same flag; "--compile" alone means full
    assert sample.parse_args(["--ckpt", ckpt, "--compile"]).compile == "full"
    with pytest.raises(SystemExit):
        sample.parse_args(["--ckpt", ckpt, "--compile", "blocks"])


def test_saved_stats_survive_a_write_that_dies(tmp_path, monkeypatch):
    """save_stats writes atomically: a write that fails half way leaves the previous file whole and no partial
    file; a path without .npz gets it, as np.savez names it."""
    mu, sigma = random_stats(np.random.default_rng(1), 20, 4)
    save_stats(str(tmp_path / "ref"), mu, sigma)
    assert os.listdir(tmp_path) == ["ref.npz"]
    real = np.savez

    def dies(f, **arrays):
        real(f, **arrays)
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", dies)
    with pytest.raises(OSError, match="disk full"):
        save_stats(str(tmp_path / "ref.npz"), mu + 1, sigma)
    assert os.listdir(tmp_path) == ["ref.npz"]
    np.testing.assert_array_equal(load_reference_stats(str(tmp_path / "ref.npz")).mu, mu)


def test_write_stats_and_fid_end_to_end(ckpt, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(evaluate, "InceptionFeatures", StubFeatures)
    rng = np.random.default_rng(0)
    for i in range(12):  # real images of another size, in nested folders: center-cropped to 8x8
        folder = tmp_path / "real" / f"c{i % 2}" / ("deep" if i % 3 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    stats = str(tmp_path / "ref.npz")
    mu_ref, sigma_ref = evaluate.main(["--write-stats", str(tmp_path / "real"), "--out", stats, "--resolution", "8",
                                       "--batch-size", "5", "--num-workers", "0", "--device", "cpu"])
    assert mu_ref.shape == (StubFeatures.dim,) and os.path.isfile(stats)

    out = tmp_path / "eval"
    result = evaluate.main(["--ckpt", ckpt, "--num-samples", "10", "--batch-size", "4", "--ref", stats,
                            "--outdir", str(out), "--cfg-scale", "2", *SAMPLE])
    images, _ = evaluate.load_samples(str(out))
    mu, sigma = feature_statistics(StubFeatures()(images))
    # 10 samples of 24-d features: singular covariances, whose zero eigenvalues carry rounding noise of ~1e-17,
    # ~3e-9 after the square root: agreement to 1e-6, not to float64 precision
    assert result["fid"] == pytest.approx(frechet_distance(mu, sigma, mu_ref, sigma_ref), rel=1e-6)
    assert result["fid"] > 0
    saved = json.loads((out / "fid.json").read_text())
    assert saved == result
    assert {k: saved[k] for k in ("num_samples", "cfg_scale", "steps", "precision")} == \
        {"num_samples": 10, "cfg_scale": 2.0, "steps": 2, "precision": "fp32"}
    assert saved["ckpt"].endswith(".pt") and "date" in saved
    np.testing.assert_allclose(load_reference_stats(str(out / "stats.npz")).mu, mu, rtol=1e-9)


def test_an_interrupted_evaluation_continues_where_it_stopped(ckpt, tmp_path, monkeypatch):
    """Part files every 4 samples; a crash in the 4th batch leaves 6 samples, which the rerun keeps (drawing the
    other 5): the same samples, statistics and FID as one uninterrupted run.  Another rerun draws nothing."""
    monkeypatch.setattr(evaluate, "InceptionFeatures", StubFeatures)
    monkeypatch.setattr(evaluate, "PART_IMAGES", 4)
    ref = str(tmp_path / "ref.npz")
    save_stats(ref, *random_stats(np.random.default_rng(0), 50, StubFeatures.dim, scale=0.1, offset=0.5))
    common = ["--ckpt", ckpt, "--num-samples", "11", "--batch-size", "2", "--ref", ref, *SAMPLE]
    whole = evaluate.main(common + ["--outdir", str(tmp_path / "whole")])
    sample_batch, calls, crash = sampling.edm_sample, [], [True]

    def crash_in_batch_4(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 4 and crash:
            crash.clear()
            raise RuntimeError("preempted")
        return sample_batch(*args, **kwargs)

    monkeypatch.setattr(sampling, "edm_sample", crash_in_batch_4)  # (what maskdit.sampling.draw_images calls)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="preempted"):
        evaluate.main(common + ["--outdir", str(out)])
    files = sorted(set(os.listdir(out)) - {".lock"})  # (.lock: the evaluation's lock on its --outdir)
    assert files == ["part-rank000-of-001-0000000.npz", "sampling.json"]  # samples 0-3
    calls.clear()
    resumed = evaluate.main(common + ["--outdir", str(out)])
    assert calls == [2, 2, 2, 1]  # samples 4-10
    files = sorted(set(os.listdir(out)) - {".lock"})
    assert files == ["fid.json", "samples-rank000-of-001.npz", "sampling.json", "stats.npz"]
    for a, b in zip(evaluate.load_samples(str(out)), evaluate.load_samples(str(tmp_path / "whole"))):
        np.testing.assert_array_equal(a, b)
    assert resumed["fid"] == pytest.approx(whole["fid"], rel=1e-9) and resumed["num_samples"] == 11
    calls.clear()
    assert evaluate.main(common + ["--outdir", str(out)])["fid"] == pytest.approx(whole["fid"], rel=1e-9)
    assert calls == []
    with pytest.raises(ValueError, match=r"--outdir .* holds samples of other settings .*'--cfg-scale': \(1.5, 2.0\)"):
        evaluate.main(common + ["--outdir", str(out), "--cfg-scale", "2"])


def test_other_weights_under_the_same_file_name_are_not_continued(ckpt, tmp_path, monkeypatch):
    """A converted checkpoint converted again from another file: the same path and step (0), other weights."""
    monkeypatch.setattr(evaluate, "InceptionFeatures", StubFeatures)
    state = torch.load(evaluate.resolve_checkpoint(ckpt), weights_only=False)
    copy = str(tmp_path / "converted.pt")
    torch.save(state, copy)
    common = ["--ckpt", copy, "--num-samples", "2", "--batch-size", "2", "--outdir", str(tmp_path / "out"), *SAMPLE]
    evaluate.main(common)
    state["ema"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["ema"].items()}
    torch.save(state, copy)
    with pytest.raises(ValueError, match=r"other settings .*\"the weights' SHA-256\": \('[0-9a-f]{64}', "
                                         r"'[0-9a-f]{64}'\)"):
        evaluate.main(common)


def test_an_outdir_in_use_is_refused(ckpt, tmp_path, monkeypatch):
    from maskdit.files import folder_lock

    monkeypatch.setattr(evaluate, "InceptionFeatures", StubFeatures)
    out = tmp_path / "out"
    os.makedirs(out)
    common = ["--ckpt", ckpt, "--num-samples", "2", "--batch-size", "2", "--outdir", str(out), *SAMPLE]
    with folder_lock(str(out), "--outdir"):  # another evaluation writing there
        with pytest.raises(ValueError, match="--outdir: .* is in use by another process"):
            evaluate.main(common)
    evaluate.main(common)  # released: fine
    assert evaluate.holds_samples(str(out))


def test_settings_no_samples_were_written_with_are_replaced(tmp_path):
    """A run that wrote its settings and failed or was stopped before its first batch leaves nothing to continue:
    a rerun with other settings replaces them (where samples exist it is refused: the test above)."""
    settings = {"cfg_scale": 1.5, "step": 10}
    evaluate.samples_done(str(tmp_path), settings, 0, 1)
    assert evaluate.samples_done(str(tmp_path), {**settings, "cfg_scale": 2.0}, 0, 1) == ([], [], [])
    with open(tmp_path / "sampling.json") as f:
        assert json.load(f)["cfg_scale"] == 2.0
    evaluate.save_samples(evaluate.part_path(str(tmp_path), 0, 1, 0), [np.zeros((1, 2, 2, 3), np.uint8)],
                          [np.zeros(1, np.int64)], [np.zeros(1, np.int64)])
    with pytest.raises(ValueError, match=r"other settings .*'--cfg-scale': \(2.0, 1.5\), \"the checkpoint's step\": "
                                         r"\(10, 11\)"):
        evaluate.samples_done(str(tmp_path), {"cfg_scale": 1.5, "step": 11}, 0, 1)


def test_result_file_name_records_the_settings():
    from maskdit.config import model_config
    from maskdit.sampling import resolve_sampling

    args = evaluate.parse_args(["--ckpt", "x", "--s-churn", "2", "--precision", "bf16", "--cfg-scale", "1.5"])
    resolve_sampling(args, {})  # (an EDM network's checkpoint)
    assert os.path.basename(evaluate.result_path(args, "/runs/r/checkpoint-0000010.pt")) == \
        "fid-checkpoint-0000010-n50000-cfg1.5-steps40-churn2-bf16-ema.json"
    dit = {"parameterization": "ddpm-eps", "config": {"model": model_config("DiT-XL/2", learn_sigma=True).to_dict()}}
    for extra, name in (([], "steps250-ddpm"), (["--cfg-channels", "4"], "steps250-ddpm-cfgch4"),
                        (["--sampler", "edm", "--steps", "18"], "steps18")):
        args = evaluate.parse_args(["--ckpt", "x", *extra])
        resolve_sampling(args, dit)
        assert os.path.basename(evaluate.result_path(args, "/runs/dit.pt")) == f"fid-dit-n50000-cfg1.5-{name}-ema.json"
    # every other setting the FID depends on, when not at its default; the reference statistics last
    args = evaluate.parse_args(["--ckpt", "x", "--s-churn", "40", "--s-min", "0.05", "--s-max", "50", "--seed", "3",
                                "--vae", "stabilityai/sd-vae-ft-mse/", "--weights", "model", "--ref", "/d/ref256.npz"])
    resolve_sampling(args, {})
    assert os.path.basename(evaluate.result_path(args, "/runs/r/last.pt")) == \
        "fid-last-n50000-cfg1.5-steps40-churn40-smin0.05-smax50-seed3-vae-sd-vae-ft-mse-model-ref-ref256.json"


def _dist_worker(rank, world, port, argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    evaluate.InceptionFeatures = StubFeatures
    evaluate.main(argv)


def test_two_processes_match_one(ckpt, tmp_path, monkeypatch):
    """rank r samples r, r+2, ...; the feature sums are all_reduced (gloo): the same samples and FID."""
    monkeypatch.setattr(evaluate, "InceptionFeatures", StubFeatures)
    ref = str(tmp_path / "ref.npz")
    save_stats(ref, *random_stats(np.random.default_rng(0), 50, StubFeatures.dim, scale=0.1, offset=0.5))
    common = ["--ckpt", ckpt, "--num-samples", "9", "--batch-size", "2", "--ref", ref, *SAMPLE]
    one = evaluate.main(common + ["--outdir", str(tmp_path / "one")])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_dist_worker, args=(2, port, common + ["--outdir", str(tmp_path / "two")]), nprocs=2)
    assert sorted(set(os.listdir(tmp_path / "two")) - {".lock"}) == ["fid.json", "samples-rank000-of-002.npz",
                                                    "samples-rank001-of-002.npz", "sampling.json", "stats.npz"]
    np.testing.assert_array_equal(np.load(tmp_path / "two" / "samples-rank001-of-002.npz")["indices"], [1, 3, 5, 7])
    for a, b in zip(evaluate.load_samples(str(tmp_path / "one")), evaluate.load_samples(str(tmp_path / "two"))):
        np.testing.assert_array_equal(a, b)
    two = json.loads((tmp_path / "two" / "fid.json").read_text())
    assert two["world_size"] == 2 and two["num_samples"] == 9
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-6)  # singular covariances, as above


def test_errors_before_sampling(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "InceptionFeatures", StubFeatures)
    with pytest.raises(SystemExit, match="^error: reference statistics file .* does not exist"):
        evaluate.cli(["--ckpt", ckpt, "--ref", str(tmp_path / "missing.npz"), *SAMPLE])
    save_stats(str(tmp_path / "ref2048.npz"), np.zeros(2048), np.eye(2048))
    with pytest.raises(ValueError, match="dimension 2048, the features 24"):
        evaluate.main(["--ckpt", ckpt, "--ref", str(tmp_path / "ref2048.npz"), *SAMPLE])
    with pytest.raises(ValueError, match="nothing to do"):
        evaluate.main(["--ckpt", ckpt, *SAMPLE])
    with pytest.raises(ValueError, match="--num-samples must be >= 1"):
        evaluate.main(["--ckpt", ckpt, "--num-samples", "0", "--outdir", str(tmp_path), *SAMPLE])
    with pytest.raises(SystemExit):  # argparse: neither --ckpt nor --write-stats
        evaluate.parse_args(["--ref", "x.npz"])
    with pytest.raises(ValueError, match="--precision tf32 needs a CUDA device"):
        evaluate.main(["--ckpt", ckpt, "--outdir", str(tmp_path / "o"), "--precision", "tf32", *SAMPLE])
    with pytest.raises(ValueError, match="--precision tf32 needs a CUDA device"):
        sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "s"), "--precision", "tf32", *SAMPLE])
    torch.save({"model": {}}, tmp_path / "official.pt")  # no config: an unconverted file, say
    for script, out in ((evaluate.main, "--outdir"), (sample.main, "--out")):
        with pytest.raises(ValueError, match="^--ckpt: .* is not a checkpoint of train.py or maskdit.convert"):
            script(["--ckpt", str(tmp_path / "official.pt"), out, str(tmp_path / "x"), *SAMPLE])
    for bad, match in ((tmp_path / "none.pt", "^--ckpt: .* is neither a checkpoint file nor a run folder"),
                       (tmp_path, "^--ckpt: run folder .* holds no checkpoint")):  # the flag these scripts take
        with pytest.raises(ValueError, match=match):
            evaluate.main(["--ckpt", str(bad), "--num-samples", "2", "--outdir", str(tmp_path / "o"), *SAMPLE])
        with pytest.raises(ValueError, match=match):
            sample.main(["--ckpt", str(bad), "--out", str(tmp_path / "s"), *SAMPLE])


def test_latent_checkpoint_without_vae_is_a_clear_error(tmp_path):
    """A 4-channel model without a training config (e.g. converted official weights) needs --vae."""
    model = create_model("DiT-T/2", input_size=8, in_channels=4, num_classes=2)
    path = str(tmp_path / "latent.pt")
    atomic_save({"model": model.state_dict(), "ema": model.state_dict(), "config": {"model": model.config.to_dict()},
                 "step": 0}, path)
    with pytest.raises(SystemExit, match="4-channel samples .* --vae"):
        evaluate.cli(["--ckpt", path, "--outdir", str(tmp_path / "out"), *SAMPLE])


def test_class_labels_random_from_the_seed_or_balanced(ckpt, tmp_path):
    """Random classes (the default) are uniform, fixed by the seed and apart from the noise; balanced ones give
    sample i class i % classes.  An --outdir of one mode is not continued in the other."""
    a, b = evaluate.sample_labels(50000, 1000, 0), evaluate.sample_labels(50000, 1000, 1)
    assert a.dtype == torch.int64 and torch.equal(a, evaluate.sample_labels(50000, 1000, 0)) and not torch.equal(a, b)
    counts = torch.bincount(a, minlength=1000)
    assert counts.min() > 20 and counts.max() < 85 and len(counts) == 1000  # 50 +- 5 standard deviations
    assert torch.equal(evaluate.sample_labels(12, 10, 3, "balanced"), torch.arange(12) % 10)
    assert not torch.equal(evaluate.sample_labels(50, 10, -1), evaluate.sample_labels(50, 10, 1))  # any int seed
    with pytest.raises(ValueError, match="class-label mode"):
        evaluate.sample_labels(3, 10, 0, "sorted")
    out = str(tmp_path / "balanced")
    evaluate.main(["--ckpt", ckpt, "--num-samples", "3", "--outdir", out, "--class-labels", "balanced", *SAMPLE])
    np.testing.assert_array_equal(evaluate.load_samples(out)[1], [0, 1, 2])
    with pytest.raises(ValueError, match="class_labels"):
        evaluate.main(["--ckpt", ckpt, "--num-samples", "3", "--outdir", out, *SAMPLE])
    # an outdir written before the mode existed holds balanced classes, and before the sampler choice EDM's samples:
    # continued as such
    settings = json.load(open(os.path.join(out, "sampling.json")))
    assert settings["sampler"] == "edm" and settings["cfg_channels"] is None
    del settings["class_labels"], settings["sampler"], settings["cfg_channels"]
    json.dump(settings, open(os.path.join(out, "sampling.json"), "w"))
    evaluate.main(["--ckpt", ckpt, "--num-samples", "3", "--outdir", out, "--class-labels", "balanced", *SAMPLE])


def test_sampling_arguments_are_checked_before_any_sampling(ckpt, tmp_path, monkeypatch):
    """A bad --out, --max-classes or --device fails at once, naming the flag, before the sampling whose work it
    would lose; a file that is no checkpoint names --ckpt."""
    monkeypatch.setattr(sample, "draw_images", lambda *a, **k: pytest.fail("sampled before checking its arguments"))
    for flags, message in ((["--out", str(tmp_path) + "/"], "must be a file prefix"),
                           (["--out", str(tmp_path) + "/."], "must be a file prefix"),
                           (["--out", str(tmp_path / "f.txt" / "x")], "--out: cannot create the folder"),
                           (["--max-classes", "0"], "--max-classes must be >= 1"),
                           (["--device", "tpu9"], "--device 'tpu9' is not a valid device")):
        if "f.txt" in flags[-1]:
            (tmp_path / "f.txt").write_text("a file where a folder should be")
        with pytest.raises(ValueError, match=message):
            sample.main(["--ckpt", ckpt, *SAMPLE, "--out", str(tmp_path / "s"), *flags])
    monkeypatch.undo()
    (tmp_path / "s").mkdir()  # a folder named like the prefix is no clash with PREFIX.png and PREFIX.npz
    png, npz = sample.main(["--ckpt", ckpt, *SAMPLE, "--labels", "1", "--out", str(tmp_path / "s")])
    assert os.path.isfile(png) and os.path.isfile(npz)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="--ckpt: cannot read .*junk.pt' as a checkpoint"):
        sample.main(["--ckpt", str(tmp_path / "junk.pt"), *SAMPLE])
    with pytest.raises(ValueError, match="--device 'tpu9' is not a valid device"):
        evaluate.main(["--ckpt", ckpt, "--outdir", str(tmp_path / "e"), *SAMPLE, "--device", "tpu9"])


def test_export_for_adms_evaluator_writes_the_samples_in_order(tmp_path):
    """--export-adm: one npz whose arr_0 holds a finished run's RGB samples in sample order (the processes' files
    interleave them), readable by numpy's reader (ADM's evaluator reads arr_0 the same way); unfinished runs, runs
    of other settings' sample counts and grayscale samples are refused."""
    out = tmp_path / "run"
    out.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (11, 5, 6, 3), dtype=np.uint8)
    (out / "sampling.json").write_text(json.dumps({"num_samples": 11}))
    for rank in range(3):  # rank r drew samples r, r + 3, ...
        idx = np.arange(rank, 11, 3)
        evaluate.save_samples(str(out / f"samples-rank{rank:03d}-of-003.npz"), [images[idx]], [idx % 10], [idx])
    path = tmp_path / "adm" / "samples.npz"
    assert evaluate.main(["--export-adm", str(out), "--out", str(path), "--device", "cpu"]) == 11
    with np.load(path) as f:
        assert f.files == ["arr_0"] and np.array_equal(f["arr_0"], images)
    assert evaluate.export_adm(str(out), str(tmp_path / "small.npz"), chunk=4) == 11  # chunks across the files
    assert np.array_equal(np.load(tmp_path / "small.npz")["arr_0"], images)

    with pytest.raises(ValueError, match="--export-adm needs --out"):
        evaluate.main(["--export-adm", str(out)])
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--export-adm", str(out), "--ckpt", "x", "--out", "y.npz"])
    (out / "sampling.json").write_text(json.dumps({"num_samples": 12}))
    with pytest.raises(ValueError, match="holds 11 samples, its run was for 12: finish it first"):
        evaluate.export_adm(str(out), str(path))
    os.unlink(out / "samples-rank002-of-003.npz")
    with pytest.raises(ValueError, match="does not hold one complete set"):
        evaluate.export_adm(str(out), str(path))
    with pytest.raises(ValueError, match="no sampling.json"):
        evaluate.export_adm(str(tmp_path), str(path))
    gray = tmp_path / "gray"
    gray.mkdir()
    (gray / "sampling.json").write_text(json.dumps({"num_samples": 2}))
    evaluate.save_samples(str(gray / "samples-rank000-of-001.npz"), [images[:2, :, :, :1]], [np.zeros(2)],
                          [np.arange(2)])
    with pytest.raises(ValueError, match=r"takes RGB uint8 images \(N, H, W, 3\); these are \(2, 5, 6, 1\)"):
        evaluate.export_adm(str(gray), str(path))
