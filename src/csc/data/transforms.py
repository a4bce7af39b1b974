"""Augmentations: spatial transforms drawn per sample, and value transforms for raw patches.

Spatial transforms use the existing config format, axes named z, y, x::

    {"mirror": {"axes": {"x": 0.5, "y": 0.5}},      # flip each axis with this probability
     "transpose": {"axes": ["x", "y"]},             # randomly permute these axes
     "rotate": {"axes": {"z": [-180, 180]}}}        # degrees, uniform, about each axis

They become one 3x3 matrix acting on (z, y, x) offsets from the patch centre (see
`csc.data.geometry`), so raw and labels move together and rotations read whatever region they
need (no undefined corners). For a 2D patch (a singleton z), rotating about z turns it in its
plane; rotating about x or y tilts it, sampling oblique planes of the volume.

Value transforms are callables on a torch tensor patch. The ones here draw their randomness from
the sample's own generator (`sample_generator`), so results do not depend on worker count.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from csc import registries

AXIS_INDEX = {"z": 0, "y": 1, "x": 2}

_GENERATOR: contextvars.ContextVar[Any] = contextvars.ContextVar("csc_sample_generator")


# splitmix64 constants: a counter-based generator, so sample (epoch, index) gets the same numbers
# whatever batch or worker draws it, and a whole batch is drawn in a few numpy operations.
_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
_KEYS = (0xD1B54A32D192ED03, 0xABC98388FB8FAC03, 0x8CB92BA72F3D8DD7)


def uniforms(seed: int, epochs: np.ndarray, indices: np.ndarray, count: int) -> np.ndarray:
    """(N, count) uniform numbers in [0, 1) that depend only on (seed, epoch, index, column)."""
    u64 = np.uint64
    key = (
        np.full(len(indices), seed % 2**64, dtype=u64) * u64(_KEYS[0])
        ^ epochs.astype(u64) * u64(_KEYS[1])
        ^ indices.astype(u64) * u64(_KEYS[2])
    )
    z = key[:, None] + (np.arange(1, count + 1, dtype=u64) * u64(_MIX[0]))[None, :]
    z = (z ^ (z >> u64(30))) * u64(_MIX[1])
    z = (z ^ (z >> u64(27))) * u64(_MIX[2])
    z = z ^ (z >> u64(31))
    return (z >> u64(11)).astype(np.float64) * 2.0**-53


class Draws:
    """The random numbers of one sample, handed out in order, with the Generator methods
    `spatial_matrix` uses."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values.tolist()
        self.next = 0

    def random(self) -> float:
        value = self.values[self.next]
        self.next += 1
        return value

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def permutation(self, items: Sequence[int]) -> list[int]:
        keys = [self.random() for _ in items]
        return [item for _, item in sorted(zip(keys, items, strict=True))]


def spatial_matrix(transforms: Mapping[str, Any] | None, rng: Any) -> np.ndarray:
    """A random 3x3 matrix on (z, y, x) offsets, the transforms applied in the config's order
    (mirror, transpose and rotate, usually). `rng` is a numpy Generator or a `Draws`."""
    # Rows as plain floats: this runs for every sample, and numpy's per-call cost on 3x3
    # matrices was a tenth of a 2D sample's time.
    rows = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    for name, spec in (transforms or {}).items():
        step = SPATIAL_TRANSFORMS.get(name)  # names are checked with the config
        if step is not None:
            rows = step(rows, spec["axes"], rng)
    return np.array(rows)


def mirror(rows: list[list[float]], axes: Mapping[str, float], rng: Any) -> list[list[float]]:
    """Flip each axis with its probability."""
    for axis, probability in axes.items():
        if rng.random() < probability:
            rows[AXIS_INDEX[axis]] = [-v for v in rows[AXIS_INDEX[axis]]]
    return rows


def transpose(rows: list[list[float]], axes: Sequence[str], rng: Any) -> list[list[float]]:
    """Permute these axes among themselves at random."""
    indices = [AXIS_INDEX[a] for a in axes]
    order = list(range(3))
    for src, dst in zip(indices, rng.permutation(indices), strict=True):
        order[src] = int(dst)
    return [rows[k] for k in order]


def rotate(
    rows: list[list[float]], axes: Mapping[str, Sequence[float]], rng: Any
) -> list[list[float]]:
    """Rotate about each axis by degrees drawn uniformly from its [low, high]."""
    for axis, (low, high) in axes.items():
        rows = _rotated(rows, AXIS_INDEX[axis], rng.uniform(low, high))
    return rows


def _rotated(rows: list[list[float]], axis: int, degrees: float) -> list[list[float]]:
    """`rotation(axis, degrees) @ rows`, on plain floats."""
    i, j = [k for k in range(3) if k != axis]
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    out = [list(row) for row in rows]
    out[i] = [c * a - s * b for a, b in zip(rows[i], rows[j], strict=True)]
    out[j] = [s * a + c * b for a, b in zip(rows[i], rows[j], strict=True)]
    return out


def rotation(axis: int, degrees: float) -> np.ndarray:
    """Rotation by `degrees` about axis 0, 1 or 2 (z, y, x), in the plane of the other two."""
    i, j = [k for k in range(3) if k != axis]
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


# The registry's names (csc.registries.SPATIAL_TRANSFORMS), each with its function (above).
SPATIAL_TRANSFORMS: dict[str, Callable[..., list[list[float]]]] = {
    name: registries.resolve(reference) for name, reference in registries.SPATIAL_TRANSFORMS.items()
}


# --- Value transforms --------------------------------------------------------------------


@contextlib.contextmanager
def sample_generator(seed: int) -> Iterator[Any]:
    """Make a torch generator seeded for one sample the current one for value transforms."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    token = _GENERATOR.set(generator)
    try:
        yield generator
    finally:
        _GENERATOR.reset(token)


def current_generator() -> Any:
    """The sample's generator inside a csc loader; torch's default one elsewhere."""
    import torch

    return _GENERATOR.get(None) or torch.default_generator


def _uniform(low: float, high: float) -> float:
    import torch

    return low + (high - low) * float(torch.rand((), generator=current_generator()))


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: Any) -> Any:
        for transform in self.transforms:
            x = transform(x)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class Normalize:
    """Stored values to float32 in [0, 1]: integers divided by their type's maximum."""

    def __call__(self, x: Any) -> Any:
        import torch

        if x.dtype.is_floating_point:
            return x.float()
        return x.float() / float(torch.iinfo(x.dtype).max)

    def __repr__(self) -> str:
        return "Normalize()"


class _Random(abc.ABC):
    """Applied with probability `p`; parameters drawn from the sample's generator."""

    def __init__(self, p: float) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"{type(self).__name__}: p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, x: Any) -> Any:
        return self.apply(x) if _uniform(0, 1) < self.p else x

    @abc.abstractmethod
    def apply(self, x: Any) -> Any:
        """The transform itself, applied when the draw says so."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class RandomGamma(_Random):
    """x ** gamma with gamma drawn from `gamma` (a [0, 1] float patch stays in [0, 1])."""

    def __init__(self, gamma: tuple[float, float] = (0.7, 1.5), p: float = 0.5) -> None:
        super().__init__(p)
        self.gamma = gamma

    def apply(self, x: Any) -> Any:
        return x.clamp(min=0) ** _uniform(*self.gamma)


class RandomContrast(_Random):
    """Scale deviations from the patch mean by a factor drawn from `factor`."""

    def __init__(self, factor: tuple[float, float] = (0.75, 1.25), p: float = 0.5) -> None:
        super().__init__(p)
        self.factor = factor

    def apply(self, x: Any) -> Any:
        mean = x.mean()
        return (x - mean) * _uniform(*self.factor) + mean


class GaussianNoise(_Random):
    """Add Gaussian noise with a standard deviation drawn from `std` (patch value units)."""

    def __init__(self, std: tuple[float, float] = (0.0, 0.05), p: float = 0.5) -> None:
        super().__init__(p)
        self.std = std

    def apply(self, x: Any) -> Any:
        import torch

        # Drawn on the CPU (the sample's generator lives there), also for a patch on a GPU
        # (`spatial_transforms_on_device`): the same noise either way.
        noise = torch.randn(x.shape, generator=current_generator(), dtype=x.dtype)
        return x + noise.to(x.device) * _uniform(*self.std)


class GaussianBlur(_Random):
    """Blur every spatial axis with a Gaussian of sigma drawn from `sigma` (voxels)."""

    def __init__(self, sigma: tuple[float, float] = (0.5, 1.5), p: float = 0.5) -> None:
        super().__init__(p)
        self.sigma = sigma

    def apply(self, x: Any) -> Any:
        import torch
        import torch.nn.functional as F  # noqa: N812 (torch's own spelling)

        sigma = _uniform(*self.sigma)
        radius = max(1, math.ceil(3 * sigma))
        taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
        kernel = torch.exp(-(taps**2) / (2 * sigma**2))
        kernel = kernel / kernel.sum()
        out = x[None]  # (1, C, *spatial): blur each spatial axis in turn, edges replicated
        for axis in range(2, out.dim()):
            if out.shape[axis] == 1:
                continue
            moved = out.movedim(axis, -1)
            flat = moved.reshape(-1, 1, moved.shape[-1])
            flat = F.pad(flat, (radius, radius), mode="replicate")
            flat = F.conv1d(flat, kernel.view(1, 1, -1))
            out = flat.reshape(moved.shape).movedim(-1, axis)
        return out[0]
