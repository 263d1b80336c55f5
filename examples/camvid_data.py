"""CamVid in the layout the source distributes, with mmseg-style augmentation.

The folder holds any of ``train/``, ``trainannot/``, ``val/``, ``valannot/``, ``test/``, ``testannot/``:
RGB frames and single-channel label PNGs with the same file names. Labels 0–10 are the 11 classes, 11
(Unlabelled) becomes the ignore index. File names start with the video sequence (``0001TP_006690.png``), which
the evaluation uses for a per-sequence breakdown.

Training pipeline (mmseg's ``RandomResize(ratio_range=(0.5, 2.0))``, ``RandomCrop(cat_max_ratio=0.75)``,
``RandomFlip(0.5)``, ``PhotoMetricDistortion``, normalisation), each sample's randomness drawn from
``(seed, epoch, index)`` so the data order and augmentations are the same for every classifier and do not depend
on the number of loader workers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "CLASSES",
    "IGNORE_INDEX",
    "CamVidSplit",
    "EvalDataset",
    "TrainDataset",
    "channel_statistics",
    "load_split",
    "photometric_distortion",
    "splits_present",
]

CLASSES = [
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
]  # fmt: skip
UNLABELLED = 11
IGNORE_INDEX = 255
SPLITS = ("train", "val", "test")


@dataclass
class CamVidSplit:
    """One split in memory: ``images [N, H, W, 3]`` uint8, ``labels [N, H, W]`` uint8 (255 = ignore)."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    files: list[str]

    @property
    def sequences(self) -> list[str]:
        """The video sequence of every frame (the file-name prefix before ``_``)."""
        return [f.split("_")[0] for f in self.files]

    def __len__(self) -> int:
        return len(self.files)


def splits_present(root: Path) -> list[str]:
    """The splits of ``root`` that have both an image and an annotation folder, in train/val/test order."""
    return [s for s in SPLITS if (root / s).is_dir() and (root / f"{s}annot").is_dir()]


def load_split(root: Path, split: str, per_sequence: int | None = None) -> CamVidSplit:
    """Read ``root/split`` and ``root/splitannot`` (pairs by file name), Unlabelled → :data:`IGNORE_INDEX`;
    ``per_sequence`` keeps only the first frames of every video sequence (smoke tests)."""
    from PIL import Image

    image_dir, label_dir = root / split, root / f"{split}annot"
    files = sorted(p.name for p in image_dir.glob("*.png"))
    missing = [f for f in files if not (label_dir / f).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of {image_dir} have no label in {label_dir}: {missing[:3]}")
    if not files:
        raise FileNotFoundError(f"no PNG images in {image_dir}")
    if per_sequence:
        taken: Counter[str] = Counter()
        kept = []
        for f in files:
            sequence = f.split("_")[0]
            if taken[sequence] < per_sequence:
                kept.append(f)
                taken[sequence] += 1
        files = kept
    images = np.stack([np.asarray(Image.open(image_dir / f).convert("RGB")) for f in files])
    labels = np.stack([np.asarray(Image.open(label_dir / f)) for f in files]).copy()
    if labels.ndim != 3:
        raise ValueError(f"labels in {label_dir} must be single-channel PNGs, got shape {labels.shape[1:]}")
    labels[labels == UNLABELLED] = IGNORE_INDEX
    bad = (labels >= len(CLASSES)) & (labels != IGNORE_INDEX)
    if bad.any():
        raise ValueError(f"labels in {label_dir} outside 0..{UNLABELLED}: {sorted(set(labels[bad].tolist()))[:5]}")
    return CamVidSplit(split, images, labels, files)


def channel_statistics(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``[N, H, W, 3]`` uint8 images, in the 0–255 range (mmseg's convention)."""
    levels = np.arange(256, dtype=np.float64)
    mean, std = [], []
    for c in range(3):  # exact, from each channel's histogram (no float copy of the images)
        hist = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
        m = (hist * levels).sum() / hist.sum()
        mean.append(float(m))
        std.append(float(np.sqrt((hist * (levels - m) ** 2).sum() / hist.sum())))
    return mean, std


# ----------------------------------------------------------------------------- augmentation
def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """``[..., 3]`` float RGB in [0, 255] → HSV with H in [0, 180) (OpenCV's uint8 convention), S, V in [0, 255]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    c = v - rgb.min(-1)
    s = np.where(v > 0, 255.0 * c / np.maximum(v, 1e-6), 0.0)
    safe = np.maximum(c, 1e-6)
    h = np.where(v == r, (g - b) / safe, np.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = np.where(c > 0, (h * 30.0) % 180.0, 0.0)
    return np.stack([h, s, v], -1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0] / 30.0, hsv[..., 1] / 255.0, hsv[..., 2]
    k = lambda n: (n + h) % 6  # noqa: E731
    f = lambda n: v - v * s * np.clip(np.minimum(k(n), 4 - k(n)), 0, 1)  # noqa: E731
    return np.stack([f(5), f(3), f(1)], -1)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion``: each with probability 1/2 — brightness ±32, contrast ×[0.5, 1.5]
    (before or after the HSV steps), saturation ×[0.5, 1.5], hue ±18 (of 180). ``[H, W, 3]`` float in [0, 255]."""
    img = image.astype(np.float32)
    if rng.random() < 0.5:
        img = np.clip(img + rng.uniform(-32, 32), 0, 255)
    contrast_first = rng.random() < 0.5
    contrast = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    if contrast_first and contrast is not None:
        img = np.clip(img * contrast, 0, 255)
    saturation = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    hue = rng.integers(-18, 19) if rng.random() < 0.5 else None
    if saturation is not None or hue is not None:
        hsv = _rgb_to_hsv(img)
        if saturation is not None:
            hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
        if hue is not None:
            hsv[..., 0] = (hsv[..., 0] + hue) % 180
        img = _hsv_to_rgb(hsv)
    if not contrast_first and contrast is not None:
        img = np.clip(img * contrast, 0, 255)
    return img


def _random_crop_box(labels: np.ndarray, crop: int, rng: np.random.Generator, cat_max_ratio: float = 0.75):
    """mmseg's ``RandomCrop``: up to 10 tries for a crop where no class covers more than ``cat_max_ratio``."""
    h, w = labels.shape
    box = (0, 0)
    for _ in range(10):
        box = (int(rng.integers(0, max(h - crop, 0) + 1)), int(rng.integers(0, max(w - crop, 0) + 1)))
        window = labels[box[0] : box[0] + crop, box[1] : box[1] + crop]
        _, counts = np.unique(window[window != IGNORE_INDEX], return_counts=True)
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return box


class TrainDataset(Dataset):
    """Augmented crops ``(image [3, crop, crop] float32 normalised, label [crop, crop] int64)``.

    Args:
        split: the training frames.
        crop: side of the square crop (padding with 0 / ignore where the rescaled image is smaller).
        mean, std: normalisation statistics (0–255 range).
        scale: base scale of the frames (1 = 360×480); each sample is rescaled by ``scale × U(0.5, 2.0)``.
        seed: with :meth:`set_epoch`, fixes every sample's randomness.
    """

    def __init__(self, split: CamVidSplit, crop: int, mean, std, *, scale: float = 1.0, seed: int = 0) -> None:
        self.split, self.crop, self.scale, self.seed, self.epoch = split, crop, scale, seed, 0
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        rng = np.random.default_rng((self.seed, self.epoch, index))
        image, labels = self.split.images[index], self.split.labels[index]
        ratio = self.scale * rng.uniform(0.5, 2.0)
        h, w = labels.shape
        size = (max(1, round(w * ratio)), max(1, round(h * ratio)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        labels = np.asarray(Image.fromarray(labels).resize(size, Image.NEAREST))
        top, left = _random_crop_box(labels, self.crop, rng)
        image = image[top : top + self.crop, left : left + self.crop]
        labels = labels[top : top + self.crop, left : left + self.crop]
        if rng.random() < 0.5:
            image, labels = image[:, ::-1], labels[:, ::-1]
        image = (photometric_distortion(image, rng) - self.mean) / self.std
        out_image = np.zeros((self.crop, self.crop, 3), np.float32)  # pad: 0 after normalisation, ignore labels
        out_labels = np.full((self.crop, self.crop), IGNORE_INDEX, np.int64)
        out_image[: image.shape[0], : image.shape[1]] = image
        out_labels[: labels.shape[0], : labels.shape[1]] = labels
        return torch.from_numpy(out_image).permute(2, 0, 1).contiguous(), torch.from_numpy(out_labels)


class EvalDataset(Dataset):
    """Whole frames, normalised, at ``scale`` (labels stay at full resolution): ``(image, label, index)``."""

    def __init__(self, split: CamVidSplit, mean, std, *, scale: float = 1.0) -> None:
        self.split, self.scale = split, scale
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        from PIL import Image

        image, labels = self.split.images[index], self.split.labels[index]
        if self.scale != 1.0:
            h, w = labels.shape
            image = np.asarray(Image.fromarray(image).resize((round(w * self.scale), round(h * self.scale)), 2))
        image = (image.astype(np.float32) - self.mean) / self.std
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(labels.astype(np.int64)), index
