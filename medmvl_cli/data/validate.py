"""`medmvl data validate`: every problem of an annotation file, never stopping at the first.

One pass over the records checks structure, turn order, answers and placeholder counts, ids and
paths; the image / volume files are checked once each, in a thread pool, while the pass goes on.
Volumes get a header-level check (shape, dtype, the `max_voxels` limit) and are decoded in full
only where their values can be NaN / Inf (floating point data) or when `full_decode` asks for it;
images are opened lazily and checked against `max_pixels` before they are decoded. A path flagged
by `strict_paths` is not opened at all. Nothing is written.

With a recipe, each record is also tokenised with the recipe's chat template, image placeholders
expanded to the model's token counts, to report sequence lengths against `model.llm.max_length`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medmvl_cli.data.annotations import (
    AnnotationFile,
    Issue,
    Record,
    conversation_problems,
    default_root,
    path_problem,
    resolve_media_path,
    schema_problems,
)
from medmvl_cli.data.file_kinds import IMAGE_SUFFIXES, VOLUME_SUFFIXES, is_dicom
from medmvl_cli.data.limits import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_VOXELS,
    TooLargeError,
    check_dicom_pixels,
    checked_volume_header,
    dicom_frames,
    open_image,
    overlong_turn,
    volume_header,
)
from medmvl_cli.errors import DataError, MedmvlError

log = logging.getLogger(__name__)

Mode = Literal["auto", "train", "infer"]
PROBLEM_KINDS: dict[str, str] = {
    "json": "a JSONL line that is not valid JSON",
    "schema": "missing or mistyped keys (id, conversations, turns, image paths, answer, question_type)",
    "role": "a turn whose `from` is not human/user, gpt/assistant or system",
    "alternation": "turns that do not alternate human/gpt (a system turn only first)",
    "empty_turn": "an empty human turn",
    "empty_answer": "an empty gpt turn",
    "unanswered": "a training record that does not end on the gpt answer",
    "placeholder": "<image> / <image3d> counts that differ from the `image` / `image3d` lists",
    "duplicate_id": "an id used by an earlier record",
    "absolute_path": "an absolute path (with --strict-paths)",
    "escapes_root": "a path climbing out of its root with .., or a symlink leading out of it (with --strict-paths)",
    "missing_file": "an image or volume that does not exist",
    "unreadable": "a file that does not decode",
    "dimensionality": "a 2-D image given as a volume, or a volume given as an image",
    "nonfinite": "NaN or Inf values in a volume",
    "too_large": "a file whose header declares more voxels / pixels than --max-voxels / --max-pixels (not decoded)",
    "too_long": "a turn too long to tokenise for model.llm.max_length (characters, checked before tokenising)",
    "template": "a record the recipe's chat template cannot encode",
}
_CHUNK = 1 << 24  # elements per finiteness check, so huge float volumes stream through memory
_AS_IMAGE = "a volume given as an image (list it under `image3d`)"
_AS_VOLUME = "a 2-D image given as a volume (list it under `image`)"


# ---------------------------------------------------------------------------------------- results
@dataclass
class RecordProblems:
    """Every problem of one record, with where it is."""

    id: str | None
    index: int
    line: int | None
    problems: list[Issue] = field(default_factory=list)


@dataclass
class LengthStats:
    """Token counts after placeholder expansion, and what `model.llm.max_length` would do to them."""

    template: str
    max_length: int
    placeholder_lengths: dict[str, int]
    measured: int
    percentiles: dict[str, float]
    truncated: int
    truncated_ids: list[str]
    dropped: dict[str, int]  # reason -> count
    dropped_ids: dict[str, list[str]]  # reason -> first ids


@dataclass
class ValidationReport:
    """What `validate_annotations` found. `problems` holds only records that have some."""

    file: str
    format: str
    mode: str
    records: int
    problems: list[RecordProblems]
    totals: dict[str, int]
    files_checked: int
    notes: list[str] = field(default_factory=list)
    lengths: LengthStats | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """The `--json` form: records, problems [{id, index, line, problems [{kind, message}]}], totals."""
        out = {
            "file": self.file, "format": self.format, "mode": self.mode,
            "records": self.records,
            "problems": [
                {"id": p.id, "index": p.index, "line": p.line,
                 "problems": [{"kind": i.kind, "message": i.message} for i in p.problems]}
                for p in self.problems
            ],
            "totals": dict(self.totals),
            "files_checked": self.files_checked,
            "notes": list(self.notes),
        }
        if self.lengths is not None:
            out["lengths"] = asdict(self.lengths)
        return out


# ------------------------------------------------------------------------------------ file checks
def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _nonfinite_issue(values: np.ndarray) -> Issue | None:
    """Counts NaN / Inf in float data, chunk by chunk (works on memory maps)."""
    if values.dtype.kind not in "fc":
        return None
    flat = values.reshape(-1)
    nan = inf = 0
    for start in range(0, flat.size, _CHUNK):
        chunk = np.asarray(flat[start:start + _CHUNK])
        if np.isfinite(chunk).all():
            continue
        nan += int(np.isnan(chunk).sum())
        inf += int(np.isinf(chunk).sum())
    if nan or inf:
        return Issue("nonfinite", f"{nan} NaN and {inf} Inf voxel(s) of {flat.size}")
    return None


def _shape_issue(shape: tuple[int, ...], fmt: str) -> str | None:
    """What the volume reader would reject about a shape (mirrors volume_io's rules)."""
    shape = tuple(int(s) for s in shape)
    dims = list(shape)
    if fmt == "npy" and len(dims) == 4 and dims[0] == 1:
        dims = dims[1:]
    while len(dims) > 3 and dims[-1] == 1:
        dims = dims[:-1]
    if len(dims) < 3:
        return f"shape {shape} is {len(dims)}-D: {_AS_VOLUME}"
    if len(dims) > 3:
        return f"shape {shape} is {len(dims)}-D: a volume is one 3-D scan (D, H, W)"
    if min(dims) < 2:
        return f"shape {shape} is a single slice: {_AS_VOLUME}"
    return None


def _raw_values(path: Path, fmt: str) -> np.ndarray:
    """The stored values of a volume file, for the NaN / Inf scan (memory-mapped where possible)."""
    if fmt == "npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)
    if fmt == "nifti":
        import nibabel as nib

        return np.asanyarray(nib.load(str(path)).dataobj)
    import SimpleITK as sitk

    return sitk.GetArrayViewFromImage(sitk.ReadImage(str(path)))


def _dicom_folder_issue(path: Path) -> Issue | None:
    import SimpleITK as sitk

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    if not series:
        return Issue("unreadable", f"folder {path} holds no DICOM series")
    if len(series) > 1:
        return Issue("unreadable", f"folder {path} holds {len(series)} DICOM series; a volume folder holds one")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0])
    if len(files) < 2:
        return Issue("dimensionality", f"folder {path} holds a single DICOM slice: a 2-D image given as a volume")
    return None


def _dicom_frames(path: Path) -> int:
    import pydicom

    return dicom_frames(pydicom.dcmread(str(path), stop_before_pixels=True))


def check_volume_file(path: Path, *, full_decode: bool = False, max_voxels: int = DEFAULT_MAX_VOXELS) -> list[Issue]:
    """Problems of one `image3d` file or DICOM folder (existence, format, shape, size, NaN / Inf)."""
    if not path.exists():
        return [Issue("missing_file", f"volume not found: {path}")]
    try:
        suffix = _suffix(path)
        if path.is_dir():
            issue = _dicom_folder_issue(path)
            if issue is not None:
                return [issue]
            checked_volume_header(path, max_voxels)
        elif suffix in VOLUME_SUFFIXES:
            header = checked_volume_header(path, max_voxels)
            problem = _shape_issue(header.shape, header.fmt)
            if problem is not None:
                return [Issue("dimensionality", f"{path}: {problem}")]
            if header.floating:
                issue = _nonfinite_issue(_raw_values(path, header.fmt))
                if issue is not None:
                    return [Issue("nonfinite", f"{path}: {issue.message}")]
        elif is_dicom(path):
            frames = _dicom_frames(path)
            if frames > 1:
                return [Issue("unreadable", f"{path} is a multi-frame DICOM file ({frames} frames); convert it to NIfTI")]
            return [Issue("dimensionality", f"{path} is a single DICOM slice: {_AS_VOLUME}, or give the series folder")]
        elif suffix in IMAGE_SUFFIXES or _is_image(path):
            return [Issue("dimensionality", f"{path} is an image file: {_AS_VOLUME}")]
        else:
            formats = ".npy, .nii(.gz), .nrrd, .mha / .mhd or a DICOM series folder"
            return [Issue("unreadable", f"{path}: {suffix or 'no suffix'} is not a volume format ({formats})")]
        if full_decode:
            from medmvl_cli.data.volume_io import read_volume

            read_volume(path, max_voxels)
    except TooLargeError as err:
        return [Issue(TooLargeError.kind, err.message)]
    except MedmvlError as err:
        return [Issue("unreadable", _naming(path, err.message))]
    except Exception as err:  # every reader has its own exceptions for a broken file
        return [Issue("unreadable", f"{path}: {type(err).__name__}: {err}")]
    return []


def _naming(path: Path, message: str) -> str:
    """A reader's message, with the file named once (the readers name it themselves)."""
    return message if message.startswith(str(path)) else f"{path}: {message}"


def _is_image(path: Path) -> bool:
    try:
        with open_image(path):
            return True
    except TooLargeError:
        return True
    except Exception:
        return False


def check_image_file(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Issue]:
    """Problems of one `image` file (existence, a volume in disguise, multi-frame, size, decoding).

    Decodes with PIL / pydicom directly: image_io pulls in torch and MONAI, seconds of import.
    """
    if not path.exists():
        return [Issue("missing_file", f"image not found: {path}")]
    try:
        if path.is_dir():
            return [Issue("dimensionality", f"{path} is a folder (a DICOM series?): {_AS_IMAGE}")]
        suffix = _suffix(path)
        if suffix in VOLUME_SUFFIXES:
            shape = volume_header(path).shape
            if len([d for d in shape if d > 1]) >= 3:
                return [Issue("dimensionality", f"{path} holds an array of shape {shape}: {_AS_IMAGE}")]
            return [Issue("unreadable", f"{path}: {suffix} is not an image format (use PNG, JPEG, BMP, TIFF or DICOM)")]
        if is_dicom(path):
            import pydicom

            ds = pydicom.dcmread(str(path))
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            if frames > 1:
                return [Issue("dimensionality", f"{path} is a multi-frame DICOM ({frames} frames): {_AS_IMAGE}")]
            check_dicom_pixels(path, ds, max_pixels)
            ds.pixel_array  # noqa: B018 -- decoding the pixels is the check
            return []
        with open_image(path, max_pixels) as img:
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                return [Issue("dimensionality", f"{path} has {frames} frames: {_AS_IMAGE}")]
            img.load()
    except TooLargeError as err:
        return [Issue(TooLargeError.kind, err.message)]
    except MedmvlError as err:
        return [Issue("unreadable", _naming(path, err.message))]
    except Exception as err:
        return [Issue("unreadable", f"{path}: {type(err).__name__}: {err}")]
    return []


# ------------------------------------------------------------------------------- recipe / lengths
class _LengthProbe:
    """Encodes records with the recipe model's processor (its template, token counts and the one
    truncation rule); the token counts come from the model built on the meta device, no weights."""

    def __init__(self, recipe):
        from medmvl_cli.data.processor import MedmvlProcessor
        from medmvl_cli.model import token_counts

        self.processor = MedmvlProcessor.from_recipe(recipe, token_counts.placeholder_lengths_for_recipe(recipe))
        self.truncate_answers = bool(getattr(recipe.data, "truncate_answers", False))
        self.lengths: list[int] = []
        self.truncated: list[str] = []
        self.dropped: dict[str, list[str]] = {}

    def measure(self, record: Record) -> Issue | None:
        try:
            encoding = self.processor.encode(record.messages(), add_generation_prompt=record.ends_on_user,
                                             truncate_answers=self.truncate_answers)
        except Exception as err:
            return Issue("template", f"the {self.processor.template_name} template cannot encode it: "
                                     f"{getattr(err, 'message', err)}")
        if encoding.length is not None:
            self.lengths.append(encoding.length)
        if encoding.dropped is not None:
            self.dropped.setdefault(encoding.dropped, []).append(record.id)
        elif encoding.truncated:
            self.truncated.append(record.id)
        return None

    def stats(self, limit: int = 20) -> LengthStats:
        lengths = np.asarray(self.lengths or [0])
        pct = {f"p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 95, 99)}
        pct.update(mean=float(lengths.mean()), max=float(lengths.max()))
        return LengthStats(
            self.processor.template_name, self.processor.max_length, dict(self.processor.tokens), len(self.lengths),
            pct, len(self.truncated), self.truncated[:limit],
            {reason: len(ids) for reason, ids in self.dropped.items()},
            {reason: ids[:limit] for reason, ids in self.dropped.items()},
        )


def roots_from_recipe(recipe, annotations: Path | str) -> tuple[str | None, str | None]:
    """image_root / volume_root of the recipe's data entry for this annotation file, if it has one."""
    target = Path(annotations).resolve()
    for spec in list(recipe.data.train) + list(recipe.data.eval):
        if Path(spec.annotations).resolve() == target:
            return spec.image_root, spec.volume_root
    return None, None


# ---------------------------------------------------------------------------------------- driver
class _Collector:
    def __init__(self):
        self.by_index: dict[int, RecordProblems] = {}

    def add(self, index: int, rid: str | None, line: int | None, issues: list[Issue]) -> None:
        if not issues:
            return
        entry = self.by_index.get(index)
        if entry is None:
            entry = self.by_index[index] = RecordProblems(rid, index, line)
        entry.problems.extend(issues)


class _FileChecks:
    """Each image / volume file checked once, in a thread pool, and which records name it."""

    def __init__(self, workers: int | None, full_decode: bool, max_voxels: int, max_pixels: int):
        self.pool = ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) + 2))
        self.checks = {"image": (check_image_file, {"max_pixels": max_pixels}),
                       "volume": (check_volume_file, {"full_decode": full_decode, "max_voxels": max_voxels})}
        self.futures: dict[tuple[str, str], Future] = {}
        self.refs: dict[tuple[str, str], list[int]] = {}
        self.meta: dict[int, tuple[str | None, int | None]] = {}

    def submit(self, kind: str, path: Path, index: int, rid: str | None, line: int | None) -> None:
        key = (kind, str(path))
        if key not in self.futures:
            check, options = self.checks[kind]
            self.futures[key] = self.pool.submit(check, path, **options)
        users = self.refs.setdefault(key, [])
        if not users or users[-1] != index:  # a file named twice is checked once
            users.append(index)
        self.meta[index] = (rid, line)

    def collect(self, found: _Collector, progress: Callable[[int, int], None] | None) -> None:
        for done, (key, future) in enumerate(self.futures.items(), start=1):
            issues = future.result()
            for index in self.refs[key]:
                rid, line = self.meta[index]
                found.add(index, rid, line, issues)
            if progress is not None:
                progress(done, len(self.futures))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _default_max_length() -> int:
    from medmvl_cli.config.schema import LLMConfig

    return LLMConfig.model_fields["max_length"].default


class _RecordPass:
    """The one pass over the records: each record's own problems, ids seen so far, and the
    training-only ones held until the file's mode is known."""

    def __init__(self, roots: dict[str, Path], strict_paths: bool, max_length: int,
                 probe: _LengthProbe | None, files: _FileChecks | None):
        self.roots, self.strict_paths, self.max_length = roots, strict_paths, max_length
        self.probe, self.files = probe, files
        self.found = _Collector()
        self.seen_ids: dict[str, tuple[int, int | None]] = {}
        self.unanswered: list[tuple[int, str | None, int | None, list[Issue]]] = []
        self.count = self.parsed = self.ends_on_user = 0

    def check(self, raw) -> None:
        self.count += 1
        src = raw.source
        record, issues = schema_problems(raw)
        rid = record.id if record is not None else raw.id
        if record is not None:
            self.parsed += 1
            self.ends_on_user += record.ends_on_user
            issues += self._conversation_issues(record, raw)
            issues += self._id_issues(rid, src)
            issues += self._path_issues(record, src, rid)
            if self.probe is not None and not issues:
                length_issue = self.probe.measure(record)
                if length_issue is not None:
                    issues.append(length_issue)
        self.found.add(src.index, rid, src.line, issues)

    def _conversation_issues(self, record: Record, raw) -> list[Issue]:
        # Turns dropped for a bad role or type would make every later check misfire.
        complete = len(record.conversations) == len(raw.data.get("conversations") or ())
        conv = conversation_problems(record, require_answer=True) if complete else []
        late = [i for i in conv if i.kind == "unanswered"]
        if late:
            self.unanswered.append((raw.source.index, record.id, raw.source.line, late))
        issues = [i for i in conv if i.kind != "unanswered"]
        overlong = overlong_turn((t.value for t in record.conversations), self.max_length)
        if overlong is not None:
            issues.append(Issue("too_long", overlong))
        return issues

    def _id_issues(self, rid: str, src) -> list[Issue]:
        if rid in self.seen_ids:
            first, first_line = self.seen_ids[rid]
            at = f"record {first}" + (f" (line {first_line})" if first_line else "")
            return [Issue("duplicate_id", f"id {rid!r} is already used by {at}")]
        self.seen_ids[rid] = (src.index, src.line)
        return []

    def _path_issues(self, record: Record, src, rid: str) -> list[Issue]:
        issues = []
        for kind, paths in (("image", record.images), ("volume", record.volumes)):
            for written in paths:
                problem = path_problem(written, self.roots[kind]) if self.strict_paths else None
                if problem is not None:  # a flagged path is never opened
                    issues.append(Issue(problem[0], f"{kind} path {problem[1]}"))
                elif self.files is not None:
                    self.files.submit(kind, resolve_media_path(written, self.roots[kind]), src.index, rid, src.line)
        return issues

    def settle_mode(self, mode: Mode) -> str:
        """train / infer (auto: infer when most records end on a human turn); a training file's
        records that do not end on the answer become problems."""
        resolved = mode if mode != "auto" else ("infer" if self.ends_on_user * 2 > self.parsed else "train")
        if resolved == "train":
            for index, rid, line, issues in self.unanswered:
                self.found.add(index, rid, line, issues)
        return resolved


def _root_notes(roots: dict[str, Path], image_root, volume_root) -> list[str]:
    return [f"{key}_root {root} is not a folder" for key, root in roots.items()
            if (image_root if key == "image" else volume_root) is not None and not root.is_dir()]


def _totals(problems: list[RecordProblems]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for entry in problems:
        for issue in entry.problems:
            totals[issue.kind] = totals.get(issue.kind, 0) + 1
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def validate_annotations(
    annotations: str | Path,
    image_root: str | Path | None = None,
    volume_root: str | Path | None = None,
    *,
    strict_paths: bool = False,
    workers: int | None = None,
    mode: Mode = "auto",
    check_files: bool = True,
    full_decode: bool = False,
    recipe=None,
    progress: Callable[[int, int], None] | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ValidationReport:
    """Check every record of `annotations` and every file they name; the input is only read.

    Relative paths resolve against `image_root` / `volume_root` (default: the annotation file's
    folder). `mode`: train (records must end on the gpt answer), infer (may end on a human turn),
    auto (infer when most records end on a human turn). `progress(done, total)` follows the file
    checks. With `recipe`, lengths are measured with its template (see `LengthStats`), and turns
    are held to its `model.llm.max_length` (else to the recipe default's). Files declaring more
    than `max_voxels` / `max_pixels` are reported as `too_large` without being decoded.
    """
    path = Path(annotations)
    file = AnnotationFile(path)
    roots = {"image": default_root(path, image_root), "volume": default_root(path, volume_root)}
    probe = _LengthProbe(recipe) if recipe is not None else None
    max_length = recipe.model.llm.max_length if recipe is not None else _default_max_length()
    files = _FileChecks(workers, full_decode, max_voxels, max_pixels) if check_files else None
    records = _RecordPass(roots, strict_paths, max_length, probe, files)
    try:
        for raw in file:
            records.check(raw)
        if records.count == 0:
            raise DataError(f"{path}: holds no records", hint="an annotation file needs at least one record")
        resolved_mode = records.settle_mode(mode)
        if files is not None:
            files.collect(records.found, progress)
    finally:
        if files is not None:
            files.close()
    problems = [records.found.by_index[i] for i in sorted(records.found.by_index)]
    log.debug("validated %d records of %s: %d with problems", records.count, path, len(problems))
    return ValidationReport(
        file=str(path), format=file.format, mode=resolved_mode, records=records.count, problems=problems,
        totals=_totals(problems), files_checked=len(files.futures) if files is not None else 0,
        notes=_root_notes(roots, image_root, volume_root), lengths=probe.stats() if probe is not None else None,
    )
