"""`medmvl pretrain | finetune | lora`: one engine function from a resolved recipe to a finished run."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from medmvl_cli.config.schema import Recipe
from medmvl_cli.constants import RECIPES_DIR
from medmvl_cli.errors import RunError
from medmvl_cli.runs.folder import BEST, write_atomic

logger = logging.getLogger(__name__)

DEEPSPEED_CONFIGS = RECIPES_DIR / "deepspeed"


def compute_dtype(recipe: Recipe) -> str:
    """float32 | bfloat16 | float16: `auto` is bfloat16 on GPUs that support it, else float32.

    On a CPU every dtype trains in float32 (bf16 is ~30x slower there and fp16 unsupported)."""
    import torch

    if not torch.cuda.is_available():
        return "float32"
    dtype = recipe.model.llm.dtype
    if dtype == "auto":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return dtype


def deepspeed_config(recipe: Recipe) -> str | None:
    name = recipe.distributed.deepspeed
    if name is None:
        return None
    path = DEEPSPEED_CONFIGS / f"{name}.json" if name in ("zero2", "zero3") else Path(name)
    if not path.is_file():
        raise RunError(f"distributed.deepspeed: {path} does not exist", hint="use zero2, zero3 or an existing .json")
    return str(path)


def build_training_model(recipe: Recipe):
    """The model (fresh, or from `init_from`) with trainable parts set, and its processor.

    Weights are float32 master weights; bf16 / fp16 training runs them under autocast."""
    from medmvl_cli.inference.load import build
    from medmvl_cli.model.trainable import apply_lora, apply_trainable

    model, processor = build(recipe, dtype="float32")
    apply_trainable(model, recipe.trainable)
    if recipe.trainable.llm == "lora":
        apply_lora(model, recipe.lora)
    return model, processor


def _sources(specs):
    from medmvl_cli.data.dataset import DatasetSource

    return [DatasetSource(s.annotations, s.image_root, s.volume_root, s.weight) for s in specs]


def build_datasets(recipe: Recipe, processor):
    """(train, eval or None) datasets, both read through the model's processor."""
    from medmvl_cli.data.dataset import LVLMDataset

    processor.set_limits(recipe.data.max_voxels, recipe.data.max_pixels, cache_dir=recipe.data.cache_dir)

    def dataset(specs, train: bool):
        return LVLMDataset.from_sources(
            _sources(specs), processor, train=train, truncate_answers=recipe.data.truncate_answers,
            skip_bad_records=recipe.data.skip_bad_records, require_answer=train,
        )

    if not recipe.data.train:
        raise RunError("the recipe has no training data", hint="add data.train: [{annotations: train.json, ...}]")
    train = dataset(recipe.data.train, True)
    evaluation = dataset(recipe.data.eval, False) if recipe.data.eval else None
    return train, evaluation


def training_arguments(recipe: Recipe, run, quiet: bool):
    import torch
    from transformers import TrainingArguments

    dtype = compute_dtype(recipe)
    train = recipe.train
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cuda = torch.cuda.is_available()
    report_to = [r for r in train.report_to if r != "none"] or "none"
    if report_to != "none":
        tracker_logs_in(run.logs_dir)
    return TrainingArguments(
        output_dir=str(run.checkpoints_dir),
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        learning_rate=train.lr,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        activation_checkpointing=train.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if train.gradient_checkpointing else None,
        logging_steps=train.logging_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=None,  # the trainer rotates its own step-N folders
        eval_strategy="steps" if (train.eval_steps and recipe.data.eval) else "no",
        eval_steps=train.eval_steps,
        metric_for_best_model=f"eval_{best_metric(recipe)}" if recipe.data.eval else None,
        greater_is_better=best_metric(recipe) != "loss",
        report_to=report_to,
        run_name=run.root.name,
        seed=recipe.seed,
        data_seed=recipe.seed,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        use_cpu=not cuda,
        ddp_backend="gloo" if (distributed and not cuda) else None,
        deepspeed=deepspeed_config(recipe),
        dataloader_num_workers=recipe.data.num_workers,
        remove_unused_columns=False,
        disable_tqdm=True,
        logging_nan_inf_filter=False,
        use_cache=False,
        # A fully trained vision tower has layers past `select_layer` that get no gradient (as in LLaVA).
        ddp_find_unused_parameters=any(
            getattr(recipe.trainable, f"{branch}_encoder") == "full" for branch in ("image", "image3d")),
    )


def best_metric(recipe: Recipe) -> str:
    """The metric that makes an evaluation the best: train.metric_for_best, else exact match when
    answers are generated, else the eval loss."""
    train = recipe.train
    return train.metric_for_best or ("exact_match" if train.eval_generate else "loss")


def tracker_logs_in(logs_dir: Path) -> None:
    """Trackers that write locally (TensorBoard, an offline wandb, a file-based MLflow) write into the
    run's logs/ folder (made once the run folder is prepared) unless the user's environment says otherwise."""
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(logs_dir))
    os.environ.setdefault("WANDB_DIR", str(logs_dir))
    os.environ.setdefault("MLFLOW_TRACKING_URI", (logs_dir / "mlruns").resolve().as_uri())


def join_deepspeed_process_group(args) -> None:
    """Under ZeRO-3, transformers builds the LLM inside `deepspeed.zero.Init`, which reads the world
    size from DeepSpeed's own communication layer. Accelerate sets that layer up on GPUs but, on
    CPUs, starts a plain torch process group; hand that group to DeepSpeed so every rank sees the
    real world size (it would otherwise see 1 and reject the batch sizes)."""
    if not args.deepspeed or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    from deepspeed import comm

    if not comm.is_initialized():
        comm.init_distributed(dist_backend=args.ddp_backend, auto_mpi_discovery=False)


def train_stage(recipe: Recipe, *, resume: str | None = None, overwrite: bool = False,
                quiet: bool = False) -> Path:
    """Train one stage of a resolved recipe into its run folder; returns the folder."""
    import transformers
    from transformers.trainer_callback import PrinterCallback

    from medmvl_cli.config.loader import dump_recipe
    from medmvl_cli.data.collator import LVLMCollator
    from medmvl_cli.engine.callbacks import MetricsFile, TrainingProgress
    from medmvl_cli.engine.trainer import LVLMTrainer
    from medmvl_cli.model.builder import materialise_presets
    from medmvl_cli.runs.folder import RunFolder

    run = RunFolder(recipe.output_dir)
    materialise_presets(recipe)
    args = training_arguments(recipe, run, quiet)
    checkpoint = None
    with args.main_process_first(local=False, desc="prepare the run folder"):
        if args.process_index == 0:
            checkpoint = run.prepare(dump_recipe(recipe), overwrite=overwrite, resume=resume)
            run.logs_dir.mkdir(exist_ok=True)
        elif resume:
            checkpoint = run.resume_checkpoint(resume)
    transformers.set_seed(recipe.seed)
    join_deepspeed_process_group(args)
    model, processor = build_training_model(recipe)
    if recipe.data.packing:
        from medmvl_cli.model.packed_attention import use_packed_attention

        use_packed_attention(model)
    train_set, eval_set = build_datasets(recipe, processor)
    generation_eval = None
    if eval_set is not None and recipe.train.eval_generate:
        from medmvl_cli.engine.generation_eval import GenerationEval

        generation_eval = GenerationEval(recipe, processor)
    callbacks = [MetricsFile(run.metrics_file)]
    if not quiet:
        callbacks.append(TrainingProgress())
    trainer = LVLMTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
        data_collator=LVLMCollator(processor.tokenizer.pad_token_id, packing=recipe.data.packing),
        callbacks=callbacks, sampler_weights=[s.weight for s in recipe.data.train],
        group_by_length=recipe.data.group_by_length, keep_checkpoints=recipe.train.save_total_limit,
        param_lrs=component_learning_rates(model, recipe),
        generation_eval=generation_eval, keep_best=recipe.train.keep_best,
    )
    trainer.remove_callback(PrinterCallback)  # logs go to metrics.jsonl and the progress bar
    if checkpoint is not None:
        logger.info("resuming from %s", checkpoint)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, TrainingProgress):
                callback.on_train_end(args, trainer.state, trainer.control)
    verify_replicas(trainer)
    if trainer.skipped_records:
        logger.warning("skipped %d record(s) whose files failed to load: %s", len(trainer.skipped_records),
                       ", ".join(trainer.skipped_records[:20]))
    if eval_set is not None:
        evaluated = [row for row in trainer.state.log_history
                     if "eval_loss" in row and row.get("step") == trainer.state.global_step]
        metrics = evaluated[-1] if evaluated else trainer.evaluate()  # the last step may have just been evaluated
        logger.info("eval loss %.4f", metrics.get("eval_loss", float("nan")))
        best = settle_best(trainer, run, recipe, metrics)
    save_final_model(trainer, run, processor, recipe)
    if eval_set is not None and trainer.args.should_save:
        write_atomic(run.root / BEST, json.dumps(best, indent=2) + "\n")
    return run.root


def settle_best(trainer, run, recipe: Recipe, final_metrics: dict) -> dict:
    """Which evaluation was the best (the final one counts too); with train.keep_best, put its
    weights back in the model before it is saved. Returns what best.json records."""
    metric = trainer.args.metric_for_best_model
    final_value = final_metrics.get(metric)
    step, value = trainer.state.best_global_step, trainer.state.best_metric
    better = (lambda a, b: a > b) if trainer.args.greater_is_better else (lambda a, b: a < b)
    if final_value is not None and (value is None or not step or better(final_value, value)):
        step, value = trainer.state.global_step, final_value
    kept = bool(recipe.train.keep_best and step and step != trainer.state.global_step)
    if kept:
        checkpoint = run.checkpoints_dir / f"step-{step}"
        logger.info("keep_best: the model is step %d's (%s %.4f), read from %s", step, metric, value, checkpoint)
        trainer._load_from_checkpoint(str(checkpoint))
    return {"metric": metric, "step": step, "value": value, "final_step": trainer.state.global_step,
            "model_is_best": kept or step == trainer.state.global_step}


def verify_replicas(trainer) -> None:
    """After data-parallel training every rank must hold the same weights; a mismatch is a bug, not noise."""
    import torch
    import torch.distributed as dist

    if trainer.args.world_size <= 1 or trainer.is_deepspeed_enabled or not dist.is_initialized():
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        local = torch.stack([sum(p.double().sum() for p in model.parameters()),
                             sum(p.double().square().sum() for p in model.parameters())])
    gathered = [torch.zeros_like(local) for _ in range(trainer.args.world_size)]
    dist.all_gather(gathered, local)
    if any(not torch.equal(gathered[0], g) for g in gathered[1:]):
        raise RunError(f"the {trainer.args.world_size} ranks ended with different weights ({gathered})",
                       hint="report this as a bug with the recipe and the launch command")
    logger.info("parameters agree on all %d ranks (checksum %.6f)", trainer.args.world_size, gathered[0][0].item())


def component_learning_rates(model, recipe: Recipe) -> dict[int, float]:
    """{id(param): lr} for the components given their own rate (train.lr_connector / lr_encoder)."""
    rates = {}
    for name, module in model.components().items():
        lr = recipe.train.lr_connector if name.endswith("connector") else (
            recipe.train.lr_encoder if name.endswith("encoder") else None)
        if lr is not None:
            rates.update({id(p): lr for p in module.parameters()})
    return rates


def save_final_model(trainer, run, processor, recipe: Recipe) -> None:
    """model/ written beside and renamed into place; FINISHED last (rank 0)."""
    import shutil

    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_deepspeed_enabled else None
    trainer.accelerator.wait_for_everyone()
    if not trainer.args.should_save:
        return
    from medmvl_cli.errors import is_disk_error, write_failure
    from medmvl_cli.model.builder import save_model
    from medmvl_cli.runs.folder import STAGED_MODEL

    staging = run.root / STAGED_MODEL
    shutil.rmtree(staging, ignore_errors=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    try:
        save_model(model, staging, processor, state_dict=state_dict, dtype=compute_dtype(recipe))
    except Exception as err:
        if not is_disk_error(err):
            raise
        shutil.rmtree(staging, ignore_errors=True)
        raise write_failure(run.model_dir, err, "the final model",
                            then="then resume with --resume auto (the last checkpoint is kept)") from None
    if run.model_dir.exists():
        shutil.rmtree(run.model_dir)
    os.replace(staging, run.model_dir)
    run.mark_finished()
    logger.info("finished: %s", run.model_dir)
