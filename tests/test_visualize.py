"""`csc visualize`: the neuroglancer state of a synthetic dataset (layers, their kinds, sources
and names; `dimensions` and position against the geometry on disk), the loopback server that
serves its sources with CORS headers, the local viewer built from the same state, the CLI with
--json, and each missing name as an error naming where csc looked."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from csc.cli import cli
from csc.storage import (
    DEFAULT_PORT,
    FolderServer,
    image_label_attrs,
    multiscales_attrs,
    open_group,
    write_array,
)
from csc.visualize import (
    DatasetView,
    Places,
    Selection,
    VisualizeWarning,
    find_views,
    mount_folders,
    open_viewer,
    show,
    source_url,
    state_url,
    viewer_state,
    write_states,
)

DATASET = "jrc_synth1"
TEMPLATE = "{dataset}/{dataset}.zarr/recon-1/{name}"
GT = "recon-1/labels/groundtruth"


def zattrs(group: Path) -> dict[str, Any]:
    return json.loads((group / ".zattrs").read_text())


def s0_geometry(group: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale and translation (nm) and shape of a multiscale group's s0, read from its files."""
    level = zattrs(group)["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    shape = json.loads((group / "s0" / ".zarray").read_text())["shape"]
    return np.array(level[0]["scale"]), np.array(level[1]["translation"]), np.array(shape)


def crop_with_classes(data: Path) -> tuple[str, list[str]]:
    """A crop of DATASET and the classes annotated in it (synth leaves some out)."""
    root = data / DATASET / f"{DATASET}.zarr" / GT
    crop = sorted(p for p in root.iterdir() if p.is_dir())[0]
    return crop.name, sorted(p.name for p in crop.iterdir() if (p / ".zattrs").is_file())


def write_output(root: Path, crop: str, name: str, gt_group: Path, *, dtype: str) -> None:
    """A prediction (uint8 p*255, or float16) or processed ids (uint32) of the crop's extent
    at 8 nm, written as csc predict and process write them."""
    scale, translation, shape = s0_geometry(gt_group)
    out_scale = scale * 2
    out_translation = translation - scale / 2 + out_scale / 2  # same box, 8 nm voxel centres
    group = open_group(str(root / f"{DATASET}.zarr" / crop / name), mode="w")
    group.attrs.update(multiscales_attrs(name, [(out_scale.tolist(), out_translation.tolist())]))
    if dtype == "uint32":
        group.attrs.update(image_label_attrs())
    values = np.zeros(tuple(int(n) for n in shape // 2), dtype=dtype)
    values[1:3, 2:6, 2:6] = 200 if dtype != "float16" else 0.8
    write_array(group, "s0", values, chunks=values.shape, compressor="zstd")


@pytest.fixture(scope="module")
def outputs(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Predictions and processed labels of the first crop's classes, beside tiny_synth."""
    root = tmp_path_factory.mktemp("outputs")
    crop, classes = crop_with_classes(tiny_synth)
    for name in classes:
        gt_group = tiny_synth / DATASET / f"{DATASET}.zarr" / GT / crop / name
        write_output(root / "predictions", crop, name, gt_group, dtype="uint8")
        write_output(root / "processed", crop, name, gt_group, dtype="uint32")
    return {"root": root, "crop": crop, "classes": classes}


def places(data: Path, outputs: dict[str, Any] | None = None) -> Places:
    root = outputs["root"] if outputs else None
    return Places(
        search_path=str(data / TEMPLATE),
        predictions=str(root / "predictions") if root else None,
        processed=str(root / "processed") if root else None,
    )


def one_view(data: Path, outputs: dict[str, Any]) -> DatasetView:
    selection = Selection(crops=(outputs["crop"],), classes=tuple(outputs["classes"]))
    (view,) = find_views(places(data, outputs), selection)
    return view


def test_state_has_raw_ground_truth_prediction_and_processed_layers(
    tiny_synth: Path, outputs: dict[str, Any]
) -> None:
    crop, classes = outputs["crop"], outputs["classes"]
    server = FolderServer(port=9999)
    view = one_view(tiny_synth, outputs)
    mount_folders([view], server)
    state = viewer_state(view, source_url=lambda p: source_url(p, server=server))
    layers = {layer["name"]: layer for layer in state["layers"]}
    store = f"zarr://http://127.0.0.1:9999/data/{DATASET}.zarr"
    assert layers["raw"] == {
        "name": "raw",
        "type": "image",
        "source": f"{store}/recon-1/em/fibsem-uint8",
    }
    expected = ["raw"]
    for name in classes:
        gt, prediction, processed = (
            f"{crop}/{name} ({k})" for k in ("gt", "prediction", "processed")
        )
        expected += [gt, prediction, processed]
        assert layers[gt]["type"] == "segmentation"
        assert layers[gt]["source"] == f"{store}/{GT}/{crop}/{name}"
        assert layers[gt]["segmentDefaultColor"].startswith("#")
        assert layers[prediction]["type"] == "image"
        assert layers[prediction]["source"] == (
            f"zarr://http://127.0.0.1:9999/predictions/{DATASET}.zarr/{crop}/{name}"
        )
        assert "toNormalized(getDataValue())" in layers[prediction]["shader"]
        assert layers[processed]["type"] == "segmentation"
        assert layers[processed]["source"] == (
            f"zarr://http://127.0.0.1:9999/processed/{DATASET}.zarr/{crop}/{name}"
        )
    assert sorted(layers) == sorted(expected)
    assert state["selectedLayer"]["layer"] == "raw"


def test_dimensions_and_position_are_the_geometry_on_disk(
    tiny_synth: Path, outputs: dict[str, Any]
) -> None:
    """`dimensions`: the finest s0 voxel size (the ground truth's 4 nm, finer than the raw's
    8 nm), in metres; position: the crop's centre (nm, from its files) in those units."""
    crop, classes = outputs["crop"], outputs["classes"]
    store = tiny_synth / DATASET / f"{DATASET}.zarr"
    raw_scale, _, _ = s0_geometry(store / "recon-1/em/fibsem-uint8")
    scale, translation, shape = s0_geometry(store / GT / crop / classes[0])
    assert (scale < raw_scale).all()
    low, high = translation - scale / 2, translation + (shape - 0.5) * scale  # voxel edges, nm
    view = one_view(tiny_synth, outputs)
    state = viewer_state(view, source_url=lambda p: p)
    assert state["dimensions"] == {
        axis: [s * 1e-9, "m"] for axis, s in zip("zyx", scale, strict=True)
    }
    np.testing.assert_allclose(np.array(state["position"]) * scale, (low + high) / 2)
    by_name = {layer.name: layer for layer in view.layers}
    assert by_name["raw"].level.scale == tuple(raw_scale)
    prediction = by_name[f"{crop}/{classes[0]} (prediction)"].level
    np.testing.assert_allclose(prediction.scale, scale * 2)
    np.testing.assert_allclose(np.array(prediction.translation) - prediction.scale[0] / 2, low)


def fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), b""


def test_the_server_serves_every_source_with_cors_headers(
    tiny_synth: Path, outputs: dict[str, Any]
) -> None:
    view = one_view(tiny_synth, outputs)
    lines: list[str] = []

    def check_while_serving() -> None:
        url = lines[0].split(": ", 1)[1]
        state = json.loads(urllib.parse.unquote(url.split("#!", 1)[1]))
        for layer, shown in zip(state["layers"], view.layers, strict=True):
            http = layer["source"].removeprefix("zarr://")
            status, headers, body = fetch(f"{http}/.zattrs")
            assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
            assert json.loads(body) == zattrs(Path(shown.location))
        root = state["layers"][0]["source"].removeprefix("zarr://")
        assert fetch(f"{root}/s0/.zarray")[0] == 200
        missing = fetch(f"{root}/s0/99/99/99")  # an absent chunk: 404, which reads as fill
        assert missing[0] == 404 and missing[1]["Access-Control-Allow-Origin"] == "*"
        origin = root.split("/data/")[0]
        assert fetch(f"{origin}/data/{DATASET}.zarr/../../etc/passwd")[0] == 404
        assert fetch(f"{origin}/data/{DATASET}.zarr/recon-1")[0] == 404  # no listings
        status, headers, _ = fetch(f"{root}/.zattrs", method="OPTIONS")
        assert status == 204 and headers["Access-Control-Allow-Private-Network"] == "true"

    show([view], server=FolderServer(port=0), echo=lines.append, wait=check_while_serving)
    assert lines[0].startswith(f"{DATASET}: https://neuroglancer-demo.appspot.com/#!")
    assert lines[-1] == "press Ctrl-C to stop"


def test_a_port_in_use_is_an_error_naming_it() -> None:
    with FolderServer(port=0) as first:
        match = f"cannot serve on 127.0.0.1:{first.port} .*pass another --port"
        with pytest.raises(OSError, match=match):
            FolderServer(port=first.port).start()


def test_a_url_holds_the_state_and_s3_sources_are_read_by_the_browser() -> None:
    state = {"dimensions": {"z": [4e-9, "m"]}, "layers": [{"name": "a b/c (gt)"}]}
    url = state_url(state, base="https://ng.example/")
    assert url.startswith("https://ng.example/#!%7B")
    assert json.loads(urllib.parse.unquote(url.split("#!", 1)[1])) == state
    server = FolderServer()
    key = "janelia-cosem-datasets/jrc_x/jrc_x.zarr/recon-1/em/fibsem-uint8"
    assert source_url(f"s3://{key}", server=server) == f"zarr://s3://{key}"
    assert source_url(f"s3://{key}", server=server, endpoint_url="http://127.0.0.1:9/") == (
        f"zarr://http://127.0.0.1:9/{key}"
    )


def test_s3_data_is_found_and_named_through_the_endpoint(
    s3_env: str, s3_synth: str, outputs: dict[str, Any]
) -> None:
    """Raw and ground truth on S3 (sources through the endpoint), predictions local."""
    search_path = f"s3://{s3_synth}-public/{TEMPLATE}"
    chosen = Places(search_path=search_path, predictions=str(outputs["root"] / "predictions"))
    selection = Selection(crops=(outputs["crop"],), classes=tuple(outputs["classes"]))
    (view,) = find_views(chosen, selection)
    assert [layer.kind for layer in view.layers] == ["raw"] + ["gt", "prediction"] * len(
        outputs["classes"]
    )
    server = FolderServer()
    mount_folders([view], server)
    state = viewer_state(
        view, source_url=lambda p: source_url(p, server=server, endpoint_url=s3_env)
    )
    raw = state["layers"][0]["source"]
    assert (
        raw == f"zarr://{s3_env}/{s3_synth}-public/{DATASET}/{DATASET}.zarr/recon-1/em/fibsem-uint8"
    )
    status, _, body = fetch(raw.removeprefix("zarr://") + "/.zattrs")
    assert status == 200 and "multiscales" in json.loads(body)
    assert state["layers"][-1]["source"].startswith(f"zarr://http://127.0.0.1:{DEFAULT_PORT}/")


def test_the_local_viewer_has_the_same_layers(tiny_synth: Path, outputs: dict[str, Any]) -> None:
    import neuroglancer  # the viz extra, in the test extra too

    view = one_view(tiny_synth, outputs)
    state = viewer_state(view, source_url=lambda p: f"zarr://http://127.0.0.1:1{p}")
    viewer = open_viewer(state)
    try:
        layers = viewer.state.layers
        assert [layer.name for layer in layers] == [layer["name"] for layer in state["layers"]]
        for built, wanted in zip(layers, state["layers"], strict=True):
            assert built.type == wanted["type"]
            assert built.source[0].url == wanted["source"]
            if "(gt)" in wanted["name"]:  # typed properties: a misspelled key would be None
                assert built.layer.segment_default_color == wanted["segmentDefaultColor"]
            if "(prediction)" in wanted["name"]:
                assert built.layer.shader == wanted["shader"]
        assert viewer.state.layout.type == "4panel"
        assert viewer.state.selected_layer.layer == "raw"
        assert list(viewer.state.position) == state["position"]
        assert viewer.state.dimensions.scales.tolist() == [
            s for s, _ in state["dimensions"].values()
        ]
        assert viewer.get_viewer_url().startswith("http://127.0.0.1:")
    finally:
        neuroglancer.stop()


def test_show_with_viewer_prints_a_local_viewer_that_answers(
    tiny_synth: Path, outputs: dict[str, Any]
) -> None:
    lines: list[str] = []

    def check_while_serving() -> None:
        url = lines[0].split(": ", 1)[1]
        assert url.startswith("http://127.0.0.1:") and "/v/" in url
        status, _, body = fetch(url)
        assert status == 200 and b"<html" in body.lower()

    view = one_view(tiny_synth, outputs)
    show([view], server=FolderServer(0), viewer=True, echo=lines.append, wait=check_while_serving)
    assert lines[-1] == "press Ctrl-C to stop"


def test_a_float16_prediction_is_left_out_with_a_warning(
    tiny_synth: Path, tmp_path: Path, outputs: dict[str, Any]
) -> None:
    crop, classes = outputs["crop"], outputs["classes"]
    gt_group = tiny_synth / DATASET / f"{DATASET}.zarr" / GT / crop / classes[0]
    write_output(tmp_path / "predictions", crop, classes[0], gt_group, dtype="float16")
    chosen = Places(
        search_path=str(tiny_synth / TEMPLATE), predictions=str(tmp_path / "predictions")
    )
    with pytest.warns(VisualizeWarning, match="float16.*--encoding uint8"):
        (view,) = find_views(chosen, Selection(crops=(crop,), classes=(classes[0],)))
    assert [layer.kind for layer in view.layers] == ["raw", "gt"]


def test_a_group_without_multiscales_is_an_error_naming_it(
    tiny_synth: Path, tmp_path: Path, outputs: dict[str, Any]
) -> None:
    crop, name = outputs["crop"], outputs["classes"][0]
    group = tmp_path / "predictions" / f"{DATASET}.zarr" / crop / name
    (group / "s0").mkdir(parents=True)
    (group / ".zattrs").write_text("{}")
    chosen = Places(
        search_path=str(tiny_synth / TEMPLATE), predictions=str(tmp_path / "predictions")
    )
    with pytest.raises(ValueError, match=f"{group} has no usable OME-NGFF 'multiscales'"):
        find_views(chosen, Selection(crops=(crop,), classes=(name,)))


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        (Selection(crops=("crop99",)), "--crops crop99 matches no crop; csc looked in search path"),
        (
            Selection(classes=("nope",)),
            "no crop with classes nope found; csc looked in search path",
        ),
        (
            Selection(datasets=("jrc_missing",)),
            "no raw of dataset jrc_missing: no OME-NGFF group at",
        ),
    ],
)
def test_a_name_that_matches_nothing_is_an_error_naming_where_csc_looked(
    tiny_synth: Path, selection: Selection, message: str
) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
        find_views(places(tiny_synth), selection)
    assert str(tiny_synth) in str(error.value)


def test_a_missing_predictions_folder_is_an_error_unless_it_is_the_configs(
    tiny_synth: Path, tmp_path: Path
) -> None:
    given = Places(search_path=str(tiny_synth / TEMPLATE), predictions=str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match=f"--predictions {tmp_path / 'none'}: no such"):
        find_views(given, Selection(crops=("crop1",)))
    optional = Places(
        search_path=given.search_path, predictions=given.predictions, optional=("prediction",)
    )
    (view,) = find_views(optional, Selection(crops=("crop1",)))
    assert {layer.kind for layer in view.layers} == {"raw", "gt"}


def test_csc_visualize_json_round_trip(
    tiny_synth: Path, outputs: dict[str, Any], write_config: Any, tmp_path: Path
) -> None:
    """With a config (search_path, predictions_path, processed_path), --json writes the state
    the library builds; an existing file needs --overwrite; two datasets need {dataset}."""
    root = outputs["root"]
    config = write_config(
        f"""
        search_path = "{tiny_synth / TEMPLATE}"
        datasplit_path = "{tmp_path / "none.csv"}"
        predictions_path = "{root / "predictions"}"
        processed_path = "{root / "processed"}"
        classes = {list(outputs["classes"])!r}
        """
    )
    out = tmp_path / "state.json"
    args = ["visualize", str(config), "--crops", outputs["crop"], "--json", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote {out}\n"
    server = FolderServer(DEFAULT_PORT)
    view = one_view(tiny_synth, outputs)
    write_states([view], str(tmp_path / "library.json"), server=server)
    assert json.loads(out.read_text()) == json.loads((tmp_path / "library.json").read_text())
    assert {layer["type"] for layer in json.loads(out.read_text())["layers"]} == {
        "image",
        "segmentation",
    }
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "pass --overwrite" in again.output
    assert CliRunner().invoke(cli, [*args, "--overwrite"]).exit_code == 0
    missing = CliRunner().invoke(cli, [*args, "--overwrite", "--processed", str(tmp_path / "no")])
    assert missing.exit_code == 1 and f"--processed {tmp_path / 'no'}: no such folder" in (
        missing.output
    )
    both = ["visualize", str(config), "--json", str(tmp_path / "x.json")]
    result = CliRunner().invoke(cli, both)
    assert result.exit_code == 1 and "put {dataset} in the path" in result.output
    each = CliRunner().invoke(cli, [*both[:2], "--json", str(tmp_path / "{dataset}.json")])
    assert each.exit_code == 0, each.output
    assert sorted(p.name for p in tmp_path.glob("jrc_*.json")) == [
        "jrc_synth1.json",
        "jrc_synth2.json",
    ]


def test_csc_visualize_crops_test_shows_the_manifests_crops(
    tiny_synth: Path, outputs: dict[str, Any], write_config: Any, tmp_path: Path
) -> None:
    """--crops test: the crops of the test crop manifest in use, by dataset and crop."""
    root, crop = outputs["root"], outputs["crop"]
    config = write_config(
        f"""
        search_path = "{tiny_synth / TEMPLATE}"
        datasplit_path = "{tmp_path / "none.csv"}"
        predictions_path = "{root / "predictions"}"
        classes = {list(outputs["classes"])!r}
        """
    )
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "crop_name,dataset,class_label,voxel_size,translation,shape\n"
        f"{crop.removeprefix('crop')},{DATASET},{outputs['classes'][0]},[4;4;4],[0;0;0],[8;8;8]\n"
    )
    out = tmp_path / "state.json"
    args = ["visualize", str(config), "--crops", "test", "--json", str(out)]
    done = CliRunner().invoke(cli, [*args, "--test-crop-manifest", str(manifest)])
    assert done.exit_code == 0, done.output
    names = {layer["name"] for layer in json.loads(out.read_text())["layers"]}
    assert f"{crop}/{outputs['classes'][0]} (prediction)" in names
    other = CliRunner().invoke(cli, [*args, "--overwrite"])  # the shipped manifest's crops
    assert other.exit_code == 1 and "crop557" in other.output
