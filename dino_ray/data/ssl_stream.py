"""The training input: a deterministic, resumable stream of multi-crop batches for one rank.

The whole run is one global sequence of sample positions: position ``p`` is image
``perm(epoch)[p % N]`` with ``epoch = p // N`` and a permutation seeded by ``(seed, epoch)``. Step
``t`` of a run with global batch ``G = B * world`` covers positions ``[t*G, (t+1)*G)``, and rank ``r``
takes the ``B`` positions starting at ``t*G + r*B``. Crops and masks are seeded by
``(seed, epoch, image)``. So a run resumed at step ``t`` (after a worker was killed, or with a new
job) sees exactly the crops it would have seen, and no image is decoded for steps already done.

The index lists each image once by URI (``sources.list_images`` on the driver: a file, local or s3://, a tar
member or a parquet row), and the actors read it with ``sources.read_image_bytes``, so every source kind trains
the same way. Each rank builds its own Ray Data pipeline over its positions (``range`` -> an actor pool that
reads, decodes and crops) and iterates it with ``iter_torch_batches``; preprocessing runs in Ray Data
actors with fractional CPUs, so it shares a small cluster with the trainers and scales out to CPU
nodes on a real one. Images that fail to decode during training (the curate stage normally removed
them), or that are gone, are replaced by the next image of the permutation and counted by reason in a
``skips`` column that the train loop sums into the stage summary. Storage that keeps failing is not a bad
image: its ``StorageError`` fails the stream (and Ray Train restarts from the last checkpoint).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from typing import Any, Iterator

import numpy as np

INDEX_FILE = "index.parquet"
log = logging.getLogger("dino_ray.stream")


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    index_uri: str  # parquet with a `uri` column: the images to train on, in a fixed order
    n_images: int
    seed: int
    batch_size: int  # per rank
    world_size: int
    rank: int
    start_step: int
    total_steps: int

    def position(self, j: np.ndarray) -> np.ndarray:
        """Global stream position of this rank's j-th row (row 0 = first row of ``start_step``)."""
        step = self.start_step + j // self.batch_size
        return step * self.batch_size * self.world_size + self.rank * self.batch_size + j % self.batch_size

    @property
    def n_rows(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.batch_size


class CropMaker:
    """Ray Data callable: stream positions -> fixed-shape crop and mask columns."""

    def __init__(self, spec: StreamSpec, data_cfg: Any):
        import pyarrow.parquet as pq
        import torch

        from dino_ray import storage
        from dino_ray.data.allocator import reduce_allocator_churn
        from dino_ray.data.multicrop import MultiCrop

        # Many small crops per image: one thread per actor (scale with actors) and fewer page faults.
        torch.set_num_threads(1)
        reduce_allocator_churn()

        fs, path = storage.filesystem(spec.index_uri)
        self.uris = pq.read_table(path, filesystem=fs, columns=["uri"]).column("uri").to_pylist()
        self.spec = spec
        self.decode_cfg = data_cfg.decode
        # JPEGs much larger than the crops decode at a reduced size (PIL draft), but never so small that
        # the smallest crop would be upsampled.
        self.draft_size = data_cfg.decode.draft_size or data_cfg.crops.min_source_size()
        self.multicrop = MultiCrop(data_cfg.crops, data_cfg.masking, seed=spec.seed)
        self._perms: dict[int, np.ndarray] = {}
        self.warned = 0

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.spec.seed, epoch]).permutation(self.spec.n_images)
        return self._perms[epoch]

    def _image(self, epoch: int, offset: int, skips: np.ndarray) -> tuple[int, np.ndarray]:
        """The first image at or after ``offset`` in the epoch's order that decodes; failures add to ``skips``."""
        from dino_ray.data.decode import SKIP_REASONS, DecodeError, decode_image
        from dino_ray.data.sources import read_image_bytes

        perm = self._perm(epoch)
        for attempt in range(min(16, self.spec.n_images)):
            index = int(perm[(offset + attempt) % self.spec.n_images])
            try:
                return index, decode_image(read_image_bytes(self.uris[index]), draft_size=self.draft_size,
                                           max_pixels=self.decode_cfg.max_pixels, min_size=self.decode_cfg.min_size,
                                           max_bytes=self.decode_cfg.max_bytes)
            except DecodeError as e:
                reason = e.reason
            except FileNotFoundError:
                reason = "missing"
            skips[SKIP_REASONS.index(reason)] += 1
            if self.warned < 20:  # the summary has the counts; the log names the first files
                self.warned += 1
                log.warning("training stream: skipped %s (%s)", self.uris[index], reason)
        raise RuntimeError(f"16 consecutive images failed to decode around position {offset} of epoch {epoch}; "
                           f"check the training index {self.spec.index_uri}")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from dino_ray.data.decode import SKIP_REASONS

        positions = self.spec.position(batch["id"].astype(np.int64))
        columns: dict[str, list[np.ndarray]] = defaultdict(list)
        for pos in positions:
            epoch, offset = divmod(int(pos), self.spec.n_images)
            skips = np.zeros(len(SKIP_REASONS), np.int64)
            index, image = self._image(epoch, offset, skips)
            for name, value in self.multicrop(image, sample_index=index, epoch=epoch).items():
                columns[name].append(value)
            columns["sample_index"].append(np.int64(index))
            columns["epoch"].append(np.int64(epoch))
            columns["skips"].append(skips)
        return {k: np.stack(v) for k, v in columns.items()}


def ssl_batches(spec: StreamSpec, data_cfg: Any, *, num_actors: int = 1, cpus_per_actor: float = 0.25,
                prefetch_batches: int = 2) -> Iterator[dict[str, Any]]:
    """Yield this rank's batches (dicts of CPU tensors) for steps ``start_step..total_steps-1``, in order."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    if spec.n_rows == 0:
        return
    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # batch t must hold step t's positions
    n_blocks = max(1, min(spec.n_rows // spec.batch_size, 4096))
    ds = ray.data.range(spec.n_rows, override_num_blocks=n_blocks).map_batches(
        CropMaker, fn_constructor_kwargs={"spec": spec, "data_cfg": data_cfg}, batch_size=spec.batch_size,
        compute=ActorPoolStrategy(min_size=1, max_size=num_actors), num_cpus=cpus_per_actor)
    yield from ds.iter_torch_batches(batch_size=spec.batch_size, drop_last=True, prefetch_batches=prefetch_batches)


def started_early(batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Start pulling the first batch of ``batches`` now, in a background thread; iterate as usual.

    Ray Data starts its actors and crops the first batch only when asked for it. Asked at once, that
    start-up overlaps whatever the caller does before its first step (building models, DeepSpeed), instead
    of following it. The thread touches the iterator once; iteration proper happens in the caller's thread.
    """
    import queue
    import threading

    first: queue.Queue = queue.Queue(maxsize=1)

    def fetch() -> None:
        try:
            first.put(("batch", next(batches)))
        except StopIteration:
            first.put(("end", None))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            first.put(("error", e))

    threading.Thread(target=fetch, name="first-batch", daemon=True).start()

    def rest() -> Iterator[dict[str, Any]]:
        kind, value = first.get()
        if kind == "error":
            raise value
        if kind == "end":
            return
        yield value
        yield from batches

    return rest()


def write_index(uris: list[str], index_uri: str, ids: list[str] | None = None) -> int:
    """Write the training index (the image order every rank agrees on)."""
    import pyarrow as pa

    from dino_ray import storage

    table = pa.table({"uri": uris, "id": ids if ids is not None else uris})
    storage.write_parquet(index_uri, table)
    return len(uris)
