"""`csc visualize`: raw, ground truth, predictions and processed labels of chosen datasets,
crops and classes as a neuroglancer viewer state, one per dataset (each its own space).

Every layer's source is an OME-NGFF multiscale group, which neuroglancer places itself from
its scales and translations (nm, voxel centres, as csc reads them); the state adds the global
`dimensions` (the finest voxel size among its layers, nm) and the position (the first chosen
crop's centre in those units). `viewer_state` builds the state as a plain dict; the hosted
neuroglancer reads it from a URL, the local viewer (`open_viewer`) takes the same dict.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import urllib.parse
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from csc.config import TrainConfig, s3_search_path
from csc.datasplit import (
    CrawlOptions,
    DatasplitRow,
    crawl,
    crop_matches,
    read_datasplit,
    s3_options,
)
from csc.storage import (
    AXES,
    FINEST,
    FolderServer,
    Level,
    MetadataReader,
    S3Options,
    Vec3,
    fs_path,
    is_s3,
    split_store_path,
    write_text_atomic,
)

if TYPE_CHECKING:
    import neuroglancer

NEUROGLANCER_URL = "https://neuroglancer-demo.appspot.com"
ZARR = "zarr://"  # neuroglancer's zarr data source (v2 and v3, read from the metadata)
GROUP_FILES = (".zattrs", "zarr.json")  # a zarr v2 group's attributes, a v3 group's metadata
KINDS = ("raw", "gt", "prediction", "processed")
SEGMENTATION_KINDS = ("gt", "processed")  # ids or 0/1: segmentation layers
# What neuroglancer's zarr source reads (no float16, float64 or bool).
VIEWABLE_DTYPES = frozenset(
    {"uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32"}
)
COLOURS = ("#ff00ff", "#00ffff", "#ffff00", "#ff8000", "#00ff00", "#ff0000", "#0080ff")
# A probability layer: uint8 round(p * 255) or float32 p, shown as p in [0, 1] (toNormalized
# divides uint8 by 255 and keeps a float) in the class's colour, transparent where p = 0.
PROBABILITY_SHADER = """#uicontrol vec3 colour color(default="{colour}")
void main() {{
  float p = clamp(toNormalized(getDataValue()), 0.0, 1.0);
  emitRGBA(vec4(colour, p));
}}
"""


class VisualizeWarning(UserWarning):
    """A chosen layer that neuroglancer cannot show, left out."""


@dataclasses.dataclass(frozen=True)
class Places:
    """Where csc looks: the ground truth through a datasplit CSV (when it exists) or a crawl of
    `search_path`; the raw through the CSV or `search_path`; predictions and processed labels
    in csc predict's layout, {folder}/{dataset}.zarr/{crop}/{class}."""

    search_path: str = TrainConfig.search_path  # {dataset}, {name}; local or an S3 URL
    raw_name: str = TrainConfig.raw_name
    crop_name: str = TrainConfig.crop_name
    datasplit: str | None = None
    predictions: str | None = None
    processed: str | None = None
    # Kinds ("prediction", "processed") whose folder is skipped where missing (a config's).
    optional: tuple[str, ...] = ()
    s3: S3Options = dataclasses.field(default_factory=S3Options)


@dataclasses.dataclass(frozen=True)
class Selection:
    """What to show: dataset and crop names or globs (empty: all), and classes."""

    datasets: tuple[str, ...] = ()
    crops: tuple[str, ...] = ()  # crop or dataset/crop; the first match is centred
    classes: tuple[str, ...] = TrainConfig.classes


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer: its kind (KINDS), multiscale group and finest level (shape filled in)."""

    name: str
    kind: str
    location: str  # the multiscale group: a local path or an S3 URL
    level: Level  # s0: nm per voxel and centre of voxel 0, (z, y, x)
    dtype: str
    crop: str | None = None  # None: raw
    class_name: str | None = None
    colour: str | None = None  # the class's colour


@dataclasses.dataclass(frozen=True)
class DatasetView:
    """The layers of one dataset, where the view is centred and the viewer's voxel units."""

    dataset: str
    layers: tuple[Layer, ...]
    centre: Vec3  # nm (z, y, x): the first chosen crop's centre (else the raw's)

    @property
    def voxel_size(self) -> Vec3:
        """The finest s0 voxel size over the layers, per axis (nm): the viewer's units."""
        z, y, x = (min(layer.level.scale[a] for layer in self.layers) for a in range(3))
        return (z, y, x)


@dataclasses.dataclass(frozen=True)
class _Crop:
    dataset: str
    crop: str
    row: DatasplitRow | None  # its ground truth, if any


def places_from_config(config: TrainConfig) -> Places:
    """A config's places: search_path (in s3_bucket with use_s3), datasplit_path, and its
    predictions_path and processed_path (skipped where missing)."""
    names = {"model_name": config.model_name}
    search_path = config.search_path
    if config.use_s3:
        search_path = s3_search_path(search_path, config.s3_bucket)
    return Places(
        search_path=search_path,
        raw_name=config.raw_name,
        crop_name=config.crop_name,
        datasplit=config.datasplit_path,
        predictions=config.predictions_path.format(**names),
        processed=config.processed_path.format(**names),
        optional=("prediction", "processed"),
        s3=s3_options(config),
    )


# --- Finding the layers ----------------------------------------------------------------------


def find_views(places: Places, selection: Selection) -> list[DatasetView]:
    """The chosen layers, one view per dataset; every name that matches nothing, and a dataset
    without raw, is an error naming it and where csc looked, before any voxel is read."""
    outputs = _outputs(places)
    crops = _chosen_crops(_ground_truth(places, selection), outputs, places, selection)
    datasets = _chosen_datasets(crops, places, selection)
    reader = _Readers(places.s3)
    views = [
        _view(
            dataset, [c for c in crops if c.dataset == dataset], outputs, places, selection, reader
        )
        for dataset in datasets
    ]
    shown = {layer.class_name for view in views for layer in view.layers}
    missing = [c for c in selection.classes if c not in shown]
    if missing and crops:
        raise ValueError(
            f"--classes {','.join(missing)}: in no chosen crop ({_crop_names(crops)}); csc looked "
            f"in {_where(places)}"
        )
    return views


def _ground_truth(places: Places, selection: Selection) -> list[DatasplitRow]:
    """The ground-truth crops: the datasplit CSV's rows if it exists, else a crawl."""
    if places.datasplit and Path(places.datasplit).is_file():
        return read_datasplit(places.datasplit)
    options = CrawlOptions(
        search_path=places.search_path,
        raw_name=places.raw_name,
        crop_name=places.crop_name,
        classes=selection.classes,
        datasets=selection.datasets,
        endpoint_url=places.s3.endpoint_url,
        s3_timeout_s=places.s3.timeout_s,
        s3_retry_budget_s=places.s3.retry_budget_s,
    )
    try:
        return crawl(options).crops
    except FileNotFoundError:
        return []  # no data folder: the raw lookup names where csc looked


def _outputs(places: Places) -> dict[str, dict[tuple[str, str], Path]]:
    """Per kind (prediction, processed), each crop's group in that folder."""
    from csc.processing import find_predictions  # numpy, scipy: not for `csc --help`

    found: dict[str, dict[tuple[str, str], Path]] = {}
    for kind, folder in (("prediction", places.predictions), ("processed", places.processed)):
        if folder is None or (kind in places.optional and not Path(folder).is_dir()):
            continue
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--{_option(kind)} {folder}: no such folder")
        try:
            crops = find_predictions(folder)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"--{_option(kind)}: {error}") from None
        found[kind] = {(c.dataset, c.crop): c.path for c in crops}
    return found


def _option(kind: str) -> str:
    return "predictions" if kind == "prediction" else kind


def _chosen_crops(
    rows: Sequence[DatasplitRow],
    outputs: dict[str, dict[tuple[str, str], Path]],
    places: Places,
    selection: Selection,
) -> list[_Crop]:
    """The crops with ground truth or outputs that the selection names, in the order of
    `selection.crops` (then natural order); a pattern that matches none is an error."""
    by_key = {(row.dataset, row.crop): _Crop(row.dataset, row.crop, row) for row in rows}
    for crops in outputs.values():
        for dataset, crop in crops:
            by_key.setdefault((dataset, crop), _Crop(dataset, crop, None))
    known = [by_key[key] for key in sorted(by_key, key=_natural)]
    known = [c for c in known if _matches(c.dataset, selection.datasets)]
    if not selection.crops:
        return known
    chosen: dict[tuple[str, str], _Crop] = {}
    for pattern in selection.crops:
        matched = [c for c in known if crop_matches(c.dataset, c.crop, [pattern])]
        if not matched:
            raise ValueError(
                f"--crops {pattern} matches no crop{_of_datasets(selection)}; csc looked in "
                f"{_where(places)}. Crops there: {_crop_names(known) or 'none'}"
            )
        chosen.update({(c.dataset, c.crop): c for c in matched})
    return list(chosen.values())


def _chosen_datasets(crops: Sequence[_Crop], places: Places, selection: Selection) -> list[str]:
    """The chosen crops' datasets, then each plain dataset name given that has none."""
    datasets = list(dict.fromkeys(c.dataset for c in crops))
    for name in selection.datasets:
        if not _is_glob(name) and name not in datasets and not selection.crops:
            datasets.append(name)  # its raw alone; the raw lookup says if it is missing
    if not datasets:
        what = f" of dataset {','.join(selection.datasets)}" if selection.datasets else ""
        raise ValueError(
            f"no crop{what} with classes {','.join(selection.classes)} found; csc looked in "
            f"{_where(places)}"
        )
    return datasets


def _view(
    dataset: str,
    crops: Sequence[_Crop],
    outputs: dict[str, dict[tuple[str, str], Path]],
    places: Places,
    selection: Selection,
    reader: _Readers,
) -> DatasetView:
    raw = _raw_layer(dataset, crops, places, reader)
    layers: list[Layer] = []
    for crop in crops:
        layers += _crop_layers(crop, outputs, selection, reader)
    first = [layer for layer in layers if crops and layer.crop == crops[0].crop]
    return DatasetView(dataset, (raw, *layers), _centre(first or [raw]))


def _raw_layer(dataset: str, crops: Sequence[_Crop], places: Places, reader: _Readers) -> Layer:
    """The dataset's raw: its crops' raw in the datasplit CSV, else search_path's."""
    rows = [c.row for c in crops if c.row is not None]
    if rows:
        location = f"{rows[0].raw_root}/{rows[0].raw_path}"
    else:
        location = places.search_path.replace("{dataset}", dataset)
        location = location.replace("{name}", places.raw_name)
    layer = _layer("raw", "raw", location, reader)
    if layer is None:
        raise FileNotFoundError(
            f"no raw of dataset {dataset}: no OME-NGFF group at {location} (csc looked in "
            f"{_where(places)}); set --search-path (or the config's search_path) to the data"
        )
    return layer


def _crop_layers(
    crop: _Crop,
    outputs: dict[str, dict[tuple[str, str], Path]],
    selection: Selection,
    reader: _Readers,
) -> list[Layer]:
    """Each chosen class of the crop, per kind where it is: gt, prediction, processed."""
    layers = []
    for number, name in enumerate(selection.classes):
        colour = COLOURS[number % len(COLOURS)]
        groups: dict[str, str] = {}
        if crop.row is not None:
            groups["gt"] = f"{crop.row.gt_root}/{crop.row.gt_path}/{name}"
        for kind, crops in outputs.items():
            if (crop.dataset, crop.crop) in crops:
                groups[kind] = str(crops[crop.dataset, crop.crop] / name)
        for kind, group in groups.items():
            layer = _layer(f"{crop.crop}/{name} ({kind})", kind, group, reader)
            if layer is not None:
                layer = dataclasses.replace(layer, crop=crop.crop, class_name=name, colour=colour)
            if layer is not None and _viewable(layer):
                layers.append(layer)
    return layers


def _layer(name: str, kind: str, group: str, reader: _Readers) -> Layer | None:
    """The layer of a multiscale group, or None where there is no group (no .zattrs, nor a
    zarr v3 zarr.json); a group there whose metadata csc cannot read is an error."""
    metadata = reader.of(group)
    if not any(_exists(metadata, f"{group}/{file}") for file in GROUP_FILES):
        return None
    source = metadata.source(group, FINEST, label=False)  # the finest level, with its shape
    assert source.dtype is not None
    return Layer(name, kind, group, source.level, source.dtype)


def _exists(metadata: MetadataReader, path: str) -> bool:
    """Whether the JSON file `path` exists (read once, cached for `source`)."""
    try:
        metadata.json(path)
    except FileNotFoundError:
        return False
    return True


def _viewable(layer: Layer) -> bool:
    if layer.dtype in VIEWABLE_DTYPES:
        return True
    hint = (
        " (csc predict --encoding uint8 writes one it reads)" if layer.kind == "prediction" else ""
    )
    warnings.warn(
        f"{layer.name} left out: neuroglancer cannot read {layer.dtype} arrays "
        f"({layer.location}){hint}",
        VisualizeWarning,
        stacklevel=2,
    )
    return False


def _centre(layers: Sequence[Layer]) -> Vec3:
    """The centre (nm) of the union of the layers' extents."""
    bounds = [layer.level.bounds() for layer in layers]
    z, y, x = (
        float((min(lo[a] for lo, _ in bounds) + max(hi[a] for _, hi in bounds)) / 2)
        for a in range(3)
    )
    return (z, y, x)


class _Readers:
    """One MetadataReader per kind of location (S3, local disk): the raw may be on S3 and
    the predictions local."""

    def __init__(self, s3: S3Options) -> None:
        self.s3 = s3
        self._readers: dict[bool, MetadataReader] = {}

    def of(self, location: str) -> MetadataReader:
        remote = is_s3(location)
        if remote not in self._readers:
            self._readers[remote] = MetadataReader(location, s3=self.s3)
        return self._readers[remote]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _is_glob(name: str) -> bool:
    return any(char in name for char in "*?[")


def _natural(key: tuple[str, str]) -> tuple[Any, ...]:
    dataset, crop = key
    return (dataset, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", crop)])


def _crop_names(crops: Iterable[_Crop]) -> str:
    names = [f"{c.dataset}/{c.crop}" for c in crops]
    return ", ".join(names[:20]) + (f" (and {len(names) - 20} more)" if len(names) > 20 else "")


def _of_datasets(selection: Selection) -> str:
    return f" of dataset {','.join(selection.datasets)}" if selection.datasets else ""


def _where(places: Places) -> str:
    """Every place csc looked, for error messages."""
    csv = places.datasplit if places.datasplit and Path(places.datasplit).is_file() else None
    where = [f"the datasplit {csv}" if csv else f"search path {places.search_path}"]
    where += [f"predictions {places.predictions}"] if places.predictions else []
    where += [f"processed {places.processed}"] if places.processed else []
    return ", ".join(where)


# --- The viewer state ------------------------------------------------------------------------


def viewer_state(view: DatasetView, *, source_url: Callable[[str], str]) -> dict[str, Any]:
    """The neuroglancer state of a view as a plain dict: `dimensions` in nm, the position
    (the view's centre in those units), and a layer per `Layer` whose source is
    `source_url(location)`."""
    voxel_size = view.voxel_size
    return {
        "dimensions": {axis: [s / 1e9, "m"] for axis, s in zip(AXES, voxel_size, strict=True)},
        "position": [c / s for c, s in zip(view.centre, voxel_size, strict=True)],
        "layers": [_layer_state(layer, source_url(layer.location)) for layer in view.layers],
        "selectedLayer": {"layer": view.layers[0].name, "visible": True},
        "layout": "4panel",
    }


def _layer_state(layer: Layer, source: str) -> dict[str, Any]:
    state: dict[str, Any] = {"name": layer.name, "source": source}
    if layer.kind in SEGMENTATION_KINDS:
        state["type"] = "segmentation"
        if layer.kind == "gt":  # 0/1 masks: the class's colour; instance ids keep theirs
            state["segmentDefaultColor"] = layer.colour
    else:
        state["type"] = "image"
        if layer.kind == "prediction":
            state["shader"] = PROBABILITY_SHADER.format(colour=layer.colour)
    return state


def source_url(location: str, *, server: FolderServer, endpoint_url: str | None = None) -> str:
    """A group's neuroglancer source: an S3 URL as neuroglancer reads public S3, or through
    `endpoint_url` (path style); a local path through the folder server."""
    if is_s3(location):
        url = f"{endpoint_url.rstrip('/')}/{fs_path(location)}" if endpoint_url else location
        return ZARR + url
    return ZARR + server.url(location)


def mount_folders(views: Sequence[DatasetView], server: FolderServer) -> None:
    """Mount each local store the views read (the folder ending in .zarr) on the server:
    data/NAME.zarr for raw and ground truth, predictions/... and processed/... for outputs."""
    for view in views:
        for layer in view.layers:
            if is_s3(layer.location):
                continue
            root, _ = split_store_path(layer.location)
            kind = "data" if layer.kind in ("raw", "gt") else _option(layer.kind)
            server.mount(root, f"{kind}/{os.path.basename(root)}")


def state_url(state: dict[str, Any], *, base: str = NEUROGLANCER_URL) -> str:
    """A hosted neuroglancer's URL that opens `state`."""
    text = json.dumps(state, separators=(",", ":"))
    return f"{base.rstrip('/')}/#!{urllib.parse.quote(text, safe='')}"


def open_viewer(state: dict[str, Any], *, bind_port: int = 0) -> neuroglancer.Viewer:
    """A local neuroglancer viewer (the `neuroglancer` package, extra `viz`) showing `state`,
    its server on 127.0.0.1 (`bind_port` 0: any free port)."""
    try:
        import neuroglancer
    except ImportError:
        raise ImportError(
            "csc visualize --viewer needs the neuroglancer package: pip install 'csc[viz]' "
            "(or leave out --viewer to print a URL for the hosted neuroglancer)"
        ) from None
    neuroglancer.set_server_bind_address("127.0.0.1", bind_port)
    viewer = neuroglancer.Viewer()
    viewer.set_state(neuroglancer.ViewerState(state))
    return viewer


# --- Showing the views -----------------------------------------------------------------------

STATE_KEYS = frozenset({"dimensions", "position", "layers"})  # what marks a state csc wrote


def json_paths(views: Sequence[DatasetView], path: str) -> list[Path]:
    """Where --json writes each view's state: `path`, or with several datasets `path` with
    {dataset} filled in (an error without it)."""
    if len(views) > 1 and "{dataset}" not in path:
        names = ", ".join(view.dataset for view in views)
        raise ValueError(
            f"--json {path}: {len(views)} datasets chosen ({names}), and a state shows one "
            "dataset's space; choose one with --datasets, or put {dataset} in the path"
        )
    return [Path(path.replace("{dataset}", view.dataset)) for view in views]


def write_states(
    views: Sequence[DatasetView],
    path: str,
    *,
    server: FolderServer,
    endpoint_url: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write each view's state as JSON (sources through `server`'s URLs, which need not be
    running yet); an existing file is replaced only with `overwrite` and only if it is a
    viewer state."""
    from csc.storage import check_json_path

    targets = json_paths(views, path)
    for target in targets:
        check_json_path(target, overwrite=overwrite, is_ours=_is_state, kind="a viewer state")
    mount_folders(views, server)
    for view, target in zip(views, targets, strict=True):
        state = viewer_state(view, source_url=_sources(server, endpoint_url))
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, json.dumps(state, indent=2) + "\n")
    return targets


def _is_state(value: Any) -> bool:
    return isinstance(value, dict) and value.keys() >= STATE_KEYS


def _sources(server: FolderServer, endpoint_url: str | None) -> Callable[[str], str]:
    return lambda location: source_url(location, server=server, endpoint_url=endpoint_url)


def show(
    views: Sequence[DatasetView],
    *,
    server: FolderServer,
    endpoint_url: str | None = None,
    viewer: bool = False,
    base: str = NEUROGLANCER_URL,
    echo: Callable[[str], None] = print,
    wait: Callable[[], None] | None = None,
) -> None:
    """Serve the views' local stores on `server` and print, per dataset, a URL of the hosted
    neuroglancer (`base`), or with `viewer` of a local neuroglancer viewer; then `wait`
    (default: until Ctrl-C) and stop serving."""
    mount_folders(views, server)
    with server:
        viewers = []
        for view in views:
            state = viewer_state(view, source_url=_sources(server, endpoint_url))
            if viewer:
                viewers.append(open_viewer(state))
                url = viewers[-1].get_viewer_url()
            else:
                url = state_url(state, base=base)
            echo(f"{view.dataset}: {url}")
        if server.prefixes:
            echo(f"serving {', '.join(server.prefixes.values())} on {server.origin}")
        echo("press Ctrl-C to stop")
        try:
            (wait or _until_interrupted)()
        finally:
            if viewers:
                import neuroglancer

                neuroglancer.stop()


def _until_interrupted() -> None:
    import time

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return
