"""load_config: defaults, paths, overrides, typo warnings, validation and user-file errors."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from csc.config import (
    CONFIG_KEYS,
    DEFAULT_SPATIAL_TRANSFORMS,
    ArrayInfo,
    ConfigFileError,
    ConfigWarning,
    TrainConfig,
    config_to_dict,
    format_config,
    load_config,
)

WriteConfig = Callable[..., Path]


def test_empty_config_gives_the_documented_defaults(write_config: WriteConfig) -> None:
    path = write_config("")
    config = load_config(path)
    folder = path.parent
    assert config.model_save_path == f"{folder}/checkpoints/{{model_name}}_{{epoch}}.pth"
    assert config.logs_save_path == f"{folder}/tensorboard/{{model_name}}"
    assert config.datasplit_path == f"{folder}/datasplit.csv"
    assert config.search_path == f"{folder}/data/{{dataset}}/{{dataset}}.zarr/recon-1/{{name}}"
    assert config.raw_name == "em/fibsem-uint8"
    assert config.crop_name == "labels/groundtruth/{crop}/{label}"
    assert (config.validation_prob, config.learning_rate, config.batch_size) == (0.15, 1e-4, 8)
    assert config.input_array_info == ArrayInfo((1, 128, 128), (8, 8, 8))
    assert config.target_array_info == config.input_array_info
    assert (config.epochs, config.iterations_per_epoch, config.random_seed) == (1000, 1000, 42)
    assert config.classes == ("nuc", "er")
    assert (config.model_name, config.model_to_load, config.model) == ("2d_unet", "2d_unet", None)
    assert (config.load_model, config.low_is_best, config.smoothing_window) == ("latest", True, 1)
    assert config.spatial_transforms == DEFAULT_SPATIAL_TRANSFORMS
    assert config.validation_time_limit is None and config.validation_batch_limit is None
    assert config.device is None and config.use_s3 is False and config.weighted_sampler is True
    assert config.force_all_classes == "validate" and config.filter_by_scale is False
    assert (config.optimizer, config.scheduler, config.criterion) == ("radam", None, "bce")
    assert config.weight_loss is True and config.gradient_accumulation_steps == 1
    assert config.s3_bucket == "janelia-cosem-datasets" and config.precision == "32"
    assert config.ema_decay is None and config.early_stopping_patience is None
    assert config.keep_last_checkpoints is None and config.max_grad_norm is None
    assert config.config_path == str(path) and config.extras == {}


def test_config_values_are_read_and_normalised(write_config: WriteConfig) -> None:
    path = write_config(
        """
        classes = ["mito", "er", "nuc"]
        input_array_info = {"shape": [64, 64, 64], "scale": [8, 8, 8]}
        model_name = "3d_unet"
        precision = 32
        force_all_classes = True
        filter_by_scale = [8, 8, 8]
        learning_rate = 3e-4
        """
    )
    config = load_config(path)
    assert config.classes == ("mito", "er", "nuc")
    assert config.input_array_info == ArrayInfo((64, 64, 64), (8, 8, 8))
    assert config.target_array_info == config.input_array_info  # defaults to the input's
    assert config.model_to_load == "3d_unet"  # defaults to model_name
    assert config.precision == "32" and config.force_all_classes == "both"
    assert config.filter_by_scale == (8, 8, 8) and config.learning_rate == 3e-4


def test_relative_paths_resolve_against_the_config_folder(
    write_config: WriteConfig, tmp_path: Path
) -> None:
    path = write_config(
        """
        from upath import UPath
        model_save_path = UPath("runs/{model_name}/{epoch}.pth")
        logs_save_path = "/abs/logs/{model_name}"
        datasplit_path = "../split.csv"
        search_path = "s3://bucket/{dataset}/{dataset}.zarr/recon-1/{name}"
        """,
        name="sub/config.py",
    )
    config = load_config(path)
    assert config.model_save_path == f"{tmp_path}/sub/runs/{{model_name}}/{{epoch}}.pth"
    assert config.logs_save_path == "/abs/logs/{model_name}"
    assert Path(config.datasplit_path).resolve() == tmp_path / "split.csv"
    assert config.search_path.startswith("s3://bucket/")


def test_search_path_stays_bucket_relative_with_use_s3(write_config: WriteConfig) -> None:
    path = write_config('use_s3 = True\nsearch_path = "{dataset}/{dataset}.zarr/recon-1/{name}"\n')
    assert load_config(path).search_path == "{dataset}/{dataset}.zarr/recon-1/{name}"


def test_use_s3_defaults_to_the_bucket_layout(write_config: WriteConfig) -> None:
    config = load_config(write_config("use_s3 = True\n"))
    assert config.search_path == "{dataset}/{dataset}.zarr/recon-1/{name}"


def test_config_is_frozen_and_defaults_are_not_shared(write_config: WriteConfig) -> None:
    first = load_config(write_config(""))
    first.spatial_transforms["mirror"]["axes"]["x"] = 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.batch_size = 2  # type: ignore[misc]
    assert load_config(write_config("")).spatial_transforms == DEFAULT_SPATIAL_TRANSFORMS


def test_file_and_folder_are_visible_to_the_config(write_config: WriteConfig) -> None:
    write_config("SHARED_CLASSES = ['mito', 'er']\n", name="shared_settings.py")
    path = write_config(
        """
        from pathlib import Path
        import shared_settings
        classes = shared_settings.SHARED_CLASSES
        here = Path(__file__)
        """
    )
    config = load_config(path)
    assert config.classes == ("mito", "er")
    assert config.extras["here"] == path  # non-setting public names are kept as extras
    # Modules and names imported under their own name are not the file's settings.
    assert "shared_settings" not in config.extras and "Path" not in config.extras


def test_main_block_does_not_run(write_config: WriteConfig) -> None:
    path = write_config(
        """
        batch_size = 4
        seen_name = __name__
        if __name__ == "__main__":
            raise SystemExit("the __main__ block ran")
        """
    )
    config = load_config(path)
    assert config.batch_size == 4
    assert config.extras["seen_name"] != "__main__"


def test_overrides_are_python_literals(write_config: WriteConfig) -> None:
    path = write_config("epochs = 10\nmodel_name = '2d_unet'\n")
    config = load_config(
        path,
        [
            "epochs=3",
            "learning_rate=3e-4",
            "classes=['nuc','mito']",
            "model_name=3d_unet",  # a bare word stays a string
            "validation_time_limit=None",
            "input_array_info={'shape': (8, 8, 8), 'scale': (4, 4, 4)}",
        ],
    )
    assert config.epochs == 3 and config.learning_rate == 3e-4
    assert config.classes == ("nuc", "mito") and config.model_name == "3d_unet"
    assert config.model_to_load == "3d_unet"
    assert config.target_array_info == ArrayInfo((8, 8, 8), (4, 4, 4))
    assert load_config(path, {"batch_size": 2}).batch_size == 2


def test_unknown_override_key_suggests_the_closest(write_config: WriteConfig) -> None:
    path = write_config("")
    with pytest.raises(ValueError, match=r"unknown config key.*'learning_rate'"):
        load_config(path, ["learning_rte=0.1"])
    with pytest.raises(ValueError, match="is not KEY=VALUE"):
        load_config(path, ["epochs"])


def test_typo_warns_with_closest_key(write_config: WriteConfig) -> None:
    path = write_config("learning_rte = 1e-3\nmy_helper_value = 3\n")
    with pytest.warns(ConfigWarning, match=r"'learning_rte'.*did you mean 'learning_rate'"):
        config = load_config(path)
    assert config.learning_rate == 1e-4  # the misspelled value is not applied
    assert config.extras == {"learning_rte": 1e-3, "my_helper_value": 3}


def test_strict_turns_typos_into_errors(write_config: WriteConfig) -> None:
    path = write_config("iterations_per_epoc = 5\n")
    with pytest.raises(ValueError, match=r"did you mean 'iterations_per_epoch'.*--strict"):
        load_config(path, strict=True)


def test_imported_names_are_not_typos(write_config: WriteConfig) -> None:
    # `from x import Foo` binds Foo under its own name: no warning, even under --strict.
    path = write_config("from json import loads as loads\nfrom csc.config import load_config\n")
    assert load_config(path, strict=True).extras == {}


def test_a_misspelled_key_holding_an_imported_class_still_warns(write_config: WriteConfig) -> None:
    path = write_config("from collections import OrderedDict\noptimzer = OrderedDict\n")
    with pytest.warns(ConfigWarning, match="'optimizer'"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("batch_size = -8", "batch_size must be an integer >= 1"),
        ("batch_size = 2.5", "batch_size must be an integer >= 1"),
        ("epochs = 0", "epochs must be an integer >= 1"),
        ("model_name = 'unet3d'", "unknown model_name 'unet3d'; available: '2d_resnet', '2d_unet'"),
        (
            "input_array_info = {'shape': (1, 128, 128), 'scale': (8, 8)}",
            r"input_array_info: shape \(1, 128, 128\) and scale \(8, 8\) have different lengths",
        ),
        (
            "target_array_info = {'shape': (1, 128, 128), 'scale': (8, 8)}",
            "target_array_info: shape .* different lengths",
        ),
        ("input_array_info = {'shape': (1, 128, 128)}", "input_array_info must be a dict with"),
        ("input_array_info = {'shape': (1, 0, 128), 'scale': (8, 8, 8)}", "positive integers"),
        ("input_array_info = {'shape': (1, 8, 8), 'scale': (8, -8, 8)}", "positive voxel sizes"),
        ("classes = []", "classes is empty"),
        ("classes = ['nuc', 'er', 'nuc']", "classes lists nuc more than once"),
        ("classes = 'nuc'", "classes must be a list of names"),
        ("learning_rate = 0", "learning_rate must be a positive number"),
        ("validation_prob = 1.0", r"validation_prob must be in \[0, 1\)"),
        ("load_model = 'newest'", "unknown load_model 'newest'"),
        ("precision = 'fp8'", "unknown precision 'fp8'"),
        ("optimizer = 'adagrad'", "unknown optimizer 'adagrad'; available: 'adam'"),
        ("scheduler = 'linear'", "unknown scheduler 'linear'"),
        ("criterion = 'hinge'", "unknown criterion 'hinge'"),
        ("force_all_classes = 'sometimes'", "unknown force_all_classes"),
        ("ema_decay = 1.5", "ema_decay must be between 0 and 1"),
        ("device = 'tpu'", "device must be None"),
        ("model_save_path = 'ckpt/model.pth'", r"model_save_path .* must contain \{epoch\}"),
        ("crop_name = 'labels/{crop}'", r"crop_name .* must contain \{label\}"),
        ("crop_name = 'labels/{label}/{crop}'", r"crop_name .* must end in /\{label\}"),
        ("search_path = 'data/{name}'", r"search_path .* must contain \{dataset\}"),
        ("spatial_transforms = {'flip': {'axes': {'x': 0.5}}}", "unknown spatial_transforms key"),
        ("spatial_transforms = {'mirror': {'axes': {'w': 0.5}}}", "unknown axes"),
        ("spatial_transforms = {'rotate': {'axes': {'z': [180, -180]}}}", r"\[min, max\]"),
        ("spatial_transforms = {'mirror': {'axes': ['x']}}", "must look like"),
        ("spatial_transforms = {'transpose': {'axes': {'x': 1}}}", "must look like"),
        ("device = 'cuda:abc'", "device must be None"),
        (  # two numbers are (y, x): for 2D patches only
            "input_array_info = {'shape': (8, 8, 8), 'scale': (8, 8, 8)}\nfilter_by_scale = (8, 8)",
            "one voxel size \\(nm\\) per axis",
        ),
        ("filter_by_scale = (8, 8, 8, 8)", "one voxel size \\(nm\\) per axis"),
        ("target_array_info = {'shape': (8, 8, 8), 'scale': (8, 8, 8)}", "both be 2D or both 3D"),
        ("train_raw_value_transforms = 3", "must be a callable"),
        ("use_s3 = 'yes'", "use_s3 must be True or False"),
        ("model_kwargs = [1, 2]", "model_kwargs must be a dict"),
        ("filter_by_scale = -4", "filter_by_scale must be"),
        ("validation_batch_limit = 0", "validation_batch_limit must be an integer >= 1"),
        ("keep_last_checkpoints = -1", "keep_last_checkpoints must be an integer >= 1"),
    ],
)
def test_impossible_values_raise_naming_the_key(
    write_config: WriteConfig, text: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(write_config(text + "\n"))


def test_2d_shapes_may_be_written_either_way(write_config: WriteConfig) -> None:
    text = "target_array_info = {'shape': (64, 64), 'scale': (8, 8)}\n"
    assert load_config(write_config(text)).target_array_info.is_2d


def test_sys_exit_in_a_config_is_reported_as_its_error(write_config: WriteConfig) -> None:
    path = write_config("import sys\nsys.exit('stop here')\n")
    with pytest.raises(ConfigFileError, match=r"(?s)line 2.*SystemExit: stop here"):
        load_config(path)


def test_any_model_name_is_fine_with_a_model_object(write_config: WriteConfig) -> None:
    path = write_config("model = print\nmodel_name = 'my_net'\n")  # any callable stands in
    assert load_config(path).model_name == "my_net"


def test_a_config_that_raises_shows_its_own_traceback(write_config: WriteConfig) -> None:
    path = write_config(
        """
        classes = ["nuc"]

        def helper():
            return 1 / 0

        batch_size = helper()
        """
    )
    with pytest.raises(ConfigFileError) as caught:
        load_config(path)
    message = str(caught.value)
    assert f'File "{path}", line 7' in message and f'File "{path}", line 5' in message
    assert "return 1 / 0" in message and "ZeroDivisionError: division by zero" in message
    assert "runpy" not in message and "csc/config.py" not in message
    assert isinstance(caught.value.__cause__, ZeroDivisionError)


def test_a_config_with_a_syntax_error_points_at_its_line(write_config: WriteConfig) -> None:
    path = write_config("epochs = 3\nbatch_size = = 4\n")
    with pytest.raises(ConfigFileError, match=rf"(?s){re.escape(str(path))}.*line 2.*SyntaxError"):
        load_config(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config file not found: .*nope\.py"):
        load_config(tmp_path / "nope.py")


def test_resolved_config_is_plain_data_and_printable(write_config: WriteConfig) -> None:
    path = write_config(
        """
        from collections import OrderedDict
        scheduler = OrderedDict  # a class stands in for a torch scheduler class
        target_value_transforms = lambda array: array
        """
    )
    config = load_config(path)
    plain = config_to_dict(config)
    json.dumps(plain)  # only plain data
    assert plain["scheduler"] == "collections.OrderedDict"
    assert plain["target_value_transforms"].startswith("<function <lambda>")
    assert plain["input_array_info"] == {"shape": [1, 128, 128], "scale": [8, 8, 8]}
    text = format_config(config)
    assert all(re.search(rf"^{key}\s+= ", text, re.M) for key in CONFIG_KEYS)
    assert "other names defined by the config file" not in text  # imports are not listed


def test_every_config_key_is_documented() -> None:
    reference = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    missing = [key for key in CONFIG_KEYS if f"`{key}`" not in reference]
    assert not missing, f"docs/configuration.md does not describe {missing}"


def test_config_keys_match_the_dataclass() -> None:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(CONFIG_KEYS) == names - {"config_path", "extras", "search_path_candidates"}
