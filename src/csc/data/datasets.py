"""Training patches, validation tiles and the epoch sampler, over crops from a datasplit.

A sample is a patch centre in world coordinates (nm, (z, y, x)) inside a crop's annotated
region, plus a spatial transform. It yields ``input`` float32 ``[1, *shape]`` and ``output``
float32 ``[len(classes), *shape]``: 1/0 per class, NaN where the class is not annotated in the
crop, where the patch leaves the annotated region, or where a label says "unknown". A 2D patch
(a singleton axis, or a 2-element shape) drops that axis: ``[1, H, W]`` and ``[C, H, W]``.

Training samples are keyed by ``(epoch, index)``: the crop, centre and transforms come from
random numbers that depend only on ``(seed, epoch, index)`` (a counter-based generator,
`csc.data.transforms.uniforms`), so any worker produces the same sample and no two epochs or
workers repeat each other. `EpochSampler` hands out those keys in order.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

from csc.config import ArrayInfo, TrainConfig
from csc.data.geometry import Grid, Inside, Plan, plan_read, shift_plan, source_map
from csc.data.sampling import Sampled, box_of, resample
from csc.data.sources import Box, DataWarning, PendingRead, RegionRead, region_cache
from csc.data.transforms import Draws, Normalize, sample_generator, spatial_matrix, uniforms
from csc.storage import DEFAULT_CHUNK_CACHE_MB, ArraySource, Vec3, open_array

T = TypeVar("T")
Transform = Callable[[torch.Tensor], torch.Tensor]
BIG_PATCH_VOXELS = 2**17  # patches this big are read and resampled a thread per core
_POOLS: dict[int, ThreadPoolExecutor] = {}  # per process id: a fork does not inherit threads


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    pool = _POOLS.get(os.getpid())
    if pool is None or pool._max_workers < workers:
        pool = _POOLS[os.getpid()] = ThreadPoolExecutor(workers, thread_name_prefix="csc-read")
    return pool


DEFAULT_CROP_CACHE_MB = 256
# A crop's region is held in memory from its second read on (a crop drawn once, as in a
# datasplit of thousands, is not worth a whole-region read), if it takes at most this share of
# the crop cache.
REGION_ADMIT_READS = 2
REGION_MAX_SHARE = 0.25
_REGION_LOCK = threading.RLock()  # reads of big patches run in several threads


@dataclasses.dataclass
class _RegionState:
    """What a dataset knows about one crop's region of one array."""

    reads: int = 0
    box: Box | None = None  # the region held in memory, voxels of the array's level
    half: tuple[int, ...] = (0, 0, 0)  # its margin around the crop: half the widest request
    too_big: bool = False


NUM_SPATIAL_DRAWS = 12  # mirror: 1 per axis, transpose: 1 per axis, rotate: 1 per axis


@dataclasses.dataclass(frozen=True)
class PatchSpec:
    """The input and target grids of every sample; `plane_axis` is the 2D patch's singleton."""

    input: Grid
    target: Grid
    plane_axis: int | None = None  # 0, 1 or 2 for a 2D patch (dropped from tensors), else None

    @classmethod
    def from_config(cls, config: TrainConfig) -> PatchSpec:
        """The spec of a config's `input_array_info` and `target_array_info`: built once per
        run (training, prediction) and passed down."""
        return cls.from_arrays(config.input_array_info, config.target_array_info)

    @classmethod
    def from_arrays(cls, input_info: ArrayInfo, target_info: ArrayInfo) -> PatchSpec:
        if input_info.plane_axis != target_info.plane_axis:
            raise ValueError(
                f"input_array_info {input_info.shape} and target_array_info {target_info.shape} "
                "must have their singleton (2D) axis in the same place"
            )
        return cls(_grid(input_info), _grid(target_info), input_info.plane_axis)

    def in_plane(self, values: Sequence[T]) -> tuple[T, ...]:
        """A (z, y, x) shape or scale as the model sees it: without a 2D patch's singleton
        axis (unchanged for 3D)."""
        return tuple(value for axis, value in enumerate(values) if axis != self.plane_axis)


def _grid(info: ArrayInfo) -> Grid:
    """The (z, y, x) grid of a config shape (a 2-element one is (1, y, x) by now: ArrayInfo)."""
    shape, scale = tuple(int(s) for s in info.shape), tuple(float(s) for s in info.scale)
    if len(shape) != 3 or len(scale) != 3:
        raise ValueError(f"a patch has 2 or 3 axes, got shape {shape} and scale {scale}")
    return Grid(shape, scale)


@dataclasses.dataclass(frozen=True)
class Crop:
    """One datasplit row, resolved: raw, one label source per class (None: not annotated)."""

    name: str  # "dataset/crop"
    raw: ArraySource
    labels: tuple[ArraySource | None, ...]  # in the config's class order
    low: tuple[float, float, float]  # annotated region, world nm, (z, y, x) edges
    high: tuple[float, float, float]

    @property
    def volume(self) -> float:
        return float(np.prod(np.asarray(self.high) - np.asarray(self.low)))


class PatchDataset(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Reads samples (crop, centre, transform) from crops; subclasses decide which samples."""

    def __init__(
        self,
        crops: Sequence[Crop],
        spec: PatchSpec,
        *,
        raw_transform: Transform | None = None,
        target_transform: Transform | None = None,
        chunk_cache_mb: int = DEFAULT_CHUNK_CACHE_MB,
        crop_cache_mb: int = DEFAULT_CROP_CACHE_MB,
        exclusions: Sequence[Sequence[int]] | None = None,
    ) -> None:
        if not crops:
            raise ValueError("no crops to sample from")
        self.crops = list(crops)
        self.spec = spec
        self.raw_transform = raw_transform
        self.target_transform = target_transform
        # Per class, the classes that exclude it (`csc.manifests.classes`): where one of them
        # is present, a class its crop does not annotate is known absent. None: no inference.
        self.exclusions = exclusions
        self.chunk_cache_mb = chunk_cache_mb
        self.crop_cache_mb = crop_cache_mb
        self._regions: dict[tuple[int, str], _RegionState] = {}
        self._groups: dict[int, list[list[int]]] = {}  # per crop: `_label_groups`
        # Float raws only (integers cannot hold NaN): crops reported as holding non-finite
        # values, and (crop, (region origin, region shape)) of crop regions in memory found
        # finite.
        self._nonfinite: set[int] = set()
        self._finite_regions: set[tuple[int, tuple[tuple[int, ...], tuple[int, ...]]]] = set()

    @property
    def num_classes(self) -> int:
        return len(self.crops[0].labels)

    def sample(
        self, crop: int, centre: Sequence[float], matrix: np.ndarray | None = None, seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """One sample: the patch of crop `crop` centred at `centre` (nm, (z, y, x))."""
        matrix = np.eye(3) if matrix is None else matrix
        return self.read([(crop, np.asarray(centre, dtype=float), matrix, seed)])[0]

    def read(self, requests: Sequence[tuple[int, np.ndarray, np.ndarray, int]]) -> Batch:
        """The batch of samples for (crop, centre, matrix, seed) requests, written in place.
        Big patches are split over a thread per core: their numpy work releases the GIL
        (3D 64^3 patches: about 1.5x on 2 cores); small ones stay in one thread, where Python
        overhead dominates."""
        num, in_worker = len(requests), torch.utils.data.get_worker_info() is not None
        inputs = _batch_array((num, 1, *self.spec.input.shape), shared=in_worker)
        targets = _batch_array((num, self.num_classes, *self.spec.target.shape), shared=in_worker)
        workers = 1 if in_worker else min(num, os.cpu_count() or 1)  # workers share the cores
        if workers < 2 or math.prod(self.spec.target.shape) < BIG_PATCH_VOXELS:
            self._read(requests, inputs, targets)
        else:  # thread i fills rows i, i + workers, ... (strided views of the batch)
            parts = [
                (requests[i::workers], inputs[i::workers], targets[i::workers])
                for i in range(workers)
            ]
            list(_thread_pool(workers).map(lambda part: self._read(*part), parts))
        return Batch(
            {
                "input": self._squeeze(torch.from_numpy(inputs)),
                "output": self._squeeze(torch.from_numpy(targets)),
            }
        )

    def _squeeze(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, C, Z, Y, X) -> (N, C, H, W) for a 2D patch (its singleton axis dropped)."""
        return batch if self.spec.plane_axis is None else batch.squeeze(2 + self.spec.plane_axis)

    def _read(
        self,
        requests: Sequence[tuple[int, np.ndarray, np.ndarray, int]],
        inputs: np.ndarray,
        targets: np.ndarray,
    ) -> None:
        """Fill batch rows for requests, in one thread with one torch thread: for patches
        this size, waking torch's thread pool costs more than it saves (2D: grid_sample
        alone runs 1.9x faster on two threads, but value transforms' small ops can run far
        slower), and tensorstore decodes on the other cores meanwhile. (The setting is per
        thread; it is put back for the training code that runs in this thread.)"""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self._assemble(requests, inputs, targets)
        finally:
            torch.set_num_threads(threads)

    def read_inputs(
        self, requests: Sequence[tuple[int, np.ndarray, np.ndarray, int]]
    ) -> torch.Tensor:
        """Only the model inputs ``[N, 1, *shape]`` of requests (prediction: no labels read)."""
        inputs = np.empty((len(requests), 1, *self.spec.input.shape), dtype=np.float32)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in `_read`
        try:
            reads = []
            for crop_index, centre, matrix, _ in requests:
                raw = self.crops[crop_index].raw
                plan = _plan(self.spec.input, centre, matrix, raw, linear=True)
                reads.append((plan, self._box(crop_index, raw, plan.start, plan.stop)))
            checks = [
                self._check_raw(request[0], read)
                for request, (_, read) in zip(requests, reads, strict=True)
            ]
            raws = resample([(plan, [read.data()]) for plan, read in reads])
            for n, ((values, _), (_, read), request) in enumerate(
                zip(raws, reads, requests, strict=True)
            ):
                if checks[n]:
                    self._check_box(request[0], read)
                with sample_generator(request[3]):
                    self._input(values, read.dtype, out=inputs[n])
        finally:
            torch.set_num_threads(threads)
        return self._squeeze(torch.from_numpy(inputs))

    def _assemble(
        self,
        requests: Sequence[tuple[int, np.ndarray, np.ndarray, int]],
        inputs: np.ndarray,
        targets: np.ndarray,
    ) -> None:
        """Fill batch rows for requests. Every read is issued first, so tensorstore fetches
        and decodes them concurrently."""
        jobs = [self._start(*request) for request in requests]
        raws = resample([(job.raw_plan, [job.raw.data()]) for job in jobs])
        labels = iter(
            resample(
                [
                    (plan, [read.data() for read in reads])
                    for job in jobs
                    for _, plan, reads in job.label_reads
                ]
            )
        )
        for n, (job, (values, _)) in enumerate(zip(jobs, raws, strict=True)):
            if job.check_raw:
                self._check_box(job.crop_index, job.raw)
            if self.raw_transform is None:  # nothing random to seed
                self._input(values, job.raw.dtype, out=inputs[n])
            else:
                with sample_generator(job.seed):
                    self._input(values, job.raw.dtype, out=inputs[n])
            self._targets(job, labels, out=targets[n])

    def _start(self, crop_index: int, centre: np.ndarray, matrix: np.ndarray, seed: int) -> _Job:
        crop = self.crops[crop_index]
        raw_plan = _plan(self.spec.input, centre, matrix, crop.raw, linear=True)
        raw = self._box(crop_index, crop.raw, raw_plan.start, raw_plan.stop)
        label_reads = []
        if crop_index not in self._groups:
            self._groups[crop_index] = _label_groups(crop)
        for classes in self._groups[crop_index]:
            label = crop.labels[classes[0]]
            assert label is not None  # `_label_groups` holds annotated classes only
            plan = shifted_plan(raw_plan, crop.raw, label, self.spec)
            if plan is None:
                plan = _plan(self.spec.target, centre, matrix, label, linear=False)
            reads = [self._box(crop_index, crop.labels[k], plan.start, plan.stop) for k in classes]
            label_reads.append((classes, plan, reads))
        check = self._check_raw(crop_index, raw)
        return _Job(crop, raw_plan, raw, label_reads, seed, crop_index, check)

    def _check_raw(self, crop_index: int, read: PendingRead | RegionRead) -> bool:
        """Whether a raw read of crop `crop_index` is to be checked for non-finite values once
        it has arrived (`_check_box`). Only float raws are, until the crop is reported; a crop
        region in memory is checked whole, once, here (it has been read already)."""
        if read.dtype.kind != "f" or crop_index in self._nonfinite:
            return False  # the common path: integer raw
        if isinstance(read, RegionRead):
            key = (crop_index, (read.origin, read.region.shape))
            if key not in self._finite_regions:
                if np.isfinite(read.region).all():
                    self._finite_regions.add(key)
                else:
                    self._report_nonfinite(crop_index, read.region, read.origin)
            return False
        return True

    def _check_box(self, crop_index: int, read: PendingRead | RegionRead) -> None:
        """Report crop `crop_index` if the box `read` (arrived) holds non-finite raw values."""
        box = read.result()
        if crop_index not in self._nonfinite and not np.isfinite(box).all():
            origin = read.box[0] if isinstance(read, PendingRead) else read.start  # box start
            self._report_nonfinite(crop_index, box, origin)

    def _report_nonfinite(self, crop_index: int, values: np.ndarray, origin: Sequence[int]) -> None:
        """Warn, once per crop (and process), that its float raw holds NaN or inf: `values`
        read from voxel `origin` (z, y, x) of the raw's level on."""
        with _REGION_LOCK:  # big patches are read in several threads
            if crop_index in self._nonfinite:
                return
            self._nonfinite.add(crop_index)
        crop, bad = self.crops[crop_index], ~np.isfinite(values)
        first = tuple(int(i) + o for i, o in zip(np.argwhere(bad)[0], origin, strict=True))
        stop = tuple(o + n for o, n in zip(origin, values.shape, strict=True))
        warnings.warn(
            f"crop {crop.name}: its raw {crop.raw.url} holds {np.count_nonzero(bad)} non-finite "
            f"values (NaN or inf) in voxels {tuple(origin)} to {stop}, the first at voxel "
            f"{first}; a batch holding them makes the loss non-finite. Replace them in the "
            "raw, or remove the crop from the datasplit",
            DataWarning,
            stacklevel=2,
        )

    def _box(
        self, crop_index: int, source: ArraySource | None, start: Sequence[int], stop: Sequence[int]
    ) -> PendingRead | RegionRead:
        """The voxels [start, stop) of `source` for a sample of crop `crop_index`: from the
        crop's region held in memory (`crop_cache_mb`), else read by tensorstore."""
        assert source is not None
        if self.crop_cache_mb <= 0:
            return PendingRead(source, start, stop, cache_mb=self.chunk_cache_mb)
        shape = source.level.shape
        with _REGION_LOCK:
            state = self._regions.setdefault((crop_index, source.url), _RegionState())
            state.reads += 1
            if state.box is None or not _holds(state.box, start, stop, shape):
                if state.too_big or state.reads < REGION_ADMIT_READS:
                    return PendingRead(source, start, stop, cache_mb=self.chunk_cache_mb)
                self._grow(state, crop_index, source, start, stop)
                if state.box is None or not _holds(state.box, start, stop, shape):
                    # Too big to hold, or a patch away from the crop (`sample` and prediction
                    # place patches anywhere): read as it is.
                    return PendingRead(source, start, stop, cache_mb=self.chunk_cache_mb)
            cache = region_cache(self.crop_cache_mb)
            region = cache.get(source, state.box, cache_mb=self.chunk_cache_mb)
            return RegionRead(region, state.box[0], start, stop, shape)

    def _grow(
        self,
        state: _RegionState,
        crop_index: int,
        source: ArraySource,
        start: Sequence[int],
        stop: Sequence[int],
    ) -> None:
        """Hold the crop's annotated region widened on every side by half the widest request
        so far: every later request of that size centred in the crop then fits."""
        crop, level = self.crops[crop_index], source.level
        low = (np.asarray(crop.low) - level.translation) / level.scale  # voxels of this level
        high = (np.asarray(crop.high) - level.translation) / level.scale
        state.half = tuple(
            max(h, (b - a + 1) // 2 + 1) for h, a, b in zip(state.half, start, stop, strict=True)
        )
        first = [max(0, int(np.floor(a)) - h) for a, h in zip(low, state.half, strict=True)]
        last = [
            min(n, int(np.ceil(b)) + 1 + h)
            for b, h, n in zip(high, state.half, level.shape, strict=True)
        ]
        if state.box == (tuple(first), tuple(last)):
            return  # no wider: the request lies away from the crop
        if state.box is not None:
            region_cache(self.crop_cache_mb).drop(source, state.box)
        size = math.prod(max(0, b - a) for a, b in zip(first, last, strict=True))
        itemsize = open_array(source, cache_mb=self.chunk_cache_mb).dtype.numpy_dtype.itemsize
        if size * itemsize > REGION_MAX_SHARE * self.crop_cache_mb * 2**20:
            state.box, state.too_big = None, True
            return
        state.box = ((first[0], first[1], first[2]), (last[0], last[1], last[2]))

    def _input(
        self, values: np.ndarray | list[np.ndarray], dtype: np.dtype, *, out: np.ndarray
    ) -> None:
        """Raw values (1, Z, Y, X) to the model's input in `out`: the config's transform, else
        scaled to [0, 1]."""
        if isinstance(values, list):  # a view into a crop region, read as it lies
            values = values[0][None]
        if self.raw_transform is None and np.issubdtype(dtype, np.integer):
            np.divide(values, np.float32(np.iinfo(dtype).max), out=out, dtype=np.float32)
            return  # the default, Normalize, done in numpy
        if values.dtype != dtype and np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)  # interpolated: back to the stored type the transform expects
            values = np.clip(np.rint(values), info.min, info.max).astype(dtype)
        tensor = torch.from_numpy(np.ascontiguousarray(values))
        transform = self.raw_transform or Normalize()
        out[...] = transform(tensor).to(torch.float32).numpy()

    def _targets(self, job: _Job, labels: Iterator[Sampled], *, out: np.ndarray) -> None:
        """(C, Z, Y, X) float32 targets of one sample in `out`: NaN for classes it does not
        annotate. The classes of one voxel grid are converted together."""
        missing = set(range(self.num_classes))
        for classes, _, _ in job.label_reads:
            stored, inside = next(labels)
            sources = [job.crop.labels[k] for k in classes]
            if classes == list(range(classes[0], classes[-1] + 1)):  # a view: written in place
                self._target(stored, sources, inside, out=out[classes[0] : classes[-1] + 1])
            else:  # class by class, each into its own row (no (K, ...) array copied over)
                for i, k in enumerate(classes):
                    self._target(stored[i : i + 1], sources[i : i + 1], inside, out=out[k : k + 1])
            missing -= set(classes)
        for k in missing:
            out[k] = np.nan
        if self.exclusions is not None:
            self._infer_absent(missing, out)

    def _infer_absent(self, missing: set[int], out: np.ndarray) -> None:
        """0 for each unannotated class of `missing` where an annotated class that excludes
        it is present (target > 0, as the toolkit's inference reads it); NaN stays elsewhere."""
        assert self.exclusions is not None
        for k in sorted(missing):
            for j in self.exclusions[k]:
                if j not in missing:
                    with np.errstate(invalid="ignore"):  # NaN (not annotated) is not present
                        out[k][out[j] > 0] = 0

    def _target(
        self,
        values: np.ndarray | list[np.ndarray],
        sources: Sequence[ArraySource | None],
        inside: Inside | None,
        *,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Stored label values of K classes, (K, Z, Y, X) or a list of K views (each the whole
        patch, or the part inside the array: `inside.cut`), to 1/0 (or the config's transform)
        in `out` (K, Z, Y, X), NaN where not annotated ("unknown" values, outside the array)."""
        known = [source for source in sources if source is not None]
        if out is None:
            out = np.empty((len(known), *self.spec.target.shape), dtype=np.float32)
        if isinstance(values, np.ndarray) and self.target_transform is None:
            absent = np.array([s.absent for s in known], dtype=values.dtype)
            np.not_equal(values, absent.reshape(-1, 1, 1, 1), out=out, casting="unsafe")
            self._unknown(values, known, out)
        else:  # class by class, each in one pass
            for k, (v, source) in enumerate(zip(values, known, strict=True)):
                if v.shape == out.shape[1:]:
                    target = out[k]
                else:  # a view of the part inside the array
                    assert inside is not None
                    target = out[k][inside.cut]
                if self.target_transform is not None:
                    tensor = torch.from_numpy(v.astype(np.float32))
                    target[...] = self.target_transform(tensor).numpy()
                else:
                    np.not_equal(v, v.dtype.type(source.absent), out=target, casting="unsafe")
                self._unknown([v], [source], target[None])
        if inside is not None:
            inside.fill_outside(out, np.nan)
        return out

    @staticmethod
    def _unknown(
        values: np.ndarray | Sequence[np.ndarray], sources: Sequence[ArraySource], out: np.ndarray
    ) -> None:
        """NaN in `out` where a class's label says "unknown"."""
        for k, source in enumerate(sources):
            if source.unknown is not None:
                out[k][values[k] == source.unknown] = np.nan


@dataclasses.dataclass
class _Job:
    """One sample between issuing its reads and assembling it."""

    crop: Crop
    raw_plan: Plan
    raw: PendingRead | RegionRead
    label_reads: list[tuple[list[int], Plan, list[PendingRead | RegionRead]]]
    seed: int
    crop_index: int = 0
    check_raw: bool = False  # float raw not yet known finite: check it once read


def _label_groups(crop: Crop) -> list[list[int]]:
    """The crop's annotated classes, grouped by label level voxel grid (shared by a group) and
    stored type: a group's values are sampled together into one array of one dtype (uint64
    ids beside uint8 masks would not fit one, and stacking them would round large ids)."""
    groups: dict[tuple[Vec3, Vec3, tuple[int, int, int], str | None], list[int]] = {}
    for k, label in enumerate(crop.labels):
        if label is not None:
            key = (label.level.scale, label.level.translation, label.level.shape, label.dtype)
            groups.setdefault(key, []).append(k)
    return list(groups.values())


def _batch_array(
    shape: tuple[int, ...], *, shared: bool, dtype: np.dtype | type = np.float32
) -> np.ndarray:
    """An empty batch array (float32 unless told); `shared`: in shared memory, as torch's
    collate allocates it in a DataLoader worker, so the batch reaches the main process
    without a copy (moving a 3D batch there afterwards took longer than assembling it)."""
    if not shared:
        return np.empty(shape, dtype=dtype)
    empty = torch.from_numpy(np.empty(0, dtype=dtype))
    storage = empty._typed_storage()._new_shared(math.prod(shape))
    return empty.new(storage).view(shape).numpy()


def _holds(box: Box, start: Sequence[int], stop: Sequence[int], shape: Sequence[int]) -> bool:
    """Whether the region `box` holds every voxel of [start, stop) that lies in the array."""
    for a, b, n, first, last in zip(start, stop, shape, *box, strict=True):
        lo, hi = max(a, 0), min(b, n)
        if hi > lo and (lo < first or hi > last):
            return False
    return True


def _plan(
    grid: Grid, centre: np.ndarray, matrix: np.ndarray, source: ArraySource, *, linear: bool
) -> Plan:
    level = source.level
    a, b = source_map(grid, centre, matrix, level.scale, level.translation)
    radius = _reach(grid, level.scale)
    return plan_read(a, b, grid.shape, level.shape, linear=linear, radius=radius)


@functools.lru_cache(maxsize=64)
def _reach(grid: Grid, scale: tuple[float, float, float]) -> np.ndarray:
    """Half the patch diagonal in a level's voxels: a bound on a rotated patch's reach."""
    half = (np.asarray(grid.shape) - 1) / 2 * np.asarray(grid.scale)
    reach = float(np.linalg.norm(half)) / np.asarray(scale)
    reach.flags.writeable = False  # shared by every call
    return reach


def shifted_plan(
    raw_plan: Plan, raw: ArraySource, label: ArraySource, spec: PatchSpec
) -> Plan | None:
    """The label plan as the raw plan moved by whole voxels, when raw and label levels share a
    voxel grid (same voxel size, translations whole voxels apart; CellMap's 8 nm label level
    and 8 nm raw do) and input and target grids are the same: planning once saves time."""
    if spec.input != spec.target or raw.level.scale != label.level.scale:
        return None
    if raw_plan.upper is not None:  # raw interpolated between voxels: labels need their own
        return None
    # Label voxel index = raw voxel index + shift (plain floats: this runs for every sample).
    shift = [
        (a - b) / n
        for a, b, n in zip(
            raw.level.translation, label.level.translation, label.level.scale, strict=True
        )
    ]
    if any(abs(d - round(d)) > 1e-6 for d in shift):
        return None
    return shift_plan(raw_plan, [round(d) for d in shift], label.level.shape)


LABEL_CODES = {"absent": 0, "present": 1, "unknown": 2}  # label boxes shipped to the device


def raw_dtype_problem(crops: Sequence[Crop]) -> str | None:
    """Why raw boxes of these crops cannot share one batch array (None: they can)."""
    dtypes = sorted({str(crop.raw.dtype) for crop in crops})
    if len(dtypes) > 1 or dtypes[0] == "None":
        return f"the training crops' raws must share one known dtype, found {', '.join(dtypes)}"
    return None


def box_map(
    grid: Grid, centre: np.ndarray, matrix: np.ndarray, source: ArraySource
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The axis-aligned box (start, stop: source voxels (z, y, x), may exceed the level) that
    holds every linear tap and nearest voxel of a patch, and the (3, 4) map of output voxel
    index i to box voxel position: map[:, :3] @ i + map[:, 3]."""
    level = source.level
    a, b = source_map(grid, centre, matrix, level.scale, level.translation)
    span = a * (np.asarray(grid.shape) - 1)  # (3, 3): how far each output axis moves each one
    low, high = b + np.minimum(span, 0).sum(axis=1), b + np.maximum(span, 0).sum(axis=1)
    start = np.floor(low).astype(np.int64)
    stop = np.floor(high).astype(np.int64) + 2  # the upper linear tap; nearest rounds below it
    return start, stop, np.concatenate([a, (b - start)[:, None]], axis=1)


def snap(centre: np.ndarray, grid: Grid, source: ArraySource) -> np.ndarray:
    """Move `centre` (< half a voxel) so the grid's voxels sit on the source's voxel centres:
    then an untransformed patch at the source's own voxel size is read exactly, not resampled."""
    scale = np.asarray(source.level.scale)
    origin = np.asarray(source.level.translation)
    half = (np.asarray(grid.shape) - 1) / 2 * np.asarray(grid.scale)
    # floor(x + 0.5), not rint: ties must all go the same way, or neighbouring tiles overlap.
    first = np.floor((centre - half - origin) / scale + 0.5) * scale + origin
    return first + half


class TrainPatches(PatchDataset):
    """Random training samples keyed by (epoch, index); see the module docstring."""

    def __init__(
        self,
        crops: Sequence[Crop],
        spec: PatchSpec,
        *,
        num_samples: int,
        seed: int,
        spatial_transforms: Mapping[str, Any] | None = None,
        probabilities: np.ndarray | None = None,
        on_device: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(crops, spec, **kwargs)
        # Spatial transforms left to the training device (`read_boxes`); raws of one dtype.
        self.on_device = on_device
        self.raw_dtype = np.dtype(self.crops[0].raw.dtype or "float32")
        if on_device and raw_dtype_problem(self.crops) is not None:
            raise ValueError(f"spatial_transforms_on_device: {raw_dtype_problem(self.crops)}")
        self.num_samples = num_samples
        self.seed = seed
        self.spatial_transforms = spatial_transforms
        if probabilities is None:
            probabilities = np.full(len(self.crops), 1 / len(self.crops))
        self.probabilities = np.asarray(probabilities, dtype=float)
        self._cumulative = np.cumsum(self.probabilities)

    def __len__(self) -> int:
        return self.num_samples

    def read(self, requests: Sequence[tuple[int, np.ndarray, np.ndarray, int]]) -> Batch:
        """The batch of samples for requests; with `on_device`, their boxes (`read_boxes`)."""
        return self.read_boxes(requests) if self.on_device else super().read(requests)

    def read_boxes(self, requests: Sequence[tuple[int, np.ndarray, np.ndarray, int]]) -> Batch:
        """`spatial_transforms_on_device`: per sample, the axis-aligned boxes its patch reads,
        and the maps from output voxels into them; `csc.data.device` resamples them on the
        training device. ``input_box`` (N, 1, Z', Y', X'): raw as stored (zeros beyond the
        level); ``output_box`` (N, C, Z'', Y'', X'') uint8 label codes (`LABEL_CODES`: 0
        absent, 1 present, 2 not annotated: "unknown", beyond the level, classes the crop
        does not annotate); ``input_map`` (N, 3, 4) and ``output_map`` (N, C, 3, 4): box voxel
        position (z, y, x) = map[:, :3] @ output index + map[:, 3]; ``annotated`` (N, C);
        ``seed`` (N,) of the value transforms. Boxes are padded to the batch's largest."""
        num, in_worker = len(requests), torch.utils.data.get_worker_info() is not None
        raws = [box_map(self.spec.input, c, m, self.crops[i].raw) for i, c, m, _ in requests]
        labels = [
            [None if lab is None else box_map(self.spec.target, c, m, lab) for lab in crop.labels]
            for crop, (_, c, m, _) in ((self.crops[r[0]], r) for r in requests)
        ]
        raw_size = np.max([stop - start for start, stop, _ in raws], axis=0)
        known = [item for row in labels for item in row if item is not None]
        label_size = np.max([stop - start for start, stop, _ in known], axis=0)
        raw_reads = [
            self._padded(r[0], self.crops[r[0]].raw, item[0], raw_size, linear=True)
            for r, item in zip(requests, raws, strict=True)
        ]
        label_reads = [
            [
                None if item is None else self._padded(r[0], lab, item[0], label_size)
                for lab, item in zip(self.crops[r[0]].labels, row, strict=True)
            ]
            for r, row in zip(requests, labels, strict=True)
        ]
        shape = (num, self.num_classes)
        input_box = _batch_array((num, 1, *raw_size), shared=in_worker, dtype=self.raw_dtype)
        codes = _batch_array((*shape, *label_size), shared=in_worker, dtype=np.uint8)
        input_map = np.stack([item[2] for item in raws])
        output_map, annotated = np.zeros((*shape, 3, 4)), np.zeros(shape, dtype=bool)
        for n, ((plan, read), row, reads) in enumerate(
            zip(raw_reads, labels, label_reads, strict=True)
        ):
            input_box[n, 0] = box_of(plan, read.data())  # zeros beyond the level
            for k, (item, label_read) in enumerate(zip(row, reads, strict=True)):
                if item is None or label_read is None:
                    codes[n, k] = LABEL_CODES["unknown"]
                    continue
                output_map[n, k], annotated[n, k] = item[2], True
                label = self.crops[requests[n][0]].labels[k]
                self._label_codes(label, *label_read, codes[n, k])
        tensors = {
            "input_box": input_box,
            "input_map": input_map,
            "output_box": codes,
            "output_map": output_map,
            "annotated": annotated,
            "seed": np.array([r[3] for r in requests], dtype=np.int64),
        }
        return Batch({key: torch.from_numpy(value) for key, value in tensors.items()})

    def _padded(
        self,
        crop_index: int,
        source: ArraySource | None,
        start: np.ndarray,
        size: np.ndarray,
        *,
        linear: bool = False,
    ) -> tuple[Plan, PendingRead | RegionRead]:
        """The box of `size` voxels from `start` (the batch's largest box: every sample's
        fits its own) as a plan, and its read, issued."""
        first = tuple(start.tolist())
        stop = tuple(a + int(n) for a, n in zip(first, size, strict=True))
        return Plan(first, stop, None, linear=linear), self._box(crop_index, source, first, stop)

    @staticmethod
    def _label_codes(
        source: ArraySource | None, plan: Plan, read: PendingRead | RegionRead, out: np.ndarray
    ) -> None:
        """A label box's stored values to codes in `out` (Z, Y, X): 1 present, 0 absent, 2
        "unknown" and beyond the level."""
        assert source is not None
        box = box_of(plan, read.data())
        np.not_equal(box, box.dtype.type(source.absent), out=out, casting="unsafe")
        if source.unknown is not None:
            out[box == source.unknown] = LABEL_CODES["unknown"]
        runs = [
            (max(0, -a), max(0, min(b, n) - a))
            for a, b, n in zip(plan.start, plan.stop, source.level.shape, strict=True)
        ]
        Inside(tuple(runs)).fill_outside(out, LABEL_CODES["unknown"])

    def draw(self, epoch: int, index: int) -> tuple[int, np.ndarray, np.ndarray, int]:
        """The (crop, centre, matrix, seed) of sample `index` of `epoch`."""
        return self.draw_many([(epoch, index)])[0]

    def draw_many(
        self, keys: Sequence[tuple[int, int]]
    ) -> list[tuple[int, np.ndarray, np.ndarray, int]]:
        """`draw` for many keys at once: their random numbers come from one vectorised call."""
        epochs = np.array([k[0] for k in keys], dtype=np.int64)
        indices = np.array([k[1] for k in keys], dtype=np.int64)
        # Columns: 0 crop, 1-3 centre, 4 value-transform seed, 5- spatial transforms.
        numbers = uniforms(self.seed, epochs, indices, 5 + NUM_SPATIAL_DRAWS)
        chosen = np.minimum(
            np.searchsorted(self._cumulative, numbers[:, 0], side="right"), len(self.crops) - 1
        )
        draws = []
        for row, crop_index in zip(numbers, chosen.tolist(), strict=True):
            crop = self.crops[crop_index]
            low, high = np.asarray(crop.low), np.asarray(crop.high)
            centre = snap(low + row[1:4] * (high - low), self.spec.input, crop.raw)
            matrix = spatial_matrix(self.spatial_transforms, Draws(row[5:]))
            draws.append((crop_index, centre, matrix, int(row[4] * 2**62)))
        return draws

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> Batch:
        return self.read(self.draw_many(keys))

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        return self.__getitems__([key])[0]


class ValidationTiles(PatchDataset):
    """Non-overlapping target-sized tiles of every crop in a fixed order (all of them), or a
    seeded random subset of `limit` of them that is the same every epoch. Under torchrun,
    rank r of n takes tiles r, r + n, ... of that list: together the ranks see it once."""

    def __init__(
        self,
        crops: Sequence[Crop],
        spec: PatchSpec,
        *,
        limit: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(crops, spec, **kwargs)
        tiles = [(i, centre) for i, crop in enumerate(self.crops) for centre in self._tiles(crop)]
        self.num_tiles = len(tiles)  # before any limit or sharding
        order = np.arange(len(tiles))
        if limit is not None:
            order = np.random.default_rng(seed).permutation(len(tiles))[:limit]
        self.keys = order[rank::world_size]  # each tile's index in the full list: its seed
        self.crop_index = np.array([tiles[k][0] for k in self.keys], dtype=np.int32)
        self.centres = np.array([tiles[k][1] for k in self.keys], dtype=np.float64).reshape(-1, 3)

    def _tiles(self, crop: Crop) -> list[np.ndarray]:
        low, high = np.asarray(crop.low), np.asarray(crop.high)
        size = self.spec.target.extent
        counts = np.maximum(1, np.floor((high - low) / size + 1e-9).astype(int))
        first = low + (high - low - counts * size) / 2 + size / 2  # tiling centred in the crop
        axes = [first[d] + size[d] * np.arange(counts[d]) for d in range(3)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
        return [snap(centre, self.spec.input, crop.raw) for centre in grid]

    def __len__(self) -> int:
        return len(self.crop_index)

    def __getitems__(self, keys: Sequence[int]) -> Batch:
        identity = np.eye(3)
        return self.read(
            [(int(self.crop_index[k]), self.centres[k], identity, int(self.keys[k])) for k in keys]
        )

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([key])[0]


class EpochSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """Keys (epoch, index) for `TrainPatches`: `num_samples` per epoch, the epoch advancing at
    each new iteration. Under torchrun, rank r of n takes global indices r, r + n, ..."""

    def __init__(
        self, num_samples: int, *, start_epoch: int = 1, rank: int = 0, world_size: int = 1
    ) -> None:
        self.num_samples = num_samples
        self.epoch = start_epoch
        self.rank = rank
        self.world_size = world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        self.epoch += 1
        for i in range(self.num_samples):
            yield epoch, i * self.world_size + self.rank

    def __len__(self) -> int:
        return self.num_samples


class Batch(list[dict[str, torch.Tensor]]):
    """Samples (dicts of tensors) that are the rows of one batch, `tensors`: datasets write a
    batch in place, so `collate` hands it on without a copy (torch's default_collate, given
    a Batch, still sees a list of samples)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        num = len(next(iter(tensors.values())))
        super().__init__({key: value[n] for key, value in tensors.items()} for n in range(num))
        self.tensors = tensors


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A batch from samples: a `Batch` as it is; else stacked with numpy in the main process
    (torch.stack runs on the intra-op thread pool, which costs far more than the copy for
    batches this small) or by torch's collate in a worker (into shared memory)."""
    if isinstance(samples, Batch):
        return dict(samples.tensors)
    if torch.utils.data.get_worker_info() is not None:
        return torch.utils.data.default_collate(samples)
    return {
        key: torch.from_numpy(np.stack([sample[key].numpy() for sample in samples]))
        for key in samples[0]
    }


def crop_probabilities(
    crops: Sequence[Crop], *, weighted: bool, classes: Sequence[str] = ()
) -> np.ndarray:
    """How often to draw each crop. Unweighted: in proportion to its annotated volume.
    Weighted: pick a class uniformly, then a crop in proportion to that class's foreground
    voxels in it, so every class with any foreground is drawn about equally often."""
    volumes = np.array([crop.volume for crop in crops])
    if not weighted:
        return volumes / volumes.sum()
    foreground = np.zeros((len(crops), len(crops[0].labels)))
    for c, crop in enumerate(crops):
        for k, label in enumerate(crop.labels):
            if label is not None and label.foreground:
                # Voxel counts at different voxel sizes are compared as volumes (nm^3).
                foreground[c, k] = label.foreground * math.prod(label.level.scale)
    totals = foreground.sum(axis=0)
    present = totals > 0
    absent = [classes[k] if k < len(classes) else str(k) for k in np.flatnonzero(~present).tolist()]
    if absent:
        warnings.warn(
            f"classes {', '.join(absent)} have no foreground voxels in any training crop; the "
            "model will never see them",
            DataWarning,
            stacklevel=2,
        )
    if not present.any():
        return volumes / volumes.sum()
    mixture = (foreground[:, present] / totals[present]).mean(axis=1)
    return mixture / mixture.sum()
