"""The `csc` command line: each command turns options into arguments and calls one function.

Imports of numpy, zarr and torch happen inside the commands, so `csc --help` starts instantly.
Option defaults are read from their torch-free homes (`TrainConfig` for the options that mirror a
config key, `SplitOptions` for the split, `csc.storage` for the S3 waits), not written here.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from csc import __version__
from csc.config import (
    DEFAULT_PREDICTION_CHECKPOINT,
    DEFAULT_S3_SEARCH_PATH,
    DEFAULT_SEARCH_PATH,
    FORCE_ALL_CLASSES_CHOICES,
    PREDICTION_ENCODINGS,
    TrainConfig,
    s3_search_path,
)
from csc.datasplit import SplitOptions
from csc.storage import COMPRESSORS, S3_RETRY_BUDGET_S, S3_TIMEOUT_S, is_url


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a comma list of integers, e.g. 64,128,128"
        ) from None


def _shape(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> tuple[int, ...] | None:
    if value is None:
        return None
    shape = _int_tuple(value)
    if len(shape) != 3:
        raise click.BadParameter(f"give 3 sizes in z,y,x order, got {value!r}")
    return shape


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn bad-input errors into one-line messages (no traceback), and print each warning as
    a `warning: ...` line on stderr the moment it is raised (each distinct one once), so a
    run that is killed later has shown them, and config warnings come before any data."""
    from csc.config import ConfigFileError
    from csc.storage import StorageError

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning
        try:
            yield
        except (
            ValueError,
            FileNotFoundError,
            FileExistsError,
            ConfigFileError,
            StorageError,
        ) as error:
            raise click.ClickException(str(error)) from None


def _show_warning(message: Warning | str, *_args: Any, **_kwargs: Any) -> None:
    """`warnings.showwarning` for the command line: one line on stderr, flushed at once."""
    click.echo(f"warning: {message}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="csc")
def cli() -> None:
    """Train segmentation models on CellMap-style volume EM data (OME-NGFF zarr, local or S3)."""


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--datasets", default=2, show_default=True, help="Number of datasets (zarr stores).")
@click.option("--crops", default=3, show_default=True, help="Label crops per dataset.")
@click.option(
    "--shape",
    default="96,256,256",
    show_default=True,
    callback=_shape,
    help="Raw volume size z,y,x in voxels at 8 nm.",
)
@click.option(
    "--crop-shape",
    default="64,256,256",
    show_default=True,
    callback=_shape,
    help="Label crop size z,y,x in voxels at 4 nm.",
)
@click.option("--classes", default="nuc,mito,er", show_default=True, help="Comma list of classes.")
@click.option("--seed", default=0, show_default=True, help="Random seed: same seed, same bytes.")
@click.option(
    "--missing-class-prob",
    default=0.2,
    show_default=True,
    help="Chance that a crop leaves a class unannotated.",
)
@click.option(
    "--chunks",
    default="64,128,128",
    show_default=True,
    callback=_shape,
    help="Chunk size z,y,x of every array.",
)
@click.option(
    "--compressor",
    default="zstd",
    show_default=True,
    type=click.Choice(COMPRESSORS),
)
@click.option("--overwrite", is_flag=True, help="Replace datasets that already exist in OUT_DIR.")
def synth(out_dir: str, **options: Any) -> None:
    """Write synthetic CellMap-layout data (raw at 8 nm, label crops at 4 nm) to OUT_DIR."""
    from csc.synth import SynthSpec, write_synthetic

    overwrite = options.pop("overwrite")
    spec = SynthSpec(
        num_datasets=options["datasets"],
        num_crops=options["crops"],
        shape=options["shape"],
        crop_shape=options["crop_shape"],
        classes=tuple(c.strip() for c in options["classes"].split(",") if c.strip()),
        seed=options["seed"],
        missing_class_prob=options["missing_class_prob"],
        chunks=options["chunks"],
        compressor=options["compressor"],
    )
    with user_errors():
        crops = write_synthetic(out_dir, spec, overwrite=overwrite)
    for crop in crops:
        click.echo(f"{crop.dataset}/{crop.crop}: {', '.join(crop.classes)}")
    datasets = len({c.dataset for c in crops}) or spec.num_datasets
    click.echo(f"wrote {datasets} datasets with {len(crops)} crops to {out_dir}")


def _config_command(function: Callable[..., Any]) -> Callable[..., Any]:
    """The arguments every command that reads a config file takes."""
    function = click.option(
        "--strict", is_flag=True, help="Treat likely misspelled config names as errors."
    )(function)
    function = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")(function)
    return click.argument("config_file", type=click.Path(dir_okay=False))(function)


@cli.command()
@_config_command
def config(config_file: str, overrides: tuple[str, ...], strict: bool) -> None:
    """Print the resolved configuration of CONFIG_FILE without training.

    KEY=VALUE pairs override the file; values are Python literals, e.g.
    epochs=3 learning_rate=3e-4 classes="['nuc','mito']".
    """
    from csc.config import format_config, load_config

    with user_errors():
        resolved = load_config(config_file, overrides, strict=strict)
    click.echo(format_config(resolved))


@cli.command()
@_config_command
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=None,
    help="Train in N processes on this machine (torchrun; one per GPU).",
)
def train(config_file: str, overrides: tuple[str, ...], strict: bool, nproc: int | None) -> None:
    """Train the model CONFIG_FILE describes (resuming as its load_model says).

    Builds the datasplit CSV first if the config's datasplit_path does not exist. KEY=VALUE
    pairs override the file, e.g. epochs=3 load_model=None. For several machines, start
    `torchrun ... -m csc train CONFIG_FILE` on each.
    """
    from csc.config import load_config

    if nproc is not None and nproc > 1:
        from csc.launch import launch

        with user_errors():
            load_config(config_file, overrides, strict=strict)  # fail here, not in N processes
        arguments = ["train", config_file, *overrides, *(["--strict"] if strict else [])]
        raise SystemExit(launch(nproc, arguments))
    with user_errors():
        resolved = load_config(config_file, overrides, strict=strict)
        from csc.training import train as run

        result = run(resolved)
    if os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 reports
        click.echo(summary(result, resolved.logs_save_path.format(model_name=resolved.model_name)))


@cli.command()
@_config_command
@click.option(
    "--crops",
    default=None,
    help="Comma list of crops (crop or dataset/crop, globs); default: validation crops.",
)
@click.option("--all", "all_crops", is_flag=True, help="Every crop in the datasplit.")
@click.option("--bbox", default=None, help="A box z0,y0,x0,z1,y1,x1 in nm; needs --dataset.")
@click.option("--dataset", default=None, help="The dataset of --bbox.")
@click.option(
    "--output",
    default=None,
    type=click.Path(file_okay=False),
    help="Output folder; default: the config's predictions_path.",
)
@click.option(
    "--checkpoint",
    default=DEFAULT_PREDICTION_CHECKPOINT,
    show_default=True,
    help="latest, best (by validation), or a .pth file.",
)
@click.option(
    "--overlap",
    type=click.FloatRange(0, 1, max_open=True),
    default=None,
    help="Window overlap per axis; default: prediction_overlap.",
)
@click.option(
    "--encoding",
    type=click.Choice(PREDICTION_ENCODINGS),
    default=None,
    help="Stored probabilities; default: prediction_encoding.",
)
@click.option(
    "--orthoplanes", is_flag=True, help="2D models: average predictions along z, y and x planes."
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace crop groups an earlier csc predict wrote (nothing else).",
)
def predict(
    config_file: str,
    overrides: tuple[str, ...],
    strict: bool,
    crops: str | None,
    all_crops: bool,
    bbox: str | None,
    dataset: str | None,
    output: str | None,
    checkpoint: str,
    overlap: float | None,
    encoding: str | None,
    orthoplanes: bool,
    overwrite: bool,
) -> None:
    """Predict crops or a box with a trained model into OME-NGFF zarr.

    Writes OUTPUT/{dataset}.zarr/{crop}/{class}/s0 per class: probabilities with the voxel
    size and translation of the target grid, readable by neuroglancer.
    """
    from csc.config import load_config

    box = None
    if bbox is not None:
        try:
            box = tuple(float(v) for v in bbox.split(","))
        except ValueError:
            raise click.BadParameter(f"{bbox!r} is not z0,y0,x0,z1,y1,x1 in nm") from None
    with user_errors():
        resolved = load_config(config_file, overrides, strict=strict)
        from csc.prediction import predict as run

        written = run(
            resolved,
            crops=_comma_list(crops),
            all_crops=all_crops,
            bbox=box,
            dataset=dataset,
            output=output,
            checkpoint=checkpoint,
            overwrite=overwrite,
            orthoplanes=orthoplanes,
            overlap=overlap,
            encoding=encoding,
        )
    for item in written:
        grid = item.grid
        click.echo(
            f"wrote {item.path}: {len(resolved.classes)} classes, {grid.shape} voxels of "
            f"{grid.scale} nm from {grid.translation} nm"
        )


@cli.command()
@_config_command
@click.option(
    "--input",
    "source",
    default=None,
    type=click.Path(file_okay=False),
    help="Predictions to process; default: the config's predictions_path.",
)
@click.option(
    "--output",
    default=None,
    type=click.Path(file_okay=False),
    help="Output folder; default: the config's processed_path.",
)
@click.option("--crops", default=None, help="Comma list of crops (crop or dataset/crop, globs).")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace crop groups an earlier csc process wrote (nothing else).",
)
def process(
    config_file: str,
    overrides: tuple[str, ...],
    strict: bool,
    source: str | None,
    output: str | None,
    crops: str | None,
    overwrite: bool,
) -> None:
    """Apply the config's process_func to predictions, block by block."""
    from csc.config import load_config

    with user_errors():
        resolved = load_config(config_file, overrides, strict=strict)
        from csc.processing import process as run

        written = run(
            resolved, source=source, output=output, crops=_comma_list(crops), overwrite=overwrite
        )
    for path in written:
        click.echo(f"wrote {path}")


def summary(result: Any, log_dir: str) -> str:
    """The last validation's per-class IoU, and how to look at the logs."""
    lines = [f"trained epochs {result.first_epoch}-{result.last_epoch}"]
    if result.validation:
        last = result.validation[-1]
        iou = last["metrics"].get("iou", {})
        scored = ", ".join(f"{k} {v:.3f}" for k, v in iou.items() if v is not None)
        lines.append(f"validation loss {last['loss']:.4f}; IoU: {scored}")
    if result.best_epoch is not None:
        lines.append(f"best epoch {result.best_epoch} (validation {result.best_score:.4f})")
    lines.append(f"TensorBoard: .venv/bin/tensorboard --logdir {log_dir}")
    return "\n".join(lines)


def _comma_list(text: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (text or "").split(",") if item.strip())


def _crawl_command(function: Callable[..., Any]) -> Callable[..., Any]:
    """The options of every command that crawls a search path."""
    options = [
        click.option(
            "--search-path",
            default=None,
            help=f"Template with {{dataset}} and {{name}}. [default: {DEFAULT_SEARCH_PATH}; "
            f"with --s3: {DEFAULT_S3_SEARCH_PATH} in the bucket]",
        ),
        click.option(
            "--raw-name",
            default=TrainConfig.raw_name,
            show_default=True,
            help="Raw group, filled in for {name}.",
        ),
        click.option(
            "--crop-name",
            default=TrainConfig.crop_name,
            show_default=True,
            help="Label group of one class of one crop, filled in for {name}.",
        ),
        click.option(
            "--classes",
            default=",".join(TrainConfig.classes),
            show_default=True,
            help="Comma list.",
        ),
        click.option("--datasets", default=None, help="Comma list of dataset names or globs."),
        click.option("--crops", default=None, help="Comma list of crop names or globs."),
        click.option(
            "--scale",
            default=None,
            help="Keep a class of a crop only if its s0 voxel size (nm) is <= this on "
            "every axis: one number, y,x or z,y,x.",
        ),
        click.option("--s3", "use_s3", is_flag=True, help="Crawl an S3 bucket instead."),
        click.option("--bucket", default=TrainConfig.s3_bucket, show_default=True),
        click.option(
            "--endpoint-url",
            default=None,
            help="S3 endpoint [default: $AWS_ENDPOINT_URL, else AWS].",
        ),
        click.option(
            "--s3-timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=S3_TIMEOUT_S,
            show_default=True,
            help="Seconds an S3 request may take to connect, and to send each next byte.",
        ),
        click.option(
            "--s3-retry-budget",
            type=click.FloatRange(min=0, min_open=True),
            default=S3_RETRY_BUDGET_S,
            show_default=True,
            help="Seconds a failing S3 read is retried (outages, throttling) before csc gives up.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _crawl_options(options: dict[str, Any]) -> Any:
    """CrawlOptions from the crawl command options (popped from `options`)."""
    from csc.datasplit import CrawlOptions

    use_s3, bucket = options.pop("use_s3"), options.pop("bucket")
    search_path = options.pop("search_path")
    if use_s3:
        search_path = s3_search_path(search_path, bucket)
    elif not is_url(search_path or ""):
        search_path = os.path.abspath(search_path or DEFAULT_SEARCH_PATH)
    scale = _comma_list(options.pop("scale"))
    try:
        scale_values = tuple(float(s) for s in scale) or None
    except ValueError:
        raise click.BadParameter(f"--scale {','.join(scale)} is not numbers") from None
    if scale_values and len(scale_values) not in (1, 2, 3):
        raise click.BadParameter("--scale takes one number (all axes), y,x or z,y,x (nm)")
    return CrawlOptions(
        search_path=search_path,
        raw_name=options.pop("raw_name"),
        crop_name=options.pop("crop_name"),
        classes=_comma_list(options.pop("classes")),
        datasets=_comma_list(options.pop("datasets")),
        crops=_comma_list(options.pop("crops")),
        scale=scale_values,
        endpoint_url=options.pop("endpoint_url"),
        s3_timeout_s=options.pop("s3_timeout"),
        s3_retry_budget_s=options.pop("s3_retry_budget"),
    )


@cli.command()
@_crawl_command
@click.option(
    "--validate-ratio",
    default=SplitOptions.validate_ratio,  # csc datasplit's own, not validation_prob
    show_default=True,
    help="Share of crops for validation (one at least, given two crops).",
)
@click.option(
    "--force-all-classes",
    type=click.Choice([choice or "none" for choice in FORCE_ALL_CLASSES_CHOICES]),
    default=TrainConfig.force_all_classes or "none",
    show_default=True,
    help="Move crops lacking a class out of this split (both: leave them out).",
)
@click.option("--seed", default=SplitOptions.seed, show_default=True, help="Seed of the split.")
@click.option(
    "--csv-path", default=TrainConfig.datasplit_path, show_default=True, type=click.Path()
)
@click.option("--relative", is_flag=True, help="Write local roots relative to the CSV's folder.")
@click.option("--dry-run", is_flag=True, help="Print the table; write nothing.")
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing datasplit CSV (no other file)."
)
def datasplit(**options: Any) -> None:
    """Crawl zarr stores for crops of the requested classes into a datasplit CSV."""
    from csc.datasplit import (
        SplitOptions,
        check_writable,
        make_datasplit,
        summarise,
        write_datasplit,
    )

    crawl_options = _crawl_options(options)
    force = options["force_all_classes"]
    split_options = SplitOptions(
        options["validate_ratio"], options["seed"], None if force == "none" else force
    )
    with user_errors():
        if not options["dry_run"]:
            check_writable(options["csv_path"], overwrite=options["overwrite"], kind="datasplit")
        rows, left_out = make_datasplit(crawl_options, split_options)
        for line in left_out:
            click.echo(f"skipped {line}", err=True)
        if options["dry_run"]:
            click.echo(_table(rows))
            click.echo(f"{summarise(rows)} (dry run: nothing written)")
            return
        path = write_datasplit(
            rows, options["csv_path"], relative=options["relative"], overwrite=options["overwrite"]
        )
    click.echo(f"wrote {path}: {summarise(rows)}")


cli.add_command(datasplit, name="make-datasplit")


def _table(rows: Any) -> str:
    import pandas as pd

    frame = pd.DataFrame(
        [(r.usage, r.dataset, r.crop, ",".join(r.classes), r.gt_root) for r in rows],
        columns=["usage", "dataset", "crop", "classes", "root"],
    )
    return frame.to_string(index=False)


@cli.command()
@_crawl_command
@click.option(
    "--csv",
    "csv_path",
    default=None,
    type=click.Path(),
    help="Also write the table to this CSV file.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --csv file.")
def counts(**options: Any) -> None:
    """Per dataset and class: crops annotated and foreground voxels at s0."""
    import pandas as pd

    from csc.datasplit import check_writable, count_classes

    crawl_options = _crawl_options(options)
    with user_errors():
        if options["csv_path"]:
            check_writable(options["csv_path"], overwrite=options["overwrite"], kind="counts")
        counted, skipped = count_classes(crawl_options)
        for line in skipped:
            click.echo(f"skipped {line}", err=True)
        table = pd.DataFrame(counted, columns=["dataset", "class", "crops", "foreground_voxels"])
    click.echo(table.to_string(index=False) if len(table) else "no annotated crops found")
    if options["csv_path"]:
        from csc.storage import write_text_atomic

        with user_errors():
            write_text_atomic(options["csv_path"], table.to_csv(index=False))
        click.echo(f"wrote {options['csv_path']}")


@cli.command()
@click.option(
    "--predictions",
    required=True,
    type=click.Path(),
    help="Folder csc predict wrote: {dataset}.zarr/{crop}/{class} groups.",
)
@click.option(
    "--datasplit",
    "datasplit_path",
    default=TrainConfig.datasplit_path,
    show_default=True,
    type=click.Path(dir_okay=False),
    help="CSV that locates the ground-truth crops.",
)
@click.option(
    "--crops",
    default=None,
    help="Comma list of crops (crop or dataset/crop, globs); default: every crop of "
    "the datasplit that has predictions.",
)
@click.option("--classes", default=None, help="Comma list; default: every predicted class.")
@click.option(
    "--threshold",
    default=0.5,
    show_default=True,
    type=float,
    help="A voxel is foreground where its probability is above this, in (0, 1).",
)
@click.option(
    "--boundary-tolerance",
    default=1,
    show_default=True,
    type=click.IntRange(min=0),
    help="Boundary F1 tolerance in voxels (Chebyshev distance).",
)
@click.option(
    "--json",
    "json_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Also write the results to this JSON file.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --json file.")
def evaluate(**options: Any) -> None:
    """Score predictions against ground-truth crops: IoU, Dice, ..., Hausdorff95 (nm)."""
    from csc.datasplit import read_datasplit, select_crops
    from csc.evaluation import check_json_path, format_table, write_json
    from csc.evaluation import evaluate as run

    json_path = options["json_path"]
    with user_errors():
        if json_path:
            check_json_path(json_path, overwrite=options["overwrite"])  # before the work
        rows = read_datasplit(options["datasplit_path"])
        rows = select_crops(rows, _comma_list(options["crops"]))
        report = run(
            options["predictions"],
            rows,
            classes=_comma_list(options["classes"]) or None,
            threshold=options["threshold"],
            boundary_tolerance=options["boundary_tolerance"],
        )
        if json_path:
            write_json(report, json_path, overwrite=options["overwrite"])
    click.echo(format_table(report))
    if json_path:
        click.echo(f"wrote {json_path}")


def main() -> None:
    """Entry point of the `csc` console script and `python -m csc`."""
    cli(prog_name="csc")
