"""Multi-crop throughput: our pipeline vs a straightforward PIL implementation of the same views.

Both sides run in the same harness, interleaved round by round on the same real Imagenette JPEGs:
a torch DataLoader with 2 worker processes (1 torch thread each) that reads a file, decodes it once
and produces 2 x 224 + 8 x 98 crops plus iBOT masks for 2 x 224 / 14 = 16 x 16 patch grids, then
the main process builds the training batch. Ours = ``MultiCrop`` (one fused crop+resize per view,
vectorised photometric ops, uint8 out) + ``normalize_batch`` on the batch; baseline = the usual
torchvision-style code written with PIL: crop() + resize() per view, ImageEnhance colour jitter in a
random order, HSV hue shift, PIL GaussianBlur, ImageOps.solarize, ToTensor + Normalize per crop,
masks in the collate function. The harness is the same as the trainer's Ray Data actors run
(the same ``MultiCrop`` object), minus Ray's transport, so the ratio isolates the augmentation code.

Throughput is reported per core as images per CPU-second (main process + workers, from the OS
counters), which stays meaningful on a machine shared with other jobs; wall-clock images/s is in
the details. Prints one JSON line (last line of stdout).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import psutil
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset

from dino_ray.data.allocator import reduce_allocator_churn
from dino_ray.data.decode import DecodeConfig, decode_image
from dino_ray.data.masking import MaskGenerator, MaskingConfig
from dino_ray.data.multicrop import MultiCrop, MultiCropConfig, normalize_batch

DATA_TAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenette-224-subset.tar"


def extract_jpegs(n: int, dest: Path) -> list[Path]:
    """Every k-th JPEG of the archive (all classes), written to ``dest``."""
    with tarfile.open(DATA_TAR) as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and m.name.endswith(".JPEG")),
                         key=lambda m: m.name)
        step = max(1, len(members) // n)
        paths = []
        for i, m in enumerate(members[::step][:n]):
            path = dest / f"{i:05d}.jpg"
            path.write_bytes(tf.extractfile(m).read())
            paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# Ours


class OursDataset(Dataset):
    def __init__(self, paths: list[Path], crop_cfg: MultiCropConfig, mask_cfg: MaskingConfig, seed: int):
        self.paths = paths
        self.decode = DecodeConfig(draft_size=crop_cfg.min_source_size())
        self.multicrop = MultiCrop(crop_cfg, mask_cfg, seed)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        image = decode_image(self.paths[i].read_bytes(), self.decode.draft_size, self.decode.max_pixels)
        return self.multicrop(image, sample_index=i, epoch=0)


# ----------------------------------------------------------------------------------------------
# Baseline: the straightforward per-crop PIL pipeline (torchvision semantics, no torchvision)


class PILViews:
    """One view: random-resized crop, flip, jitter, grayscale, blur, solarize, to normalised tensor."""

    def __init__(self, cfg: MultiCropConfig, size: int, scale: tuple[float, float], blur_p: float,
                 solarize_p: float):
        self.cfg, self.size, self.scale, self.blur_p, self.solarize_p = cfg, size, scale, blur_p, solarize_p
        self.mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self.std = torch.tensor(cfg.std).view(3, 1, 1)

    def crop_box(self, w: int, h: int) -> tuple[int, int, int, int]:
        area = w * h
        for _ in range(10):
            target = area * random.uniform(*self.scale)
            aspect = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = random.randint(0, w - cw), random.randint(0, h - ch)
                return left, top, left + cw, top + ch
        return 0, 0, w, h

    def jitter(self, img: Image.Image) -> Image.Image:
        cfg = self.cfg
        for op in random.sample(range(4), 4):
            if op == 0:
                img = ImageEnhance.Brightness(img).enhance(random.uniform(1 - cfg.brightness, 1 + cfg.brightness))
            elif op == 1:
                img = ImageEnhance.Contrast(img).enhance(random.uniform(1 - cfg.contrast, 1 + cfg.contrast))
            elif op == 2:
                img = ImageEnhance.Color(img).enhance(random.uniform(1 - cfg.saturation, 1 + cfg.saturation))
            else:
                hsv = np.array(img.convert("HSV"))
                hsv[..., 0] += np.uint8(int(random.uniform(-cfg.hue, cfg.hue) * 255) % 256)
                img = Image.fromarray(hsv, "HSV").convert("RGB")
        return img

    def __call__(self, img: Image.Image) -> torch.Tensor:
        cfg = self.cfg
        view = img.crop(self.crop_box(*img.size)).resize((self.size, self.size), Image.Resampling.BICUBIC)
        if random.random() < cfg.flip_probability:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if random.random() < cfg.color_jitter_probability:
            view = self.jitter(view)
        if random.random() < cfg.grayscale_probability:
            view = view.convert("L").convert("RGB")
        if random.random() < self.blur_p:
            view = view.filter(ImageFilter.GaussianBlur(radius=random.uniform(*cfg.blur_sigma_range)))
        if random.random() < self.solarize_p:
            view = ImageOps.solarize(view, threshold=128)
        x = torch.from_numpy(np.asarray(view, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std


class BaselineDataset(Dataset):
    def __init__(self, paths: list[Path], cfg: MultiCropConfig):
        self.paths = paths
        self.globals = [PILViews(cfg, cfg.global_crops_size, cfg.global_crops_scale, p, s)
                        for p, s in zip(cfg.global_blur_probability, cfg.global_solarize_probability)]
        self.local = PILViews(cfg, cfg.local_crops_size, cfg.local_crops_scale, cfg.local_blur_probability, 0.0)
        self.n_local = cfg.local_crops_number

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, list[torch.Tensor]]:
        img = Image.open(io.BytesIO(self.paths[i].read_bytes())).convert("RGB")
        return {"global": [v(img) for v in self.globals], "local": [self.local(img) for _ in range(self.n_local)]}


class BaselineCollate:
    """DINOv2-style collate: crop-major stacking and per-batch stratified masks."""

    def __init__(self, cfg: MultiCropConfig, mask_cfg: MaskingConfig):
        self.generator = MaskGenerator(cfg.mask_grid)
        self.mask_cfg = mask_cfg
        self.n_global = cfg.global_crops_number

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng(random.getrandbits(32))
        n = len(samples) * self.n_global
        n_masked = int(n * self.mask_cfg.mask_probability)
        strata = np.linspace(*self.mask_cfg.mask_ratio_min_max, n_masked + 1)
        n_patches = self.generator.num_patches
        masks = [self.generator(int(n_patches * rng.uniform(strata[k], strata[k + 1])), rng) for k in range(n_masked)]
        masks += [self.generator(0, rng) for _ in range(n - n_masked)]
        rng.shuffle(masks)
        return {
            "global_crops": torch.stack([s["global"][c] for c in range(self.n_global) for s in samples]),
            "local_crops": torch.stack([s["local"][c] for c in range(len(samples[0]["local"])) for s in samples]),
            "masks": torch.from_numpy(np.stack(masks).reshape(n, -1)),
        }


# ----------------------------------------------------------------------------------------------


def _worker_init(_: int) -> None:
    # Same process setup for both pipelines (what our Ray Data actors do at start-up).
    reduce_allocator_churn()
    torch.set_num_threads(1)


def _loader(dataset: Dataset, batch_size: int, workers: int, collate=None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                      persistent_workers=workers > 0, prefetch_factor=2 if workers else None,
                      worker_init_fn=_worker_init)


def _cpu_seconds() -> float:
    """CPU time of this process and all its children (the DataLoader workers) so far."""
    total = time.process_time()
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _epoch(loader: DataLoader, finish) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds over main + workers, images) of one pass."""
    c0, t0 = _cpu_seconds(), time.perf_counter()
    n = 0
    for batch in loader:
        out = finish(batch)
        n += out["global_crops"].shape[0] // 2
    return time.perf_counter() - t0, _cpu_seconds() - c0, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and rounds (about a minute)")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    n_images = args.images or (128 if args.quick else 384)
    rounds = args.rounds or (2 if args.quick else 4)
    torch.set_num_threads(1)

    crop_cfg, mask_cfg = MultiCropConfig(), MaskingConfig()
    with tempfile.TemporaryDirectory(prefix="dino-ray-bench-") as tmp:
        paths = extract_jpegs(n_images, Path(tmp))
        ours = _loader(OursDataset(paths, crop_cfg, mask_cfg, seed=0), args.batch_size, args.workers)
        base = _loader(BaselineDataset(paths, crop_cfg), args.batch_size, args.workers,
                       BaselineCollate(crop_cfg, mask_cfg))
        ours_finish = lambda b: normalize_batch(b, crop_cfg)  # noqa: E731 - the trainer's on-device step
        base_finish = lambda b: b  # noqa: E731 - the baseline collate already built the batch
        _epoch(ours, ours_finish)  # warm-up: worker start, first imports
        _epoch(base, base_finish)
        wall: dict[str, list[float]] = {"ours": [], "baseline": []}
        cpu: dict[str, list[float]] = {"ours": [], "baseline": []}
        for _ in range(rounds):
            for name, loader, finish in (("ours", ours, ours_finish), ("baseline", base, base_finish)):
                dt, cpu_s, n = _epoch(loader, finish)
                assert n == n_images, (name, n)
                wall[name].append(dt)
                cpu[name].append(cpu_s)
    total = n_images * rounds
    per_core = {k: total / sum(v) for k, v in cpu.items()}  # images per CPU-second: robust to other load
    per_wall = {k: total / sum(v) for k, v in wall.items()}
    print(json.dumps({
        "name": "multicrop_dataloader_2x224_8x98_masks",
        "unit": "images/s per core (images / CPU-seconds of main process + 2 workers)",
        "ours": round(per_core["ours"], 2),
        "baseline": round(per_core["baseline"], 2),
        "ratio": round(per_core["ours"] / per_core["baseline"], 3),
        "wall_images_per_s": {k: round(v, 2) for k, v in per_wall.items()},
        "wall_ratio": round(per_wall["ours"] / per_wall["baseline"], 3),
        "images": n_images, "rounds": rounds, "workers": args.workers, "batch_size": args.batch_size,
        "round_wall_seconds": {k: [round(t, 2) for t in v] for k, v in wall.items()},
        "round_cpu_seconds": {k: [round(t, 2) for t in v] for k, v in cpu.items()},
        "crops": "2x224 + 8x98, masks 2 x 16x16", "source": "Imagenette 224 px JPEG",
        "torch_threads_per_worker": 1, "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "pillow": PIL.__version__,
                     "numpy": np.__version__},
    }))


if __name__ == "__main__":
    main()
