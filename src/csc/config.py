"""The training configuration: a plain Python file in, a validated frozen `TrainConfig` out.

The user's file runs in a fresh namespace (``__name__`` is not ``"__main__"``, so a trailing
``if __name__ == "__main__": train(__file__)`` block does not run). Its public names are mapped
onto `TrainConfig` fields; names close to a field are reported as likely typos. Nothing here
imports torch, so ``csc config`` stays instant for configs that do not import it themselves.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import inspect
import os
import re
import runpy
import sys
import traceback
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeGuard

from csc import registries
from csc.manifests.classes import CLASSES_TABLE, unlisted
from csc.storage import S3_RETRY_BUDGET_S, S3_TIMEOUT_S, bucket_url, is_url

# Names accepted where the config gives a string instead of an object, read from their one home
# (csc.registries), sorted as the errors list them.
MODEL_NAMES = tuple(sorted(registries.MODELS))
OPTIMIZER_NAMES = tuple(sorted(registries.OPTIMIZERS))
SCHEDULER_NAMES = tuple(sorted(registries.SCHEDULERS))
LOSS_NAMES = tuple(sorted(registries.LOSSES))
SPATIAL_TRANSFORM_NAMES = tuple(registries.SPATIAL_TRANSFORMS)
PROCESS_FUNC_NAMES = tuple(sorted(registries.PROCESS_FUNCS))
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
PREDICTION_ENCODINGS = ("uint8", "float16")
LOAD_MODEL_CHOICES = ("latest", "best", None)  # or the path of a .pth file (`load_model_file`)
CHECKPOINT_SUFFIXES = (".pth", ".pt")  # a load_model that ends so is a checkpoint file's path
MONITOR_MODES = ("min", "max")
MONITOR_LOSS = "loss"  # the mean validation loss (TensorBoard's `validation`)
MONITOR_ALIASES = {"f1": "dice"}  # Dice is the F1 score of the voxels
SCHEDULER_INTERVALS = ("step", "epoch", None)  # None: by the scheduler's type (csc.optim)
DEFAULT_PREDICTION_CHECKPOINT = "latest"  # the weights csc predict uses unless told otherwise
EXISTING_RUN_CHOICES = ("refuse", "move")  # a fresh run meeting another run's files
FORCE_ALL_CLASSES_CHOICES = ("train", "validate", "both", None)
AXES = ("z", "y", "x")
DEFAULT_SEARCH_PATH = "data/{dataset}/{dataset}.zarr/recon-1/{name}"  # next to the config
DEFAULT_TRUTH_PATH = "data/ground_truth.zarr"  # the challenge's ground truth zarr (TRUTH_PATH)
# Inside the bucket when use_s3 is set: the layout of the public CellMap bucket.
DEFAULT_S3_SEARCH_PATH = "{dataset}/{dataset}.zarr/recon-1/{name}"
# Keys whose values are paths: relative ones are resolved against the config file's folder.
PATH_KEYS = (
    "model_save_path",
    "logs_save_path",
    "datasplit_path",
    "search_path",
    "predictions_path",
    "processed_path",
)

# The challenge toolkit's path constants, for configs and scripts that import them
# (docs/utils.md). csc's own defaults, as relative paths: a config resolves them against its
# folder like every path it sets, and csc.predict / csc.process resolve their path arguments
# the same way. TrainConfig.raw_name and crop_name equal RAW_NAME and CROP_NAME (a test holds).
BASE_DATA_PATH = "data"
SEARCH_PATH = DEFAULT_SEARCH_PATH  # data/{dataset}/{dataset}.zarr/recon-1/{name}
RAW_NAME = "em/fibsem-uint8"
CROP_NAME = "labels/groundtruth/{crop}/{label}"
PREDICTIONS_PATH = f"{BASE_DATA_PATH}/predictions/{{dataset}}.zarr/{{crop}}"
PROCESSED_PATH = f"{BASE_DATA_PATH}/processed/{{dataset}}.zarr/{{crop}}"
SUBMISSION_PATH = f"{BASE_DATA_PATH}/submission.zarr"
TRUTH_PATH = f"{BASE_DATA_PATH}/ground_truth.zarr"
# The classes scored as instances (connected objects), in the challenge's order.
INSTANCE_CLASSES = (
    "nuc",
    "vim",
    "ves",
    "endo",
    "lyso",
    "ld",
    "perox",
    "mito",
    "np",
    "mt",
    "cell",
    "instance",
)

# One entry per spatial transform; also the example its error messages show.
DEFAULT_SPATIAL_TRANSFORMS: dict[str, Any] = {
    "mirror": {"axes": {"x": 0.5, "y": 0.5}},  # probability of flipping each axis
    "transpose": {"axes": ["x", "y"]},  # axes that may be permuted among themselves
    # Degrees, drawn uniformly, about each axis: z turns a 2D (1, y, x) patch in its plane.
    "rotate": {"axes": {"z": [-180, 180]}},
}


class ConfigWarning(UserWarning):
    """A config name that looks like a misspelled key, or a setting that can have no effect."""


class ConfigFileError(Exception):
    """The user's config file raised while it ran; the message is its own traceback."""


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """Patch shape in voxels and voxel size in nm, both (z, y, x); a 2-element (y, x) pair of
    shape and scale is the plane (1, y, x) (`__post_init__`)."""

    shape: tuple[int, ...]
    scale: tuple[float, ...]

    def __post_init__(self) -> None:
        # The toolkit's 2D form, shape (y, x) and scale (y, x), is the plane (1, y, x) whose
        # singleton z takes y's voxel size; normalised here, once, so that everything after
        # (patch grids, prediction's output grid, raw levels) sees three axes.
        if len(self.shape) == 2 and len(self.scale) == 2:
            object.__setattr__(self, "shape", (1, *self.shape))
            object.__setattr__(self, "scale", (self.scale[0], *self.scale))

    @property
    def plane_axis(self) -> int | None:
        """The one rule for a 2D patch: its singleton axis in (z, y, x), the first axis of size
        1; None for a 3D patch (a 2-element (y, x) info became (1, y, x) when built)."""
        return tuple(self.shape).index(1) if 1 in self.shape else None

    @property
    def is_2d(self) -> bool:
        return self.plane_axis is not None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. Field names are the config file's names."""

    # Where things go. Templates: {model_name}, {epoch}; {dataset}, {name} in search_path.
    # The folder that model_save_path, logs_save_path and datasplit_path are relative to when
    # the config does not set them (the toolkit's key); None: the config's folder.
    base_experiment_path: str | None = None
    model_save_path: str = "checkpoints/{model_name}_{epoch}.pth"
    logs_save_path: str = "tensorboard/{model_name}"
    datasplit_path: str = "datasplit.csv"
    search_path: str = DEFAULT_SEARCH_PATH
    raw_name: str = "em/fibsem-uint8"
    crop_name: str = "labels/groundtruth/{crop}/{label}"
    use_s3: bool = False
    s3_bucket: str = "janelia-cosem-datasets"
    # Data.
    classes: tuple[str, ...] = ("nuc", "er")
    input_array_info: ArrayInfo = ArrayInfo((1, 128, 128), (8.0, 8.0, 8.0))
    target_array_info: ArrayInfo = ArrayInfo((1, 128, 128), (8.0, 8.0, 8.0))
    validation_prob: float = 0.15
    filter_by_scale: bool | float | tuple[float, ...] = False
    force_all_classes: str | None = "validate"
    weighted_sampler: bool = True
    # A class a crop does not annotate is known to be absent where a class that excludes it
    # (no shared ids in the classes table, e.g. mito and nuc) is present there: 0, not NaN.
    use_mutual_exclusion: bool = False
    spatial_transforms: dict[str, Any] | None = dataclasses.field(
        default_factory=lambda: _copy(DEFAULT_SPATIAL_TRANSFORMS)
    )
    train_raw_value_transforms: Callable[..., Any] | None = None
    val_raw_value_transforms: Callable[..., Any] | None = None
    target_value_transforms: Callable[..., Any] | None = None
    dataloader_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    chunk_cache_mb: int = 256  # tensorstore's decoded-chunk cache, per loader process
    crop_cache_mb: int = 256  # crop regions held decoded in memory, per loader process
    # Spatial transforms (resampling) in the training process on its device: the loader ships
    # each sample's axis-aligned boxes. None: on when training on CUDA with rotations.
    spatial_transforms_on_device: bool | None = None
    s3_endpoint_url: str | None = None  # S3 endpoint; None: $AWS_ENDPOINT_URL, else AWS
    s3_timeout_s: float = S3_TIMEOUT_S  # one S3 request: to connect, and for each next byte
    s3_retry_budget_s: float = S3_RETRY_BUDGET_S  # how long a failing S3 read is retried
    # Model.
    model_name: str = "2d_unet"
    model_to_load: str = "2d_unet"
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    model: Any = None
    load_model: str | None = "latest"
    # Optimisation.
    epochs: int = 1000
    iterations_per_epoch: int = 1000
    batch_size: int = 8
    learning_rate: float = 1e-4
    optimizer: Any = "radam"
    scheduler: Any = None
    scheduler_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Optimizer settings and warm-up (docs/training.md#optimizer-and-learning-rate).
    # Keyword arguments of the optimizer (weight_decay, momentum, betas, eps, ...).
    optimizer_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # False: biases and norm layers' weights (every parameter of <= 1 axis) get no weight
    # decay (a second parameter group); True: every parameter gets the optimizer's.
    weight_decay_norm_and_bias: bool = False
    warmup_steps: int = 0  # optimizer steps of linear warm-up before the scheduler
    warmup_start_factor: float = 0.01  # of learning_rate, at the first warm-up step
    scheduler_interval: str | None = None  # "step", "epoch"; None: by the scheduler's type
    # Recompute the activations of csc's model blocks in the backward pass (less memory).
    activation_checkpointing: bool = False
    criterion: Any = "bce"
    criterion_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    weight_loss: bool = True
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None
    # Optimizer steps in a row skipped for a non-finite loss or gradients before the run stops.
    max_nonfinite_steps: int = 10
    precision: str = "32"
    ema_decay: float | None = None
    random_seed: int = 42
    device: str | None = None
    debug_memory: bool = False  # print (and log) peak host and GPU memory after every epoch
    # TensorBoard images (docs/training.md, "TensorBoard"): how many validation examples, spread
    # over the tiles, and training patches of each epoch's first batch are shown; 0: none.
    tensorboard_images: int = 3
    # torch.compile the model: True, or torch.compile's keyword arguments (e.g. {"mode":
    # "max-autotune"}); the first batches are slow while it compiles.
    compile: bool | dict[str, Any] = False
    channels_last: bool | None = None  # None: on CUDA with bf16/fp16 autocast (tensor cores)
    # Logging, reproducibility and debugging (training metrics, run record, cadences).
    train_metrics: bool = True  # SegmentationMetrics over the training batches: train/* tags
    log_every_n_steps: int = 1  # per-batch scalars (loss) every N training batches
    validate_every_n_steps: int | None = None  # also validate mid-epoch every N optimizer steps
    # True: deterministic algorithms (an op without one raises), no cudnn benchmark; "warn":
    # the same, but such an op only warns.
    deterministic: bool | str = False
    debug: bool | int = False  # print shapes, ranges and timings of the first 3 (or N) batches
    # Validation, model selection and checkpoint housekeeping.
    validation_time_limit: float | None = None
    validation_batch_limit: int | None = None
    low_is_best: bool = True
    smoothing_window: int = 1
    early_stopping_patience: int | None = None
    keep_last_checkpoints: int | None = None
    # What "best" means (monitor): the score the best checkpoint, early stopping, plateau,
    # load_model="best" and save_top_k follow. "loss" (mean validation loss), "{metric}" (its
    # mean over classes, e.g. "iou") or "{metric}/{class}" ("dice/mito"); "f1" is "dice".
    monitor: str = "loss"
    monitor_mode: str | None = None  # "min" or "max"; None: min for loss (low_is_best), max else
    save_top_k: int | None = None  # keep the k best epochs by the monitored score (+ the newest)
    existing_run: str = "refuse"  # or "move": a fresh run moves an old run's files aside
    # Prediction (csc predict) and post-processing (csc process); templates: {model_name}.
    predictions_path: str = "predictions/{model_name}"
    prediction_overlap: float = 0.25  # share of a window that overlaps its neighbour, per axis
    prediction_block_shape: tuple[int, int, int] = (64, 256, 256)  # output voxels held at once
    prediction_encoding: str = "uint8"  # probabilities as uint8 (p * 255) or float16
    prediction_batch_size: int | None = None  # windows per forward pass; None: batch_size
    # Raw transform for prediction windows (the toolkit's key); None: val_raw_value_transforms.
    value_transforms: Callable[..., Any] | None = None
    # A callable (one class's block) -> array, or the name of one of csc's own methods
    # (registries.PROCESS_FUNCS); None: "instances".
    process_func: Callable[..., Any] | str | None = None
    # What process_func gets: "probabilities" in [0, 1], or "logits" (their inverse sigmoid,
    # what the toolkit's process_func gets, as the toolkit stores the model's raw output).
    process_input: str = "probabilities"
    processed_path: str = "predictions/{model_name}_processed"
    # csc's own methods (a named or unset process_func; a callable ignores them).
    process_threshold: float = 0.5  # foreground: p > process_threshold, p in [0, 1]
    min_instance_size: int = 0  # voxels of the prediction grid; smaller objects are removed
    watershed_min_distance: int = 5  # voxels between two watershed seeds (peaks), per axis
    process_memory_mb: int = 4096  # a crop labelled whole fits in this; else block by block
    # Provenance: the file it came from and the public names csc does not read.
    config_path: str | None = None
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Where a config that leaves search_path at its default looks for data, in order
    # (search_path is the first that exists); empty when the config sets search_path.
    search_path_candidates: tuple[str, ...] = ()


# Fields that are bookkeeping, not config keys a user sets.
_INTERNAL_FIELDS = ("config_path", "extras", "search_path_candidates")
CONFIG_KEYS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(TrainConfig) if f.name not in _INTERNAL_FIELDS
)


def load_config(
    path: str | os.PathLike[str],
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    *,
    strict: bool = False,
) -> TrainConfig:
    """Run the config file at `path`, apply `overrides`, and return the validated config.

    `overrides` is a mapping of key to value, or ``KEY=VALUE`` strings whose values are parsed
    as Python literals (``epochs=3``, ``classes="['nuc','mito']"``). With `strict`, a name that
    looks like a misspelled key is an error instead of a warning.
    """
    config_path = Path(path).expanduser().resolve()
    if not config_path.is_file():
        raise FileNotFoundError(f"config file not found: {config_path}")
    namespace = run_config_file(config_path)
    values = public_names(namespace)
    values.update(parse_overrides(overrides))
    return build_config(
        values, config_dir=config_path.parent, config_path=config_path, strict=strict
    )


def run_config_file(config_path: Path) -> dict[str, Any]:
    """Execute the file in a fresh namespace with its folder importable and as the working
    directory (so ``open("classes.txt")`` in it reads its neighbour); return its globals."""
    folder = str(config_path.parent)
    sys.path.insert(0, folder)
    try:
        with config_folder(config_path):
            return runpy.run_path(str(config_path), run_name="__csc_config__")
    except (Exception, SystemExit) as error:  # sys.exit() in a config is its error too
        raise ConfigFileError(_user_traceback(error, config_path)) from error
    finally:
        if folder in sys.path:
            sys.path.remove(folder)


@contextlib.contextmanager
def config_folder(config_path: str | os.PathLike[str] | None) -> Iterator[None]:
    """The config file's folder as working directory for the body, as the toolkit runs its
    configs, and the caller's again afterwards; unchanged for a config without a file."""
    if config_path is None:
        yield
        return
    previous = os.getcwd()
    os.chdir(Path(config_path).parent)
    try:
        yield
    finally:
        os.chdir(previous)


def _user_traceback(error: BaseException, config_path: Path) -> str:
    """The traceback from the first frame in the user's file on, without csc's own frames."""
    frames = traceback.extract_tb(error.__traceback__)
    first = next((i for i, f in enumerate(frames) if Path(f.filename) == config_path), 0)
    if isinstance(error, SyntaxError):  # raised while compiling: no frame in the file itself
        first = len(frames)  # the exception names the file, line and column
    shown = frames[first:]
    lines = ["Traceback (most recent call last):\n"] if shown else []
    lines += traceback.format_list(shown)
    lines += traceback.format_exception_only(type(error), error)
    return f"the config file {config_path} raised an error:\n" + "".join(lines).rstrip()


def public_names(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The file's own public names: no dunder/private names and no imported modules."""
    return {
        name: value
        for name, value in namespace.items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


def parse_overrides(overrides: Mapping[str, Any] | Sequence[str] | None) -> dict[str, Any]:
    """Turn ``KEY=VALUE`` strings (values as Python literals) or a mapping into a dict."""
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        parsed = dict(overrides)
    else:
        parsed = dict(_parse_override(item) for item in overrides)
    for key in parsed:
        if key not in CONFIG_KEYS:
            raise ValueError(f"unknown config key in override {key}=...{_suggestion(key)}")
    return parsed


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(
            f"override {item!r} is not KEY=VALUE, e.g. epochs=3 or classes=\"['nuc']\""
        )
    try:
        return key, ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return key, text  # a bare word such as model_name=3d_unet stays a string


def build_config(
    values: Mapping[str, Any],
    *,
    config_dir: Path | None = None,
    config_path: Path | None = None,
    strict: bool = False,
) -> TrainConfig:
    """Map config-file names onto a `TrainConfig`, resolve paths and validate."""
    known = {k: v for k, v in values.items() if k in CONFIG_KEYS}
    extras = {k: v for k, v in values.items() if k not in CONFIG_KEYS and not _is_imported(k, v)}
    _report_typos(extras, strict=strict, source=config_path)
    kwargs = _normalise(known)
    if config_dir is not None:
        kwargs = _resolve_paths(kwargs, config_dir)
    config = TrainConfig(
        **kwargs, config_path=str(config_path) if config_path else None, extras=extras
    )
    validate(config)
    if "low_is_best" in known:
        check_low_is_best(config)
    _report_unlisted(config, source=config_path)
    _report_unused_process_input(config, source=config_path)
    return config


def _report_unused_process_input(config: TrainConfig, *, source: Path | None) -> None:
    """Warn when process_input = "logits" meets csc's own methods, which threshold
    probabilities (process_threshold) whatever it says."""
    if config.process_input == "logits" and not callable(config.process_func):
        where = f" in {source}" if source else ""
        warnings.warn(
            f"process_input = 'logits'{where} has no effect: csc's own process_func "
            f"({config.process_func or 'instances'}) thresholds probabilities at "
            "process_threshold; give a callable process_func to get logits",
            ConfigWarning,
            stacklevel=3,
        )


def _report_unlisted(config: TrainConfig, *, source: Path | None) -> None:
    """Warn when use_mutual_exclusion meets classes the classes table does not list: nothing
    is inferred for them (as in the toolkit), which the user should know."""
    missing = unlisted(config.classes) if config.use_mutual_exclusion else []
    if missing:
        where = f" in {source}" if source else ""
        warnings.warn(
            f"use_mutual_exclusion{where}: classes {', '.join(missing)} are not in the classes "
            f"table ({CLASSES_TABLE}); no absent voxels are inferred for or from them",
            ConfigWarning,
            stacklevel=3,
        )


def _report_typos(extras: Mapping[str, Any], *, strict: bool, source: Path | None) -> None:
    where = f" in {source}" if source else ""
    for name in extras:
        hint = _suggestion(name)
        if not hint:
            continue
        message = f"config name '{name}'{where} is not a csc setting{hint}"
        if strict:
            raise ValueError(message + " (--strict makes this an error)")
        warnings.warn(message, ConfigWarning, stacklevel=3)


def _is_imported(name: str, value: Any) -> bool:
    """`from x import Foo` binds Foo under its own name; such names are not settings."""
    own_name = (
        getattr(value, "__name__", None) if isinstance(value, type | types.FunctionType) else None
    )
    return own_name == name and getattr(value, "__module__", None) != "__csc_config__"


def _suggestion(name: str) -> str:
    close = difflib.get_close_matches(name, CONFIG_KEYS, n=1, cutoff=0.8)
    return f"; did you mean '{close[0]}'?" if close else ""


def _normalise(known: Mapping[str, Any]) -> dict[str, Any]:
    """Coerce file values to field types: tuples for sequences, str for paths, ArrayInfo."""
    kwargs = dict(known)
    for key in (*PATH_KEYS, "raw_name", "crop_name", "load_model"):
        if isinstance(kwargs.get(key), os.PathLike):
            kwargs[key] = os.fspath(kwargs[key])
    if "input_array_info" in kwargs:
        kwargs["input_array_info"] = _array_info(kwargs["input_array_info"], "input_array_info")
    if "target_array_info" in kwargs:
        kwargs["target_array_info"] = _array_info(kwargs["target_array_info"], "target_array_info")
    elif "input_array_info" in kwargs:
        kwargs["target_array_info"] = kwargs["input_array_info"]
    if "classes" in kwargs:
        kwargs["classes"] = _string_tuple(kwargs["classes"], "classes")
    if kwargs.get("use_s3") is True and "search_path" not in kwargs:
        kwargs["search_path"] = DEFAULT_S3_SEARCH_PATH
    if isinstance(kwargs.get("monitor"), str):
        kwargs["monitor"] = canonical_monitor(kwargs["monitor"])
    if "model_to_load" not in kwargs and "model_name" in kwargs:
        kwargs["model_to_load"] = kwargs["model_name"]
    if isinstance(kwargs.get("filter_by_scale"), Sequence):
        kwargs["filter_by_scale"] = tuple(kwargs["filter_by_scale"])
    if kwargs.get("force_all_classes") is True:
        kwargs["force_all_classes"] = "both"
    elif kwargs.get("force_all_classes") is False:
        kwargs["force_all_classes"] = None
    if isinstance(kwargs.get("precision"), int):
        kwargs["precision"] = str(kwargs["precision"])
    if isinstance(kwargs.get("prediction_block_shape"), Sequence):
        kwargs["prediction_block_shape"] = tuple(kwargs["prediction_block_shape"])
    if kwargs.get("device") is not None and not isinstance(kwargs["device"], str):
        kwargs["device"] = str(kwargs["device"])  # a torch.device
    mappings = (
        "model_kwargs",
        "scheduler_kwargs",
        "optimizer_kwargs",
        "criterion_kwargs",
        "dataloader_kwargs",
    )
    for key in mappings:
        if key in kwargs:
            kwargs[key] = _mapping(kwargs[key], key)
    if kwargs.get("spatial_transforms") is not None:
        kwargs["spatial_transforms"] = _copy(
            _mapping(kwargs["spatial_transforms"], "spatial_transforms")
        )
    return kwargs


def _array_info(value: Any, key: str) -> ArrayInfo:
    if isinstance(value, ArrayInfo):
        return value
    if not isinstance(value, Mapping) or "shape" not in value or "scale" not in value:
        raise ValueError(
            f"{key} must be a dict with 'shape' (voxels) and 'scale' (nm per voxel), "
            f"e.g. {{'shape': (1, 128, 128), 'scale': (8, 8, 8)}}; got {value!r}"
        )
    shape, scale = value["shape"], value["scale"]
    if not isinstance(shape, Sequence) or not isinstance(scale, Sequence):
        raise ValueError(f"{key}: 'shape' and 'scale' must be sequences, got {shape!r}, {scale!r}")
    return ArrayInfo(tuple(shape), tuple(scale))


def _string_tuple(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{key} must be a list of names, e.g. ['nuc', 'mito']; got {value!r}")
    return tuple(value)


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{key} must be a dict, got {type(value).__name__} {value!r}")
    return dict(value)


def _copy(value: Any) -> Any:
    """A deep copy of plain dict/list data, so a config never shares state with defaults."""
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_copy(v) for v in value]
    return value


# The outputs that base_experiment_path anchors when the config leaves them at their defaults.
EXPERIMENT_KEYS = ("model_save_path", "logs_save_path", "datasplit_path")


def _resolve_paths(kwargs: dict[str, Any], config_dir: Path) -> dict[str, Any]:
    """Relative local paths (and templates) become absolute, anchored at the config's folder,
    or at base_experiment_path for the outputs (EXPERIMENT_KEYS) the config does not set. A
    search_path left at its default looks where csc and the toolkit would (`default_search`)."""
    given = set(kwargs)
    base = kwargs.get("base_experiment_path")
    if isinstance(base, os.PathLike):
        base = kwargs["base_experiment_path"] = os.fspath(base)
    if isinstance(base, str) and base:
        base = kwargs["base_experiment_path"] = _anchored(base, config_dir)
    use_s3 = kwargs.get("use_s3", TrainConfig.use_s3)
    if not use_s3 and _is_default_search_path(kwargs.get("search_path")):
        kwargs.update(default_search(config_dir))
    for key in PATH_KEYS:
        if key == "search_path" and use_s3:
            continue  # on S3 the search path is relative to the bucket
        value = kwargs.get(key, getattr(TrainConfig, key))
        folder = config_dir
        if isinstance(base, str) and base and key in EXPERIMENT_KEYS and key not in given:
            folder = Path(base)
        if isinstance(value, str):
            kwargs[key] = _anchored(value, folder)
    if is_checkpoint_file(kwargs.get("load_model")):  # like every path: from the config's folder
        kwargs["load_model"] = _anchored(kwargs["load_model"], config_dir)
    return kwargs


def _anchored(value: str, folder: Path) -> str:
    """A relative local path (or template) joined to `folder`; URLs and absolute paths stay."""
    if is_url(value) or os.path.isabs(value):
        return value
    return os.path.normpath(folder / os.path.expanduser(value))


def _is_default_search_path(value: Any) -> bool:
    """Whether a config's search_path is unset or spelled as csc's default (the toolkit's
    layout below a data folder), which `default_search` then resolves."""
    return value is None or (
        isinstance(value, str) and os.path.normpath(value) == os.path.normpath(DEFAULT_SEARCH_PATH)
    )


def default_search(config_dir: Path) -> dict[str, Any]:
    """Where a config that leaves search_path at its default finds data: ``data/`` next to
    the config (csc's layout), then ``data/`` one folder up (the toolkit's checkout: configs in
    ``examples/``, data in ``data/`` beside it). search_path is the first whose data folder
    exists, else the first; both are kept so that an empty crawl can name every place."""
    folders = dict.fromkeys((config_dir, config_dir.parent))  # the root is its own parent
    candidates = tuple(os.path.normpath(folder / DEFAULT_SEARCH_PATH) for folder in folders)
    found = [c for c in candidates if os.path.isdir(data_root(c))]
    return {"search_path": (found or candidates)[0], "search_path_candidates": candidates}


def data_root(search_path: str) -> str:
    """The folder a search path template starts in: everything before its first field."""
    return os.path.dirname(search_path.split("{", 1)[0]) or "."


def s3_search_path(search_path: str | None, bucket: str) -> str:
    """Where a crawl with use_s3 looks: `search_path` (default DEFAULT_S3_SEARCH_PATH), a path
    inside `bucket` unless it is an S3 URL itself."""
    return bucket_url(bucket, search_path or DEFAULT_S3_SEARCH_PATH)


def validate(config: TrainConfig) -> None:
    """Raise `ValueError` naming the key for any value that cannot work. Reads no data."""
    _check_counts(config)
    _check_choices(config)
    _check_array_info(config.input_array_info, "input_array_info")
    _check_array_info(config.target_array_info, "target_array_info")
    if config.input_array_info.is_2d != config.target_array_info.is_2d:
        raise ValueError(
            "input_array_info and target_array_info must both be 2D or both 3D, got "
            f"{config.input_array_info.shape} and {config.target_array_info.shape}"
        )
    _check_classes(config.classes)
    _check_templates(config)
    _check_spatial_transforms(config.spatial_transforms)
    _check_objects(config)
    _check_optimisation(config)
    _check_prediction(config)
    _check_monitor(config)
    _check_logging(config)


def _check_counts(config: TrainConfig) -> None:
    positive_ints = (
        "batch_size",
        "epochs",
        "iterations_per_epoch",
        "gradient_accumulation_steps",
        "smoothing_window",
        "max_nonfinite_steps",
    )
    for key in positive_ints:
        _require_int(config, key, minimum=1)
    _require_int(config, "tensorboard_images", minimum=0)
    for key in (
        "validation_batch_limit",
        "early_stopping_patience",
        "keep_last_checkpoints",
        "save_top_k",
    ):
        if getattr(config, key) is not None:
            _require_int(config, key, minimum=1)
    _require_int(config, "random_seed", minimum=0)
    _require_int(config, "chunk_cache_mb", minimum=0)
    _require_int(config, "crop_cache_mb", minimum=0)
    if config.spatial_transforms_on_device not in (None, True, False):
        raise ValueError(
            "spatial_transforms_on_device must be None (on when training on CUDA with "
            f"rotations), True or False, got {config.spatial_transforms_on_device!r}"
        )
    positive = (
        "learning_rate",
        "max_grad_norm",
        "validation_time_limit",
        "s3_timeout_s",
        "s3_retry_budget_s",
    )
    for key in positive:
        value = getattr(config, key)
        if value is None and key in ("max_grad_norm", "validation_time_limit"):
            continue
        if not _is_number(value) or value <= 0:
            raise ValueError(f"{key} must be a positive number, got {value!r}")
    endpoint = config.s3_endpoint_url
    if endpoint is not None and not (isinstance(endpoint, str) and "://" in endpoint):
        raise ValueError(f"s3_endpoint_url must be a URL like http://host:9000, got {endpoint!r}")
    if not _is_number(config.validation_prob) or not 0 <= config.validation_prob < 1:
        raise ValueError(f"validation_prob must be in [0, 1), got {config.validation_prob!r}")
    if config.ema_decay is not None and (
        not _is_number(config.ema_decay) or not 0 < config.ema_decay < 1
    ):
        raise ValueError(
            f"ema_decay must be between 0 and 1 (e.g. 0.999), got {config.ema_decay!r}"
        )
    scale = config.filter_by_scale
    values = scale if isinstance(scale, tuple) else (scale,)
    if not isinstance(scale, bool) and not all(_is_number(v) and v > 0 for v in values):
        raise ValueError(
            f"filter_by_scale must be True/False, a voxel size in nm or one per axis, got {scale!r}"
        )
    lengths = (2, 3) if config.input_array_info.is_2d else (3,)  # 2: (y, x) of a 2D patch
    if isinstance(scale, tuple) and len(scale) not in lengths:
        raise ValueError(
            f"filter_by_scale {scale} needs one voxel size (nm) per axis of input_array_info "
            f"{config.input_array_info.scale}, or a single number for all axes"
        )


def _require_int(config: TrainConfig, key: str, *, minimum: int) -> None:
    value = getattr(config, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_choices(config: TrainConfig) -> None:
    if config.model is None:
        _require_choice("model_name", config.model_name, MODEL_NAMES, hint=" (or set `model`)")
    elif not isinstance(config.model_name, str) or not config.model_name:
        raise ValueError(f"model_name must be a non-empty string, got {config.model_name!r}")
    if not isinstance(config.model_to_load, str) or not config.model_to_load:
        raise ValueError(f"model_to_load must be a non-empty string, got {config.model_to_load!r}")
    if not is_checkpoint_file(config.load_model):
        hint = " or the path of a checkpoint file (ending in .pth)"
        _require_choice("load_model", config.load_model, LOAD_MODEL_CHOICES, hint=hint)
    _require_choice("existing_run", config.existing_run, EXISTING_RUN_CHOICES)
    _require_choice("precision", config.precision, PRECISIONS)
    _require_choice("force_all_classes", config.force_all_classes, FORCE_ALL_CLASSES_CHOICES)
    for key, names in (
        ("optimizer", OPTIMIZER_NAMES),
        ("scheduler", SCHEDULER_NAMES),
        ("criterion", LOSS_NAMES),
    ):
        if isinstance(getattr(config, key), str):
            _require_choice(key, getattr(config, key).lower(), names, hint=" (or a torch object)")
    bools = (
        "low_is_best",
        "use_s3",
        "weighted_sampler",
        "weight_loss",
        "use_mutual_exclusion",
        "debug_memory",
        "weight_decay_norm_and_bias",
        "activation_checkpointing",
    )
    for key in bools:
        if not isinstance(getattr(config, key), bool):
            raise ValueError(f"{key} must be True or False, got {getattr(config, key)!r}")
    if not isinstance(config.compile, bool | dict):
        raise ValueError(
            "compile must be True, False or a dict of torch.compile arguments, e.g. "
            f"{{'mode': 'max-autotune'}}, got {config.compile!r}"
        )
    if config.channels_last is not None and not isinstance(config.channels_last, bool):
        raise ValueError(
            f"channels_last must be None (automatic), True or False, got {config.channels_last!r}"
        )
    if config.device is not None and not re.fullmatch(r"cpu|mps|cuda(:\d+)?", config.device):
        raise ValueError(
            f"device must be None, 'cpu', 'cuda', 'cuda:N' or 'mps', got {config.device!r}"
        )


def _check_optimisation(config: TrainConfig) -> None:
    """optimizer_kwargs (its names are checked against the optimizer's signature by
    csc.optim, before any data is read), warm-up and the scheduler's cadence."""
    given = set(config.optimizer_kwargs)
    if given & {"lr", "params"}:
        raise ValueError(
            f"optimizer_kwargs sets {', '.join(sorted(given & {'lr', 'params'}))}: csc passes "
            "the model's parameters and learning_rate itself; set learning_rate instead"
        )
    if given and not isinstance(config.optimizer, str | type):
        raise ValueError(
            f"optimizer_kwargs {sorted(given)} need an optimizer name or class, but optimizer "
            f"is an instance of {type(config.optimizer).__name__}: give its arguments there"
        )
    _require_int(config, "warmup_steps", minimum=0)
    factor = config.warmup_start_factor
    if not _is_number(factor) or not 0 <= factor <= 1:
        raise ValueError(
            f"warmup_start_factor must be in [0, 1] (the share of learning_rate the first "
            f"warm-up step uses), e.g. 0.01, got {factor!r}"
        )
    _require_choice("scheduler_interval", config.scheduler_interval, SCHEDULER_INTERVALS)
    if config.scheduler_interval is not None and config.scheduler is None:
        raise ValueError(
            f"scheduler_interval {config.scheduler_interval!r} needs a scheduler; set "
            "scheduler, or scheduler_interval = None"
        )
    if config.scheduler_interval == "step" and _is_plateau(config.scheduler):
        raise ValueError(
            "scheduler_interval 'step' cannot drive ReduceLROnPlateau, which steps on the "
            "validation score once per epoch; use scheduler_interval = None or 'epoch'"
        )


def _is_plateau(scheduler: Any) -> bool:
    """Whether `scheduler` (a name, class or instance) is ReduceLROnPlateau, without torch."""
    if isinstance(scheduler, str):
        return scheduler.lower() == "plateau"
    kind = scheduler if isinstance(scheduler, type) else type(scheduler)
    return any(c.__name__ == "ReduceLROnPlateau" for c in kind.__mro__)


# --- What "best" means (monitor) ----------------------------------------------------------


def canonical_monitor(monitor: str) -> str:
    """`monitor` in csc's one spelling: aliases replaced (``"f1"`` -> ``"dice"``) and a
    ``"/mean"`` dropped (``"iou/mean"`` is ``"iou"``, the mean over classes)."""
    metric, _, name = monitor.strip().partition("/")
    metric = MONITOR_ALIASES.get(metric.lower(), metric.lower())
    return metric if name in ("", "mean") else f"{metric}/{name}"


def monitor_parts(monitor: str) -> tuple[str, str]:
    """(metric, class) of a metric `monitor`; the class is ``"mean"`` for a mean over classes
    (the key `SegmentationMetrics.compute` gives it)."""
    metric, _, name = canonical_monitor(monitor).partition("/")
    return metric, name or "mean"


def monitor_mode(config: TrainConfig) -> str:
    """Which way the monitored score is better, ``"min"`` or ``"max"``: `monitor_mode` when
    set; else for the loss ``low_is_best`` (the toolkit's key), for a metric ``"max"``."""
    if config.monitor_mode is not None:
        return config.monitor_mode
    if config.monitor == MONITOR_LOSS:
        return "min" if config.low_is_best else "max"
    return "max"


def _check_monitor(config: TrainConfig) -> None:
    """`monitor` names the loss, a metric or a metric of one class; `monitor_mode` is a mode;
    ``low_is_best = False`` (never the default) agrees with the mode."""
    monitor = config.monitor
    if not isinstance(monitor, str) or not monitor:
        raise ValueError(f"monitor must be a string such as 'loss' or 'iou', got {monitor!r}")
    if config.monitor_mode is not None:
        _require_choice("monitor_mode", config.monitor_mode, (*MONITOR_MODES, None))
    if monitor != MONITOR_LOSS:
        metric, name = monitor_parts(monitor)
        metrics = (*registries.METRIC_NAMES, *MONITOR_ALIASES)
        if metric not in registries.METRIC_NAMES:
            valid = ", ".join(repr(m) for m in (MONITOR_LOSS, *metrics))
            raise ValueError(
                f"unknown monitor {monitor!r}: {metric!r} is no metric; available: {valid}, each "
                "as the mean over classes or as 'METRIC/CLASS' for one class (e.g. 'iou/nuc')"
            )
        if name != "mean" and name not in config.classes:
            valid = ", ".join(repr(c) for c in ("mean", *config.classes))
            raise ValueError(
                f"monitor {monitor!r} names class {name!r}, which is not in classes; "
                f"available: {valid}"
            )
    if config.low_is_best is False:
        check_low_is_best(config)


def check_low_is_best(config: TrainConfig) -> None:
    """`ValueError` when `low_is_best` (as the config set it) says the other way than the
    monitored score's mode (`monitor_mode`)."""
    mode = monitor_mode(config)
    if (mode == "min") == config.low_is_best:
        return
    said = "lower" if config.low_is_best else "higher"
    why = f"monitor_mode = {mode!r}" if config.monitor_mode else f"monitor {config.monitor!r}"
    raise ValueError(
        f"low_is_best = {config.low_is_best} says a {said} score is better, but {why} is "
        f"better when {'lower' if mode == 'min' else 'higher'}: drop low_is_best (it is the "
        "toolkit's key for the loss), or set monitor_mode to the way you mean"
    )


def is_checkpoint_file(load_model: Any) -> TypeGuard[str]:
    """Whether a `load_model` value is the path of a checkpoint file rather than
    ``"latest"``/``"best"``/None: a string that ends in .pth/.pt or holds a folder."""
    if not isinstance(load_model, str) or load_model in ("latest", "best"):
        return False
    return load_model.endswith(CHECKPOINT_SUFFIXES) or "/" in load_model or os.sep in load_model


def load_model_file(config: TrainConfig) -> Path | None:
    """The checkpoint file `load_model` names (absolute once the config is built); None for
    "latest", "best" and None."""
    return Path(config.load_model) if is_checkpoint_file(config.load_model) else None


def _check_logging(config: TrainConfig) -> None:
    """The training-log, reproducibility and debug keys."""
    if not isinstance(config.train_metrics, bool):
        raise ValueError(f"train_metrics must be True or False, got {config.train_metrics!r}")
    _require_int(config, "log_every_n_steps", minimum=1)
    if config.validate_every_n_steps is not None:
        _require_int(config, "validate_every_n_steps", minimum=1)
    deterministic = config.deterministic
    if not (isinstance(deterministic, bool) or deterministic == "warn"):
        raise ValueError(
            "deterministic must be True, False or 'warn' (deterministic where torch can be, a "
            f"warning where it cannot), got {deterministic!r}"
        )
    debug = config.debug
    if not isinstance(debug, bool) and (not isinstance(debug, int) or debug < 1):
        raise ValueError(
            f"debug must be True (the first 3 batches), False, or a number of batches >= 1, "
            f"got {debug!r}"
        )


# What csc process hands process_func (TrainConfig.process_input).
PROCESS_INPUTS = ("probabilities", "logits")


def _check_prediction(config: TrainConfig) -> None:
    _require_choice("prediction_encoding", config.prediction_encoding, PREDICTION_ENCODINGS)
    _require_choice("process_input", config.process_input, PROCESS_INPUTS)
    overlap = config.prediction_overlap
    if not _is_number(overlap) or not 0 <= overlap < 1:
        raise ValueError(f"prediction_overlap must be in [0, 1), e.g. 0.25, got {overlap!r}")
    block = config.prediction_block_shape
    if not (
        isinstance(block, tuple)
        and len(block) == 3
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in block)
    ):
        raise ValueError(
            "prediction_block_shape must be 3 positive integers (z, y, x output voxels), e.g. "
            f"(64, 256, 256), got {block!r}"
        )
    if config.prediction_batch_size is not None:
        _require_int(config, "prediction_batch_size", minimum=1)
    _check_process(config)


def _check_process(config: TrainConfig) -> None:
    if isinstance(config.process_func, str):
        _require_choice(
            "process_func", config.process_func, PROCESS_FUNC_NAMES, hint=" (or a callable)"
        )
    level = config.process_threshold
    if not _is_number(level) or not 0 <= level < 1:
        raise ValueError(f"process_threshold must be in [0, 1), e.g. 0.5, got {level!r}")
    _require_int(config, "min_instance_size", minimum=0)
    _require_int(config, "watershed_min_distance", minimum=1)
    _require_int(config, "process_memory_mb", minimum=0)


def _require_choice(key: str, value: Any, choices: Sequence[Any], hint: str = "") -> None:
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"unknown {key} {value!r}; available: {valid}{hint}")


def _check_array_info(info: ArrayInfo, key: str) -> None:
    shape, scale = info.shape, info.scale
    if len(shape) != len(scale):
        raise ValueError(
            f"{key}: shape {shape} and scale {scale} have different lengths; give one voxel "
            "size (nm) per axis, in (z, y, x) order"
        )
    if len(shape) not in (2, 3):
        raise ValueError(f"{key}: shape must have 2 (y, x) or 3 (z, y, x) axes, got {shape}")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"{key}: shape must be positive integers (voxels), got {shape}")
    if not all(_is_number(s) and s > 0 for s in scale):
        raise ValueError(f"{key}: scale must be positive voxel sizes in nm, got {scale}")


def _check_classes(classes: tuple[str, ...]) -> None:
    if not classes:
        raise ValueError("classes is empty; list the classes to segment, e.g. ['nuc', 'mito']")
    if not all(isinstance(c, str) and c for c in classes):
        raise ValueError(f"classes must be non-empty strings, got {list(classes)}")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise ValueError(f"classes lists {', '.join(repeated)} more than once: {list(classes)}")


def _check_templates(config: TrainConfig) -> None:
    required = {
        "model_save_path": ("{epoch}",),
        "search_path": ("{dataset}", "{name}"),
        "crop_name": ("{crop}", "{label}"),
    }
    for key, fields in required.items():
        value = getattr(config, key)
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a path string, got {value!r}")
        missing = [f for f in fields if f not in value]
        if missing:
            raise ValueError(f"{key} {value!r} must contain {' and '.join(missing)}")
    if not config.crop_name.endswith("/{label}"):
        raise ValueError(f"crop_name {config.crop_name!r} must end in /{{label}}")
    for key in ("logs_save_path", "datasplit_path", "raw_name", "s3_bucket"):
        if not isinstance(getattr(config, key), str) or not getattr(config, key):
            raise ValueError(f"{key} must be a non-empty string, got {getattr(config, key)!r}")
    base = config.base_experiment_path
    if base is not None and (not isinstance(base, str) or not base or is_url(base)):
        raise ValueError(
            "base_experiment_path must be a local folder (where checkpoints/, tensorboard/ and "
            f"datasplit.csv go unless set), or None for the config's folder; got {base!r}"
        )


def _check_spatial_transforms(transforms: Mapping[str, Any] | None) -> None:
    if transforms is None:
        return
    for name, spec in transforms.items():
        if name not in SPATIAL_TRANSFORM_NAMES:
            _require_choice("spatial_transforms key", name, SPATIAL_TRANSFORM_NAMES)
        axes = spec.get("axes") if isinstance(spec, Mapping) else None
        kind = list if name == "transpose" else dict  # transpose: axes list; others: per axis
        if not isinstance(axes, Sequence if kind is list else Mapping) or isinstance(axes, str):
            example = DEFAULT_SPATIAL_TRANSFORMS[name]
            raise ValueError(f"spatial_transforms['{name}'] must look like {example}, got {spec!r}")
        bad = [a for a in axes if a not in AXES]
        if bad:
            raise ValueError(f"spatial_transforms['{name}'] has unknown axes {bad}; use z, y, x")
        if (
            name == "mirror"
            and isinstance(axes, Mapping)
            and not all(_is_number(p) and 0 <= p <= 1 for p in axes.values())
        ):
            raise ValueError(
                f"spatial_transforms['mirror'] probabilities must be in [0, 1]: {axes}"
            )
        if (
            name == "rotate"
            and isinstance(axes, Mapping)
            and not all(_is_range(r) for r in axes.values())
        ):
            raise ValueError(
                f"spatial_transforms['rotate'] needs [min, max] degrees per axis: {axes}"
            )


def _is_range(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(_is_number(v) for v in value)
        and value[0] <= value[1]
    )


def _check_objects(config: TrainConfig) -> None:
    keys = (
        "train_raw_value_transforms",
        "val_raw_value_transforms",
        "target_value_transforms",
        "value_transforms",
        "process_func",
    )
    for key in keys:
        value = getattr(config, key)
        if key == "process_func" and isinstance(value, str):
            continue  # a method's name, checked against registries.PROCESS_FUNCS
        if value is not None and not callable(value):
            named = f", or one of {', '.join(PROCESS_FUNC_NAMES)}" if key == "process_func" else ""
            raise ValueError(
                f"{key} must be a callable (array -> array){named} or None, got {value!r}"
            )
    if config.model is not None and not callable(config.model):
        raise ValueError(
            f"model must be a torch.nn.Module (or None to build model_name), got {config.model!r}"
        )


def check_keywords(
    function: Callable[..., Any], kwargs: Mapping[str, Any], *, key: str, num_positional: int = 0
) -> None:
    """Raise `ValueError` naming `key` when `function` (a class or callable, called with
    `num_positional` positional arguments and `kwargs`) takes no argument of a name in `kwargs`,
    or needs one that neither gives. Reads no data; builds nothing."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: nothing to check
        return
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    given = [p for p in parameters if p.kind in positional][:num_positional]
    takes = [p.name for p in parameters if p.kind in named and p not in given]
    label = getattr(function, "__qualname__", repr(function))
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    unknown = [name for name in kwargs if name not in takes]
    if unknown and not takes_any:
        raise ValueError(
            f"{key}: {label} takes no argument {unknown[0]!r}; it takes "
            f"{', '.join(takes) or 'none'}"
        )
    required = [p for p in parameters if p.kind in named and p.default is p.empty]
    missing = [p.name for p in required if p not in given and p.name not in kwargs]
    if missing:
        raise ValueError(f"{label} needs {', '.join(missing)}: set it in {key}")


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as plain data (numbers, strings, lists, dicts); objects become their repr."""
    return {field.name: _plain(getattr(config, field.name)) for field in dataclasses.fields(config)}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, ArrayInfo):
        return {"shape": list(value.shape), "scale": list(value.scale)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)


def format_config(config: TrainConfig) -> str:
    """One ``key = value`` line per setting, then the extra names the file defined."""
    plain = config_to_dict(config)
    extras = plain.pop("extras")
    width = max(len(k) for k in plain)
    lines = [f"{key:<{width}} = {value!r}" for key, value in plain.items()]
    if extras:
        lines.append(f"# other names defined by the config file: {', '.join(sorted(extras))}")
    return "\n".join(lines)
