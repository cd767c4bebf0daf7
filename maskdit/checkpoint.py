"""Training checkpoints: their names in a run folder, crash-safe saving (``maskdit.files.atomic_write``), finding,
loading, pruning and setting aside later ones on a resume, and the run log's records a resume trains again."""

from __future__ import annotations

import json
import os
import re

import torch

from .files import atomic_write

CKPT_RE = re.compile(r"^checkpoint-(\d+)\.pt$")


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"checkpoint-{step:07d}.pt")


def atomic_save(obj, path: str) -> None:
    """``torch.save`` with ``atomic_write``: crash-safe checkpoints."""
    atomic_write(path, lambda f: torch.save(obj, f))


def drop_log_records_after(path: str, step: int, keep_in: str | None = None) -> int:
    """Rewrite the JSON-lines log ``path`` (atomically) without the records of steps after ``step``: those a
    resume from the checkpoint of ``step`` trains again (-1: every record, for a fresh run in a folder an earlier
    attempt logged into).  The dropped records are appended to the log ``keep_in`` when given.  Returns how many
    were dropped (0 without the file)."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.readlines()

    def later(line: str) -> bool:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a kill: its step is gone with it
            return line.strip() != ""
        return isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step

    kept = [line for line in lines if not later(line)]
    if len(kept) < len(lines):
        if keep_in is not None:
            with open(keep_in, "a") as f:
                f.writelines(line if line.endswith("\n") else line + "\n" for line in lines if later(line))
        atomic_write(path, lambda f: f.write("".join(kept).encode()))
    return len(lines) - len(kept)


def checkpoint_files(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the checkpoints in ``run_dir``, by step (empty without the folder)."""
    if not os.path.isdir(run_dir):
        return []
    return sorted((int(m.group(1)), os.path.join(run_dir, name)) for name in os.listdir(run_dir)
                  if (m := CKPT_RE.match(name)))


def set_aside_later_checkpoints(run_dir: str, step: int, stamp: str) -> str | None:
    """Move the checkpoints of ``run_dir`` of steps after ``step`` into a new subfolder
    ``abandoned-after-<step>-<stamp>`` and return it (None if there are none): a resume from the checkpoint of
    ``step`` starts another branch of the run, and the folder's latest checkpoint must be this branch's, so that a
    later ``--resume`` of the folder continues it.  Nothing is deleted; renames within the folder."""
    later = [path for s, path in checkpoint_files(run_dir) if s > step]
    if not later:
        return None
    dest = os.path.join(run_dir, f"abandoned-after-{step}-{stamp}")
    os.makedirs(dest)
    for path in later:
        os.replace(path, os.path.join(dest, os.path.basename(path)))
    return dest


def latest_checkpoint(run_dir: str) -> str | None:
    """The checkpoint with the highest step in ``run_dir``, or None."""
    found = checkpoint_files(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: str, step: int, keep_last: int, keep_every: int = 0) -> list[str]:
    """Delete the checkpoints of ``run_dir`` written before ``step`` that fall outside the ``keep_last`` most
    recent (the one of ``step`` counted among them) and are not at a multiple of ``keep_every`` steps (0: none
    kept for that); ``keep_last`` 0 keeps everything.  Checkpoints of later steps are not touched.  Returns the
    deleted paths."""
    if keep_last < 1 or not os.path.isdir(run_dir):
        return []
    older = [(s, path) for s, path in checkpoint_files(run_dir) if s < step]
    doomed = [path for s, path in older[:max(0, len(older) - (keep_last - 1))]
              if not (keep_every and s % keep_every == 0)]
    for path in doomed:
        os.unlink(path)
    return doomed


def resolve_checkpoint(path: str, arg: str = "--resume") -> str:
    """A checkpoint file, or the latest checkpoint of a run folder; ValueError naming the argument ``arg``
    if there is none."""
    if os.path.isdir(path):
        found = latest_checkpoint(path)
        if found is None:
            raise ValueError(f"{arg}: run folder {path!r} holds no checkpoint-*.pt file")
        return found
    if not os.path.isfile(path):
        raise ValueError(f"{arg}: {path!r} is neither a checkpoint file nor a run folder")
    return path


def load_failure(e: BaseException) -> str:
    """Why ``torch.load`` failed, in one line: the exception's type and its message's first line."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}"


def load_checkpoint(path: str, map_location="cpu", arg: str = "--resume") -> dict:
    """Load a training checkpoint written by ``train.py`` (a dict with model, ema, optimizer, step, ...);
    ``path`` may be a run folder (its latest checkpoint), errors name the argument ``arg``."""
    file = resolve_checkpoint(path, arg)
    try:
        ckpt = torch.load(file, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated, corrupt or not a checkpoint: the unpickler fails in many ways
        found = checkpoint_files(os.path.dirname(os.path.abspath(file)))
        steps = [s for s, p in found if os.path.samefile(p, file)]
        earlier = [p for s, p in found if steps and s < steps[0]]
        hint = f"; the folder's checkpoint before it is {earlier[-1]!r}" if earlier else ""
        raise ValueError(f"{arg}: cannot read {file!r} as a checkpoint ({load_failure(e)}){hint}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{arg}: {path!r} is not a checkpoint of train.py or maskdit.convert (missing 'model'/"
                         "'config'); official MaskDiT and DiT checkpoints: python -m maskdit.convert SRC DST --source "
                         "maskdit|dit")
    return ckpt
