"""The `csc` command line: each command turns options into arguments and calls one function.

Imports of numpy, zarr and torch happen inside the commands, so `csc --help` starts instantly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from csc import __version__


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
    """Turn bad-input errors into one-line messages (no traceback) and warnings into lines."""
    from csc.config import ConfigFileError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except (ValueError, FileNotFoundError, FileExistsError, ConfigFileError) as error:
            raise click.ClickException(str(error)) from None
        finally:
            for warning in caught:
                click.echo(f"warning: {warning.message}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="csc")
def cli() -> None:
    """Train segmentation models on CellMap-style volume EM data (OME-NGFF zarr, local or S3)."""


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--datasets", default=2, show_default=True, help="Number of datasets (zarr stores).")
@click.option("--crops", default=3, show_default=True, help="Label crops per dataset.")
@click.option("--shape", default="96,256,256", show_default=True, callback=_shape,
              help="Raw volume size z,y,x in voxels at 8 nm.")  # fmt: skip
@click.option("--crop-shape", default="64,256,256", show_default=True, callback=_shape,
              help="Label crop size z,y,x in voxels at 4 nm.")  # fmt: skip
@click.option("--classes", default="nuc,mito,er", show_default=True, help="Comma list of classes.")
@click.option("--seed", default=0, show_default=True, help="Random seed: same seed, same bytes.")
@click.option("--missing-class-prob", default=0.2, show_default=True,
              help="Chance that a crop leaves a class unannotated.")  # fmt: skip
@click.option("--chunks", default="64,128,128", show_default=True, callback=_shape,
              help="Chunk size z,y,x of every array.")  # fmt: skip
@click.option("--compressor", default="zstd", show_default=True,
              type=click.Choice(["zstd", "blosc-lz4", "gzip", "none"]))  # fmt: skip
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


def main() -> None:
    """Entry point of the `csc` console script and `python -m csc`."""
    cli(prog_name="csc")
