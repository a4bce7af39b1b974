"""What a run shows in TensorBoard besides the plain scalars (docs/training.md, "TensorBoard"):
the custom-scalars layout, labelled image panels, a spread of validation examples and the
model summary. The training loop calls these; they write nothing themselves.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Generic, TypeVar

import numpy as np
import torch

from csc.metrics import METRIC_NAMES
from csc.tracking import VALIDATION_TAG, Layout

T = TypeVar("T")

# --- The custom-scalars layout -------------------------------------------------------------


def scalar_layout(classes: Sequence[str], metrics: Sequence[str] = METRIC_NAMES) -> Layout:
    """The custom-scalars tab: training and validation loss on one chart, the learning rate,
    then per metric a category with one chart per class (and the mean) drawing validation's
    ``metrics/{m}/{c}`` and training's ``train/{m}/{c}`` together (a tag not logged is
    simply not drawn)."""
    layout: dict[str, dict[str, list[str]]] = {
        "loss": {
            "training (loss) and validation (validation) loss": [
                "^loss$",
                f"^{re.escape(VALIDATION_TAG)}$",
            ],
            "learning rate": ["^lr$"],
            "best monitored score so far (best/{monitor})": ["^best/"],
        }
    }
    for metric in metrics:
        layout[f"metric: {metric}"] = {
            f"{metric} {name}": [
                f"^metrics/{re.escape(metric)}/{re.escape(name)}$",
                f"^train/{re.escape(metric)}/{re.escape(name)}$",
            ]
            for name in (*classes, "mean")
        }
    return layout


# --- Image panels --------------------------------------------------------------------------

# matplotlib's viridis at 0, 1/8, ..., 1 (perceptually uniform; also readable when printed
# grey), interpolated linearly in between: truth (0 or 1) and prediction (p) share it.
VIRIDIS = np.array(
    [
        (0.267004, 0.004874, 0.329415),
        (0.282623, 0.140926, 0.457517),
        (0.229739, 0.322361, 0.545706),
        (0.172719, 0.448791, 0.557885),
        (0.127568, 0.566949, 0.550556),
        (0.157851, 0.683765, 0.501686),
        (0.369214, 0.788888, 0.382914),
        (0.678489, 0.863742, 0.189503),
        (0.993248, 0.906157, 0.143936),
    ],
    dtype=np.float32,  # panels are float32: 8-bit images need no more, and it halves the work
)
# Unannotated truth voxels: red and light grey diagonal stripes, a pattern no value of the
# colour map has (p = 0.5 is viridis' teal).
HATCH = (
    np.array((0.85, 0.10, 0.10), dtype=np.float32),
    np.array((0.80, 0.80, 0.80), dtype=np.float32),
)
HATCH_PERIOD = 6  # pixels per stripe pair
PANELS = ("raw", "truth", "prediction")
MIN_PANEL_WIDTH = 96  # pixels: smaller patches are enlarged (nearest) so the labels fit
LABEL_HEIGHT = 14  # pixels of the label row above the panels
GAP = 2  # white pixels between panels and rows


def _viridis_table(levels: int = 256) -> np.ndarray:
    """(levels, 3) viridis at 0, 1/(levels - 1), ..., 1: VIRIDIS interpolated linearly."""
    scaled = np.linspace(0, 1, levels, dtype=np.float32) * (len(VIRIDIS) - 1)
    low = np.minimum(np.floor(scaled).astype(int), len(VIRIDIS) - 2)
    weight = (scaled - low)[..., None]
    return VIRIDIS[low] * (1 - weight) + VIRIDIS[low + 1] * weight


VIRIDIS_TABLE = _viridis_table()  # one colour per 8-bit level: the images are 8-bit


def colour_map(values: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) viridis, at the 256 levels of an 8-bit image (a table
    look-up: ten times faster than interpolating each pixel)."""
    levels = np.rint(np.clip(values, 0, 1) * (len(VIRIDIS_TABLE) - 1)).astype(np.intp)
    colours: np.ndarray = VIRIDIS_TABLE[levels]
    return colours


@functools.lru_cache(maxsize=8)
def _hatch(height: int, width: int) -> np.ndarray:
    """(H, W, 3) diagonal stripes of the HATCH colours (read only: shared between calls)."""
    diagonal = np.arange(height)[:, None] + np.arange(width)[None, :]
    stripe = diagonal % HATCH_PERIOD < HATCH_PERIOD // 2  # (H, W): diagonal bands
    pattern = np.where(stripe[..., None], HATCH[0], HATCH[1])
    pattern.flags.writeable = False
    return pattern


def truth_colours(truth: np.ndarray) -> np.ndarray:
    """(H, W) 0/1 with NaN where unannotated -> (H, W, 3): viridis, unannotated hatched."""
    unannotated = np.isnan(truth)
    rgb = colour_map(np.where(unannotated, 0.0, truth))
    rgb[unannotated] = _hatch(*truth.shape)[unannotated]
    return rgb


def grey(raw: np.ndarray) -> np.ndarray:
    """(H, W) raw -> (H, W, 3), scaled to its own min..max; non-finite values black."""
    raw = np.nan_to_num(raw.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    low, span = float(raw.min()), max(float(raw.max() - raw.min()), 1e-6)
    return np.repeat(((raw - low) / span)[..., None], 3, axis=-1)


def panel_row(
    raw_panel: np.ndarray, truth: np.ndarray | None, prediction: np.ndarray | None
) -> list[np.ndarray]:
    """The RGB panels of one example: its raw (`grey`, drawn once for all classes), then
    truth and prediction when given."""
    panels = [raw_panel]
    if truth is not None:
        panels.append(truth_colours(truth))
    if prediction is not None:
        panels.append(colour_map(np.nan_to_num(prediction, nan=0.0)))  # non-finite: 0
    return panels


def labelled_grid(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str]) -> np.ndarray:
    """Panels (H, W, 3) in rows, one column per title, the titles written above: (H', W', 3)
    floats in [0, 1] on white."""
    from PIL import Image, ImageDraw  # drawing text: only image logging needs Pillow

    height, width = rows[0][0].shape[:2]
    zoom = max(1, math.ceil(MIN_PANEL_WIDTH / width))
    cell_h, cell_w = height * zoom + GAP, width * zoom + GAP
    grid = np.full((LABEL_HEIGHT + cell_h * len(rows), cell_w * len(titles), 3), 255, np.uint8)
    for r, panels in enumerate(rows):
        for c, panel in enumerate(panels):
            pixels = (panel * 255).round().astype(np.uint8)
            big = pixels.repeat(zoom, axis=0).repeat(zoom, axis=1)  # nearest-neighbour
            top, left = LABEL_HEIGHT + r * cell_h, c * cell_w
            grid[top : top + height * zoom, left : left + width * zoom] = big
    image = Image.fromarray(grid)
    draw = ImageDraw.Draw(image)
    for c, title in enumerate(titles):
        draw.text((c * cell_w + 2, 1), title, fill=(0, 0, 0))
    return np.asarray(image, dtype=np.float32) / 255


def middle_slice(volume: torch.Tensor) -> np.ndarray:
    """(C, Y, X) or (C, Z, Y, X) -> (C, Y, X) float64: a 3D patch's middle z slice."""
    if volume.ndim == 4:
        volume = volume[:, volume.shape[1] // 2]
    return volume.detach().float().cpu().numpy().astype(np.float64)


Example = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # raw, truth, prediction (C, Y, X)


def example_of(
    raw: torch.Tensor, target: torch.Tensor, prediction: torch.Tensor | None = None
) -> Example:
    """One patch's middle slices (C, Y, X): raw, truth (NaN: unannotated), prediction (p)."""
    return (
        middle_slice(raw),
        middle_slice(target),
        None if prediction is None else middle_slice(prediction),
    )


def example_images(
    classes: Sequence[str], examples: Sequence[Example], *, prefix: str = "images"
) -> dict[str, np.ndarray]:
    """Per class, ``{prefix}/{class}``: one row per example of labelled panels raw | truth |
    prediction (truth and prediction in viridis, unannotated truth hatched red)."""
    images = {}
    with_prediction = examples[0][2] is not None
    titles = PANELS if with_prediction else PANELS[:2]
    raws = [grey(raw[0]) for raw, _, _ in examples]  # one raw panel per example, every class
    for k, name in enumerate(classes):
        rows = [
            panel_row(raws[i], truth[k], None if prediction is None else prediction[k])
            for i, (_, truth, prediction) in enumerate(examples)
        ]
        images[f"{prefix}/{name}"] = labelled_grid(rows, titles)
    return images


class Spread(Generic[T]):
    """About `count` items evenly spread over a stream of unknown length, chosen the same way
    on every pass: the items at multiples of a stride, which doubles whenever more than twice
    `count` are kept (so at most 2 * count are held)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.stride = 1
        self.seen = 0
        self.kept: list[tuple[int, T]] = []

    def take(self) -> bool:
        """Move on to the stream's next item: whether it is to be kept (then `keep` it)."""
        index, self.seen = self.seen, self.seen + 1
        return self.count > 0 and index % self.stride == 0

    def keep(self, item: T) -> None:
        """Keep the item `take` said yes to."""
        self.kept.append((self.seen - 1, item))
        if len(self.kept) > 2 * self.count:
            self.stride *= 2
            self.kept = [(i, kept) for i, kept in self.kept if i % self.stride == 0]

    def chosen(self) -> list[tuple[int, T]]:
        """(stream position, item) of up to `count` kept items, first and last included."""
        kept, count = self.kept, self.count
        if len(kept) <= count:
            return list(kept)
        picks = sorted({round(i * (len(kept) - 1) / max(count - 1, 1)) for i in range(count)})
        return [kept[i] for i in picks]


# --- Model summary -------------------------------------------------------------------------


def model_summary(
    model: torch.nn.Module,
    *,
    name: str,
    input_shape: Sequence[int],
    output_shape: Sequence[int],
) -> str:
    """Parameters per top-level module, the total, and the shapes of a patch in and out, as a
    Markdown table (TensorBoard's text tab renders it; the console prints it as it is)."""
    lines = [
        f"model {name} ({type(model).__name__}): input {tuple(input_shape)} -> output "
        f"{tuple(output_shape)} (B, C, *spatial)",
        "",
        "| module | type | parameters |",
        "|---|---|---:|",
    ]
    counted = 0
    for child_name, child in model.named_children():
        count = sum(p.numel() for p in child.parameters())
        counted += count
        lines.append(f"| {child_name} | {type(child).__name__} | {count:,} |")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if total > counted:  # parameters of the model itself, outside any child module
        lines.append(f"| (own) | {type(model).__name__} | {total - counted:,} |")
    lines.append(f"| **total** | | **{total:,}** ({trainable:,} trainable) |")
    return "\n".join(lines)
