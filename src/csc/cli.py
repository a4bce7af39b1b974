"""The `csc` command line: each command turns options into arguments and calls one function.

Imports of numpy, zarr and torch happen inside the commands, so `csc --help` starts instantly.
Option defaults are read from their torch-free homes (`TrainConfig` for the options that mirror a
config key, `SplitOptions` for the split, `csc.storage` for the S3 waits), not written here.
The challenge toolkit's spellings (`make-datasplit`, `-vr`, `--search_path`, `-so`, ...) are
extra names of csc's commands and options (`TOOLKIT_COMMANDS`, `Spelled`); docs/cli.md lists them.
"""

from __future__ import annotations

import itertools
import os
import shlex
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click
from click.core import ParameterSource

from csc import __version__
from csc.config import (
    DEFAULT_PREDICTION_CHECKPOINT,
    DEFAULT_S3_SEARCH_PATH,
    DEFAULT_SEARCH_PATH,
    DEFAULT_TRUTH_PATH,
    FORCE_ALL_CLASSES_CHOICES,
    PREDICTION_ENCODINGS,
    TrainConfig,
    s3_search_path,
)
from csc.datasplit import SplitOptions
from csc.storage import COMPRESSORS, DEFAULT_PORT, S3_RETRY_BUDGET_S, S3_TIMEOUT_S, is_url
from csc.visualize import NEUROGLANCER_URL


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


# The challenge toolkit's command names -> csc's commands of the same job.
TOOLKIT_COMMANDS = {"make-datasplit": "datasplit", "get-counts": "counts"}
TOOLKIT_SPELLED = "csc.toolkit_spelled"  # ctx.meta key: a toolkit-only option name was typed


class Spelled(click.Option):
    """An option that the challenge toolkit spells differently too: `toolkit` holds its names
    (e.g. ``-vr``, ``--search_path``), accepted and listed in `--help` next to csc's."""

    def __init__(
        self, param_decls: Sequence[str], *, toolkit: tuple[str, ...] = (), **attrs: Any
    ) -> None:
        super().__init__([*param_decls, *toolkit], **attrs)
        self.toolkit = toolkit


class ToolkitCommand(click.Command):
    """A command that notes in `ctx.meta[TOOLKIT_SPELLED]` whether a toolkit-only option name
    was typed, for the one default that follows the spelling (predict's orthoplanes)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        names = {name for p in self.params if isinstance(p, Spelled) for name in p.toolkit}
        typed = itertools.takewhile(lambda arg: arg != "--", args)
        ctx.meta[TOOLKIT_SPELLED] = any(arg.split("=", 1)[0] in names for arg in typed)
        return super().parse_args(ctx, args)


class Commands(click.Group):
    """csc's commands, also found under the challenge toolkit's names (`TOOLKIT_COMMANDS`)."""

    command_class = ToolkitCommand

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, TOOLKIT_COMMANDS.get(cmd_name, cmd_name))

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_commands(ctx, formatter)
        rows = [(alias, f"Same as `csc {name}`.") for alias, name in TOOLKIT_COMMANDS.items()]
        with formatter.section("The challenge toolkit's names"):
            formatter.write_dl(rows)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="csc")
def cli() -> None:
    """Train segmentation models on CellMap-style volume EM data (OME-NGFF zarr, local or S3)."""


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--datasets", default=2, show_default=True, help="Number of datasets (zarr stores).")
@click.option("--crops", default=3, show_default=True, help="Label crops per dataset.")
@click.option(
    "--test-crops",
    default=0,
    show_default=True,
    help="Held-out test crops per dataset: labels in OUT_DIR/ground_truth.zarr, rows in "
    "OUT_DIR/test_crop_manifest.csv (the challenge's layout).",
)
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
        num_test_crops=options["test_crops"],
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
        held_out = " (test crop, held out)" if crop.test else ""
        click.echo(f"{crop.dataset}/{crop.crop}: {', '.join(crop.classes)}{held_out}")
    datasets = len({c.dataset for c in crops}) or spec.num_datasets
    tests = sum(c.test for c in crops)
    click.echo(f"wrote {datasets} datasets with {len(crops) - tests} crops to {out_dir}")
    if tests:
        click.echo(
            f"and {tests} test crops: ground truth {os.path.join(out_dir, 'ground_truth.zarr')}, "
            f"manifest {os.path.join(out_dir, 'test_crop_manifest.csv')}"
        )


@cli.command()
@click.argument("folder", type=click.Path(file_okay=False), default=".")
@click.option("--overwrite", is_flag=True, help="Replace example configs that already exist.")
def init(folder: str, overwrite: bool) -> None:
    """Write the commented example configs (2D and 3D UNet) into FOLDER/examples/.

    FOLDER defaults to the current folder. Their paths are relative to examples/: data in
    FOLDER/data (e.g. from `csc synth data`), checkpoints and logs in FOLDER.
    """
    from csc.scaffold import write_examples

    with user_errors():
        written = write_examples(folder, overwrite=overwrite)
    for path in written:
        click.echo(f"wrote {path}")
    data = os.path.normpath(os.path.join(folder, "data"))
    click.echo(f"next: csc synth {data} && csc train {os.path.normpath(written[0])}")


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


def _layout_folder(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """The folder csc writes {dataset}.zarr/{crop} groups under; the toolkit's template
    FOLDER/{dataset}.zarr/{crop} names the same folder."""
    if value is None or "{" not in value:
        return value
    from csc.utils import layout_root

    try:
        return layout_root(value, f"--{param.name}")
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def _location_command(function: Callable[..., Any]) -> Callable[..., Any]:
    """predict's options that set the config's data locations (the toolkit's -s, -r, -n)."""
    options = [
        click.option(
            "--search-path",
            cls=Spelled,
            toolkit=("-s", "--search_path"),
            default=None,
            help="Sets the config's search_path (a local path is relative to here).",
        ),
        click.option(
            "--raw-name",
            cls=Spelled,
            toolkit=("-r", "--raw_name"),
            default=None,
            help="Sets the config's raw_name.",
        ),
        click.option(
            "--crop-name",
            cls=Spelled,
            toolkit=("-n", "--crop_name"),
            default=None,
            help="Sets the config's crop_name.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _config_with(
    config_file: str, overrides: tuple[str, ...], *, strict: bool, **options: str | None
) -> Any:
    """The config with its KEY=VALUE overrides and the options that set a key (None: unset)."""
    from csc.config import load_config, parse_overrides

    changes = parse_overrides(overrides)
    changes.update({key: value for key, value in options.items() if value is not None})
    if options.get("search_path") and not is_url(changes["search_path"]):
        changes["search_path"] = os.path.abspath(changes["search_path"])  # as typed, from here
    return load_config(config_file, changes, strict=strict)


def _crop_selection(text: str | None) -> Any:
    """--crops as csc's crop patterns (`csc.utils.parse_crops`: the toolkit's numbers N mean
    cropN, '*' all, 'test' the challenge's test crops)."""
    from csc.utils import parse_crops

    return parse_crops(text)


MANIFEST_OPTION = click.option(
    "--test-crop-manifest",
    "manifest",
    default=None,
    type=click.Path(dir_okay=False),
    help="The test crop manifest CSV for --crops test and test crop ids; default: "
    "$CSC_TEST_CROP_MANIFEST_URL, else csc's copy of the challenge's.",
)


def _crawled_rows(config: Any, locations: dict[str, str | None]) -> Any:
    """predict's -s/-r/-n say where the crops are: crawled there (as the toolkit does), not
    read from the datasplit CSV; None when none is given."""
    if all(value is None for value in locations.values()):
        return None
    from csc.datasplit import crawl_config

    return crawl_config(config)[0]


@cli.command()
@_config_command
@click.option(
    "--crops",
    cls=Spelled,
    toolkit=("-c",),
    default=None,
    help="Comma list of crops (crop or dataset/crop, globs; a number N is cropN, a test crop "
    "if the datasplit has no such crop), or 'test' (the test crop manifest's); default: "
    "validation crops.",
)
@click.option("--all", "all_crops", is_flag=True, help="Every crop in the datasplit.")
@MANIFEST_OPTION
@click.option("--bbox", default=None, help="A box z0,y0,x0,z1,y1,x1 in nm; needs --dataset.")
@click.option(
    "--dataset", default=None, help="The dataset of --bbox; alone: its whole raw (region raw)."
)
@click.option(
    "--output",
    cls=Spelled,
    toolkit=("-o", "--output-path", "--output_path"),
    default=None,
    type=click.Path(file_okay=False),
    callback=_layout_folder,
    help="Output folder (or the toolkit's FOLDER/{dataset}.zarr/{crop}); default: the "
    "config's predictions_path.",
)
@click.option(
    "--checkpoint",
    default=DEFAULT_PREDICTION_CHECKPOINT,
    show_default=True,
    help="latest, best (by the config's monitor, the validation loss unless set), or a .pth file.",
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
    "--orthoplanes",
    is_flag=True,
    help="2D models: average predictions along z, y and x planes [default: off; on when a "
    "toolkit-only name such as -c, -o, -O is typed].",
)
@click.option(
    "skip_orthoplanes",
    cls=Spelled,
    toolkit=("-so", "--skip-orthoplanes", "--skip_orthoplanes"),
    is_flag=True,
    help="The toolkit's: no orthoplanes (its default for 2D models is on).",
)
@click.option(
    "--overwrite",
    cls=Spelled,
    toolkit=("-O",),
    is_flag=True,
    help="Replace crop groups an earlier csc predict wrote (nothing else).",
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=None,
    help="Predict in N processes on this machine (torchrun; one per GPU), the blocks split "
    "between them.",
)
@_location_command
def predict(
    config_file: str,
    overrides: tuple[str, ...],
    strict: bool,
    crops: str | None,
    all_crops: bool,
    manifest: str | None,
    bbox: str | None,
    dataset: str | None,
    output: str | None,
    checkpoint: str,
    overlap: float | None,
    encoding: str | None,
    orthoplanes: bool,
    skip_orthoplanes: bool,
    overwrite: bool,
    nproc: int | None,
    **locations: str | None,
) -> None:
    """Predict crops, a box or a dataset's whole raw with a trained model into OME-NGFF zarr.

    Writes OUTPUT/{dataset}.zarr/{crop}/{class}/s0 per class: probabilities with the voxel
    size and translation of the target grid, readable by neuroglancer, and a pyramid s1, ...
    --dataset NAME alone predicts NAME's whole raw (into OUTPUT/NAME.zarr/raw). A killed run
    rerun with the same weights and settings predicts only the blocks it had not written. For
    several machines, start `torchrun ... -m csc predict CONFIG_FILE ...` on each.
    """
    if orthoplanes and skip_orthoplanes:
        raise click.UsageError("--orthoplanes and --skip-orthoplanes contradict each other")
    box = None
    if bbox is not None:
        try:
            box = tuple(float(v) for v in bbox.split(","))
        except ValueError:
            raise click.BadParameter(f"{bbox!r} is not z0,y0,x0,z1,y1,x1 in nm") from None
    toolkit_default = click.get_current_context().meta.get(TOOLKIT_SPELLED) and not skip_orthoplanes
    with user_errors():
        resolved = _config_with(config_file, overrides, strict=strict, **locations)
        if toolkit_default and not orthoplanes and resolved.input_array_info.is_2d:
            click.echo("orthoplanes: on (the toolkit's default for 2D models; -so: off)", err=True)
            orthoplanes = True
        selection = _crop_selection(crops)
        if nproc is not None and nproc > 1:
            from csc.launch import launch

            arguments = _relaunch_arguments(click.get_current_context(), orthoplanes)
            raise SystemExit(launch(nproc, ["predict", *arguments]))
        from csc.prediction import predict as run

        written = run(
            resolved,
            crops=selection.patterns,
            all_crops=all_crops or selection.all_crops,
            test_crops=selection.test,
            manifest=manifest,
            bbox=box,
            dataset=dataset,
            output=output,
            checkpoint=checkpoint,
            overwrite=overwrite,
            orthoplanes=orthoplanes,
            overlap=overlap,
            encoding=encoding,
            rows=_crawled_rows(resolved, locations),
        )
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 reports
        return
    for item in written:
        grid = item.grid
        classes = item.region.classes or resolved.classes
        counts = item.blocks
        done = (
            f"; {counts.predicted} of {counts.total} blocks predicted, {counts.recorded} "
            "already written by an earlier run"
            if counts is not None
            else ""
        )
        click.echo(
            f"wrote {item.path}: {len(classes)} classes, {grid.shape} voxels of "
            f"{grid.scale} nm from {grid.translation} nm{done}"
        )


def _relaunch_arguments(ctx: click.Context, orthoplanes: bool) -> list[str]:
    """The command's arguments as csc spells them, for its N processes: each option given
    (by its first name), without --nproc; the orthoplanes default the toolkit's spelling
    chose, made explicit."""
    arguments: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if param.name in ("nproc", "skip_orthoplanes", "orthoplanes"):
            continue
        if isinstance(param, click.Argument):
            arguments.extend(value if isinstance(value, tuple) else [str(value)])
        elif isinstance(param, click.Option) and value not in (None, False, param.default):
            name = next(n for n in param.opts if n.startswith("--"))
            arguments.extend([name] if param.is_flag else [name, str(value)])
    return [*arguments, *(["--orthoplanes"] if orthoplanes else [])]


@cli.command()
@_config_command
@click.option(
    "--input",
    "source",
    cls=Spelled,
    toolkit=("-i", "--input-path", "--input_path"),
    default=None,
    type=click.Path(file_okay=False),
    callback=_layout_folder,
    help="Predictions to process (or the toolkit's FOLDER/{dataset}.zarr/{crop}); default: "
    "the config's predictions_path.",
)
@click.option(
    "--output",
    cls=Spelled,
    toolkit=("-o", "--output-path", "--output_path"),
    default=None,
    type=click.Path(file_okay=False),
    callback=_layout_folder,
    help="Output folder (or the toolkit's FOLDER/{dataset}.zarr/{crop}); default: the "
    "config's processed_path.",
)
@click.option(
    "--crops",
    cls=Spelled,
    toolkit=("-c",),
    default=None,
    help="Comma list of crops (crop or dataset/crop, globs; a number N is cropN), or 'test' "
    "(the test crop manifest's); default: every predicted crop.",
)
@MANIFEST_OPTION
@click.option(
    "--overwrite",
    cls=Spelled,
    toolkit=("-O",),
    is_flag=True,
    help="Replace crop groups an earlier csc process wrote (nothing else).",
)
@click.option(
    "--device",
    cls=Spelled,
    toolkit=("-d",),
    default=None,
    help="Sets the config's device; csc's process_func gets NumPy blocks, so none is used.",
)
@click.option(
    "--max-workers",
    cls=Spelled,
    toolkit=("-w", "--max_workers"),
    type=click.IntRange(min=1),
    default=None,
    help="The toolkit's thread count; csc processes one block at a time.",
)
def process(
    config_file: str,
    overrides: tuple[str, ...],
    strict: bool,
    source: str | None,
    output: str | None,
    crops: str | None,
    manifest: str | None,
    overwrite: bool,
    device: str | None,
    max_workers: int | None,
) -> None:
    """Predictions to labels: instance ids and 0/1 masks (or the config's process_func)."""
    with user_errors():
        resolved = _config_with(config_file, overrides, strict=strict, device=device)
        from csc.processing import process as run
        from csc.utils import scored_crop_patterns, warn_unused_process_options

        warn_unused_process_options(device=device, max_workers=max_workers)
        selection = _crop_selection(crops)
        patterns = scored_crop_patterns(manifest) if selection.test else selection.patterns
        written = run(resolved, source=source, output=output, crops=patterns, overwrite=overwrite)
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
    lines.append(f"TensorBoard: {tensorboard_command(log_dir)}")
    return "\n".join(lines)


def tensorboard_command(log_dir: str) -> str:
    """A shell command that shows `log_dir` in TensorBoard from any folder: `tensorboard`
    when the one on PATH is this Python environment's, else this Python's ``-m
    tensorboard.main`` (csc depends on tensorboard, so it is installed beside csc)."""
    logs = shlex.quote(os.path.abspath(log_dir))
    on_path = shutil.which("tensorboard")
    beside = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    if on_path is not None and os.path.realpath(on_path) == os.path.realpath(beside):
        return f"tensorboard --logdir {logs}"
    return f"{shlex.quote(sys.executable)} -m tensorboard.main --logdir {logs}"


def _comma_list(text: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (text or "").split(",") if item.strip())


def _crawl_command(function: Callable[..., Any]) -> Callable[..., Any]:
    """The options of every command that crawls a search path."""
    options = [
        click.option(
            "--search-path",
            cls=Spelled,
            toolkit=("-sp", "--search_path"),
            default=None,
            help=f"Template with {{dataset}} and {{name}}. [default: {DEFAULT_SEARCH_PATH}; "
            f"with --s3: {DEFAULT_S3_SEARCH_PATH} in the bucket]",
        ),
        click.option(
            "--raw-name",
            cls=Spelled,
            toolkit=("-rn", "--raw_name"),
            default=TrainConfig.raw_name,
            show_default=True,
            help="Raw group, filled in for {name}.",
        ),
        click.option(
            "--crop-name",
            cls=Spelled,
            toolkit=("-cn", "--crop_name"),
            default=TrainConfig.crop_name,
            show_default=True,
            help="Label group of one class of one crop, filled in for {name}.",
        ),
        click.option(
            "--classes",
            cls=Spelled,
            toolkit=("-c",),
            default=",".join(TrainConfig.classes),
            show_default=True,
            help="Comma list.",
        ),
        click.option(
            "--datasets",
            cls=Spelled,
            toolkit=("-ds",),
            default=None,
            help="Comma list of dataset names or globs [default: all].",
        ),
        click.option(
            "--crops",
            cls=Spelled,
            toolkit=("-cr",),
            default=None,
            help="Comma list of crop names or globs [default: all].",
        ),
        click.option(
            "--scale",
            cls=Spelled,
            toolkit=("-s",),
            default=None,
            help="Keep a class of a crop only if its s0 voxel size (nm) is <= this on "
            "every axis: one number, y,x or z,y,x.",
        ),
        click.option(
            "--s3",
            "use_s3",
            cls=Spelled,
            toolkit=("-s3", "--use-s3", "--use_s3"),
            is_flag=True,
            help="Crawl an S3 bucket instead.",
        ),
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
        datasets=_everything_or(options.pop("datasets")),
        crops=_everything_or(options.pop("crops")),
        scale=scale_values,
        endpoint_url=options.pop("endpoint_url"),
        s3_timeout_s=options.pop("s3_timeout"),
        s3_retry_budget_s=options.pop("s3_retry_budget"),
    )


def _everything_or(text: str | None) -> tuple[str, ...]:
    """A comma list of names or globs; the toolkit's 'all' (like no list) means every one."""
    names = _comma_list(text)
    return () if names == ("all",) else names


# The toolkit's force-all-classes flags -> csc's --force-all-classes choice.
TOOLKIT_FORCE = {"force_both": "both", "force_train": "train", "force_validate": "validate"}


def _force_all_classes(options: dict[str, Any]) -> str:
    """--force-all-classes, or the one toolkit flag -fa, -ft or -fv given instead."""
    flags = [choice for flag, choice in TOOLKIT_FORCE.items() if options.pop(flag)]
    source = click.get_current_context().get_parameter_source("force_all_classes")
    if len(flags) > 1 or (flags and source is ParameterSource.COMMANDLINE):
        raise click.UsageError("give one of --force-all-classes, -fa, -ft and -fv")
    return flags[0] if flags else str(options["force_all_classes"])


@cli.command()
@_crawl_command
@click.option(
    "--validate-ratio",
    cls=Spelled,
    toolkit=("-vr", "--validate_ratio"),
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
@click.option(
    "force_both", cls=Spelled, toolkit=("-fa",), is_flag=True, help="= --force-all-classes both"
)
@click.option(
    "force_train", cls=Spelled, toolkit=("-ft",), is_flag=True, help="= --force-all-classes train"
)
@click.option(
    "force_validate",
    cls=Spelled,
    toolkit=("-fv",),
    is_flag=True,
    help="= --force-all-classes validate",
)
@click.option("--seed", default=SplitOptions.seed, show_default=True, help="Seed of the split.")
@click.option(
    "--csv-path",
    cls=Spelled,
    toolkit=("-cp", "--csv_path"),
    default=TrainConfig.datasplit_path,
    show_default=True,
    type=click.Path(),
)
@click.option("--relative", is_flag=True, help="Write local roots relative to the CSV's folder.")
@click.option(
    "--dry-run",
    cls=Spelled,
    toolkit=("--dry_run",),
    is_flag=True,
    help="Print the table; write nothing.",
)
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
    force = _force_all_classes(options)
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


_MANIFEST_HELP = "Test crop manifest CSV to use; default: $CSC_TEST_CROP_MANIFEST_URL, else csc's."
# Options of each mode of `csc evaluate`: predictions vs datasplit crops, or a submission.
_PREDICTIONS_MODE = ("datasplit_path", "crops", "classes", "threshold", "boundary_tolerance")
_SUBMISSION_MODE = ("result_file", "truth_path", "manifest", "instance_classes")


@cli.command()
@click.option(
    "--predictions",
    default=None,
    type=click.Path(),
    help="Folder csc predict wrote: {dataset}.zarr/{crop}/{class} groups.",
)
@click.option(
    "-s",
    "--submission-path",
    "submission",
    default=None,
    type=click.Path(),
    help="Score this challenge submission (zip, folder holding one zip, or zarr folder) as "
    "the challenge does, instead of --predictions.",
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
@click.option(
    "-r",
    "--result-file",
    default=None,
    type=click.Path(dir_okay=False),
    help="With -s: write the public result here and the full one as <stem>_extended<suffix>.",
)
@click.option(
    "-t",
    "--truth-path",
    default=DEFAULT_TRUTH_PATH,
    show_default=True,
    type=click.Path(),
    help="With -s: the ground truth zarr (crop<id>/<label> arrays).",
)
@click.option(
    "--test-crop-manifest", "manifest", default=None, type=click.Path(), help=_MANIFEST_HELP
)
@click.option(
    "-ic",
    "--instance-classes",
    default=None,
    help="With -s: comma list of the classes scored as instances; default: the challenge's.",
)
@click.option("--overwrite", is_flag=True, help="Replace a --json or -r file csc wrote.")
@click.pass_context
def evaluate(ctx: click.Context, /, **options: Any) -> None:
    """Score predictions against ground-truth crops (IoU, Dice, ..., Hausdorff95 in nm), or
    with -s a challenge submission as the challenge scores it."""
    submission_mode = options["submission"] is not None
    if submission_mode == (options["predictions"] is not None):
        raise click.UsageError("give either --predictions (csc's scores) or -s (a submission)")
    unused = _SUBMISSION_MODE if not submission_mode else (*_PREDICTIONS_MODE, "json_path")
    spelled = {p.name: max(p.opts, key=len) for p in ctx.command.params}
    given = [
        spelled[name]
        for name in unused
        if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT
    ]
    if given:
        mode = "-s (a submission)" if submission_mode else "--predictions"
        raise click.UsageError(f"{', '.join(given)}: not an option of csc evaluate with {mode}")
    if submission_mode:
        _evaluate_submission(options)
    else:
        _evaluate_predictions(options)


def _evaluate_predictions(options: dict[str, Any]) -> None:
    from csc.datasplit import read_datasplit, select_crops
    from csc.evaluation import evaluate as run
    from csc.evaluation import format_table, is_report, write_json
    from csc.storage import check_json_path

    json_path = options["json_path"]
    with user_errors():
        if json_path:
            check_json_path(
                json_path, overwrite=options["overwrite"], is_ours=is_report
            )  # before the work
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


def _evaluate_submission(options: dict[str, Any]) -> None:
    from csc.submissions import extended_path, format_result, score_submission

    result_file = options["result_file"]
    with user_errors():
        result = score_submission(
            options["submission"],
            options["truth_path"],
            manifest=options["manifest"],
            instance_classes=_comma_list(options["instance_classes"]) or None,
            result_path=result_file,
            overwrite=options["overwrite"],
        )
    click.echo(format_result(result))
    if result_file:
        click.echo(f"wrote {result_file} and {extended_path(result_file)}")


@cli.command("pack-results")
@click.option(
    "-i",
    "--input-search-path",
    "input_template",
    default="data/processed/{dataset}.zarr/{crop}",
    show_default=True,
    help="Where each test crop's labels are: {crop} (crop<id>) and {dataset} are filled.",
)
@click.option(
    "-o",
    "--output-path",
    "output",
    default="data/submission.zarr",
    show_default=True,
    type=click.Path(),
    help="The submission zarr (suffix .zarr); the zip is written beside it (.zip).",
)
@click.option("--overwrite", is_flag=True, help="Replace a submission csc pack-results wrote.")
@click.option(
    "-w",
    "--max-workers",
    "workers",
    type=click.IntRange(min=1),
    default=None,
    help="Labels packed at once (threads); default: the CPU count.",
)
@click.option(
    "--test-crop-manifest", "manifest", default=None, type=click.Path(), help=_MANIFEST_HELP
)
@click.option("--check", is_flag=True, help="Check the zip as csc check-submission does.")
@click.option(
    "--config",
    "config_file",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="A csc config: read the labels from its processed_path (instead of -i).",
)
@click.pass_context
def pack_results(
    ctx: click.Context,
    input_template: str,
    output: str,
    overwrite: bool,
    workers: int | None,
    manifest: str | None,
    check: bool,
    config_file: str | None,
) -> None:
    """Pack processed predictions into a challenge submission zarr and zip."""
    with user_errors():
        from csc.packing import pack_results as run

        if config_file is not None:
            if ctx.get_parameter_source("input_template") is not ParameterSource.DEFAULT:
                raise click.UsageError("give -i/--input-search-path or --config, not both")
            input_template = _processed_template(config_file)

        report = run(
            input_template, output, manifest=manifest, overwrite=overwrite, workers=workers
        )
    for line in report.missing:
        click.echo(f"skipped {line}", err=True)
    click.echo(
        f"packed {len(report.packed)} labels of {report.num_crops} crops into {report.zarr_path}"
    )
    click.echo(f"wrote {report.zip_path} ({report.zip_bytes} bytes)")
    if check:
        _report_check(str(report.zip_path), manifest)


def _processed_template(config_file: str) -> str:
    """{processed_path}/{dataset}.zarr/{crop} of a config: where csc process wrote."""
    from csc.config import load_config

    config = load_config(config_file)
    folder = config.processed_path.format(model_name=config.model_name)
    return f"{folder}/{{dataset}}.zarr/{{crop}}"


@cli.command("check-submission")
@click.argument("path", type=click.Path(exists=True))
@click.option(
    "--test-crop-manifest", "manifest", default=None, type=click.Path(), help=_MANIFEST_HELP
)
def check_submission(path: str, manifest: str | None) -> None:
    """Check a submission zip (or folder) as the challenge will read it; exit 1 on errors."""
    _report_check(path, manifest)


def _report_check(path: str, manifest: str | None) -> None:
    """Print the size and every finding about a submission; exit 1 if any is an error."""
    from collections import Counter

    from csc.submission_check import check_submission as run
    from csc.submission_check import submission_size

    with user_errors():
        problems = run(path, manifest=manifest)
        size = submission_size(path) if not any(p.where == path for p in problems) else None
    if size is not None:
        click.echo(f"{path}: {size[0]} bytes ({size[1]} uncompressed)")
    for problem in problems:
        click.echo(str(problem), err=problem.level == "error")
    counts: Counter[str] = Counter(p.level for p in problems)
    levels = {"error": "errors", "missing": "missing", "ignored": "ignored", "note": "notes"}
    click.echo(", ".join(f"{counts[level]} {name}" for level, name in levels.items()))
    if counts["error"]:
        first = next(p for p in problems if p.level == "error")
        more = f" (and {counts['error'] - 1} more above)" if counts["error"] > 1 else ""
        click.echo(
            f"Error: {path} would be refused or mis-scored: {first.where}: {first.message}"
            f"{more}; fix it before uploading",
            err=True,
        )
        raise SystemExit(1)


@cli.command("fetch-data")
@click.option(
    "--crops",
    default="all",
    show_default=True,
    help="'all' (every training crop of the crop manifest, and the test crops), 'test' (the "
    "test crops: EM only, they have no ground truth) or training crop numbers, e.g. 111,112.",
)
@click.option(
    "--raw-padding",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="EM voxels (of each level) fetched around each crop, on every side.",
)
@click.option(
    "--dest",
    default="data",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder the data lands in: DEST/{dataset}/{dataset}.zarr/recon-1/...",
)
@click.option(
    "--fetch-all-em-resolutions",
    "all_resolutions",
    is_flag=True,
    help="Every EM level; by default only the crop's resolution and coarser ones.",
)
@click.option(
    "--workers",
    cls=Spelled,
    toolkit=("--num-workers",),
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    envvar="CSC_FETCH_DATA_NUM_WORKERS",
    help="Files downloaded at once (threads); env CSC_FETCH_DATA_NUM_WORKERS.",
)
@click.option(
    "--manifest",
    default=None,
    type=click.Path(),
    help="Crop manifest CSV (crop_number,collection,alignment,crop_url,em_url); default: "
    "$CSC_FETCH_DATA_MANIFEST_URL, else csc's manifest.csv.",
)
@click.option(
    "--test-crop-manifest", "test_manifest", default=None, type=click.Path(), help=_MANIFEST_HELP
)
@click.option(
    "--endpoint-url", default=None, help="S3 endpoint [default: $AWS_ENDPOINT_URL, else AWS]."
)
@click.option(
    "--s3-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=S3_TIMEOUT_S,
    show_default=True,
    help="Seconds an S3 request may take to connect, and to send each next byte.",
)
@click.option(
    "--s3-retry-budget",
    type=click.FloatRange(min=0, min_open=True),
    default=S3_RETRY_BUDGET_S,
    show_default=True,
    help="Seconds a failing S3 read is retried (outages, throttling) before csc gives up.",
)
@click.option(
    "--aws-credentials",
    is_flag=True,
    help="Sign requests with the standard AWS credentials (a private mirror); default: "
    "anonymous, as the public bucket wants.",
)
@click.option("--dry-run", is_flag=True, help="Print what would be fetched; write nothing.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def fetch_data(**options: Any) -> None:
    """Download ground-truth crops and the EM around them from the bucket into DEST.

    Resumable: a rerun fetches only what is missing or incomplete (by size). A file that
    differs from the source is replaced only if csc fetch-data wrote it; any other is kept and
    named.
    """
    with user_errors():
        from csc import fetching

        dry_run, quiet = options.pop("dry_run"), options.pop("quiet")
        fetch_options = _fetch_options(options)
        if dry_run:
            for line in fetching.describe_plan(fetching.plan_fetch(fetch_options)):
                click.echo(line)
            return
        report = fetching.fetch_data(fetch_options, on_start=fetching.progress_bar(quiet=quiet))
    _report_fetch(report)


def _fetch_options(options: dict[str, Any]) -> Any:
    """FetchOptions from csc fetch-data's options."""
    from csc.fetching import FetchOptions
    from csc.storage import S3Options

    return FetchOptions(
        crops=options["crops"],
        dest=options["dest"],
        raw_padding=options["raw_padding"],
        all_resolutions=options["all_resolutions"],
        workers=options["workers"],
        manifest=options["manifest"],
        test_crop_manifest=options["test_manifest"],
        s3=S3Options(options["endpoint_url"], options["s3_timeout"], options["s3_retry_budget"]),
        anonymous=not options["aws_credentials"],
    )


def _report_fetch(report: Any) -> None:
    """What csc fetch-data did: replaced and kept files on stderr, the totals on stdout."""
    from csc.fetching import size_text

    plan = report.plan
    if report.replaced:
        click.echo(
            f"replaced {len(report.replaced)} files csc had fetched that no longer match the "
            f"source, e.g. {report.replaced[0]}",
            err=True,
        )
    if report.kept:
        click.echo(
            f"warning: kept {len(report.kept)} files that differ from the source and that csc "
            f"did not write (or that changed since), e.g. {report.kept[0]}; move them away and "
            "rerun to fetch them",
            err=True,
        )
    complete = len(plan.with_state("complete"))
    click.echo(
        f"fetched {report.num_fetched} files ({size_text(report.num_bytes)}) for "
        f"{len(plan.crops)} crops into {plan.dest}; {complete} already complete"
    )


@cli.command()
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--datasets",
    default=None,
    help="Comma list of dataset names or globs [default: the chosen crops' datasets].",
)
@click.option(
    "--crops",
    default=None,
    help="Comma list of crops (crop or dataset/crop, globs; a number N is cropN), or test "
    "(the test crop manifest's crops) [default: all]; the view opens at the first one's centre.",
)
@click.option(
    "--classes",
    default=None,
    help=f"Comma list [default: the config's classes, else {','.join(TrainConfig.classes)}].",
)
@click.option(
    "--search-path",
    default=None,
    help="Where the raw and ground truth are: a template with {dataset} and {name} "
    "[default: the config's search_path, else " + DEFAULT_SEARCH_PATH + "].",
)
@click.option("--raw-name", default=None, help="[default: the config's raw_name]")
@click.option("--crop-name", default=None, help="[default: the config's crop_name]")
@click.option(
    "--datasplit",
    "datasplit_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="A datasplit CSV that locates the crops [default: the config's datasplit_path if it "
    "exists; else the search path is crawled].",
)
@click.option(
    "--predictions",
    default=None,
    type=click.Path(file_okay=False),
    help="csc predict's output folder [default: the config's predictions_path, if it exists].",
)
@click.option(
    "--processed",
    default=None,
    type=click.Path(file_okay=False),
    help="csc process's output folder [default: the config's processed_path, if it exists].",
)
@click.option(
    "--port",
    default=DEFAULT_PORT,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port on 127.0.0.1 that serves the local zarr folders (0: any free port).",
)
@click.option(
    "--json",
    "json_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write the viewer state JSON here and exit (several datasets: put {dataset} in it).",
)
@click.option("--overwrite", is_flag=True, help="Replace a --json file that is a viewer state.")
@click.option(
    "--viewer",
    is_flag=True,
    help="Start a local neuroglancer viewer (needs the neuroglancer package: csc[viz]) "
    "instead of printing a URL of the hosted one.",
)
@click.option(
    "--test-crop-manifest", "manifest", default=None, type=click.Path(), help=_MANIFEST_HELP
)
@click.option(
    "--neuroglancer-url",
    default=NEUROGLANCER_URL,
    show_default=True,
    help="The hosted neuroglancer the printed URLs open.",
)
def visualize(config_file: str | None, **options: Any) -> None:
    """Show raw, ground truth, predictions and processed labels in neuroglancer.

    Default: serve the local zarr folders on 127.0.0.1:PORT (until Ctrl-C) and print, per
    dataset, a URL of the hosted neuroglancer that shows them (S3 data is read by the browser
    directly). --json writes the state and exits; --viewer starts a local neuroglancer viewer
    (the neuroglancer package) and prints its URL. Raw is an image layer, each ground-truth
    and processed class a segmentation layer, each prediction an image of p in [0, 1].
    """
    from csc.storage import FolderServer
    from csc.visualize import find_views, show, write_states

    with user_errors():
        places, selection = _visualize_places(config_file, options)
        views = find_views(places, selection)
        server = FolderServer(options["port"])
        endpoint = places.s3.endpoint
        if options["json_path"]:
            if options["viewer"]:
                raise click.UsageError("give --json (write the state) or --viewer, not both")
            paths = write_states(
                views,
                options["json_path"],
                server=server,
                endpoint_url=endpoint,
                overwrite=options["overwrite"],
            )
            for path in paths:
                click.echo(f"wrote {path}")
            return
        show(
            views,
            server=server,
            endpoint_url=endpoint,
            viewer=options["viewer"],
            base=options["neuroglancer_url"],
            echo=click.echo,
        )


def _visualize_places(config_file: str | None, options: dict[str, Any]) -> Any:
    """visualize's Places and Selection: the config's (if given), then the options."""
    import dataclasses

    from csc.visualize import Places, Selection, places_from_config

    classes = TrainConfig.classes
    places = Places(search_path=os.path.abspath(DEFAULT_SEARCH_PATH))
    if config_file is not None:
        from csc.config import load_config

        config = load_config(config_file)
        places, classes = places_from_config(config), config.classes
    given = {
        "search_path": options["search_path"],
        "raw_name": options["raw_name"],
        "crop_name": options["crop_name"],
        "datasplit": options["datasplit_path"],
        "predictions": options["predictions"],
        "processed": options["processed"],
    }
    if given["search_path"] and not is_url(given["search_path"]):
        given["search_path"] = os.path.abspath(given["search_path"])
    changes = {key: value for key, value in given.items() if value is not None}
    option = {"prediction": "predictions", "processed": "processed"}  # kind -> its option
    changes["optional"] = tuple(k for k in places.optional if option[k] not in changes)
    places = dataclasses.replace(places, **changes)
    crops = _everything_or(options["crops"])
    if crops == ("test",):  # the test crops of the manifest in use, by dataset and crop
        from csc.utils import scored_crop_patterns

        crops = scored_crop_patterns(options["manifest"])
    selection = Selection(
        datasets=_everything_or(options["datasets"]),
        crops=tuple(f"crop{name}" if name.isdigit() else name for name in crops),
        classes=_comma_list(options["classes"]) or classes,
    )
    return places, selection


def main() -> None:
    """Entry point of the `csc` console script and `python -m csc`."""
    cli(prog_name="csc")
