"""`medmvl data synth`: a small deterministic dataset whose answers can only be read off the image.

2D: grayscale PNG "chest films" (body, two dark lungs, bright round lesions). 3D: NIfTI CT volumes
in HU with a real affine (air -1000, body ~0, lungs ~-850, lesions ~+40 HU). Each image carries one
question; question kinds and, within a kind, answer classes are dealt round-robin so both are
balanced. Same arguments, same bytes.

Conventions (also in docs/data.md):
- 2D films are shown as a PA chest film is read: the patient's right is on the image's left.
  Quadrants are named from the patient: "right upper" is the image's top-left quadrant.
- 3D arrays are (D, H, W) = (inferior->superior, anterior->posterior, patient's right->left), as
  MedM-VL's .npy; the NIfTI file stores them as (x, y, z) with an LPS-pointing affine
  diag(-sx, -sy, sz), so "left" / "right" are the patient's, read from the world coordinates.

The "easy" question kinds, meant for quick training runs with tiny random-init encoders, are
2D `quadrant` ("Which quadrant of the chest holds the lesion?", 4 classes, one large lesion) and
3D `side` ("Which lung has the lesion?", left / right, a lobar consolidation filling the upper or lower half of one lung).
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from medmvl_cli.constants import IMAGE_PLACEHOLDER, VOLUME_PLACEHOLDER
from medmvl_cli.errors import DataError

log = logging.getLogger(__name__)

Kind = Literal["2d", "3d", "both"]
QUESTION_KINDS: dict[str, tuple[str, ...]] = {
    "2d": ("presence", "quadrant", "count", "report"),
    "3d": ("presence", "side", "count", "report"),
}
EASY: dict[str, str] = {"2d": "quadrant", "3d": "side"}
SIDES = ("right", "left")
ZONES = ("upper", "lower")
QUADRANTS = tuple(f"{side} {zone}" for side in SIDES for zone in ZONES)
NUMBER_WORDS = ("No", "One", "Two", "Three", "Four")
FIELD_OF_VIEW_MM = (320.0, 350.0, 350.0)  # (D, H, W): a chest, whatever the voxel grid

QUESTIONS: dict[tuple[str, str], tuple[str, str, tuple[str, ...]]] = {
    # (dim, kind): (question, question_type, answer classes)
    ("2d", "presence"): ("Is there a lesion in the lungs?", "closed", ("yes", "no")),
    ("2d", "quadrant"): ("Which quadrant of the chest holds the lesion?", "closed", QUADRANTS),
    ("2d", "count"): ("How many lesions are visible?", "closed", ("1", "2", "3")),
    ("2d", "report"): ("Write a short report for this chest film.", "open", ("0", "1", "2", "3")),
    ("3d", "presence"): ("Is there a lesion in the lungs on this CT?", "closed", ("yes", "no")),
    ("3d", "side"): ("Which lung has the lesion?", "closed", SIDES),
    ("3d", "count"): ("How many lesions are in the lungs?", "closed", ("1", "2", "3")),
    ("3d", "report"): ("Write a short report for this chest CT.", "open", ("0", "1", "2", "3")),
}


@dataclass(frozen=True)
class Lesion:
    """One lesion: where (patient side, upper / lower zone) and how big (relative radius)."""

    side: str
    zone: str
    radius: float  # fraction of the image width
    large: bool


@dataclass(frozen=True)
class Case:
    """One synthetic image / volume and its question."""

    dim: str
    split: str
    number: int
    task: str
    lesions: tuple[Lesion, ...]
    answer: str

    @property
    def id(self) -> str:
        return f"synth{self.dim}-{self.split}-{self.number:05d}"


# ------------------------------------------------------------------------------------------ cases
def _lesions(rng: np.random.Generator, slots: Sequence[tuple[str, str]], large: bool | None) -> tuple[Lesion, ...]:
    out = []
    for side, zone in slots:
        big = bool(rng.random() < 0.5) if large is None else large
        radius = float(rng.uniform(0.09, 0.12) if big else rng.uniform(0.05, 0.065))
        out.append(Lesion(side, zone, radius, big))
    return tuple(out)


def _slots(rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """`count` distinct (side, zone) quadrants: lesions never overlap and stay countable."""
    order = rng.permutation(4)[:count]
    return [(SIDES[i // 2], ZONES[i % 2]) for i in sorted(order)]


def make_case(dim: str, split: str, number: int, task: str, label: str, seed: int) -> Case:
    """The lesions of one case, drawn so that its answer to `task` is `label`."""
    rng = _rng(seed, dim, split, number, "case")
    if task == "presence":
        lesions = _lesions(rng, _slots(rng, int(rng.integers(1, 3))), None) if label == "yes" else ()
    elif task == "quadrant":
        side, zone = label.split()
        lesions = _lesions(rng, [(side, zone)], True)
    elif task == "side":
        lesions = _lesions(rng, [(label, ZONES[int(rng.integers(2))])], True)
    elif task == "count":
        lesions = tuple(Lesion(s, z, float(rng.uniform(0.075, 0.1)), True) for s, z in _slots(rng, int(label)))
    elif task == "report":
        lesions = _lesions(rng, _slots(rng, int(label)), None)
    else:
        raise ValueError(task)
    answer = report_text(dim, lesions) if task == "report" else label
    return Case(dim, split, number, task, lesions, answer)


def report_text(dim: str, lesions: Sequence[Lesion]) -> str:
    """The templated report of a case."""
    if not lesions:
        return "No lesion. Both lungs are clear."
    where = "{size} one in the {side} {zone} zone" if dim == "2d" else "{size} one in the {zone} {side} lung"
    parts = [where.format(size="a large" if lesion.large else "a small", side=lesion.side, zone=lesion.zone)
             for lesion in lesions]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    noun = "lesion" if len(lesions) == 1 else "lesions"
    return f"{NUMBER_WORDS[len(lesions)]} {noun}: {listing}."


def plan_cases(dim: str, split: str, count: int, tasks: Sequence[str], seed: int) -> list[Case]:
    """`count` cases; tasks dealt round-robin, and each task's answer classes round-robin."""
    cases = []
    for number in range(count):
        task = tasks[number % len(tasks)]
        classes = QUESTIONS[(dim, task)][2]
        label = classes[(number // len(tasks)) % len(classes)]
        cases.append(make_case(dim, split, number, task, label, seed))
    return cases


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    words = [seed] + [k if isinstance(k, int) else int.from_bytes(k.encode(), "little") % (1 << 32) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


# --------------------------------------------------------------------------------------- drawing
def _anatomy(rng: np.random.Generator) -> dict[str, float]:
    """Shared jitter for one case; both lungs get the same size so only lesions break symmetry."""
    return {
        "body": float(rng.uniform(0.95, 1.05)),
        "lung": float(rng.uniform(0.93, 1.07)),
        "lung_dx": float(rng.uniform(-0.015, 0.015)),
    }


def _lung_center_x(side: str, anatomy: dict[str, float]) -> float:
    """Fraction of the width; the patient's right is at the low x (image left / array W start)."""
    offset = 0.2 + anatomy["lung_dx"]
    return 0.5 - offset if side == "right" else 0.5 + offset


def render_film(case: Case, size: int, seed: int) -> np.ndarray:
    """A (size, size) uint8 chest film: air, body, two dark lungs, bright lesions."""
    rng = _rng(seed, case.dim, case.split, case.number, "pixels")
    anatomy = _anatomy(rng)
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
    img = np.full((size, size), 8.0)
    body = ((x - 0.5) / (0.44 * anatomy["body"])) ** 2 + ((y - 0.52) / (0.46 * anatomy["body"])) ** 2 <= 1
    img[body] = 135.0
    lung_cy, lung_rx, lung_ry = 0.47, 0.13 * anatomy["lung"], 0.3 * anatomy["lung"]
    for side in SIDES:
        cx = _lung_center_x(side, anatomy)
        img[((x - cx) / lung_rx) ** 2 + ((y - lung_cy) / lung_ry) ** 2 <= 1] = 45.0
    for lesion in case.lesions:
        cx = _lung_center_x(lesion.side, anatomy) + rng.uniform(-0.02, 0.02)
        cy = lung_cy + (-1 if lesion.zone == "upper" else 1) * 0.45 * lung_ry + rng.uniform(-0.02, 0.02)
        img[(x - cx) ** 2 + (y - cy) ** 2 <= lesion.radius ** 2] = 245.0
    img += rng.normal(0.0, 4.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def volume_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """Voxel (x, y, z) = (W, H, D) index -> RAS mm; centred on the origin, LPS-pointing axes."""
    spacing = [FIELD_OF_VIEW_MM[i] / shape[i] for i in range(3)]  # D, H, W
    sx, sy, sz = spacing[2], spacing[1], spacing[0]
    w, h, d = shape[2], shape[1], shape[0]
    return np.array([
        [-sx, 0, 0, sx * (w - 1) / 2],
        [0, -sy, 0, sy * (h - 1) / 2],
        [0, 0, sz, -sz * (d - 1) / 2],
        [0, 0, 0, 1],
    ], dtype=np.float64)


def render_volume(case: Case, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A (D, H, W) int16 CT in HU: D inferior->superior, H anterior->posterior, W right->left."""
    rng = _rng(seed, case.dim, case.split, case.number, "voxels")
    anatomy = _anatomy(rng)
    d, h, w = shape
    z, y, x = np.ogrid[0:d, 0:h, 0:w]
    z, y, x = (z + 0.5) / d, (y + 0.5) / h, (x + 0.5) / w
    # Lesion radii are fractions of the width; in z they shrink by the voxel aspect (round in mm).
    aspect_z = (FIELD_OF_VIEW_MM[2] / FIELD_OF_VIEW_MM[0])
    vol = np.full(shape, -1000.0)
    body = ((x - 0.5) / (0.45 * anatomy["body"])) ** 2 + ((y - 0.5) / (0.36 * anatomy["body"])) ** 2 <= 1
    vol[np.broadcast_to(body, shape)] = 0.0
    lung_cz, lung_rz = 0.55, 0.38 * anatomy["lung"]
    lung_cy, lung_ry, lung_rx = 0.48, 0.25 * anatomy["lung"], 0.15 * anatomy["lung"]
    lungs = {}
    for side in SIDES:
        cx = _lung_center_x(side, anatomy)
        lungs[side] = ((x - cx) / lung_rx) ** 2 + ((y - lung_cy) / lung_ry) ** 2 + ((z - lung_cz) / lung_rz) ** 2 <= 1
        vol[lungs[side]] = -850.0
    if case.task == "side":
        # The easy 3D question shows a lobar consolidation: the lesion's zone of one lung filled with
        # soft tissue, a signal a tiny random-init 3D encoder picks up within a few epochs.
        (lesion,) = case.lesions
        zone = (z >= lung_cz) if lesion.zone == "upper" else (z < lung_cz)
        vol[lungs[lesion.side] & zone] = 40.0
    for lesion in case.lesions if case.task != "side" else ():
        cx = _lung_center_x(lesion.side, anatomy) + rng.uniform(-0.02, 0.02)
        cy = lung_cy + rng.uniform(-0.05, 0.05)
        cz = lung_cz + (1 if lesion.zone == "upper" else -1) * 0.45 * lung_rz + rng.uniform(-0.02, 0.02)
        r = lesion.radius
        blob = ((x - cx) / r) ** 2 + ((y - cy) / r) ** 2 + ((z - cz) / (r * aspect_z)) ** 2 <= 1
        vol[blob] = 40.0
    vol += rng.normal(0.0, 10.0, shape)
    return np.rint(vol).astype(np.int16)


def nifti_bytes(volume: np.ndarray) -> bytes:
    """A gzipped NIfTI-1 of a (D, H, W) volume, byte-for-byte reproducible (gzip mtime 0)."""
    import nibabel as nib

    data = np.ascontiguousarray(volume.transpose(2, 1, 0))  # (x, y, z) = (W, H, D)
    affine = volume_affine(volume.shape)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header["descrip"] = b"medmvl synthetic chest CT (HU)"
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)  # noise does not compress: be quick


def png_bytes(film: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(film, mode="L").save(buf, format="PNG")
    return buf.getvalue()


# -------------------------------------------------------------------------------------- records
def make_record(case: Case, media_path: str, train: bool) -> dict:
    """A MedM-VL record: train ends on the gpt answer, test on the human question."""
    question, qtype, _ = QUESTIONS[(case.dim, case.task)]
    placeholder = IMAGE_PLACEHOLDER if case.dim == "2d" else VOLUME_PLACEHOLDER
    conversations = [{"from": "human", "value": f"{placeholder}\n{question}"}]
    if train:
        conversations.append({"from": "gpt", "value": case.answer})
    key = "image" if case.dim == "2d" else "image3d"
    return {"id": case.id, key: [media_path], "conversations": conversations,
            "answer": case.answer, "question_type": qtype, "task": case.task}


def resolve_questions(dim: str, questions: str | Sequence[str]) -> tuple[str, ...]:
    """`all`, `easy`, or a list of question kinds (those that do not apply to `dim` are skipped)."""
    if isinstance(questions, str):
        questions = [q.strip() for q in questions.split(",") if q.strip()]
    known = QUESTION_KINDS[dim]
    out: list[str] = []
    for q in questions:
        picked = known if q == "all" else (EASY[dim],) if q == "easy" else (q,) if q in known else ()
        out += [k for k in picked if k not in out]
    all_known = {k for kinds in QUESTION_KINDS.values() for k in kinds} | {"all", "easy"}
    unknown = [q for q in questions if q not in all_known]
    if unknown:
        raise DataError(
            f"unknown question kind(s): {', '.join(unknown)}",
            hint="use all, easy, or some of: presence, quadrant (2D), side (3D), count, report",
        )
    return tuple(out)


# ---------------------------------------------------------------------------------------- driver
@dataclass
class SynthResult:
    """What `synthesize` wrote: annotation file name -> number of records, and media counts."""

    out_dir: Path
    annotations: dict[str, int]
    images: int
    volumes: int
    questions: dict[str, tuple[str, ...]]


SYNTH_MARKER = "medmvl-synth.json"


def synthesize(
    out_dir: str | Path,
    *,
    kind: Kind = "both",
    n: int = 200,
    seed: int = 0,
    image_size: int = 64,
    volume_size: tuple[int, int, int] = (32, 64, 64),
    questions: str | Sequence[str] = "all",
    test_fraction: float = 0.2,
    overwrite: bool = False,
) -> SynthResult:
    """Write `n` images (2D) and / or `n` volumes (3D) with their train / test annotation files.

    Files appear in `out_dir` only once all are written (staged in a hidden folder beside them);
    existing annotation files or media folders are an error unless `overwrite`.
    """
    if n < 2:
        raise DataError(f"--n {n}: need at least 2 cases (one for train, one for test)")
    if not 0 < test_fraction < 1:
        raise DataError(f"--test-fraction {test_fraction}: must be between 0 and 1 (exclusive)")
    if image_size < 16 or min(volume_size) < 8:
        raise DataError("sizes too small: images need at least 16 pixels, volumes 8 voxels a side")
    dims = ("2d", "3d") if kind == "both" else (kind,)
    tasks = {dim: resolve_questions(dim, questions) for dim in dims}
    for dim, chosen in tasks.items():
        if not chosen:
            raise DataError(f"no question kind of {questions!r} applies to {dim} data",
                            hint=f"{dim} kinds: {', '.join(QUESTION_KINDS[dim])}")
    out = Path(out_dir)
    media_dir = {"2d": "images", "3d": "volumes"}
    targets = [out / media_dir[d] for d in dims] + [out / f"{s}_{d}.json" for d in dims for s in ("train", "test")]
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        raise DataError(
            f"{out} already holds {', '.join(p.name for p in existing)}",
            hint="pass --overwrite to replace them, or choose another folder",
        )
    foreign = [p.name for p in existing if p.name not in synth_entries(out)]
    if foreign:
        raise DataError(
            f"--overwrite refused: {out} holds {', '.join(foreign)}, which `medmvl data synth` did not write "
            f"(they are not listed in its {SYNTH_MARKER})",
            hint="choose another folder; medmvl only replaces what it wrote",
        )
    out.mkdir(parents=True, exist_ok=True)
    n_test = max(1, int(round(n * test_fraction)))
    counts = {"train": n - n_test, "test": n_test}
    stage = Path(tempfile.mkdtemp(prefix=".synth-", dir=out))
    written: dict[str, int] = {}
    try:
        for dim in dims:
            (stage / media_dir[dim]).mkdir()
            for split, count in counts.items():
                records = []
                for case in plan_cases(dim, split, count, tasks[dim], seed):
                    if dim == "2d":
                        rel = f"images/{split}-{case.number:05d}.png"
                        (stage / rel).write_bytes(png_bytes(render_film(case, image_size, seed)))
                    else:
                        rel = f"volumes/{split}-{case.number:05d}.nii.gz"
                        (stage / rel).write_bytes(nifti_bytes(render_volume(case, tuple(volume_size), seed)))
                    records.append(make_record(case, rel, train=split == "train"))
                order = _rng(seed, dim, split, "order").permutation(len(records))
                records = [records[i] for i in order]
                name = f"{split}_{dim}.json"
                (stage / name).write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
                written[name] = len(records)
        _commit(stage, out, [media_dir[d] for d in dims], list(written))
        _record_entries(out, [media_dir[d] for d in dims] + list(written))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("wrote %s to %s", ", ".join(f"{k} ({v})" for k, v in written.items()), out)
    return SynthResult(
        out, written, images=n if "2d" in dims else 0, volumes=n if "3d" in dims else 0, questions=tasks,
    )


def synth_entries(out: Path) -> set[str]:
    """What `synthesize` wrote into `out` earlier (from its marker file), the only names it may replace."""
    try:
        marker = json.loads((out / SYNTH_MARKER).read_text(encoding="utf-8"))
        return set(marker["entries"]) if marker.get("format") == "medmvl-synth" else set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def _record_entries(out: Path, names: list[str]) -> None:
    entries = sorted(synth_entries(out) | set(names))
    tmp = out / f".{SYNTH_MARKER}.tmp"
    tmp.write_text(json.dumps({"format": "medmvl-synth", "version": 1, "entries": entries}, indent=1) + "\n",
                   encoding="utf-8")
    tmp.replace(out / SYNTH_MARKER)


def _commit(stage: Path, out: Path, folders: list[str], files: list[str]) -> None:
    """Move staged media folders, then annotation files, into `out` (each move one rename)."""
    old = stage / ".replaced"
    old.mkdir()
    for name in folders:
        if (out / name).exists():
            (out / name).rename(old / name)
        (stage / name).rename(out / name)
    for name in files:  # last, so an annotation file never names media that is not there yet
        (stage / name).replace(out / name)


def lesion_quadrant_from_pixels(film: np.ndarray, threshold: int = 200) -> str:
    """The quadrant with the most lesion-bright pixels, named from the patient (image left = right)."""
    h, w = film.shape
    bright = film > threshold
    counts = {
        "right upper": bright[: h // 2, : w // 2].sum(), "left upper": bright[: h // 2, w // 2:].sum(),
        "right lower": bright[h // 2:, : w // 2].sum(), "left lower": bright[h // 2:, w // 2:].sum(),
    }
    return max(counts, key=counts.get)


def lesion_side_from_voxels(data_xyz: np.ndarray, affine: np.ndarray) -> str:
    """The patient side whose half of the volume is denser (RAS world x > 0 is the right)."""
    x_index = np.arange(data_xyz.shape[0])
    world_x = affine[0, 0] * x_index + affine[0, 3]
    means = data_xyz.reshape(data_xyz.shape[0], -1).mean(axis=1)
    right, left = means[world_x > 0].mean(), means[world_x < 0].mean()
    return "right" if right > left else "left"


__all__ = [
    "EASY", "QUESTION_KINDS", "QUESTIONS", "Case", "Lesion", "SynthResult", "synthesize", "plan_cases",
    "make_case", "render_film", "render_volume", "volume_affine", "nifti_bytes", "report_text",
    "resolve_questions", "lesion_quadrant_from_pixels", "lesion_side_from_voxels",
]
