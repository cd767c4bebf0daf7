"""The VAE latent pipeline: prepare_latents (shards, resume), LatentDataset, per-step resampling, decoding."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")

import sample  # noqa: E402
from maskdit.checkpoint import atomic_save, load_checkpoint  # noqa: E402
from maskdit.config import model_config  # noqa: E402
from maskdit.data import ImageFolderDataset, LatentDataset, batch_iterator, make_dataset  # noqa: E402
from maskdit.latents import SD_SCALE, decode_latents, latent_decoder, load_vae, sample_latents  # noqa: E402
from maskdit.models import DiT  # noqa: E402
from maskdit.prepare_latents import prepare_latents  # noqa: E402

RES = 32  # pixels; the tiny VAE downsamples by 2 (two blocks), so latents are 4 x 16 x 16


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny randomly initialised AutoencoderKL saved like a hub download (no network)."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=RES)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return str(root)


def _prepare(image_dir, out, vae_dir, **kw):
    args = dict(resolution=RES, vae=vae_dir, batch_size=2, shard_size=2, num_workers=0, device="cpu", progress=False)
    return prepare_latents(image_dir, str(out), **{**args, **kw})


class _CountEncodes:
    """Counts AutoencoderKL.encode calls; optionally fails on call number ``fail_at``."""

    def __init__(self, monkeypatch, fail_at=None):
        self.calls, self.fail_at, original = 0, fail_at, diffusers.AutoencoderKL.encode

        def encode(vae, *a, **k):
            self.calls += 1
            if self.calls == self.fail_at:
                raise KeyboardInterrupt  # a kill in the middle of a shard
            return original(vae, *a, **k)

        monkeypatch.setattr(diffusers.AutoencoderKL, "encode", encode)


def test_prepare_writes_shards_and_meta(tmp_path, image_dir, vae_dir):
    out = tmp_path / "lat"
    meta = _prepare(image_dir, out, vae_dir)
    assert meta["complete"] and meta["num_shards"] == 3 and meta["num_images"] == 6
    assert (meta["channels"], meta["latent_size"], meta["downsample"], meta["resolution"]) == (4, 16, 2, RES)
    assert meta["scale"] == SD_SCALE and meta["classes"] == ["cat", "dog"] and meta["vae"] == vae_dir
    assert json.loads((out / "meta.json").read_text()) == meta
    for k in range(3):
        x = np.load(out / f"shard-{k:05d}.npy", mmap_mode="r")
        assert x.shape == (2, 8, 16, 16) and x.dtype == np.float32
        assert np.load(out / f"labels-{k:05d}.npy").tolist() == [[0, 0], [0, 1], [1, 1]][k]
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]

    # the stored moments are the VAE posterior of the ADM-cropped image, mean then logvar
    vae = load_vae(vae_dir)
    img, _ = ImageFolderDataset(image_dir, RES)[3]
    dist = vae.encode(img[None]).latent_dist
    stored = torch.from_numpy(np.load(out / "shard-00001.npy")[1])
    torch.testing.assert_close(stored, torch.cat([dist.mean, dist.logvar], 1)[0], atol=1e-5, rtol=1e-5)


def test_uneven_last_shard(tmp_path, image_dir, vae_dir):
    """6 images in shards of 4: a last shard of 2, and batches that never run past the last image."""
    from maskdit.prepare_latents import plan_batches

    assert plan_batches([0, 1], 6, 4, 3) == ([[0, 1, 2], [3], [4, 5]], [None, 0, 1])
    meta = _prepare(image_dir, tmp_path / "lat", vae_dir, shard_size=4, batch_size=3)
    assert meta["complete"] and meta["num_shards"] == 2
    assert [np.load(tmp_path / "lat" / f"shard-{k:05d}.npy").shape[0] for k in range(2)] == [4, 2]
    ds = LatentDataset(str(tmp_path / "lat"))
    assert len(ds) == 6 and [int(ds[i][1]) for i in range(6)] == [0, 0, 0, 1, 1, 1]


def test_changed_image_files_are_not_mixed_into_old_shards(tmp_path, image_dir, vae_dir):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(image_dir, images)
    _prepare(str(images), tmp_path / "lat", vae_dir)
    os.rename(images / "dog" / "2.png", images / "dog" / "9.png")  # the same count and classes
    with pytest.raises(ValueError, match="the image files changed"):
        _prepare(str(images), tmp_path / "lat", vae_dir)


def test_latent_dataset(tmp_path, image_dir, vae_dir):
    out = tmp_path / "lat"
    _prepare(image_dir, out, vae_dir, dtype="float16")
    ds = make_dataset(f"latents:{out}", None)
    assert isinstance(ds, LatentDataset) and ds.is_latent
    assert (len(ds), ds.channels, ds.image_size, ds.resolution, ds.num_classes) == (6, 4, 16, RES, 2)
    assert ds.class_names == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    x, y = ds[5]
    assert x.shape == (8, 16, 16) and x.dtype == torch.float32 and y.item() == 1
    torch.testing.assert_close(x, torch.from_numpy(np.load(out / "shard-00002.npy")[1].astype(np.float32)))
    torch.testing.assert_close(ds[-1][0], x)
    with pytest.raises(IndexError):
        ds[6]
    # image_size: None, the latent size or the pixel resolution; anything else names both
    assert make_dataset(f"latents:{out}", 16).image_size == make_dataset(f"latents:{out}", RES).image_size == 16
    with pytest.raises(ValueError, match="give 16, 32 or nothing"):
        make_dataset(f"latents:{out}", 24)
    with pytest.raises(ValueError, match="does not exist"):
        make_dataset(f"latents:{tmp_path / 'nope'}", None)

    moments, labels = next(batch_iterator(ds, 4, seed=0))  # the DataLoader path
    assert moments.shape == (4, 8, 16, 16) and labels.dtype == torch.int64
    z = ds.prepare_batch(moments, torch.Generator().manual_seed(0))
    assert z.shape == (4, 4, 16, 16) and z.dtype == torch.float32


def test_resume_encodes_only_missing_shards(tmp_path, image_dir, vae_dir, monkeypatch, capsys):
    out = tmp_path / "lat"
    _prepare(image_dir, out, vae_dir)
    files = [out / f"shard-{k:05d}.npy" for k in range(3)]
    before = [np.load(f) for f in files]
    mtimes = [f.stat().st_mtime_ns for f in files]
    files[1].unlink()
    with pytest.raises(ValueError, match="cannot read latent shard"):
        LatentDataset(str(out))

    (out / ".tmp-abc123shard-00001.npy").write_bytes(b"partial")  # left by a killed run
    count = _CountEncodes(monkeypatch)
    meta = _prepare(image_dir, out, vae_dir)
    assert not (out / ".tmp-abc123shard-00001.npy").exists()
    assert count.calls == 1 and meta["complete"]  # batch 2 = shard 2: one encode call for the one missing shard
    assert [files[0].stat().st_mtime_ns, files[2].stat().st_mtime_ns] == [mtimes[0], mtimes[2]]
    np.testing.assert_array_equal(np.load(files[1]), before[1])

    np.save(files[2], before[2].astype(np.float16))  # the right shape in another dtype: not a valid shard
    _prepare(image_dir, out, vae_dir)
    assert count.calls == 2 and np.load(files[2]).dtype == np.float32
    np.testing.assert_array_equal(np.load(files[2]), before[2])
    capsys.readouterr()

    _prepare(image_dir, out, vae_dir)  # complete: nothing to do
    assert count.calls == 2 and "already encoded" in capsys.readouterr().out
    with pytest.raises(ValueError, match="other settings.*dtype"):
        _prepare(image_dir, out, vae_dir, dtype="float16")


def test_interrupted_run_resumes(tmp_path, image_dir, vae_dir, monkeypatch):
    out = tmp_path / "lat"
    count = _CountEncodes(monkeypatch, fail_at=2)  # shard 0 is written, the kill hits shard 1
    with pytest.raises(KeyboardInterrupt):
        _prepare(image_dir, out, vae_dir)
    meta = json.loads((out / "meta.json").read_text())
    assert not meta["complete"] and [e["index"] for e in meta["shards"]] == [0]
    with pytest.raises(ValueError, match="incomplete"):
        LatentDataset(str(out))
    count.fail_at, count.calls = None, 0
    _prepare(image_dir, out, vae_dir)
    assert count.calls == 2 and len(LatentDataset(str(out))) == 6


def test_sample_latents_statistics():
    mean, std = 1.5, 2.0
    moments = torch.cat([torch.full((4, 4, 32, 32), mean), torch.full((4, 4, 32, 32), math.log(std ** 2))], 1)
    z = sample_latents(moments, torch.Generator().manual_seed(0))
    assert z.shape == (4, 4, 32, 32)
    assert abs(z.mean().item() - mean * SD_SCALE) < 0.02 and abs(z.std().item() - std * SD_SCALE) < 0.01
    # exactly (mean + exp(logvar/2) * eps) * scale with eps from the generator; logvar clamped to [-30, 20]
    m = torch.randn(2, 8, 4, 4)
    m[:, 4:] = torch.tensor([-50.0, 0.5, 25.0, -1.0]).view(1, 4, 1, 1)
    eps = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    want = (m[:, :4] + torch.exp(m[:, 4:].clamp(-30, 20) / 2) * eps) * SD_SCALE
    torch.testing.assert_close(sample_latents(m, torch.Generator().manual_seed(3)), want)
    assert not torch.equal(sample_latents(m), sample_latents(m))  # a fresh draw each call


def test_decode_helper(tmp_path, image_dir, vae_dir):
    out = tmp_path / "lat"
    _prepare(image_dir, out, vae_dir)
    model_cfg = model_config("DiT-T/2", input_size=16, in_channels=4, num_classes=2).to_dict()
    ckpt = {"config": {"model": model_cfg, "train": {"dataset": f"latents:{out}"}}}
    decode = latent_decoder(ckpt, None, torch.device("cpu"))  # the VAE named in meta.json
    z = torch.randn(3, 4, 16, 16)
    images = decode(z)
    assert images.shape == (3, 3, RES, RES) and images.min() >= -1 and images.max() <= 1
    vae = load_vae(vae_dir)
    torch.testing.assert_close(images, vae.decode(z / SD_SCALE).sample.clamp(-1, 1))  # z / 0.18215 -> decode
    torch.testing.assert_close(images, decode_latents(vae, z))
    pixel = {"config": {"model": {**model_cfg, "in_channels": 3}, "train": {"dataset": "digits"}}}
    assert latent_decoder(pixel, None, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="latent channels"):
        latent_decoder(pixel, vae_dir, torch.device("cpu"))
    gone = {"config": {"model": model_cfg, "train": {"dataset": f"latents:{tmp_path / 'elsewhere'}"}}}
    with pytest.raises(ValueError, match="pass --vae"):
        latent_decoder(gone, None, torch.device("cpu"))
    assert latent_decoder(gone, vae_dir, torch.device("cpu")) is not None


def test_sample_cli_decodes_latents(tmp_path, image_dir, vae_dir):
    out = tmp_path / "lat"
    _prepare(image_dir, out, vae_dir)
    cfg = model_config("MaskDiT-T/2", input_size=16, in_channels=4, num_classes=2)
    model = DiT(cfg)
    ckpt = tmp_path / "ckpt.pt"
    atomic_save({"model": model.state_dict(), "ema": model.state_dict(), "step": 0,
                 "config": {"model": cfg.to_dict(), "train": {"dataset": f"latents:{out}"}}}, str(ckpt))
    png, npz = sample.main(["--ckpt", str(ckpt), "--num-per-class", "1", "--steps", "2", "--device", "cpu",
                            "--out", str(tmp_path / "s")])
    data = np.load(npz)
    assert data["images"].shape == (2, RES, RES, 3) and data["images"].dtype == np.uint8
    assert Image.open(png).size[0] > RES


def test_hub_failure_is_one_clear_line(monkeypatch, tmp_path, image_dir, vae_dir):
    from huggingface_hub.errors import OfflineModeIsEnabled

    def offline(*a, **k):
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.\nmore detail")

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", offline)
    with pytest.raises(ValueError, match="could not load the VAE weights 'stabilityai/sd-vae-ft-ema'") as e:
        load_vae("stabilityai/sd-vae-ft-ema")
    assert "\n" not in str(e.value) and "offline" in str(e.value) and "--vae PATH" in str(e.value)
    with pytest.raises(ValueError, match="could not load"):  # the command fails the same way, before encoding
        prepare_latents(image_dir, str(tmp_path / "lat"), resolution=RES, device="cpu", progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        load_vae(str(tmp_path / "no-vae-here"))
    monkeypatch.undo()  # the same --out with a VAE that loads: nothing was encoded, so nothing holds it back
    meta = prepare_latents(image_dir, str(tmp_path / "lat"), resolution=RES, vae=vae_dir, device="cpu", progress=False)
    assert meta["complete"]


def test_bad_input_and_missing_diffusers(tmp_path, monkeypatch, image_dir):
    with pytest.raises(ValueError, match="--images: dataset folder .*missing.* does not exist"):
        prepare_latents(str(tmp_path / "missing"), str(tmp_path / "out"), progress=False)
    (tmp_path / "file").write_text("a file where a folder should be")
    with pytest.raises(ValueError, match="--out: cannot create the folder"):
        prepare_latents(image_dir, str(tmp_path / "file" / "out"), progress=False)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        prepare_latents(str(tmp_path / "empty"), str(tmp_path / "out"), progress=False)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'maskdit\[latents\]'"):
        load_vae("stabilityai/sd-vae-ft-ema")


def test_cli_error_and_no_diffusers_import(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; sys.modules['diffusers'] = None\n"  # importing any of these must not need diffusers
            "import maskdit, maskdit.data, maskdit.latents, sample\n"
            "sys.argv = ['prepare_latents', '--images', sys.argv[1], '--out', sys.argv[2]]\n"
            "import runpy; runpy.run_module('maskdit.prepare_latents', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing"), str(tmp_path / "out")], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: --images: dataset folder {str(tmp_path / 'missing')!r} does not exist"


def test_train_on_latents_end_to_end(tmp_path, image_dir, vae_dir, monkeypatch):
    """prepare -> train.py --dataset latents:DIR (fresh latents every step) -> grid and sample.py decode; the
    loss sees each step's draw (mean + std eps) * SD_SCALE of the batch's moments, scaled once."""
    import train
    from maskdit import distributed

    drawn, fed = [], []
    real_prepare, real_forward = LatentDataset.prepare_batch, distributed.LossModule.forward
    monkeypatch.setattr(LatentDataset, "prepare_batch", lambda self, moments, generator=None, eps=None: drawn.append(
        (moments.clone(), eps.clone())) or real_prepare(self, moments, generator, eps))
    monkeypatch.setattr(distributed.LossModule, "forward", lambda self, images, *a, **k: fed.append(images.clone())
                        or real_forward(self, images, *a, **k))
    out = tmp_path / "lat"
    _prepare(image_dir, out, vae_dir)
    run = tmp_path / "run"
    train.main(["--dataset", f"latents:{out}", "--image-size", "16", "--batch-size", "2", "--steps", "2",
                "--log-every", "1", "--grid-per-class", "1", "--sample-steps", "2", "--device", "cpu",
                "--out", str(run)])
    assert len(drawn) == len(fed) == 2
    for (moments, eps), images in zip(drawn, fed):
        mean, logvar = moments.float().chunk(2, dim=1)
        torch.testing.assert_close(images, (mean + torch.exp(logvar.clamp(-30, 20) / 2) * eps) * SD_SCALE)
    grid = Image.open(run / "samples.png")
    assert grid.mode == "RGB" and grid.size[0] >= 2 * RES  # decoded 32x32 RGB images, a row per class
    ckpt = torch.load(run / "checkpoint-0000002.pt", weights_only=False)
    assert ckpt["config"]["model"]["input_size"] == 16 and ckpt["config"]["model"]["in_channels"] == 4
    png, npz = sample.main(["--ckpt", str(run), "--num-per-class", "1", "--steps", "2", "--device", "cpu",
                            "--out", str(tmp_path / "s")])
    assert np.load(npz)["images"].shape == (2, RES, RES, 3)


def test_latent_runs_record_their_data_wherever_they_are_read(tmp_path, image_dir, vae_dir, monkeypatch):
    """A relative latents:DIR is recorded absolute, --image-size defaults to the latents' grid, and the VAE and
    scale go into the checkpoint too: sample.py decodes from another directory, or with the folder gone."""
    import shutil

    import train

    _prepare(image_dir, tmp_path / "lat", vae_dir, resolution=24)  # 12x12 latents: not the default --image-size
    monkeypatch.chdir(tmp_path)
    train.main(["--dataset", "latents:lat", "--batch-size", "2", "--steps", "1", "--grid-per-class", "0",
                "--device", "cpu", "--out", "run"])
    monkeypatch.chdir(image_dir)
    cfg = load_checkpoint(str(tmp_path / "run"))["config"]
    assert cfg["train"]["dataset"] == f"latents:{tmp_path / 'lat'}" and cfg["model"]["input_size"] == 12
    with open(tmp_path / "lat" / "meta.json") as f:
        meta = json.load(f)
    assert cfg["train"]["latents"] == {"vae": meta["vae"], "scale": meta["scale"]}
    shutil.rmtree(tmp_path / "lat")
    _, npz = sample.main(["--ckpt", str(tmp_path / "run"), "--num-per-class", "1", "--steps", "2", "--device", "cpu",
                          "--out", str(tmp_path / "s")])
    assert np.load(npz)["images"].shape == (2, 24, 24, 3)


def test_one_preparation_a_folder_at_a_time(tmp_path, image_dir, vae_dir):
    from maskdit.files import folder_lock

    os.makedirs(tmp_path / "lat")
    with folder_lock(str(tmp_path / "lat"), "--out"):  # another process's run, as far as flock is concerned
        with pytest.raises(ValueError, match="--out: .* is in use by another process .*.lock"):
            _prepare(image_dir, tmp_path / "lat", vae_dir)
    assert _prepare(image_dir, tmp_path / "lat", vae_dir)["complete"]


def test_latent_batches_are_resampled_every_step():
    moments = torch.randn(3, 8, 4, 4)
    a, b = sample_latents(moments, torch.Generator().manual_seed(0)), sample_latents(moments)
    assert not torch.equal(a, b)
    eps = torch.randn(3, 4, 4, 4)
    mean, logvar = moments.chunk(2, dim=1)
    torch.testing.assert_close(sample_latents(moments, eps=eps), (mean + torch.exp(logvar / 2) * eps) * SD_SCALE)
