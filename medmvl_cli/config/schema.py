"""The recipe: one YAML file becomes one validated `Recipe`.

The tree mirrors the model tree; a backend is chosen by its `type` field. Unknown keys are errors.
Stage defaults (which parts train, which template) are filled by `resolve.py`, not here, so that the
schema describes what a user may write and `config show` prints what will actually run.
"""

from __future__ import annotations

import difflib
import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medmvl_cli.config.limits import DEFAULT_MAX_PIXELS, DEFAULT_MAX_VOXELS
from medmvl_cli.config.names import LLM_PRESETS, TEMPLATES
from medmvl_cli.config.trackers import NO_TRACKER, TRACKERS

Stage = Literal["pretrain", "finetune", "lora"]
STAGES: tuple[str, ...] = ("pretrain", "finetune", "lora")
Activation = Literal["gelu", "relu", "silu"]
Train = Literal["frozen", "full"]
TrainLLM = Literal["frozen", "full", "lora"]
PositiveTriple = tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]]


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are re-validated on update."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _one_source(path: str | None, preset: str | None, what: str) -> None:
    if (path is None) == (preset is None):
        raise ValueError(f"{what}: give exactly one of `path` (a local HF folder) or `preset` (built-in tiny model)")


# --------------------------------------------------------------------------------------- encoders
class _EncoderBase(Section):
    select_layer: int = Field(
        -2, description="Hidden state the features come from (HF style: 0 = patch embeddings, -1 = last layer)."
    )
    select_feature: Literal["patch", "cls_patch"] = Field(
        "patch", description="`patch`: patch tokens only; `cls_patch`: the CLS token too (encoders that have one)."
    )


class ClipEncoder(_EncoderBase):
    """A CLIP vision tower (transformers' CLIPVisionModel)."""

    type: Literal["clip"] = Field(description="Encoder backend.")
    path: str | None = Field(None, description="Local HF folder (or hub id where the hub is reachable) of a CLIP model.")
    preset: Literal["tiny"] | None = Field(None, description="Built-in random-init tiny encoder instead of `path`.")

    @model_validator(mode="after")
    def _source(self):
        _one_source(self.path, self.preset, "clip encoder")
        return self


class SiglipEncoder(_EncoderBase):
    """A SigLIP vision tower (transformers' SiglipVisionModel); it has no CLS token."""

    type: Literal["siglip"] = Field(description="Encoder backend.")
    path: str | None = Field(None, description="Local HF folder (or hub id) of a SigLIP model.")
    preset: Literal["tiny"] | None = Field(None, description="Built-in random-init tiny encoder instead of `path`.")

    @model_validator(mode="after")
    def _source(self):
        _one_source(self.path, self.preset, "siglip encoder")
        return self


ImageEncoder = Annotated[ClipEncoder | SiglipEncoder, Field(discriminator="type")]


class Vit3dEncoder(_EncoderBase):
    """A 3D ViT from MONAI building blocks; its input size is `volume.size`."""

    type: Literal["vit3d"] = Field(description="Encoder backend.")
    path: str | None = Field(None, description="Folder of a saved vit3d encoder (else random init).")
    preset: Literal["tiny"] | None = Field(None, description="`tiny`: hidden 64, 2 layers, 4 heads, patch 4x8x8.")
    select_layer: int = Field(-1, description="Hidden state the features come from (0 = patch embeddings, -1 = last).")
    patch_size: PositiveTriple | None = Field(None, description="Patch size (D, H, W); each must divide `volume.size`.")
    hidden_size: int | None = Field(None, gt=0, description="Token width (default 768; tiny preset 64).")
    num_layers: int | None = Field(None, gt=0, description="Transformer blocks (default 12; tiny preset 2).")
    num_heads: int | None = Field(None, gt=0, description="Attention heads (default 12; tiny preset 4).")
    mlp_dim: int | None = Field(None, gt=0, description="MLP width (default 4 x hidden_size).")


class M3dClipEncoder(_EncoderBase):
    """The 3D ViT of M3D-CLIP (input 1x32x256x256, patch 4x16x16, hidden 768, 12 layers)."""

    type: Literal["m3d_clip"] = Field(description="Encoder backend.")
    path: str = Field(description="Local folder holding the released M3D-CLIP weights.")
    select_layer: int = Field(-1, description="Hidden state the features come from (0 = patch embeddings, -1 = last).")


class MedmClipEncoder(_EncoderBase):
    """MedM-CLIP's 3D ViT (post-norm transformer layers, CLS token)."""

    type: Literal["medm_clip"] = Field(description="Encoder backend.")
    path: str = Field(description="Local folder holding the released MedM-CLIP weights.")
    select_layer: int = Field(-1, description="Hidden state the features come from (0 = patch embeddings, -1 = last).")


class SlicesEncoder(_EncoderBase):
    """A 2D encoder applied to each of `num_slices` axial slices of a volume, features concatenated."""

    type: Literal["slices"] = Field(description="Encoder backend.")
    base: Literal["clip", "siglip"] = Field(description="The 2D encoder run over the slices.")
    path: str | None = Field(None, description="Local HF folder (or hub id) of the 2D encoder.")
    preset: Literal["tiny"] | None = Field(None, description="Built-in random-init tiny 2D encoder instead of `path`.")
    num_slices: int = Field(32, gt=0, description="Slices taken from the volume (must equal `volume.size[0]`).")

    @model_validator(mode="after")
    def _source(self):
        _one_source(self.path, self.preset, "slices encoder")
        return self


VolumeEncoder = Annotated[
    Vit3dEncoder | M3dClipEncoder | MedmClipEncoder | SlicesEncoder, Field(discriminator="type")
]


# ------------------------------------------------------------------------------------- connectors
class MlpConnector(Section):
    """Per-token MLP from encoder width to LLM width (LLaVA's projector); one LLM token per feature."""

    type: Literal["mlp"] = Field(description="Connector backend.")
    depth: int = Field(2, gt=0, description="Number of Linear layers.")
    activation: Activation = Field("gelu", description="Activation between the Linear layers.")
    slice_mean: bool = Field(
        False, description="Run on each slice's tokens and average over slices (MedM-VL before 5a90f80: `--slice-pooling mean`; `slices` encoder only)."
    )


class SpatialPoolingConnector(Section):
    """Average pooling over the encoder's patch grid (3D or 2D, derived), then an MLP."""

    type: Literal["spatial_pooling"] = Field(description="Connector backend.")
    pool: Annotated[int, Field(gt=0)] | PositiveTriple = Field(
        2, description="Pooling kernel and stride: one int for every axis, or (D, H, W)."
    )
    depth: int = Field(2, gt=0, description="Number of Linear layers after pooling.")
    activation: Activation = Field("gelu", description="Activation between the Linear layers.")


class AttentionPoolingConnector(Section):
    """Learned queries attend over the encoder tokens (multi-head attention), then an MLP."""

    type: Literal["attention_pooling"] = Field(description="Connector backend.")
    num_queries: int | None = Field(
        None, gt=0, description="Learned queries = output tokens; null = patches per slice (MedM-VL)."
    )
    heads: int = Field(8, gt=0, description="Attention heads (must divide the encoder width).")
    depth: int = Field(2, gt=0, description="Number of Linear layers after attention.")
    activation: Activation = Field("gelu", description="Activation between the Linear layers.")
    slice_mean: bool = Field(
        False, description="Run on each slice's tokens and average over slices (MedM-VL before 5a90f80: `--slice-pooling mean`; `slices` encoder only)."
    )


Connector = Annotated[
    MlpConnector | SpatialPoolingConnector | AttentionPoolingConnector, Field(discriminator="type")
]


# ----------------------------------------------------------------------------------------- volume
class VolumeAugmentConfig(Section):
    """Random augmentations applied at train time only (MONAI Rand*d transforms)."""

    flip_prob: float = Field(0.0, ge=0, le=1, description="Probability of a flip along each spatial axis.")
    rotate90_prob: float = Field(0.0, ge=0, le=1, description="Probability of a 90-degree rotation in the axial plane.")
    intensity_scale_prob: float = Field(0.0, ge=0, le=1, description="Probability of scaling intensities by up to 10%.")
    intensity_shift_prob: float = Field(0.0, ge=0, le=1, description="Probability of shifting intensities by up to 0.1.")


class VolumeConfig(Section):
    """How a volume file becomes the encoder's input tensor (1, D, H, W) in [0, 1]."""

    size: PositiveTriple = Field((32, 256, 256), description="(D, H, W) after preprocessing.")
    window: tuple[float, float] = Field((-1000.0, 1000.0), description="HU window (low, high) mapped to [0, 1].")
    spacing: tuple[float, float, float] | None = Field(
        None, description="Resample to this voxel spacing in mm (D, H, W); null keeps the voxel grid."
    )
    orientation: str = Field(
        "LPS", description="Axis codes of the W, H, D axes after reorienting; LPS = a radiologist's view (docs/volumes.md)."
    )
    crop_foreground: bool = Field(True, description="Crop to the body (voxels above the window's low end).")
    augment: VolumeAugmentConfig = Field(
        default_factory=VolumeAugmentConfig, description="Train-time random augmentations."
    )

    @field_validator("window")
    @classmethod
    def _window_order(cls, v):
        if v[0] >= v[1]:
            raise ValueError(f"window low ({v[0]}) must be below high ({v[1]})")
        return v

    @field_validator("spacing")
    @classmethod
    def _spacing_positive(cls, v):
        if v is not None and (min(v) <= 0 or not all(math.isfinite(s) for s in v)):
            raise ValueError("spacing values must be positive (mm)")
        return v

    @field_validator("orientation")
    @classmethod
    def _orientation_codes(cls, v):
        v = v.upper()
        axis_of = {c: i for i, pair in enumerate(("LR", "AP", "SI")) for c in pair}
        if len(v) != 3 or sorted(axis_of.get(c, -1) for c in v) != [0, 1, 2]:
            raise ValueError(f"orientation {v!r} must name each of L/R, A/P, S/I once, e.g. RAS or LPS")
        return v

    @model_validator(mode="after")
    def _square_for_turns(self):
        if self.augment.rotate90_prob > 0 and self.size[1] != self.size[2]:
            raise ValueError(f"augment.rotate90_prob: 90° turns in the H×W plane need H == W, size is {list(self.size)}; "
                             "use a square H×W or set rotate90_prob to 0")
        return self


# --------------------------------------------------------------------------------------- branches
class ImageBranch(Section):
    """The 2D branch: image encoder + connector."""

    encoder: ImageEncoder = Field(description="The 2D vision encoder (chosen by `type`).")
    connector: Connector = Field(description="Maps encoder features to LLM tokens (chosen by `type`).")
    window: tuple[float, float] | None = Field(
        None, description="Window (low, high) for DICOM images; null = the file's own window."
    )


class Image3dBranch(Section):
    """The 3D branch: volume encoder + connector + volume preprocessing."""

    encoder: VolumeEncoder = Field(description="The 3D encoder (chosen by `type`).")
    connector: Connector = Field(description="Maps encoder features to LLM tokens (chosen by `type`).")
    volume: VolumeConfig = Field(default_factory=VolumeConfig, description="Volume preprocessing.")

    @model_validator(mode="after")
    def _slices_take_every_slice(self):
        if self.encoder.type == "slices" and self.encoder.num_slices != self.volume.size[0]:
            raise ValueError(f"slices encoder: num_slices is {self.encoder.num_slices} but volume.size[0] is "
                             f"{self.volume.size[0]}; a slices encoder takes every slice of the preprocessed "
                             "volume: make them equal")
        return self


class LLMConfig(Section):
    """The causal language model and how text is formatted for it."""

    path: str | None = Field(None, description="Local HF folder of the LLM (a hub id only where the hub is reachable).")
    preset: Literal[LLM_PRESETS] | None = Field(
        None, description="Built-in random-init tiny LLM with its own tokenizer, instead of `path`."
    )
    template: str | None = Field(
        None, description="Chat template: qwen2 | llama3 | phi | phi3 | plain | medmvl-<llm>; null = the stage default."
    )
    max_length: int = Field(2048, gt=0, description="Longest sequence in tokens, image tokens included (the one truncation point).")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel of the LLM."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and compute dtype; auto = bfloat16 on GPUs that support it, else float32."
    )

    @model_validator(mode="after")
    def _source(self):
        _one_source(self.path, self.preset, "model.llm")
        return self

    @field_validator("template")
    @classmethod
    def _known_template(cls, v):
        if v is not None and v not in TEMPLATES:
            raise ValueError(f"unknown template {v!r}; known: {', '.join(TEMPLATES)}")
        return v


class ModelConfig(Section):
    """The encoder-connector-LLM stack; at least one of `image` / `image3d`."""

    llm: LLMConfig = Field(description="The language model.")
    image: ImageBranch | None = Field(None, description="The 2D branch (images, `<image>` placeholders).")
    image3d: Image3dBranch | None = Field(None, description="The 3D branch (volumes, `<image3d>` placeholders).")

    @model_validator(mode="after")
    def _a_branch(self):
        if self.image is None and self.image3d is None:
            raise ValueError("a model needs at least one branch: `image` (2D) or `image3d` (3D)")
        return self


# -------------------------------------------------------------------------------------- trainable
class TrainableConfig(Section):
    """Which parts train; null = the stage default (see docs/recipes.md)."""

    llm: TrainLLM | None = Field(None, description="frozen | full | lora.")
    image_encoder: Train | None = Field(None, description="frozen | full (needs `model.image`).")
    image_connector: Train | None = Field(None, description="frozen | full (needs `model.image`).")
    image3d_encoder: Train | None = Field(None, description="frozen | full (needs `model.image3d`).")
    image3d_connector: Train | None = Field(None, description="frozen | full (needs `model.image3d`).")


class LoraConfig(Section):
    """LoRA adapter on the LLM (PEFT)."""

    r: int = Field(128, gt=0, description="Rank.")
    alpha: float = Field(256, gt=0, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="`all-linear` (every linear layer of the LLM but the output head) or module names."
    )


# ------------------------------------------------------------------------------------------- data
class DatasetSpec(Section):
    """One annotation file and where its files live."""

    annotations: str = Field(description="JSON list or JSONL of MedM-VL / LLaVA records.")
    image_root: str | None = Field(None, description="Folder that `image` paths are relative to.")
    volume_root: str | None = Field(None, description="Folder that `image3d` paths are relative to.")
    weight: float = Field(1.0, gt=0, description="Sampling weight relative to the other training files.")


class DataConfig(Section):
    """Training and evaluation data."""

    train: list[DatasetSpec] = Field(default_factory=list, description="Training files.")
    eval: list[DatasetSpec] = Field(default_factory=list, description="Evaluation files.")
    cache_dir: str | None = Field(None, description="Preprocessed-volume cache folder; null = no cache.")
    group_by_length: bool = Field(True, description="Batch samples of similar length together.")
    packing: bool = Field(False, description="Padding-free batches: samples concatenated, positions restarting at 0.")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes.")
    truncate_answers: bool = Field(
        False, description="Cut the tail of an over-long answer instead of dropping the sample."
    )
    skip_bad_records: bool = Field(
        False, description="Skip (and count) records whose files fail to load at train time instead of stopping."
    )
    max_voxels: int = Field(
        DEFAULT_MAX_VOXELS, gt=0,
        description="Largest volume read, in voxels declared by the file's header (checked before decoding; "
        "default 512 x 512 x 2048). Training, `data cache` and `data validate --recipe` refuse larger files.",
    )
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, gt=0,
        description="Largest 2D image read, in pixels declared by its header (checked before decoding; "
        "default PIL's decompression-bomb limit, 89,478,485).",
    )


# ------------------------------------------------------------------------------------------ train
#: Metrics a checkpoint can be chosen by: eval loss, or a key of `medmvl eval`'s report
#: (tests/unit/test_generation_eval.py keeps this equal to evaluation.report.METRICS, BERTScore aside).
BestMetric = Literal[
    "loss", "exact_match", "closed_accuracy", "closed_accuracy_strict", "open_recall", "choice_accuracy",
    "choice_accuracy_strict", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_1", "rouge_l", "meteor",
]


class TrainConfig(Section):
    """Optimisation and logging."""

    epochs: float = Field(1, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(8, gt=0, description="Samples per device per step.")
    grad_accum: int = Field(1, gt=0, description="Gradient accumulation steps.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_connector: float | None = Field(None, gt=0, description="Learning rate of the connectors (null = `lr`).")
    lr_encoder: float | None = Field(None, gt=0, description="Learning rate of the encoders (null = `lr`).")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (never on norms and biases).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward to save memory.")
    logging_steps: int = Field(10, gt=0, description="Log every N steps.")
    save_steps: int = Field(500, gt=0, description="Checkpoint every N steps.")
    save_total_limit: int | None = Field(2, gt=0, description="Keep at most N checkpoints (null = all).")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps (null = at the end only).")
    eval_generate: bool = Field(
        True, description="At each evaluation also answer the eval records (greedy) and score them with "
                          "`medmvl eval`'s metrics: exact match, LLaVA-Med closed / open, choice accuracy, BLEU, ROUGE.")
    eval_max_samples: int | None = Field(
        200, gt=0, description="Eval records answered at each evaluation: the first N (null = all).")
    eval_max_new_tokens: int = Field(64, gt=0, description="Longest answer generated for an eval record.")
    metric_for_best: BestMetric | None = Field(
        None, description="What makes a checkpoint the best: a `medmvl eval` metric key, or loss (lower is "
                          "better). null = exact_match when eval_generate runs, else loss.")
    keep_best: bool = Field(
        False, description="Make model/ the weights of the best evaluation (its checkpoint is never rotated "
                           "away); best.json in the run folder names its step and score.")
    report_to: list[str] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment trackers beside metrics.jsonl: any HF Trainer integration (tensorboard, wandb, "
                    "mlflow, comet_ml, trackio, clearml, ...), or [none].",
    )

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, names: list[str]) -> list[str]:
        known = [*TRACKERS, NO_TRACKER]
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                raise ValueError(f"unknown tracker {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                                 + f" (one of: {', '.join(known)})")
        return names


class DistributedConfig(Section):
    """Multi-process training."""

    deepspeed: str | None = Field(None, description="null | zero2 | zero3 | path/to/ds_config.json.")


# ----------------------------------------------------------------------------------------- recipe
class Recipe(Section):
    """A whole recipe: what to build, what to train it on, how."""

    stage: Stage | None = Field(None, description="pretrain | finetune | lora; must match the command if given.")
    seed: int = Field(42, ge=0, description="Seed of every random generator.")
    output_dir: str = Field("runs/run", description="The run folder.")
    init_from: str | None = Field(
        None, description="Start from the model of an earlier run (its folder); not a resume."
    )
    model: ModelConfig = Field(description="The model stack.")
    trainable: TrainableConfig = Field(default_factory=TrainableConfig, description="Which parts train.")
    lora: LoraConfig | None = Field(None, description="LoRA settings (defaults when `trainable.llm: lora`).")
    data: DataConfig = Field(default_factory=DataConfig, description="Training and evaluation data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation and logging.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Multi-process training.")
