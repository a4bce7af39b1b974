"""The fault audit: bad inputs and faults a user meets, each run as a real `csc` command.

Run from the repository root: .venv/bin/python benchmarks/fault_audit.py [--only NAME,...]

Every case gets a fresh copy of one workspace: tiny `csc synth` data, a 2D config and a finished
two-epoch run (checkpoints, TensorBoard logs, datasplit.csv). The case changes the config or the
files, runs `python -m csc ...`, and its outcome is classified:

- data loss: a file that existed before is gone or has other bytes afterwards (one moved
  aside whole, its bytes under a new path, counts as kept);
- traceback: a Python traceback reached the user;
- hang: the command ran past its time limit;
- silent: the command succeeded without saying a word about the fault;
- unclear: it failed (or warned) without naming the key, file or path the case expects;
- clear: it failed (or, for `warn` cases, warned) with a message that names it.

Prints one line per case and the counts per outcome. Nothing here is timed; it takes a few
minutes (each case starts a Python process that imports torch).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests.faults: the same snapshot rule

from tests.faults import snapshot

TIME_LIMIT_S = 120
BASE_CONFIG = """\
search_path = "data/{dataset}/{dataset}.zarr/recon-1/{name}"
datasplit_path = "datasplit.csv"
classes = ["nuc", "mito", "er"]
input_array_info = {"shape": (1, 32, 32), "scale": (8, 8, 8)}
target_array_info = input_array_info
model_name = "2d_unet"
model_kwargs = {"num_levels": 2, "base_channels": 4}
epochs = 1
iterations_per_epoch = 2
batch_size = 2
validation_batch_limit = 1
device = "cpu"
model_save_path = "checkpoints/{model_name}_{epoch}.pth"
logs_save_path = "tensorboard/{model_name}"
predictions_path = "predictions/{model_name}"
processed_path = "predictions/{model_name}_processed"
"""
SYNTH = [
    "synth",
    "data",
    "--datasets",
    "2",
    "--crops",
    "2",
    "--shape",
    "16,48,48",
    "--crop-shape",
    "16,64,64",
    "--chunks",
    "16,32,32",
    "--missing-class-prob",
    "0",
]
TEST = ("--crops", "test")  # the test crops of the challenge's manifest (not in the workspace)
LABELS = "data/jrc_synth1/jrc_synth1.zarr/recon-1/labels/groundtruth"
RAW = "data/jrc_synth1/jrc_synth1.zarr/recon-1/em/fibsem-uint8"
# Lines that make a case's training a fresh run of its own, beside the workspace's run.
FRESH = (
    "load_model = None\nmodel_save_path = 'other/{model_name}_{epoch}.pth'\n"
    "logs_save_path = 'other/tb'\n"
)
# A resumed run rewrites its own best copy and drops the training state of epochs before the
# last two (its own documented housekeeping: the weights stay).
RESUME_REWRITES = (
    "checkpoints/csc-extras/2d_unet_best.pth",
    "checkpoints/csc-extras/2d_unet_best.state.pth",
    "checkpoints/csc-extras/2d_unet_1.state.pth",
)


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input or fault: config lines appended, files changed, the command to run."""

    name: str
    expect: str  # text the message must contain: the key, file or path at fault
    args: tuple[str, ...] = ("train", "config.py")
    append: str = ""  # config lines appended to the workspace's config.py
    prepare: Callable[[Path], None] | None = None
    outcome: str = "error"  # "error": must fail; "warn": may succeed but must warn; "ok"
    # Files the command may replace: a resumed run rewrites its own best copy.
    may_change: tuple[str, ...] = RESUME_REWRITES


def config_case(name: str, lines: str, expect: str, outcome: str = "error") -> Case:
    return Case(name, expect, ("config", "config.py"), textwrap.dedent(lines), outcome=outcome)


CONFIG_CASES = [
    config_case("typo epoch", "epoch = 5", "epochs", "warn"),
    config_case("typo bach_size", "bach_size = 4", "batch_size", "warn"),
    config_case("batch_size 0", "batch_size = 0", "batch_size"),
    config_case("batch_size float", "batch_size = 2.5", "batch_size"),
    config_case("epochs negative", "epochs = -1", "epochs"),
    config_case("learning_rate 0", "learning_rate = 0", "learning_rate"),
    config_case("learning_rate text", "learning_rate = 'fast'", "learning_rate"),
    config_case("classes empty", "classes = []", "classes"),
    config_case("classes a string", "classes = 'nuc'", "classes"),
    config_case("classes repeated", "classes = ['nuc', 'nuc']", "nuc"),
    config_case("model_name unknown", "model_name = 'unet3d'", "model_name"),
    config_case("optimizer unknown", "optimizer = 'adamx'", "optimizer"),
    config_case("scheduler unknown", "scheduler = 'cosin'", "scheduler"),
    config_case("criterion unknown", "criterion = 'bce2'", "criterion"),
    config_case("precision unknown", "precision = 'fp8'", "precision"),
    config_case("load_model unknown", "load_model = 'last'", "load_model"),
    config_case(
        "input without scale", "input_array_info = {'shape': (1, 32, 32)}", "input_array_info"
    ),
    config_case(
        "shape/scale lengths",
        "input_array_info = {'shape': (1, 32, 32), 'scale': (8, 8)}",
        "input_array_info",
    ),
    config_case(
        "shape negative",
        "input_array_info = {'shape': (1, -32, 32), 'scale': (8, 8, 8)}",
        "input_array_info",
    ),
    config_case(
        "2D input, 3D target",
        "target_array_info = {'shape': (8, 32, 32), 'scale': (8, 8, 8)}",
        "target_array_info",
    ),
    config_case("device gpu", "device = 'gpu'", "device"),
    config_case(
        "model_save_path without epoch", "model_save_path = 'checkpoints/m.pth'", "model_save_path"
    ),
    config_case("search_path without dataset", "search_path = 'data/x.zarr/{name}'", "search_path"),
    config_case("crop_name without label", "crop_name = 'labels/{crop}'", "crop_name"),
    config_case(
        "spatial transform unknown",
        "spatial_transforms = {'flip': {'axes': ['x']}}",
        "spatial_transforms",
    ),
    config_case(
        "mirror probability 2", "spatial_transforms = {'mirror': {'axes': {'x': 2}}}", "mirror"
    ),
    config_case(
        "rotate range reversed",
        "spatial_transforms = {'rotate': {'axes': {'z': [90, -90]}}}",
        "rotate",
    ),
    config_case("validation_prob 1.5", "validation_prob = 1.5", "validation_prob"),
    config_case("ema_decay 2", "ema_decay = 2", "ema_decay"),
    config_case("force_all_classes yes", "force_all_classes = 'yes'", "force_all_classes"),
    config_case("filter_by_scale negative", "filter_by_scale = -1", "filter_by_scale"),
    config_case("dataloader_kwargs a number", "dataloader_kwargs = 5", "dataloader_kwargs"),
    config_case(
        "prediction_block_shape 2D", "prediction_block_shape = (64, 256)", "prediction_block_shape"
    ),
    config_case("prediction_overlap 1", "prediction_overlap = 1", "prediction_overlap"),
    config_case("keep_last_checkpoints 0", "keep_last_checkpoints = 0", "keep_last_checkpoints"),
    config_case("syntax error", "epochs = = 3", "config.py"),
    config_case("config raises", "raise RuntimeError('no data here')", "config.py"),
    config_case(
        "raw transform a string",
        "train_raw_value_transforms = 'normalize'",
        "train_raw_value_transforms",
    ),
    config_case("model a number", "model = 5", "model"),
    config_case("compile yes", "compile = 'yes'", "compile"),
    config_case(
        "gradient_accumulation_steps 0",
        "gradient_accumulation_steps = 0",
        "gradient_accumulation_steps",
    ),
    config_case("random_seed negative", "random_seed = -1", "random_seed"),
    config_case("channels_last text", "channels_last = 'auto'", "channels_last"),
    Case("config file missing", "missing.py", ("config", "missing.py")),
    Case("override not KEY=VALUE", "epochs3", ("config", "config.py", "epochs3")),
    Case("override unknown key", "epoch", ("config", "config.py", "epoch=3")),
    # Found only when training starts (they need torch or the model).
    Case(
        "input not divisible",
        "input_array_info",
        append="input_array_info = {'shape': (1, 30, 30), 'scale': (8, 8, 8)}\n"
        "target_array_info = input_array_info\n",
    ),
    Case(
        "target smaller and coarser",
        "target_array_info",
        append="load_model = None\nmodel_save_path = 'other/{model_name}_{epoch}.pth'\n"
        "logs_save_path = 'other/tb'\n"
        "target_array_info = {'shape': (1, 16, 16), 'scale': (16, 16, 16)}\n",
    ),
    Case("device cuda without CUDA", "device", append="device = 'cuda'\n"),
    Case(
        "scheduler_kwargs unknown key",
        "T_maxx",
        append="scheduler = 'cosine'\nscheduler_kwargs = {'T_maxx': 3}\n",
    ),
    Case(
        "criterion_kwargs unknown key",
        "gamma_",
        append="criterion = 'focal'\ncriterion_kwargs = {'gamma_': 2}\n",
    ),
]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _zip(path: Path, members: dict[str, str]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)


def _escaping_zip_and_truth(ws: Path) -> None:
    """A submission zip with a member outside its folder, and a one-label ground truth."""
    _zip(ws / "bad.zip", {"../evil": "x", ".zgroup": "{}"})
    label = ws / "data/truth.zarr/crop1/mito"
    label.mkdir(parents=True)
    _write(ws / "data/truth.zarr/.zgroup", '{"zarr_format": 2}')
    _write(ws / "data/truth.zarr/crop1/.zgroup", '{"zarr_format": 2}')
    zarray = (
        '{"zarr_format": 2, "shape": [4, 4, 4], "chunks": [4, 4, 4], "dtype": "|u1", '
        '"compressor": null, "fill_value": 0, "order": "C", "filters": null}'
    )
    _write(label / ".zarray", zarray)
    _write(label / ".zattrs", '{"voxel_size": [8, 8, 8], "translation": [0, 0, 0]}')


def _stale_datasplit(ws: Path) -> None:
    text = (ws / "datasplit.csv").read_text()
    (ws / "datasplit.csv").write_text(text.replace(",mito", "").replace("mito,", ""))


def _drop_raw_chunks(ws: Path) -> None:
    for level in (ws / RAW).iterdir():
        for child in level.iterdir() if level.is_dir() else ():
            if child.is_dir():
                shutil.rmtree(child)


def _corrupt_latest(ws: Path) -> None:
    (ws / "checkpoints/2d_unet_2.pth").write_bytes(b"not a checkpoint")


def _corrupt_all(ws: Path) -> None:
    for path in (ws / "checkpoints").glob("2d_unet_*.pth"):
        path.write_bytes(b"not a checkpoint")


def _float_raw_with_nan(ws: Path) -> None:
    import numpy as np
    import zarr

    for dataset in ("jrc_synth1", "jrc_synth2"):
        group = zarr.open_group(str(ws / f"data/{dataset}/{dataset}.zarr/recon-1/em"), mode="a")
        source = group["fibsem-uint8"]
        target = group.require_group("fibsem-float32")
        target.attrs.update(dict(source.attrs))
        for level in source:
            data = np.asarray(source[level][...], dtype=np.float32)
            data[..., : data.shape[-1] // 2] = np.nan
            target.create_array(level, data=data, chunks=source[level].chunks)


def _mixed_label_dtypes(ws: Path) -> None:
    import numpy as np
    import zarr

    for crop in (c for c in (ws / LABELS).iterdir() if c.is_dir()):
        group = zarr.open_group(str(crop / "mito"), mode="a")
        for level in list(group.array_keys()):
            array = group[level]
            data = np.asarray(array[...]).astype(np.uint64) * 7  # instance-like ids
            attrs = dict(array.attrs)
            del group[level]
            new = group.create_array(level, data=data, chunks=array.chunks)
            new.attrs.update(attrs)


def _truth_layout(ws: Path) -> None:
    """Ground truth laid out as the challenge's truth store: {dataset}.zarr/{crop}/{label}."""
    for crop in ("crop1", "crop2"):
        shutil.copytree(ws / LABELS / crop, ws / f"truth/jrc_synth1.zarr/{crop}")


def _checkpoints_parent_is_file(ws: Path) -> None:
    _write(ws / "blocked", "a file where a folder should be\n")


FILE_CASES = [
    Case(
        "fresh start over another run", "checkpoints", append="load_model = None\n", may_change=()
    ),
    Case("stale datasplit for other classes", "datasplit.csv", prepare=_stale_datasplit),
    Case(
        "datasplit names a missing dataset",
        "jrc_synth2",
        prepare=lambda ws: shutil.rmtree(ws / "data/jrc_synth2"),
    ),
    Case(
        "no data under search_path",
        "nowhere",
        append="search_path = 'nowhere/{dataset}/{dataset}.zarr/recon-1/{name}'\n"
        "datasplit_path = 'new.csv'\n",
    ),
    Case("raw chunks all missing", "fibsem-uint8", prepare=_drop_raw_chunks),
    Case(
        "NaN in a float raw",
        "fibsem-float32",
        outcome="warn",
        prepare=_float_raw_with_nan,
        append="raw_name = 'em/fibsem-float32'\ndatasplit_path = 'float.csv'\nload_model = None\n"
        "model_save_path = 'other/{model_name}_{epoch}.pth'\nlogs_save_path = 'other/tb'\n",
    ),
    Case(
        "learning rate 1e20 (NaN loss)",
        "non-finite",
        append="optimizer = 'sgd'\nlearning_rate = 1e20\niterations_per_epoch = 30\nepochs = 2\n"
        + FRESH,
    ),
    Case("optimizer changed on resume", "optimizer", append="optimizer = 'sgd'\n"),
    Case("mixed label dtypes", "", outcome="ok", prepare=_mixed_label_dtypes),
    Case("corrupt latest checkpoint", "2d_unet_2.pth", outcome="warn", prepare=_corrupt_latest),
    Case("every checkpoint corrupt", "checkpoints", prepare=_corrupt_all),
    Case(
        "datasplit made for another raw_name",
        "raw_name",
        outcome="warn",
        prepare=_float_raw_with_nan,
        append="raw_name = 'em/fibsem-float32'\n",
    ),
    Case(
        "checkpoint folder is a file",
        "blocked",
        prepare=_checkpoints_parent_is_file,
        append="model_save_path = 'blocked/{model_name}_{epoch}.pth'\nload_model = None\n",
    ),
    Case(
        "log folder is a file",
        "blocked",
        prepare=_checkpoints_parent_is_file,
        append="logs_save_path = 'blocked/tb'\nload_model = None\n"
        "model_save_path = 'other/{model_name}_{epoch}.pth'\n",
    ),
    Case(
        "predict --overwrite onto ground truth",
        LABELS.rsplit("/", 3)[0],
        (
            "predict",
            "config.py",
            "--output",
            "data/jrc_synth1/jrc_synth1.zarr/recon-1/labels/groundtruth",
            "--all",
            "--overwrite",
        ),
    ),
    Case(
        "predict --overwrite onto a {dataset}.zarr/{crop}/{label} truth",
        "truth/jrc_synth1.zarr/crop1",
        ("predict", "config.py", "--output", "truth", "--all", "--overwrite"),
        prepare=_truth_layout,
    ),
    Case(
        "predict into the dataset's store",
        "jrc_synth1.zarr",
        ("predict", "config.py", "--output", "data/jrc_synth1/jrc_synth1.zarr", "--all"),
    ),
    Case(
        "datasplit --overwrite onto a label .zattrs",
        ".zattrs",
        (
            "datasplit",
            "--search-path",
            "data/{dataset}/{dataset}.zarr/recon-1/{name}",
            "--classes",
            "nuc,mito",
            "--csv-path",
            f"{LABELS}/.zattrs",
            "--overwrite",
        ),
    ),
    Case(
        "datasplit --csv-path a folder",
        "data",
        (
            "datasplit",
            "--search-path",
            "data/{dataset}/{dataset}.zarr/recon-1/{name}",
            "--classes",
            "nuc,mito",
            "--csv-path",
            "data",
            "--overwrite",
        ),
    ),
    Case(
        "counts --csv --overwrite onto a .zattrs",
        ".zattrs",
        (
            "counts",
            "--search-path",
            "data/{dataset}/{dataset}.zarr/recon-1/{name}",
            "--classes",
            "nuc",
            "--csv",
            f"{RAW}/.zattrs",
            "--overwrite",
        ),
    ),
    Case(
        "evaluate --json --overwrite onto a .zattrs",
        ".zattrs",
        (
            "evaluate",
            "--predictions",
            "checkpoints",
            "--datasplit",
            "datasplit.csv",
            "--json",
            f"{RAW}/.zattrs",
            "--overwrite",
        ),
    ),
    Case(
        "predict without checkpoints",
        "checkpoint",
        ("predict", "config.py", "--checkpoint", "latest"),
        prepare=lambda ws: shutil.rmtree(ws / "checkpoints"),
    ),
    Case(
        "predict a missing .pth",
        "nothere.pth",
        ("predict", "config.py", "--checkpoint", "nothere.pth"),
    ),
    Case(
        "predict with another architecture",
        "model_kwargs",
        ("predict", "config.py"),
        append="model_kwargs = {'num_levels': 2, 'base_channels': 8}\n",
    ),
    Case(
        "process_func an unknown name",
        "process_func",
        ("process", "config.py"),
        append="process_func = 'blobs'\n",
    ),
    Case(
        "process without predictions",
        "predictions",
        ("process", "config.py"),
        append="process_func = lambda x: x > 0.5\n",
    ),
    Case(
        "evaluate without predictions",
        "nowhere",
        ("evaluate", "--predictions", "nowhere", "--datasplit", "datasplit.csv"),
    ),
    Case("synth into existing data", "jrc_synth1", tuple(SYNTH)),
    # The challenge workflow: test crops, packing, checking and scoring a submission.
    Case("predict test crops without their raw", "jrc_ctl-id8-1", ("predict", "config.py", *TEST)),
    Case(
        "test crop manifest missing",
        "nothere.csv",
        ("predict", "config.py", *TEST, "--test-crop-manifest", "nothere.csv"),
    ),
    Case(
        "test crop manifest without a column",
        "shape",
        ("process", "config.py", *TEST, "--test-crop-manifest", "m.csv"),
        prepare=lambda ws: _write(ws / "m.csv", "crop_name,dataset,class_label\n1,a,mito\n"),
    ),
    Case(
        "pack-results onto someone's zip",
        "sub.zip",
        ("pack-results", "-o", "sub.zarr", "--overwrite"),
        prepare=lambda ws: _write(ws / "sub.zip", "my own notes\n"),
    ),
    Case("pack-results without processed labels", "data/processed", ("pack-results",)),
    Case(
        "check-submission of a zip escaping its folder",
        "outside",
        ("check-submission", "bad.zip"),
        prepare=lambda ws: _zip(ws / "bad.zip", {"../evil": "x", ".zgroup": "{}"}),
    ),
    Case(
        "evaluate -s of a zip escaping its folder",
        "bad.zip",
        ("evaluate", "-s", "bad.zip", "-t", "data/truth.zarr"),
        prepare=_escaping_zip_and_truth,
    ),
    Case(
        "evaluate -s without ground truth",
        "ground_truth.zarr",
        ("evaluate", "-s", "bad.zip"),
        prepare=lambda ws: _zip(ws / "bad.zip", {".zgroup": "{}"}),
    ),
    Case(
        "evaluate -r --overwrite onto someone's file",
        "result.json",
        ("evaluate", "-s", "sub.zip", "-r", "result.json", "--overwrite"),
        prepare=lambda ws: _write(ws / "result.json", '{"mine": true}\n'),
    ),
]


def make_workspace(folder: Path) -> None:
    """Synthetic data, the config, and two finished epochs of training in `folder`."""
    _write(folder / "config.py", BASE_CONFIG)
    for args in (SYNTH, ["train", "config.py", "epochs=2"]):
        done = run_csc(folder, args)
        if done.returncode != 0:
            raise SystemExit(
                f"preparing the workspace failed: csc {' '.join(args)}\n"
                f"{done.stdout}\n{done.stderr}"
            )


def relocate(csv_path: Path, old: Path, new: Path) -> None:
    """Point a copied workspace's datasplit (absolute roots) at the copy's own data."""
    csv_path.write_text(csv_path.read_text().replace(str(old), str(new)))


def run_csc(folder: Path, args: list[str] | tuple[str, ...]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "csc", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIME_LIMIT_S,
    )


def classify(case: Case, folder: Path) -> tuple[str, str]:
    """Run `case` in `folder` (a workspace copy): its outcome and the message's first line."""
    if case.prepare is not None:
        case.prepare(folder)
    if case.append:
        with open(folder / "config.py", "a") as file:
            file.write("\n" + case.append)
    before = snapshot(folder)
    try:
        done = run_csc(folder, case.args)
    except subprocess.TimeoutExpired:
        return "hang", f"over {TIME_LIMIT_S} s"
    after = snapshot(folder)
    # A file is kept where it was, or moved aside whole (as csc moves an old run or a damaged
    # checkpoint): its bytes under a path that is new. Otherwise it is lost or overwritten.
    moved = {sha for name, sha in after.items() if name not in before}
    lost = [
        n
        for n in before
        if after.get(n) != before[n] and before[n] not in moved and n not in case.may_change
    ]
    if lost:
        return "data loss", f"{len(lost)} files changed or lost, e.g. {lost[0]}"
    said = _first_message(done.stderr) or _first_message(done.stdout)
    if _internal_traceback(done.stdout + done.stderr, folder):
        return "traceback", said
    # What csc told the user: click's "Error:" line, warnings, a failing rank's line.
    told = " ".join(
        line for line in done.stderr.splitlines() if line.startswith(("Error:", "warning:", "csc:"))
    )
    if case.outcome == "ok":
        return ("clear" if done.returncode == 0 else "unclear"), said or "ran"
    if case.outcome == "warn" and done.returncode == 0:
        if "warning:" in told:
            return ("clear" if case.expect in told else "unclear"), said
        return "silent", said or "exit 0"
    if done.returncode == 0:
        return "silent", said or "exit 0"
    return ("clear" if case.expect in told else "unclear"), said


def _internal_traceback(output: str, folder: Path) -> bool:
    """A traceback with frames outside the user's own files (a config's own error shows the
    frames of the config file only, which is the message csc means to give)."""
    if "Traceback (most recent call last)" not in output:
        return False
    frames = re.findall(r'File "([^"]+)"', output)
    return any(not frame.startswith(str(folder)) for frame in frames)


def _first_message(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("epoch")]
    interesting = [line for line in lines if "rror" in line or "warning" in line.lower()]
    return (interesting or lines or [""])[0][:160]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="Comma list of case names to run.")
    args = parser.parse_args()
    cases = CONFIG_CASES + FILE_CASES
    if args.only:
        wanted = {name.strip() for name in args.only.split(",")}
        cases = [case for case in cases if case.name in wanted]
    counts: collections.Counter[str] = collections.Counter()
    with tempfile.TemporaryDirectory(prefix="csc-fault-audit-") as temporary:
        template = Path(temporary) / "template"
        make_workspace(template)
        for index, case in enumerate(cases):
            folder = Path(temporary) / f"case{index}"
            shutil.copytree(template, folder)
            relocate(folder / "datasplit.csv", template, folder)
            outcome, said = classify(case, folder)
            counts[outcome] += 1
            print(f"{outcome:<10} {case.name:<45} {said}", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    print(f"\n{len(cases)} cases: " + ", ".join(f"{n} {k}" for k, n in counts.most_common()))


if __name__ == "__main__":
    main()
