import copy
import json
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train
from maskdit import EDMLoss, EDMPrecond, create_model
from maskdit.checkpoint import (
    atomic_save,
    checkpoint_files,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
)
from maskdit.config import ModelConfig
from maskdit.files import make_output_folder
from maskdit.models import DiT
from maskdit.training import EMA, default_signal_handlers, stop_signals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--image-size", "8", "--batch-size", "16", "--log-every", "2", "--grid-per-class", "0", "--device", "cpu"]


def run(out, *extra):
    return train.main(FAST + ["--out", str(out), *extra])


@pytest.mark.parametrize("fused", [False, True])
def test_ema_update_matches_formula_and_zero_weight_skips(fused):
    """The foreach ops, and the one-launch Triton kernel (the CUDA default; here the interpreter)."""
    model = create_model("DiT-T/2", input_size=8, in_channels=1, num_classes=2)
    shadow = copy.deepcopy(model)
    ema = EMA(model, shadow, fused=fused)
    assert ema.fused == fused
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    before = [e.clone() for e in shadow.parameters()]
    ema.update(torch.tensor(0.0))
    assert all(torch.equal(a, b) for a, b in zip(before, shadow.parameters()))
    ema.update(0.25)
    for b, e, p in zip(before, shadow.parameters(), model.parameters()):
        torch.testing.assert_close(e, 0.75 * b + 0.25 * p)
    assert not any(p.requires_grad for p in shadow.parameters())


def test_output_folder_is_made_or_named_with_its_flag(tmp_path, monkeypatch):
    """``make_output_folder`` (train.py, sample.py, evaluate, prepare_latents, the bench scripts): the folder and
    its parents made; a path through a file, or a folder the process may not write, a ValueError naming the flag
    and the folder."""
    make_output_folder(str(tmp_path / "a" / "b"), "--out")
    assert (tmp_path / "a" / "b").is_dir()
    make_output_folder(str(tmp_path / "a" / "b"), "--out")  # an existing folder is fine
    (tmp_path / "f.txt").write_text("a file where a folder should be")
    with pytest.raises(ValueError, match=r"^--outdir: cannot create the folder '.*f\.txt/x' \("):
        make_output_folder(str(tmp_path / "f.txt" / "x"), "--outdir")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # (root may write anywhere: access stands in)
    with pytest.raises(ValueError, match=r"^--out: the folder '.*a/b' is not writable$"):
        make_output_folder(str(tmp_path / "a" / "b"), "--out")


def test_atomic_save_keeps_previous_file_on_crash(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    atomic_save({"v": 1}, str(path))

    def crash(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"v": 2}, str(path))
    monkeypatch.undo()
    assert torch.load(path)["v"] == 1
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temporary file left behind


def test_atomic_save_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """The order that makes a checkpoint survive a power cut, not only a killed process: the data on disk
    before the new name points at it, and the rename itself on disk before the call returns."""
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode)))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", None)) or real_replace(a, b))
    atomic_save({"v": 1}, str(tmp_path / "ck.pt"))
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]


def test_prune_checkpoints_keeps_the_recent_and_the_milestones(tmp_path):
    def steps():
        return sorted(int(p.name[11:18]) for p in tmp_path.glob("checkpoint-*.pt"))

    for s in (100, 200, 300, 400, 500, 600, 700):
        atomic_save({"step": s}, checkpoint_path(str(tmp_path), s))
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    assert prune_checkpoints(str(tmp_path), 700, keep_last=0) == [] and len(steps()) == 7  # 0: keep all
    # a resume from step 300 into the same folder: its new checkpoint 400 counts as the latest, 500-700 stay
    assert prune_checkpoints(str(tmp_path), 400, keep_last=2) == [checkpoint_path(str(tmp_path), s) for s in (100, 200)]
    assert steps() == [300, 400, 500, 600, 700]
    prune_checkpoints(str(tmp_path), 700, keep_last=1, keep_every=200)
    assert steps() == [400, 600, 700] and (tmp_path / "notes.pt").exists()
    assert prune_checkpoints(str(tmp_path / "missing"), 700, keep_last=1) == []


def test_training_keeps_the_checkpoints_asked_for(tmp_path):
    run(tmp_path, "--steps", "6", "--ckpt-every", "1", "--keep-checkpoints", "2", "--keep-every", "3")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pt")) == \
        ["checkpoint-0000003.pt", "checkpoint-0000005.pt", "checkpoint-0000006.pt"]
    assert not list(tmp_path.glob(".tmp-*"))
    train.main(["--resume", str(tmp_path), "--steps", "8", "--keep-checkpoints", "1"])  # the policy may change
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pt")) == \
        ["checkpoint-0000003.pt", "checkpoint-0000006.pt", "checkpoint-0000008.pt"]
    assert load_checkpoint(str(tmp_path))["config"]["train"]["keep_checkpoints"] == 1


def test_a_failed_checkpoint_write_prunes_nothing(tmp_path, monkeypatch):
    """Older checkpoints are deleted only once the new one is written: a failed write keeps the last good one."""
    run(tmp_path, "--steps", "2", "--ckpt-every", "1", "--keep-checkpoints", "1")
    assert [p.name for p in tmp_path.glob("checkpoint-*.pt")] == ["checkpoint-0000002.pt"]

    def disk_full(obj, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train, "atomic_save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train.main(["--resume", str(tmp_path), "--steps", "3"])
    assert [p.name for p in tmp_path.glob("checkpoint-*.pt")] == ["checkpoint-0000002.pt"]


def test_ema_warmup_caps_the_decay_early():
    from maskdit.training import ema_decay_at

    assert ema_decay_at(0, 0.9999, True) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.9999, True) == pytest.approx(0.91)
    assert ema_decay_at(10 ** 6, 0.9999, True) == 0.9999
    assert ema_decay_at(0, 0.9999, False) == 0.9999


def test_label_dropout_gives_the_null_class_at_its_rate(tmp_path, monkeypatch):
    from maskdit import distributed

    seen, real = [], distributed.LossModule.forward
    monkeypatch.setattr(distributed.LossModule, "forward",
                        lambda self, images, labels, *a, **k: seen.append(labels.clone()) or real(self, images, labels,
                                                                                                     *a, **k))
    run(tmp_path, "--steps", "12", "--label-dropout", "0.15", "--ckpt-every", "12")
    labels = torch.cat(seen)  # (192 labels: the rate's standard error is 0.026; 1 - rate would be far off)
    assert labels.numel() == 12 * 16 and abs((labels == 10).float().mean().item() - 0.15) < 0.08  # 10: null class


def fixed_batch_loss(state, cfg_dict):
    model = DiT(ModelConfig.from_dict(cfg_dict))
    model.load_state_dict(state)
    from maskdit.data import DigitsDataset
    d = DigitsDataset(8)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(d), generator=g)[:256]
    sigma = EDMLoss().sample_sigma(256, "cpu", g)
    noise = torch.randn(256, 1, 8, 8, generator=g)
    with torch.no_grad():
        return EDMLoss()(EDMPrecond(model), d.images[idx], d.labels[idx], sigma=sigma, noise=noise).mean().item()


def test_short_training_lowers_the_loss(tmp_path):
    run(tmp_path, "--steps", "150", "--lr", "1e-3", "--batch-size", "32", "--ckpt-every", "1000")
    ckpt = load_checkpoint(str(tmp_path))
    initial = create_model("MaskDiT-T/2", input_size=8, in_channels=1, num_classes=10).state_dict()
    before = fixed_batch_loss(initial, ckpt["config"]["model"])
    after = fixed_batch_loss(ckpt["model"], ckpt["config"]["model"])
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("flags", [["--precision", "fp32"], ["--precision", "bf16"], ["--precision", "fp16"],
                                   ["--mask-ratio-dist", "uniform:0.2:0.8"]])  # (per-sample ratios: host draws)
def test_resume_is_exact(tmp_path, flags):
    extra = [*flags, "--ckpt-every", "3", "--steps"]
    run(tmp_path / "a", *extra, "6")
    run(tmp_path / "b", *extra, "3")
    train.main(["--resume", str(tmp_path / "b"), "--steps", "6"])
    a, b = load_checkpoint(str(tmp_path / "a")), load_checkpoint(str(tmp_path / "b"))
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["data"] == b["data"]
    lines = open(tmp_path / "b" / "log.jsonl").read().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 3, 4, 6]  # the resumed run appends


def test_mae_coef_zero_builds_maskdit_without_a_learnable_mask_token(tmp_path):
    """--mae-coef 0: the official code's model without MAE (zeros at the masked positions); the checkpoint's
    config says so and a resume rebuilds the same model."""
    run(tmp_path, "--steps", "2", "--mae-coef", "0", "--ckpt-every", "2")
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt["config"]["model"]["learn_mask_token"] is False and "mask_token" not in ckpt["model"]
    train.main(["--resume", str(tmp_path), "--steps", "3"])
    assert load_checkpoint(str(tmp_path))["step"] == 3


def test_init_from_starts_a_new_run_from_the_weights_of_a_checkpoint(tmp_path):
    run(tmp_path / "a", "--steps", "3", "--ckpt-every", "3")
    a = load_checkpoint(str(tmp_path / "a"))
    run(tmp_path / "b", "--init-from", str(tmp_path / "a"), "--steps", "0")  # its model and size by default
    b = load_checkpoint(str(tmp_path / "b"))
    assert b["step"] == 0 and b["optimizer"]["state"] == {} and b["data"]["batches_done"] == 0
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert b["config"]["model"] == a["config"]["model"]
    assert b["config"]["train"]["init_from"] == str(tmp_path / "a" / "checkpoint-0000003.pt")
    # a weights-only file, as maskdit.convert writes for official checkpoints, then some steps with new settings
    weights = {"model": a["ema"], "ema": a["ema"], "config": {"model": a["config"]["model"]}, "step": 0}
    atomic_save(weights, str(tmp_path / "converted.pt"))
    run(tmp_path / "c", "--init-from", str(tmp_path / "converted.pt"), "--steps", "2", "--mask-schedule", "cosine",
        "--lr", "5e-5", "--ckpt-every", "2")
    c = load_checkpoint(str(tmp_path / "c"))
    assert c["step"] == 2 and c["config"]["train"]["lr"] == 5e-5
    assert not all(torch.equal(c["model"][k], a["ema"][k]) for k in a["ema"])  # it trained
    # the EMA goes on from the checkpoint's at the full decay (no warm-up, which would all but reset it)
    assert c["config"]["train"]["ema_warmup"] is False
    moved = {key: max((c[key][k].float() - a["ema"][k].float()).abs().max().item() for k in a["ema"])
             for key in ("model", "ema")}
    assert 0 < moved["ema"] < 0.01 * moved["model"], moved


def test_init_from_an_unconverted_file_points_to_the_converter(tmp_path):
    torch.save({"model": {}, "opt": {}}, tmp_path / "official.pt")  # no 'config': an official file, say
    with pytest.raises(ValueError, match="--init-from: .* is not a checkpoint of train.py or maskdit.convert.*"
                                         "python -m maskdit.convert"):
        run(tmp_path / "b", "--init-from", str(tmp_path / "official.pt"))


def test_init_from_names_each_misfit_of_the_data(tmp_path):
    """A network for 3-channel images of 7 classes (at the digits' size) does not fit the digits."""
    model = create_model("MaskDiT-T/2", input_size=8, in_channels=3, num_classes=7)
    atomic_save({"model": model.state_dict(), "ema": model.state_dict(), "config": {"model": model.config.to_dict()},
                 "step": 0}, str(tmp_path / "rgb7.pt"))
    with pytest.raises(ValueError, match=r"does not fit its MaskDiT-T/2: channels 1 \(the network's: 3\), "
                                         r"classes 10 \(the network's: 7\)$"):
        run(tmp_path / "b", "--init-from", str(tmp_path / "rgb7.pt"))


@pytest.mark.parametrize("flags, message", [
    (["--model", "DiT-T/2"], "--model 'DiT-T/2' differs from the network of --init-from"),
    (["--image-size", "16"], "does not fit its MaskDiT-T/2: image size 16 \\(the network's: 8\\)"),
    (["--resume", "RUN"], "give one"),
])
def test_init_from_refuses_what_does_not_fit(tmp_path, flags, message):
    run(tmp_path / "a", "--steps", "1")
    flags = [str(tmp_path / "a") if f == "RUN" else f for f in flags]
    with pytest.raises(ValueError, match=message):
        run(tmp_path / "b", "--init-from", str(tmp_path / "a"), *flags)
    assert latest_checkpoint(str(tmp_path / "b")) is None


def test_resume_refuses_to_change_the_model(tmp_path):
    run(tmp_path, "--steps", "1")
    with pytest.raises(ValueError, match="--model 'DiT-T/2' differs"):
        train.main(["--resume", str(tmp_path), "--model", "DiT-T/2"])
    with pytest.raises(ValueError, match="already holds checkpoints"):  # a new run never overwrites one
        run(tmp_path, "--steps", "1")


@pytest.mark.parametrize("flags,message", [
    (["--mask-ratio", "1.0"], "--mask-ratio must be in"),
    (["--mask-ratio", "-0.1"], "--mask-ratio must be in"),
    (["--image-size", "9"], "not divisible by the patch size"),
    (["--model", "MaskDiT-Q/2"], "unknown model name"),
    (["--model", "DiT-T/2", "--activation-checkpointing", "decoder"], "needs a MaskDiT model"),
    (["--dataset", "/nonexistent/folder"], "does not exist"),
    (["--resume", "/nonexistent/run"], "neither a checkpoint file nor a run folder"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints and --keep-every must be >= 0"),
    (["--keep-every", "-5"], "--keep-checkpoints and --keep-every must be >= 0"),
    (["--device", "cpu", "--sdpa-backend", "cudnn"], "--sdpa-backend cudnn needs a CUDA device"),
    (["--device", "cpu", "--sdpa-backend", "flex"], "--sdpa-backend flex needs a CUDA device"),
    (["--device", "tpu9"], "--device 'tpu9' is not a valid device"),
    (["--betas", "1.5", "0.9"], "--betas must be in"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--num-workers", "-1"], "--num-workers must be >= 0"),
    (["--sample-steps", "0"], "--sample-steps must be >= 1"),
    (["--eval-per-class", "0"], "--eval-per-class must be >= 1"),
    (["--cfg-scale", "-5"], "--cfg-scale must be >= 0"),
    (["--time-budget", "-5"], "--time-budget must be >= 0"),
    (["--eval-every", "-1"], "--eval-every and --eval-every-seconds must be >= 0"),
    (["--mask-schedule", "cosine", "--mask-cosine-power", "-1"], "--mask-cosine-power must be >= 0"),
    (["--model", "MaskDiT-T/4", "--mask-ratio-dist", "uniform:0.7:0.8"],
     "--mask-ratio-dist: a mask ratio of 0.8 keeps no token of MaskDiT-T/4"),
    (["--dataset", __file__], "is a file, not a folder"),
])
def test_invalid_configuration_fails_at_start(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path, *flags)
    assert latest_checkpoint(str(tmp_path)) is None


def test_triton_backend_on_the_cpu_needs_the_interpreter(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="--backend triton needs a CUDA device .* TRITON_INTERPRET=1"):
        run(tmp_path, "--device", "cpu", "--backend", "triton")
    assert not os.path.exists(tmp_path / "log.jsonl")  # refused before the run folder was made


def test_rerunning_a_tuning_command_continues_its_schedule(tmp_path):
    """The resume that sets a new mask schedule starts it; the same command again (after an interruption)
    continues it instead of starting it over; another schedule starts anew.  The tuning's --lr reaches the
    optimizer (not only the config) and stays on later resumes."""
    run(tmp_path, "--steps", "4", "--ckpt-every", "2")
    tune = ["--resume", str(tmp_path), "--mask-schedule", "cosine", "--ckpt-every", "2", "--lr", "5e-5"]
    train.main(tune + ["--steps", "6"])  # (as if stopped at step 6 of a run to step 8)
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt["config"]["train"]["mask_schedule_start"] == 4
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == [5e-5] * len(ckpt["optimizer"]["param_groups"])
    train.main(tune + ["--steps", "8"])
    assert load_checkpoint(str(tmp_path))["config"]["train"]["mask_schedule_start"] == 4
    ratios = {r["step"]: r["mask_ratio"] for r in map(json.loads, open(tmp_path / "log.jsonl")) if "mask_ratio" in r}
    assert ratios[8] < ratios[6] / 4, ratios  # near the end of one schedule from step 4 to 8 (not halfway again)
    train.main(["--resume", str(tmp_path), "--mask-schedule", "zero", "--steps", "9"])
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt["config"]["train"]["mask_schedule_start"] == 8
    assert {g["lr"] for g in ckpt["optimizer"]["param_groups"]} == {5e-5}


def test_resume_refuses_a_dataset_whose_classes_changed(tmp_path):
    """Labels are class-folder indices: a class more or less, or the same count under other names, would give
    the run's labels other meanings (a new last class would be the null class)."""
    from PIL import Image

    def add(name):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(tmp_path / "imgs" / name / f"{i}.png")

    add("cat"), add("dog")
    flags = ["--dataset", str(tmp_path / "imgs"), "--num-workers", "0"]
    run(tmp_path / "run", "--steps", "1", *flags)
    add("zebra")
    with pytest.raises(ValueError, match="--resume .* does not fit its MaskDiT-T/2: classes 3 .the network's: 2"):
        train.main(["--resume", str(tmp_path / "run"), "--steps", "2"])
    import shutil
    shutil.rmtree(tmp_path / "imgs" / "zebra")
    os.rename(tmp_path / "imgs" / "dog", tmp_path / "imgs" / "cow")
    with pytest.raises(ValueError, match="class 1 named 'cow' .the run's: 'dog'"):
        train.main(["--resume", str(tmp_path / "run"), "--steps", "2"])


def test_resume_removes_partial_files_and_the_log_records_it_trains_again(tmp_path):
    """A kill during a checkpoint write leaves a .tmp- file; a kill after some log steps leaves their records:
    the resume deletes the one and drops the others, so log.jsonl has each step once."""
    run(tmp_path, "--steps", "3", "--ckpt-every", "2", "--log-every", "1")
    os.unlink(checkpoint_path(str(tmp_path), 3))  # as if killed while writing step 3's checkpoint
    (tmp_path / ".tmp-abcd-checkpoint-0000003.pt").write_bytes(b"partial")
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.')  # and a record cut in the middle
    train.main(["--resume", str(tmp_path), "--steps", "4"])
    assert not any(name.startswith(".tmp-") for name in os.listdir(tmp_path))
    steps = [r["step"] for r in map(json.loads, open(tmp_path / "log.jsonl")) if "loss" in r]
    assert steps == [1, 2, 3, 4]


def _logged_steps(run_dir):
    return [r["step"] for r in map(json.loads, open(os.path.join(run_dir, "log.jsonl"))) if "loss" in r]


def test_resume_from_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path):
    """A resume from a checkpoint earlier than the folder's latest starts another branch: the later checkpoints and
    their log records move to a subfolder (nothing deleted), so that resuming the folder continues this branch."""
    run(tmp_path, "--steps", "6", "--ckpt-every", "2", "--log-every", "1")
    old_six = load_checkpoint(checkpoint_path(str(tmp_path), 6))["model"]
    train.main(["--resume", checkpoint_path(str(tmp_path), 2), "--steps", "3", "--lr", "1e-4"])
    (aside,) = [d for d in os.listdir(tmp_path) if d.startswith("abandoned-after-2-")]
    assert sorted(os.listdir(tmp_path / aside)) == ["checkpoint-0000004.pt", "checkpoint-0000006.pt", "log.jsonl"]
    assert _logged_steps(tmp_path / aside) == [3, 4, 5, 6]
    assert all(torch.equal(a, b) for a, b in zip(load_checkpoint(str(tmp_path / aside))["model"].values(),
                                                 old_six.values()))
    assert latest_checkpoint(str(tmp_path)) == checkpoint_path(str(tmp_path), 3)
    train.main(["--resume", str(tmp_path), "--steps", "5"])  # the folder: this branch, at its step 3
    assert _logged_steps(tmp_path) == [1, 2, 3, 4, 5]
    assert load_checkpoint(str(tmp_path))["config"]["train"]["lr"] == 1e-4


def test_resume_into_another_runs_folder_is_refused(tmp_path):
    run(tmp_path / "a", "--steps", "2", "--ckpt-every", "2")
    run(tmp_path / "b", "--steps", "4", "--ckpt-every", "2")
    with pytest.raises(ValueError, match="--out .* already holds checkpoints of a run; continue that one with"):
        train.main(["--resume", str(tmp_path / "a"), "--out", str(tmp_path / "b"), "--steps", "4"])
    assert [s for s, _ in checkpoint_files(str(tmp_path / "b"))] == [2, 4]
    train.main(["--resume", str(tmp_path / "a"), "--out", str(tmp_path / "c"), "--steps", "3"])  # a new folder: fine
    assert latest_checkpoint(str(tmp_path / "c")) == checkpoint_path(str(tmp_path / "c"), 3)


def test_a_new_run_drops_the_log_of_an_attempt_that_saved_no_checkpoint(tmp_path):
    run(tmp_path, "--steps", "2", "--ckpt-every", "100", "--log-every", "1")
    for path in checkpoint_files(str(tmp_path)):  # (the final checkpoint: as if killed before it)
        os.unlink(path[1])
    run(tmp_path, "--steps", "3", "--log-every", "1")
    assert _logged_steps(tmp_path) == [1, 2, 3]


def test_a_new_batch_size_on_resume_does_not_inherit_the_accumulation(tmp_path):
    """Unmasking tuning at "batch 64 on 8 GPUs" is a global batch of 512 even if pretraining accumulated."""
    run(tmp_path, "--steps", "1", "--grad-accum", "2")
    train.main(["--resume", str(tmp_path), "--steps", "2"])  # nothing new: the run's global batch
    assert load_checkpoint(str(tmp_path))["data"]["batch_size"] == 32
    train.main(["--resume", str(tmp_path), "--steps", "3", "--batch-size", "8"])
    assert load_checkpoint(str(tmp_path))["data"]["batch_size"] == 8
    train.main(["--resume", str(tmp_path), "--steps", "4", "--batch-size", "4", "--grad-accum", "3"])
    assert load_checkpoint(str(tmp_path))["data"]["batch_size"] == 12


def test_a_run_folder_in_use_is_refused(tmp_path):
    """A run folder is held (flock) while a run trains in it: another launch into it, e.g. a scheduler's requeue
    of a job still running, is refused before it touches anything."""
    from maskdit.files import folder_lock

    run(tmp_path, "--steps", "2", "--ckpt-every", "2")
    with folder_lock(str(tmp_path), "--out"):
        with pytest.raises(ValueError, match="--resume: .* is in use by another process"):
            train.main(["--resume", str(tmp_path), "--steps", "4"])
    train.main(["--resume", str(tmp_path), "--steps", "3"])  # released: fine
    assert latest_checkpoint(str(tmp_path)) == checkpoint_path(str(tmp_path), 3)


def test_changes_of_the_global_batch_never_replay_a_begun_epoch(tmp_path):
    """Each change of the global batch continues the stream at the next epoch boundary, counted from the stream's
    position (1797 digits: 3 batches of 512 an epoch, 7 of 256)."""
    run(tmp_path, "--steps", "4", "--batch-size", "512")  # batches 0-3: epoch 1 begun
    train.main(["--resume", str(tmp_path), "--steps", "5", "--batch-size", "256"])
    assert load_checkpoint(str(tmp_path))["data"]["batches_done"] == 15  # epoch 2 (batch 14 of 256), one batch
    train.main(["--resume", str(tmp_path), "--steps", "6", "--batch-size", "512"])
    assert load_checkpoint(str(tmp_path))["data"]["batches_done"] == 10  # epoch 3 (batch 9 of 512), not epoch 2 again


def test_resume_of_weights_without_a_training_state_points_to_init_from(tmp_path):
    run(tmp_path / "a", "--steps", "1")
    a = load_checkpoint(str(tmp_path / "a"))
    atomic_save({"model": a["ema"], "ema": a["ema"], "config": {"model": a["config"]["model"]}, "step": 0},
                str(tmp_path / "converted.pt"))
    with pytest.raises(ValueError, match="--resume: .* holds weights without a run's training state .* --init-from"):
        train.main(["--resume", str(tmp_path / "converted.pt")])


def test_an_unreadable_latest_checkpoint_names_the_one_before(tmp_path):
    run(tmp_path, "--steps", "4", "--ckpt-every", "2")
    with open(checkpoint_path(str(tmp_path), 4), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"cannot read .*checkpoint-0000004.pt.*; the folder's checkpoint before it "
                                         r"is .*checkpoint-0000002.pt"):
        train.main(["--resume", str(tmp_path)])


def test_triton_attention_on_the_cpu_needs_the_interpreter(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="--sdpa-backend triton needs a CUDA device .* TRITON_INTERPRET=1"):
        run(tmp_path, "--device", "cpu", "--sdpa-backend", "triton")
    assert latest_checkpoint(str(tmp_path)) is None


def test_sdpa_backend_flag_selects_the_attention_kernel(tmp_path, monkeypatch):
    """--sdpa-backend math: every dense attention call runs under that kernel only; the flag is not inherited
    by a resume, and a later run without it is back to PyTorch's choice."""
    from maskdit import attention

    seen = []
    real = attention._dense_sdpa
    monkeypatch.setattr(attention, "_dense_sdpa", lambda q, k, v: seen.append(attention._sdpa_backend) or real(q, k, v))
    run(tmp_path / "a", "--steps", "1", "--sdpa-backend", "math")
    assert seen and set(seen) == {"math"}
    seen.clear()
    train.main(["--resume", str(tmp_path / "a"), "--steps", "2"])
    assert seen and set(seen) == {None}


@pytest.mark.parametrize("backend, fused", [("torch", False), ("auto", None)])
def test_the_torch_backend_keeps_the_ema_plain(tmp_path, monkeypatch, backend, fused):
    """--backend torch is plain PyTorch throughout: its EMA never takes kernels.ema's launch (fused=False);
    the other backends leave the choice to the EMA (its Triton kernel for CUDA parameters)."""
    seen = []

    class SpyEMA(EMA):
        def __init__(self, model, ema_model, fused=None):
            seen.append(fused)
            super().__init__(model, ema_model, fused=fused)

    monkeypatch.setattr(train, "EMA", SpyEMA)
    run(tmp_path, "--steps", "1", "--backend", backend)
    assert seen == [fused]


def test_nonfinite_losses_are_skipped_then_training_stops(tmp_path, monkeypatch):
    real_call = EDMLoss.__call__
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        loss = real_call(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(EDMLoss, "__call__", flaky)
    with pytest.raises(SystemExit, match="non-finite losses in a row"):
        run(tmp_path, "--steps", "50", "--max-nonfinite", "3", "--ckpt-every", "4")
    good, stopped = load_checkpoint(str(tmp_path / "checkpoint-0000004.pt")), load_checkpoint(str(tmp_path))
    assert stopped["step"] == 8 and stopped["nonfinite_total"] == 4
    for key in ("model", "ema"):  # the skipped steps changed nothing
        assert all(torch.equal(good[key][k], stopped[key][k]) for k in good[key])
    assert all(torch.isfinite(v).all() for v in stopped["model"].values())


def test_stop_signals_are_recorded_then_the_handlers_come_back():
    originals = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}

    def own_handler(signum, frame):  # the caller's handlers, which must come back (not the defaults)
        raise AssertionError("called")

    try:
        for s in originals:
            signal.signal(s, own_handler)
        with stop_signals() as received:
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # (handlers run in the main thread between bytecodes)
            assert received == [signal.SIGUSR1, signal.SIGTERM]
            default_signal_handlers()  # what a data-loader worker forked here runs first
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert all(signal.getsignal(s) is own_handler for s in originals)
    finally:
        for s, handler in originals.items():
            signal.signal(s, handler)


def test_stop_signal_checkpoints_at_the_next_log_step_and_resumes_exactly(tmp_path, monkeypatch):
    decay_at = train.ema_decay_at

    def signal_at_step_3(step, *args):  # called once a step, before the step's update
        if step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return decay_at(step, *args)

    monkeypatch.setattr(train, "ema_decay_at", signal_at_step_3)
    with pytest.raises(SystemExit) as stop:
        run(tmp_path / "b", "--steps", "50", "--ckpt-every", "100")
    assert stop.value.code == 128 + signal.SIGUSR1
    assert sorted(set(os.listdir(tmp_path / "b")) - {".lock"}) == ["checkpoint-0000004.pt", "log.jsonl"]
    monkeypatch.setattr(train, "ema_decay_at", decay_at)
    train.main(["--resume", str(tmp_path / "b"), "--steps", "6"])
    run(tmp_path / "a", "--steps", "6", "--ckpt-every", "100")
    a, b = load_checkpoint(str(tmp_path / "a")), load_checkpoint(str(tmp_path / "b"))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_sigterm_stops_the_script_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *FAST, "--steps", "100000",
                             "--out", str(out)], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # training has started: the first log line
            if line.startswith("step 2/"):
                break
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, rest
    assert "SIGTERM received: checkpoint at step" in rest and f"continue with --resume {out}" in rest
    ckpt = load_checkpoint(str(out))
    assert 2 <= ckpt["step"] < 100000 and ckpt["step"] % 2 == 0  # a log step (the signal may beat step 2's check)


def _subprocess(args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_train_and_sample_scripts_end_to_end(tmp_path):
    out = tmp_path / "run"
    res = _subprocess([os.path.join(ROOT, "train.py"), *FAST[:-4], "--steps", "4", "--grid-per-class", "2",
                       "--sample-steps", "2", "--out", str(out)], cwd=tmp_path)
    assert f"run folder: {out}" in res.stdout
    assert {"checkpoint-0000004.pt", "log.jsonl", "samples.png"} <= set(os.listdir(out))
    prefix = tmp_path / "s" / "digits"
    churn = ["--s-churn", "3", "--s-min", "0.01", "--s-noise", "1.003"]  # (the stochastic sampler's draws too)
    _subprocess([os.path.join(ROOT, "sample.py"), "--ckpt", str(out), "--num-per-class", "2", "--steps", "2",
                 "--batch-size", "7", *churn, "--out", str(prefix)], cwd=tmp_path)
    npz = np.load(str(prefix) + ".npz")
    assert npz["images"].shape == (20, 8, 8, 1) and npz["images"].dtype == np.uint8
    assert npz["labels"].tolist() == [i // 2 for i in range(20)]
    assert os.path.exists(str(prefix) + ".png")
    # the same seed gives the same images whatever the batch size (per-image generators, also for the churn)
    prefix2 = tmp_path / "s" / "again"
    _subprocess([os.path.join(ROOT, "sample.py"), "--ckpt", str(out), "--num-per-class", "2", "--steps", "2",
                 "--batch-size", "20", *churn, "--out", str(prefix2)], cwd=tmp_path)
    assert np.array_equal(np.load(str(prefix2) + ".npz")["images"], npz["images"])


def test_train_script_reports_bad_config_without_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--mask-ratio", "1.5", "--out",
                          str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode != 0
    assert "error: --mask-ratio must be in [0, 1), got 1.5" in res.stderr and "Traceback" not in res.stderr


def test_unmasking_tuning_resume_with_a_cosine_schedule(tmp_path):
    run(tmp_path, "--steps", "4", "--log-every", "1")
    train.main(["--resume", str(tmp_path), "--mask-schedule", "cosine", "--lr", "5e-5", "--steps", "12",
                "--log-every", "1"])
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    ratios = [r["mask_ratio"] for r in records]
    assert ratios[:4] == [0.5] * 4  # the first phase: constant
    tuning = ratios[4:]  # logged after each step: progress (step-1-4)/8 of the tuning phase
    assert tuning == sorted(tuning, reverse=True) and tuning[0] == pytest.approx(0.5) and tuning[-1] < 0.01
    assert all(r["lr"] == 5e-5 for r in records[4:])
    assert load_checkpoint(str(tmp_path))["config"]["train"]["mask_schedule_start"] == 4


@pytest.mark.parametrize("flags", [["--mask-schedule", "zero"], ["--mask-ratio", "0"],
                                   ["--mask-ratio-dist", "unmasked:0.5"], ["--mask-ratio-dist", "uniform:0.2:0.8"]])
def test_training_runs_with_schedules_and_per_sample_ratios(tmp_path, monkeypatch, flags):
    seen = []
    real = train.random_mask
    monkeypatch.setattr(train, "random_mask", lambda *a, **k: seen.append(a[2]) or real(*a, **k))
    run(tmp_path, "--steps", "2", *flags)
    if "zero" in flags or "0" in flags:
        assert seen == []  # a ratio of 0 takes the unmasked path
    else:
        assert len(seen) == 2 and all(isinstance(r, list) and len(r) == 16 for r in seen)
        if "unmasked:0.5" in flags:
            assert all(sorted(r)[:8] == [0.0] * 8 and sorted(r)[8:] == [0.5] * 8 for r in seen)


@pytest.mark.parametrize("flags,message", [
    (["--grad-accum", "0"], "--grad-accum must be >= 1"),
    (["--fsdp", "--precision", "fp16"], "--fsdp supports --precision fp32 and bf16"),
    (["--batch-size", "1000", "--grad-accum", "2"], "the global batch 2000"),
])
def test_invalid_multi_process_settings_fail_at_start(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path, *flags)


def test_tensorboard_logs_scalars_or_says_the_package_is_missing(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="--tensorboard needs the tensorboard package"):
            run(tmp_path, "--steps", "2", "--tensorboard")
        return
    run(tmp_path, "--steps", "2", "--tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))


def test_digits_metric_in_training_and_time_budget(tmp_path, monkeypatch):
    """--eval-every writes digits-metric records (training time excluded from evaluation); a time budget stops
    the run at a log step with a checkpoint."""
    monkeypatch.setenv("MASKDIT_CACHE", str(tmp_path / "cache"))
    run(tmp_path / "a", "--steps", "4", "--eval-every", "2", "--eval-per-class", "1")
    evals = [r for r in map(json.loads, open(tmp_path / "a" / "log.jsonl")) if "digits_fd" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["train_seconds"] > 0 and 0 <= r["class_accuracy"] <= 1 for r in evals)
    run(tmp_path / "b", "--steps", "1000", "--time-budget", "0.001")
    assert load_checkpoint(str(tmp_path / "b"))["step"] == 2  # the first log step
    with pytest.raises(ValueError, match="need --dataset digits"):
        run(tmp_path / "c", "--dataset", str(tmp_path), "--eval-every", "2")


def test_compile_network_modes():
    from maskdit import EDMPrecond
    from maskdit.training import compile_network

    net = EDMPrecond(create_model("MaskDiT-T/2", input_size=8, in_channels=4, num_classes=10))
    assert compile_network(net, "none") is net
    assert type(compile_network(net, "full")).__name__ == "OptimizedModule"
    assert compile_network(net, "regional", backend="eager") is net  # its blocks, found inside the denoiser
    blocks = [m for m in net.modules() if type(m).__name__ == "DiTBlock"]
    assert len(blocks) == 6 + 2 and all(b._compiled_call_impl is not None for b in blocks)
    with pytest.raises(ValueError, match="compile mode must be one of"):
        compile_network(net, "blocks")


def test_regional_compilation_matches_eager_and_graphs_do_not_grow_with_depth_or_k():
    from torch._dynamo.utils import counters

    from maskdit.masking import random_mask
    from maskdit.training import compile_blocks
    from tests.conftest import randomize

    torch._dynamo.reset()
    counters.clear()
    eager = randomize(create_model("MaskDiT-T/2", input_size=8, in_channels=4, num_classes=10))
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled, backend="aot_eager") == 6 + 2  # encoder and decoder blocks
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 5, 10])
    graphs = []
    for ratio in (0.5, 0.25, 0.75, 0.6):  # a changing K, as under a mask-ratio schedule
        ids = random_mask(3, 16, ratio).ids_keep
        out_e, out_c = eager(x, t, y, ids), compiled(x, t, y, ids)
        torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
        out_e.square().sum().backward()
        out_c.square().sum().backward()
        graphs.append(counters["stats"]["unique_graphs"])
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, atol=1e-5, rtol=1e-5, msg=name)
    # 8 blocks, yet a handful of graphs (each stack's body and last block; one dynamic-shape recompile at the
    # second K), and none after it
    assert graphs[1] <= 5 and graphs[1:] == [graphs[1]] * 3, graphs
    torch._dynamo.reset()


def test_train_compile_flag_modes(tmp_path):
    args = train.parse_args(["--compile"])
    assert args.compile == "full"
    assert train.parse_args(["--compile", "regional"]).compile == "regional"
    assert train.parse_args(["--no-compile"]).compile == "none"
    with pytest.raises(SystemExit):
        train.parse_args(["--compile", "fast"])
    # a run compiled regionally, with its blocks' activations recomputed, trains like any other
    run(tmp_path, "--steps", "2", "--compile", "regional", "--activation-checkpointing", "all", "--ckpt-every", "2")
    saved = load_checkpoint(str(tmp_path))["config"]["train"]
    assert (saved["compile"], saved["activation_checkpointing"]) == ("regional", "all")


def test_triton_backend_trains_like_the_torch_backend(tmp_path):
    # two steps of train.py with each backend (the kernels in the CPU interpreter), the fused loss, decoder
    # recomputation and the fused AdamW: the same weights afterwards
    flags = ["--steps", "2", "--batch-size", "4", "--ckpt-every", "2", "--activation-checkpointing", "decoder"]
    run(tmp_path / "torch", *flags, "--backend", "torch")
    run(tmp_path / "triton", *flags, "--backend", "triton")
    a, b = load_checkpoint(str(tmp_path / "torch")), load_checkpoint(str(tmp_path / "triton"))
    assert a["step"] == b["step"] == 2
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / run_dir / "log.jsonl")]
              for run_dir in ("torch", "triton")]
    assert len(losses[0]) >= 1 and losses[0] == pytest.approx(losses[1], rel=1e-4)
    for k in a["model"]:  # Adam's first steps move every weight by about lr, so sign flips of ~0 gradients
        diff = (b["model"][k] - a["model"][k]).abs()  # could differ by 2 lr: compare in bulk
        assert diff.float().mean() < 1e-5, k
    # --keep-norm-outputs keeps what the triton backend recomputes, bitwise the same: the same weights
    run(tmp_path / "kept", *flags, "--backend", "triton", "--keep-norm-outputs")
    c = load_checkpoint(str(tmp_path / "kept"))
    assert all(torch.equal(c["model"][k], b["model"][k]) for k in b["model"])
    assert c["config"]["train"]["keep_norm_outputs"] is True


def test_grad_norm_counts_the_parameters_with_gradients():
    from maskdit.distributed import grad_norm

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    assert grad_norm(model).item() == 0.0  # before any backward
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(model.parameters())]
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    model[1].bias.grad = None  # a parameter without a gradient is left out
    expected = torch.cat([g.flatten() for g in grads[:3]]).norm()
    assert grad_norm(model).dtype == torch.float32
    torch.testing.assert_close(grad_norm(model), expected)


def test_log_records_the_gradient_norm_with_the_fp16_loss_scale_taken_out(tmp_path):
    """Each log record has the norm of its step's gradient (of the global batch, before the update); fp16's
    gradients are scaled by the loss scale (65536 at first), which the logged norm leaves out."""
    norms = {}
    for precision in ("fp32", "fp16"):
        run(tmp_path / precision, "--steps", "2", "--log-every", "1", "--precision", precision, "--ckpt-every", "2")
        records = [json.loads(line) for line in open(tmp_path / precision / "log.jsonl")]
        norms[precision] = [r["grad_norm"] for r in records if "loss" in r]
    assert len(norms["fp32"]) == 2 and all(0 < n < 1e3 for n in norms["fp32"])
    assert norms["fp16"] == pytest.approx(norms["fp32"], rel=2e-2)
