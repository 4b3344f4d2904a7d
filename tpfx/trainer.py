"""HF Trainer checkpoints of a sharded model: ``tpfx.TrainerCheckpoints``, a ``TrainerCallback``.

Trainer saves a model that is not a ``PreTrainedModel`` by writing ``model.state_dict()`` with safetensors, and
the optimizer with ``torch.save`` from its main process: for a sharded module the first holds DTensors
(safetensors refuses them) and the second would hold one rank's slices. The callback takes over the saves that
Trainer's own save strategy asks for (it clears ``control.should_save`` at the steps where Trainer's flow set it,
so ``save_strategy``, ``save_steps`` and ``save_total_limit`` keep their meaning) and writes
``output_dir/checkpoint-<step>/`` in the layout Trainer resumes from:

- ``config.json`` and ``model.safetensors``: the full model, by ``sharded.save_pretrained`` (it also loads with
  ``from_pretrained``). Trainer's resume reads it and calls ``load_state_dict`` with the full tensors, which the
  sharded module cuts to each rank's slice (``tpfx.full_state_dict``).
- ``trainer_state.json`` and ``rng_state.pth`` (``rng_state_<process>.pth`` when Trainer itself runs
  distributed), in Trainer's format: Trainer restores the step, skips the batches already trained and restores
  the random state at the point where it does so for its own checkpoints.
- ``tpfx/``: the per-rank checkpoint of ``tpfx.save`` (the model's slices and the optimizer's state) and the
  learning-rate scheduler's state. Trainer finds no ``optimizer.pt`` there and leaves the optimizer alone; the
  callback loads it in ``on_train_begin`` of the resumed run, after Trainer has created the optimizer and
  before the first step.

Collective: every rank of the tp group runs Trainer with the callback and the same ``output_dir``.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from tpfx.checkpoint import load, save

__all__ = ["TrainerCheckpoints"]

TPFX_DIR = "tpfx"
SCHEDULER = "scheduler.pt"
META = "tpfx_checkpoint.json"
TRAINER_STATE = "trainer_state.json"


def _rng_state() -> dict[str, Any]:
    """The random states Trainer saves and restores (its ``_save_rng_state`` keys for this host)."""
    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                              "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.random.get_rng_state_all()
    return states


def _rng_file(args: TrainingArguments) -> str | None:
    """Trainer's name for this process's random-state file, ``None`` where another process writes it."""
    if args.world_size > 1:
        return f"rng_state_{args.process_index}.pth"
    return "rng_state.pth" if dist.get_rank() == 0 else None


class TrainerCheckpoints(TrainerCallback):
    """Saves and resumes a sharded model's Trainer checkpoints (see the module docstring). ``resume_from``:
    the checkpoint a resumed run started from, when it is not ``output_dir/checkpoint-<step>`` (Trainer does
    not tell callbacks which one it read)."""

    def __init__(self, resume_from: str | os.PathLike | None = None) -> None:
        self.resume_from = resume_from
        self._due = False

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl:
        return self._take_save(args, state, control, **kwargs)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> TrainerControl:
        return self._take_save(args, state, control, **kwargs)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               **kwargs: Any) -> None:
        if self._due:  # after Trainer logged this step: the checkpoint's log history has it, as Trainer's would
            self._due = False
            self._save_now(args, state, **kwargs)

    def _take_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                   **kwargs: Any) -> TrainerControl:
        """Take over the save Trainer's flow asked for at this step: at once, or after this step's log."""
        if control.should_save:
            control.should_save = False  # this callback writes the checkpoint, Trainer does not
            if control.should_log:
                self._due = True
            else:
                self._save_now(args, state, **kwargs)
        return control

    def _save_now(self, args: TrainingArguments, state: TrainerState, *, model: Any = None,
                  optimizer: Any = None, lr_scheduler: Any = None, **_: Any) -> None:
        path = os.path.join(str(args.output_dir), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self.save(path, args, state, model, optimizer, lr_scheduler)

    def save(self, path: str, args: TrainingArguments, state: TrainerState, model: Any, optimizer: Any,
             lr_scheduler: Any) -> None:
        """Write one checkpoint and drop the oldest beyond ``save_total_limit`` (collective)."""
        model.save_pretrained(path)
        save(model, os.path.join(path, TPFX_DIR), optimizer=optimizer)
        if (name := _rng_file(args)) is not None:
            torch.save(_rng_state(), os.path.join(path, name))
        if dist.get_rank() == 0:
            if lr_scheduler is not None:
                torch.save(lr_scheduler.state_dict(), os.path.join(path, TPFX_DIR, SCHEDULER))
            with open(os.path.join(path, TPFX_DIR, META), "w") as f:
                json.dump({"global_step": state.global_step}, f)
            state.save_to_json(os.path.join(path, TRAINER_STATE))
            rotate_checkpoints(output_dir=str(args.output_dir), save_total_limit=args.save_total_limit,
                               best_model_checkpoint=state.best_model_checkpoint, use_mtime=False)
        dist.barrier(group=model.group)  # the checkpoint is complete on every rank's return

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, *,
                       model: Any = None, optimizer: Any = None, lr_scheduler: Any = None,
                       **_: Any) -> None:
        if state.global_step == 0:
            return  # a fresh run
        path = str(self.resume_from or os.path.join(str(args.output_dir), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        meta = os.path.join(path, TPFX_DIR, META)
        if not os.path.isfile(meta):
            raise RuntimeError(f"tpfx: Trainer resumed at step {state.global_step}, but {path} has no tpfx "
                               "checkpoint (optimizer state); pass TrainerCheckpoints(resume_from=<the "
                               "checkpoint directory given to trainer.train>)")
        with open(meta) as f:
            saved = json.load(f)["global_step"]
        if saved != state.global_step:
            raise RuntimeError(f"tpfx: {path} holds step {saved}, but Trainer resumed at step {state.global_step}")
        load(model, os.path.join(path, TPFX_DIR), optimizer=optimizer)
        scheduler = os.path.join(path, TPFX_DIR, SCHEDULER)
        if lr_scheduler is not None and os.path.isfile(scheduler):
            lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))
