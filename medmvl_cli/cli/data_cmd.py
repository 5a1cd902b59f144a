"""`medmvl data validate | synth | cache | convert`: check an annotation file, write a synthetic dataset,
fill the volume cache, convert a published dataset."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from medmvl_cli.cli.options import MaxPixelsOption, MaxVoxelsOption

app = typer.Typer(no_args_is_help=True)


class ValidateMode(str, Enum):
    auto = "auto"
    train = "train"
    infer = "infer"


class SynthKind(str, Enum):
    d2 = "2d"
    d3 = "3d"
    both = "both"


@app.command("validate")
def validate(
    annotations: Annotated[
        Path,
        typer.Argument(help="Annotation file: a JSON list or JSONL of MedM-VL / LLaVA records.", show_default=False),
    ],
    image_root: Annotated[
        Path | None,
        typer.Option("--image-root", help="Folder `image` paths are relative to (default: the annotation file's folder)."),
    ] = None,
    volume_root: Annotated[
        Path | None,
        typer.Option("--volume-root", help="Folder `image3d` paths are relative to (default: the annotation file's folder)."),
    ] = None,
    recipe: Annotated[
        Path | None,
        typer.Option("--recipe", help="Also tokenise with this recipe's template and report lengths against model.llm.max_length."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    strict_paths: Annotated[
        bool,
        typer.Option("--strict-paths", help="Flag (and do not open) absolute paths and paths that leave their root by `..` or a symlink."),
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option("--workers", min=1, help="Threads checking files (default: CPU count + 2, at most 8)."),
    ] = None,
    mode: Annotated[
        ValidateMode,
        typer.Option("--mode", help="train: records must end on the gpt answer; infer: may end on a human turn; auto: infer if most records do."),
    ] = ValidateMode.auto,
    full_decode: Annotated[
        bool,
        typer.Option("--full-decode", help="Decode every volume in full (default: headers, plus full decode of float data for NaN / Inf)."),
    ] = False,
    no_files: Annotated[
        bool,
        typer.Option("--no-files", help="Check the records only, not the files they name."),
    ] = False,
    show: Annotated[int, typer.Option("--show", min=0, help="Records listed in detail in the summary.")] = 20,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    max_voxels: MaxVoxelsOption = None,
    max_pixels: MaxPixelsOption = None,
) -> None:
    """Check every record and every file it names; list every problem. Exit 1 if there is any.

    Records: schema, turn order, answers (training files), <image> / <image3d> counts, duplicate ids.

    Files: missing, not decoding, wrong dimensionality, NaN / Inf, over --max-voxels / --max-pixels (from the
    header, never decoded); with --strict-paths, absolute paths and paths escaping their root by `..` or a symlink.

    The input file is only read. Example: medmvl data validate data/train_3d.json --volume-root data/ct --json
    """
    from rich.console import Console

    from medmvl_cli.cli.options import limit_options
    from medmvl_cli.data.validate import roots_from_recipe, validate_annotations
    from medmvl_cli.progress import JobProgress

    loaded = None
    if recipe is not None:
        from medmvl_cli.config.loader import load_recipe

        loaded = load_recipe(recipe)
        recipe_image_root, recipe_volume_root = roots_from_recipe(loaded, annotations)
        image_root = image_root or (Path(recipe_image_root) if recipe_image_root else None)
        volume_root = volume_root or (Path(recipe_volume_root) if recipe_volume_root else None)
        max_voxels, max_pixels = max_voxels or loaded.data.max_voxels, max_pixels or loaded.data.max_pixels

    with JobProgress("checking files", enabled=not (quiet or as_json), transient=True, unit="files") as progress:
        report = validate_annotations(
            annotations, image_root, volume_root, strict_paths=strict_paths, workers=workers,
            mode=mode.value, check_files=not no_files, full_decode=full_decode, recipe=loaded,
            progress=progress.update, **limit_options(max_voxels, max_pixels),
        )
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        _print_summary(report, Console(), show)
    if not report.ok:
        raise typer.Exit(1)


def _print_summary(report, console, show: int) -> None:
    from rich.markup import escape
    from rich.table import Table

    from medmvl_cli.data.validate import PROBLEM_KINDS

    kind_of_file = "an inference" if report.mode == "infer" else "a training"
    console.print(
        f"[bold]{escape(report.file)}[/bold]: {report.records} record(s), {report.format}, "
        f"read as {kind_of_file} file; {report.files_checked} file(s) checked"
    )
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    if report.lengths is not None:
        _print_lengths(report.lengths, console)
    if report.ok:
        console.print("[green]ok[/green]: no problems")
        return
    total = sum(report.totals.values())
    console.print(f"[red]{total} problem(s) in {len(report.problems)} record(s)[/red]")
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("kind")
    table.add_column("count", justify="right")
    table.add_column("what")
    table.add_column("first records")
    for kind, count in report.totals.items():
        firsts = [_where(p) for p in report.problems if any(i.kind == kind for i in p.problems)][:3]
        table.add_row(kind, str(count), PROBLEM_KINDS.get(kind, ""), escape(", ".join(firsts)))
    console.print(table)
    for entry in report.problems[:show]:
        console.print(f"[bold]{escape(_where(entry))}[/bold]")
        for issue in entry.problems:
            console.print(f"  [red]{issue.kind}[/red]: {escape(issue.message)}")
    if len(report.problems) > show:
        console.print(f"... and {len(report.problems) - show} more record(s) (--show N, or --json for all)")


def _where(entry) -> str:
    line = f", line {entry.line}" if entry.line is not None else ""
    return f"{entry.id} (record {entry.index}{line})"


def _print_lengths(lengths, console) -> None:
    pct = lengths.percentiles
    console.print(
        f"tokens with template {lengths.template} ({', '.join(f'{k} = {v}' for k, v in lengths.placeholder_lengths.items())}): "
        f"p50 {pct['p50']:.0f}, p90 {pct['p90']:.0f}, p99 {pct['p99']:.0f}, max {pct['max']:.0f} "
        f"over {lengths.measured} record(s); max_length {lengths.max_length}"
    )
    if lengths.truncated:
        console.print(f"[yellow]{lengths.truncated} record(s) would have their answer cut[/yellow]: {', '.join(lengths.truncated_ids[:5])}")
    for reason, count in lengths.dropped.items():
        console.print(f"[yellow]{count} record(s) would be dropped[/yellow] ({reason}): {', '.join(lengths.dropped_ids[reason][:5])}")


@app.command("synth")
def synth(
    out_dir: Annotated[
        Path,
        typer.Argument(help="Folder to write into (created if needed).", show_default=False),
    ],
    kind: Annotated[
        SynthKind,
        typer.Option("--kind", help="2d films, 3d CT volumes, or both."),
    ] = SynthKind.both,
    n: Annotated[
        int,
        typer.Option("--n", min=2, help="Images (and volumes) per kind, train and test together."),
    ] = 200,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Same seed, same bytes.")] = 0,
    questions: Annotated[
        str,
        typer.Option("--questions", help="all | easy | a comma list of presence, quadrant (2D), side (3D), count, report."),
    ] = "all",
    image_size: Annotated[
        int,
        typer.Option("--image-size", min=16, help="2D film size in pixels (square)."),
    ] = 64,
    volume_size: Annotated[
        tuple[int, int, int],
        typer.Option("--volume-size", help="3D volume size D H W in voxels."),
    ] = (32, 64, 64),
    test_fraction: Annotated[
        float,
        typer.Option("--test-fraction", help="Share of cases in the test files."),
    ] = 0.2,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace annotation files and media folders already there."),
    ] = False,
) -> None:
    """Write a small synthetic dataset whose answers can only be read off the image.

    2D: grayscale PNG chest films; 3D: NIfTI CT volumes in HU, with train_2d / test_2d / train_3d / test_3d.json.

    Easy questions for quick training runs: 2D quadrant, 3D side (--questions easy). See docs/data.md.

    Example: medmvl data synth data/synth --kind both --n 240 --questions easy
    """
    from rich.console import Console
    from rich.table import Table

    from medmvl_cli.data.synth import EASY, synthesize

    result = synthesize(
        out_dir, kind=kind.value, n=n, seed=seed, image_size=image_size, volume_size=volume_size,
        questions=questions, test_fraction=test_fraction, overwrite=overwrite,
    )
    console = Console()
    table = Table(title=f"synthetic dataset in {result.out_dir}", show_edge=False, pad_edge=False)
    table.add_column("file")
    table.add_column("records", justify="right")
    for name, count in result.annotations.items():
        table.add_row(name, str(count))
    console.print(table)
    for dim, kinds in result.questions.items():
        console.print(f"{dim}: questions {', '.join(kinds)} (easy: {EASY[dim]}); "
                      f"{'image_root' if dim == '2d' else 'volume_root'} = {result.out_dir}")


@app.command("cache")
def cache(
    recipe: Annotated[Path, typer.Argument(help="Recipe whose data.train / data.eval volumes to preprocess.", show_default=False)],
    overrides: Annotated[list[str] | None, typer.Argument(help="Dotted KEY=VALUE recipe overrides.", show_default=False)] = None,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Parallel jobs (0 = one in this process).")] = 2,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Preprocess every volume of a recipe's data into data.cache_dir, so training reads tensors, not CTs.

    Example: medmvl data cache recipes/medmvl-ct/finetune.yaml --workers 8
    """
    from rich.console import Console

    from medmvl_cli.config.loader import load_recipe
    from medmvl_cli.data.annotations import default_root, read_records, resolve_media_path
    from medmvl_cli.data.volume_cache import VolumeCache
    from medmvl_cli.errors import RecipeError
    from medmvl_cli.progress import JobProgress

    resolved = load_recipe(recipe, overrides or [])
    if resolved.data.cache_dir is None or resolved.model.image3d is None:
        raise RecipeError(f"{recipe}: nothing to cache",
                          hint="the recipe needs model.image3d and data.cache_dir (e.g. data.cache_dir=cache)")
    paths = []
    for spec in [*resolved.data.train, *resolved.data.eval]:
        root = default_root(spec.annotations, spec.volume_root)
        for record in read_records(spec.annotations):
            paths.extend(resolve_media_path(p, root) for p in record.volumes)
    console = Console(stderr=True)
    with JobProgress("caching volumes", console, enabled=not quiet, unit="volumes") as progress:
        report = VolumeCache(resolved.data.cache_dir, resolved.data.max_voxels).fill(
            paths, resolved.model.image3d.volume, workers=workers,
            progress=lambda done, total, _path: progress.update(done, total),
            executor="process" if workers > 1 else "thread",
        )
    console.print(f"{report.built} built, {report.cached} already cached, {len(report.failed)} failed "
                  f"-> {resolved.data.cache_dir}")
    for path, message in report.failed[:20]:
        console.print(f"  [red]failed[/red] {path}: {message}")
    if report.failed:
        raise typer.Exit(1)


class Dataset(str, Enum):
    """The converters of medmvl_cli.data.convert.CONVERTERS (listed here so --help stays fast)."""

    vqa_rad = "vqa-rad"
    slake = "slake"
    pathvqa = "pathvqa"
    pmc_vqa = "pmc-vqa"
    m3d_vqa = "m3d-vqa"
    m3d_cap = "m3d-cap"
    ct_rate = "ct-rate"
    hf = "hf"


class Lang(str, Enum):
    en = "en"
    zh = "zh"
    all = "all"


@app.command("convert")
def convert(
    dataset: Annotated[Dataset, typer.Argument(help="The dataset's converter (docs/datasets.md).", show_default=False)],
    src: Annotated[Path, typer.Argument(help="The dataset as downloaded (a folder; a parquet file for hf). Only read.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Folder for <split>.json, media links and conversion.json.", show_default=False)],
    split: Annotated[list[str] | None, typer.Option("--split", help="Split(s) to write (repeatable; default: every split SRC holds).")] = None,
    lang: Annotated[Lang, typer.Option("--lang", help="SLAKE: questions in this language.")] = Lang.en,
    image_column: Annotated[str | None, typer.Option("--image-column", help="hf: the image column (default image).")] = None,
    question_column: Annotated[str | None, typer.Option("--question-column", help="hf: the question column (default question).")] = None,
    answer_column: Annotated[str | None, typer.Option("--answer-column", help="hf: the answer column (default answer).")] = None,
    question_type_column: Annotated[str | None, typer.Option("--question-type-column", help="hf: a closed / open / choice column (default: yes / no answers are closed).")] = None,
    no_validate: Annotated[bool, typer.Option("--no-validate", help="Skip `data validate` on the files written.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Convert a public dataset, in the layout it is published in, into MedM-VL annotation files.

    One <split>.json per split, each record with `answer` and `question_type` (closed / open / choice),
    media paths relative to OUT (links to the source folders; images stored in parquet written once).
    Counts read / written / dropped with reasons; validates what it wrote. Re-running rewrites the
    same files. See docs/datasets.md for each dataset.

    Example: medmvl data convert slake data/Slake1.0 --out data/slake --lang en
    """
    from rich.console import Console

    from medmvl_cli.data.convert import ConvertOptions, get_converter
    from medmvl_cli.data.convert import convert as run_convert

    options = ConvertOptions(lang=lang.value, image_column=image_column, question_column=question_column,
                             answer_column=answer_column, question_type_column=question_type_column)
    report = run_convert(get_converter(dataset.value), src, out, split, options, validate=not no_validate)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        _print_conversion(report, Console())
    if not report.ok:
        raise typer.Exit(1)


def _print_conversion(report, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{report.dataset} -> {escape(str(report.out_dir))}", show_edge=False, pad_edge=False)
    for name, justify in (("split", "left"), ("file", "left"), ("read", "right"), ("written", "right"),
                          ("dropped", "right"), ("validate", "left")):
        table.add_column(name, justify=justify)
    for s in report.splits:
        check = "skipped" if s.validation is None else ("ok" if s.validation["ok"] else
                                                        "[red]" + escape(", ".join(f"{k} {v}" for k, v in s.validation["problems"].items())) + "[/red]")
        table.add_row(s.split, s.file.name, str(s.read), str(s.written), str(sum(s.dropped.values())), check)
    console.print(table)
    for s in report.splits:
        for reason, count in sorted(s.dropped.items()):
            console.print(f"  {s.split}: dropped {count} ({escape(reason)})")
