"""HF Trainer, taught our run folder, sampler, parameter groups and failure rules.

- Sampler: per-file weights and length grouping (`data/sampler.py`), deterministic per epoch.
- Optimizer: AdamW; weight decay off for norms and biases; optional learning rates per component
  (`train.lr_connector`, `train.lr_encoder`, as LLaVA's mm_projector_lr).
- Checkpoints: `checkpoints/step-N`, written under Trainer's own name, given checksums
  (`runs/checkpoint.py`) and renamed when complete, so a crash mid-save never leaves a folder that
  looks resumable; `save_total_limit` honoured. A failed save (disk full) stops the run naming the
  folder. The weights are saved as the model's exact state dict (safetensors) and loaded back
  strictly; a checkpoint file that does not load stops the run naming it.
- A NaN / Inf loss stops the run naming the step; nothing is saved after it.
- Throughput (tokens/s, samples/s) is added to every log line.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import Trainer

from medmvl_cli.data.dataset import SKIPPED
from medmvl_cli.data.sampler import WeightedLengthGroupedSampler
from medmvl_cli.errors import MedmvlError, RunError, write_failure
from medmvl_cli.runs.checkpoint import write_checksums
from medmvl_cli.runs.folder import STEP_DIR

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"


class LVLMTrainer(Trainer):
    def __init__(self, *args, sampler_weights=None, group_by_length=False, keep_checkpoints=None,
                 param_lrs=None, generation_eval=None, keep_best=False, **kwargs):
        """`param_lrs`: {id(parameter): learning rate} for parameters not trained at `train.lr`;
        `generation_eval`: a `GenerationEval` whose metrics join each evaluation's;
        `keep_best`: rotation never removes the checkpoint of the best evaluation."""
        super().__init__(*args, **kwargs)
        self.generation_eval = generation_eval
        self.keep_best = keep_best
        self.sampler_weights = sampler_weights or [1.0]
        self.group_by_length = group_by_length
        self.keep_checkpoints = keep_checkpoints
        self.param_lrs = param_lrs or {}
        self.skipped_records: list[str] = []
        self._window = {"tokens": 0, "samples": 0, "start": time.perf_counter()}

    # ----------------------------------------------------------------------------------- data
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        world = max(self.args.world_size, 1)
        return WeightedLengthGroupedSampler(
            lengths=dataset.lengths, source_indices=dataset.source_indices, weights=self.sampler_weights,
            batch_size=self.args.per_device_train_batch_size * world,
            group_by_length=self.group_by_length, seed=self.args.seed,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = inputs.pop(SKIPPED, None)
        if skipped:
            self.skipped_records.extend(skipped)
        inputs.pop("id", None)
        mask = inputs.get("attention_mask")
        self._window["tokens"] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        self._window["samples"] += (
            inputs["input_ids"].shape[0] if "position_ids" not in inputs
            else int((inputs["position_ids"] == 0).sum())
        )
        inputs["use_cache"] = False
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            step = self.state.global_step + 1
            last = self.args.output_dir
            raise RunError(
                f"the loss became {loss.item()} at step {step}",
                hint=f"lower train.lr or check the data; the last good checkpoint (if any) is in {last}, "
                     "resume from it with --resume auto",
            )
        return loss

    # ----------------------------------------------------------------------------- evaluation
    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """The eval loss, then (with `generation_eval`) the task metrics of generated answers."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.generation_eval is not None and metric_key_prefix == "eval":
            model = self.accelerator.unwrap_model(self.model)
            output.metrics.update(self.generation_eval(model, self.args.process_index, self.args.world_size))
            best = self.args.metric_for_best_model
            if best and best not in output.metrics:
                raise RunError(f"train.metric_for_best is {best.removeprefix('eval_')!r}, which the eval records "
                               f"do not allow (computed: {', '.join(k[5:] for k in output.metrics if k != 'eval_loss')})",
                               hint="choose one of the computed metrics, or loss")
        return output

    # ------------------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple, list] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            lr = self.param_lrs.get(id(param), self.args.learning_rate)
            key = (lr, self.args.weight_decay if name in decay else 0.0)
            groups.setdefault(key, []).append(param)
        param_groups = [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(param_groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    # ---------------------------------------------------------------------------- checkpoints
    def _save(self, output_dir=None, state_dict=None):
        """Checkpoint weights: the exact state dict, loaded back strictly on resume.

        Tensors are copied out first: tied weights share storage and DeepSpeed keeps parameters as
        views into flat buffers, neither of which safetensors stores as they are."""
        from safetensors.torch import save_file

        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        weights = state_dict if state_dict is not None else self.accelerator.unwrap_model(self.model).state_dict()
        weights = {k: (v.detach().cpu() if v.is_cuda else v.detach().clone()).contiguous() for k, v in weights.items()}
        save_file(weights, os.path.join(output_dir, WEIGHTS), metadata={"format": "pt"})

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint:
            from transformers.trainer_callback import TrainerState

            with _reading(resume_from_checkpoint, "trainer_state.json"):
                TrainerState.load_from_json(os.path.join(resume_from_checkpoint, "trainer_state.json"))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.is_deepspeed_enabled:
            with _reading(resume_from_checkpoint, "the DeepSpeed state"):
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file

        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        with _reading(resume_from_checkpoint, WEIGHTS):
            weights = load_file(os.path.join(resume_from_checkpoint, WEIGHTS))
        result = model.load_state_dict(weights, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise RunError(f"checkpoint {resume_from_checkpoint} does not fit the model "
                           f"(missing {sorted(result.missing_keys)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]})",
                           hint="resume with the recipe the run was started with")

    def _load_optimizer_and_scheduler(self, checkpoint):
        with _reading(checkpoint, "optimizer.pt / scheduler.pt"):
            return super()._load_optimizer_and_scheduler(checkpoint)

    def _load_rng_state(self, checkpoint):
        with _reading(checkpoint, "rng_state*.pth"):
            return super()._load_rng_state(checkpoint)

    def _save_checkpoint(self, model, trial):
        written = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        final = Path(self.args.output_dir) / f"step-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                write_checksums(written)
        except Exception as err:  # OSError, torch's RuntimeError, SafetensorError: whatever the disk did
            if isinstance(err, MedmvlError) or not self.args.should_save:
                raise
            shutil.rmtree(written, ignore_errors=True)
            raise write_failure(final, err, f"checkpoint step-{self.state.global_step}",
                                then="then resume with --resume auto (from the last complete checkpoint)") from None
        if self.args.should_save:
            if final.exists():
                shutil.rmtree(final)
            os.replace(written, final)
            self._rotate()
        self.accelerator.wait_for_everyone()

    def _rotate(self):
        limit = self.keep_checkpoints
        if not limit:
            return
        steps = sorted((int(m.group(1)), p) for p in Path(self.args.output_dir).iterdir()
                       if (m := STEP_DIR.match(p.name)))
        best = self.state.best_global_step if self.keep_best else None
        for step, path in steps[:-limit]:
            if step != best:
                shutil.rmtree(path, ignore_errors=True)

    # ---------------------------------------------------------------------------------- logs
    def log(self, logs, start_time=None):
        if "loss" in logs:
            elapsed = max(time.perf_counter() - self._window["start"], 1e-9)
            logs["tokens_per_s"] = round(self._window["tokens"] / elapsed, 2)
            logs["samples_per_s"] = round(self._window["samples"] / elapsed, 3)
            self._window = {"tokens": 0, "samples": 0, "start": time.perf_counter()}
            if not math.isfinite(logs["loss"]):
                raise RunError(f"the loss became {logs['loss']} by step {self.state.global_step}",
                               hint="lower train.lr or check the data; resume from the last checkpoint with --resume auto")
        super().log(logs, start_time)


@contextmanager
def _reading(checkpoint, what: str):
    """A checkpoint file that fails to load becomes a RunError naming it, not a traceback (nor Typer's
    bare "Aborted." for the EOFError of an empty torch file)."""
    try:
        yield
    except MedmvlError:
        raise
    except Exception as err:  # torch / safetensors / json raise many kinds for a damaged file
        detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise RunError(f"checkpoint {checkpoint}: {what} does not load ({detail})",
                       hint="resume from another checkpoint (--resume auto skips damaged ones), or start over "
                            "with --overwrite") from None
