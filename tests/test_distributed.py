"""Multi-process training on the CPU (gloo): 2 processes train like 1 process with the same global batch.

Each torchrun launch costs ~15 s on 2 cores (mostly starting Python and torch three times), so the launches
are shared through module-scoped fixtures: one reference single-process run, one DDP run, one FSDP run.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import train
from maskdit.checkpoint import load_checkpoint
from maskdit.data import EpochBatchSampler
from maskdit.distributed import DistEnv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--image-size", "8", "--log-every", "2", "--ckpt-every", "2", "--grid-per-class", "0", "--device", "cpu",
        "--num-workers", "0"]
ATOL = 1e-5  # fp32: the processes sum the same per-sample gradients in another order

# Launched by torchrun in place of train.py: records which rank saves checkpoints or opens files for writing.
SPY = """
import os, sys
sys.path.insert(0, {root!r})
import train
rank, marks = os.environ["RANK"], {marks!r}
real_save, real_open = train.atomic_save, open

def mark(kind, path):
    with real_open(os.path.join(marks, kind + "-rank" + rank), "a") as f:
        f.write(str(path) + "\\n")

def atomic_save(obj, path):
    mark("save", path)
    real_save(obj, path)

def spy_open(path, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+"):
        mark("open", path)
    return real_open(path, mode, *args, **kwargs)

train.atomic_save, train.open = atomic_save, spy_open
train.main(sys.argv[1:])
"""


# Launched by torchrun in place of train.py: rank 1 alone gets SIGUSR1 (a stop request) during step 3.
SIGNAL_RANK_1 = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train
decay_at = train.ema_decay_at

def signal_at_step_3(step, *args):
    if step == 3 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGUSR1)
    return decay_at(step, *args)

train.ema_decay_at = signal_at_step_3
train.main(sys.argv[1:])
"""


def torchrun(cwd, *args, script=None, returncode=0, timeout=300):
    """``torchrun --standalone --nproc_per_node=2 train.py ARGS`` (gloo on the CPU), one thread a process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           script or os.path.join(ROOT, "train.py"), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    assert res.returncode == returncode, res.stdout[-4000:] + res.stderr[-4000:]
    return res


def ckpt(run, step):
    return load_checkpoint(os.path.join(str(run), f"checkpoint-{step:07d}.pt"))


def assert_same_training_state(a, b, atol=ATOL):
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], atol=atol, rtol=0, msg=f"{key}.{k}")
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k in oa["state"][i]:
            torch.testing.assert_close(oa["state"][i][k], ob["state"][i][k], atol=atol, rtol=0)
    for k in ("batch_size", "batches_done", "images_done"):  # the position in the global-batch stream
        assert a["data"][k] == b["data"][k], k
    for k in ("generator", "host"):
        assert torch.equal(a["rng"][k], b["rng"][k]), k


def log_records(run):
    return [json.loads(line) for line in open(os.path.join(str(run), "log.jsonl"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, batch 8, 6 steps, checkpoints at 2, 4, 6."""
    out = tmp_path_factory.mktemp("ref")
    train.main(FAST + ["--batch-size", "8", "--steps", "6", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Two processes x batch 4 (global batch 8), 4 steps, through the spy that records every write."""
    tmp = tmp_path_factory.mktemp("ddp")
    marks = tmp / "marks"
    marks.mkdir()
    script = tmp / "spy_train.py"
    script.write_text(SPY.format(root=ROOT, marks=str(marks)))
    res = torchrun(tmp, *FAST, "--batch-size", "4", "--steps", "4", "--out", str(tmp / "run"), script=str(script))
    return tmp / "run", marks, res


def test_sampler_parts_cut_the_global_batch_in_process_order():
    whole = iter(EpochBatchSampler(20, 8, seed=3, start_batch=1))
    parts = [iter(EpochBatchSampler(20, 8, seed=3, start_batch=1, num_parts=4, parts=DistEnv(rank=r, world_size=2)
                                    .parts(2))) for r in range(2)]
    for _ in range(5):  # across an epoch boundary (2 batches per epoch)
        batch = next(whole)
        for r, it in enumerate(parts):
            env = DistEnv(rank=r, world_size=2)
            for micro in range(2):
                assert next(it) == batch[env.rows(micro, 2, 2)]
    with pytest.raises(ValueError, match="cannot take parts"):
        EpochBatchSampler(20, 8, seed=0, num_parts=3)


def test_two_processes_equal_one_process_with_the_same_global_batch(reference, ddp_run, tmp_path):
    run, marks, res = ddp_run
    assert_same_training_state(ckpt(run, 4), ckpt(reference, 4))
    assert ckpt(run, 4)["data"]["world_size"] == 2
    # the logged loss is the mean over both processes: the global batch's loss
    records, ref = log_records(run), log_records(reference)
    assert [r["step"] for r in records] == [2, 4]
    for r, q in zip(records, ref):
        assert r["loss"] == pytest.approx(q["loss"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(q["grad_norm"], rel=1e-5)  # the all-reduced gradient's, once
    # one process with gradient accumulation: the same global batch, the same training
    train.main(FAST + ["--batch-size", "4", "--grad-accum", "2", "--steps", "4", "--out", str(tmp_path / "acc")])
    assert_same_training_state(ckpt(tmp_path / "acc", 4), ckpt(reference, 4))
    for r, q in zip(log_records(tmp_path / "acc"), ref):
        assert r["grad_norm"] == pytest.approx(q["grad_norm"], rel=1e-5)


def test_only_rank_zero_writes_and_prints(ddp_run):
    run, marks, res = ddp_run
    assert sorted(os.listdir(marks)) == ["open-rank0", "save-rank0"]
    saved = open(marks / "save-rank0").read().split()
    assert [os.path.basename(p) for p in saved] == ["checkpoint-0000002.pt", "checkpoint-0000004.pt"]
    assert sorted(set(os.listdir(run)) - {".lock"}) == ["checkpoint-0000002.pt", "checkpoint-0000004.pt", "log.jsonl"]
    assert res.stdout.count("run folder:") == 1 and res.stdout.count("step 4/4") == 1


def test_two_process_checkpoint_resumes_in_one_process(reference, ddp_run, tmp_path):
    run, _, _ = ddp_run
    # same global batch (4 x 1 process x 2 accumulated): the data position carries over exactly
    train.main(["--resume", os.path.join(run, "checkpoint-0000002.pt"), "--grad-accum", "2", "--steps", "6",
                "--out", str(tmp_path)])
    resumed = ckpt(tmp_path, 6)
    assert resumed["data"]["world_size"] == 1 and resumed["data"]["grad_accum"] == 2
    assert_same_training_state(resumed, ckpt(reference, 6))


def test_mask_ratio_zero_with_ddp_and_accumulation(tmp_path):
    """No token is masked: the mask token still gets its (zero) gradient, so DDP needs no unused-parameter
    search; and gradients are reduced once per step with accumulation (no_sync on the first micro-batch)."""
    flags = [*FAST, "--mask-ratio", "0", "--steps", "2"]
    torchrun(tmp_path, *flags, "--batch-size", "2", "--grad-accum", "2", "--out", str(tmp_path / "ddp"))
    train.main(flags + ["--batch-size", "8", "--out", str(tmp_path / "one")])
    assert_same_training_state(ckpt(tmp_path / "ddp", 2), ckpt(tmp_path / "one", 2))


def has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not has_fsdp2(), reason="FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6")
def test_fsdp_trains_like_one_process_and_checkpoints_move_both_ways(reference, tmp_path):
    # an unsharded checkpoint continues under FSDP (2 processes x 2 x 2 accumulated: the global batch 8) ...
    torchrun(tmp_path, "--resume", os.path.join(reference, "checkpoint-0000002.pt"), "--fsdp", "--batch-size", "2",
             "--grad-accum", "2", "--steps", "4", "--out", str(tmp_path / "fsdp"))
    sharded = ckpt(tmp_path / "fsdp", 4)
    assert sharded["config"]["train"]["fsdp"] and sharded["data"]["world_size"] == 2
    assert_same_training_state(sharded, ckpt(reference, 4))
    # the gradient norm sums the shards' squares over both processes
    (fsdp_record,) = [r for r in log_records(tmp_path / "fsdp") if r["step"] == 4]
    (ref_record,) = [r for r in log_records(reference) if r["step"] == 4]
    assert fsdp_record["grad_norm"] == pytest.approx(ref_record["grad_norm"], rel=1e-5)
    # ... and the FSDP checkpoint (full state dicts gathered on rank 0) continues in one unsharded process,
    # which keeps the global batch 8 by itself: batch 2 x 4 accumulated
    train.main(["--resume", str(tmp_path / "fsdp"), "--steps", "6", "--out", str(tmp_path / "one")])
    resumed = ckpt(tmp_path / "one", 6)
    assert resumed["data"]["grad_accum"] == 4 and resumed["data"]["micro_batch"] == 2
    assert not resumed["config"]["train"]["fsdp"]  # --fsdp is a setting of the launch, not of the run
    assert_same_training_state(resumed, ckpt(reference, 6))


def test_a_stop_signal_to_one_process_stops_all_at_the_same_step(tmp_path):
    """Rank 1 alone is signalled: at the next log step every process agrees, rank 0 writes the checkpoint, all
    exit (non-zero: torchrun then fails the job, so a scheduler sees it did not finish)."""
    script = tmp_path / "signal_rank_1.py"
    script.write_text(SIGNAL_RANK_1.format(root=ROOT))
    res = torchrun(tmp_path, *FAST, "--ckpt-every", "100", "--steps", "50", "--batch-size", "4", "--out",
                   str(tmp_path / "run"), script=str(script), returncode=1, timeout=120)  # (about 7 s; processes
    # that disagree on the step hang in a collective)
    assert "SIGUSR1 received: checkpoint at step 4, then stop" in res.stdout
    assert f"exitcode  : {128 + signal.SIGUSR1}" in res.stdout + res.stderr
    assert sorted(set(os.listdir(tmp_path / "run")) - {".lock"}) == ["checkpoint-0000004.pt", "log.jsonl"]
