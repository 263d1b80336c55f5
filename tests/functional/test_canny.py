"""OpenCV's Canny and SSA-Seg's boundary band, bit-identical to ``cv2`` itself (skipped without OpenCV)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptive_heads import functional as AF

cv2 = pytest.importorskip("cv2", reason="OpenCV (opencv-python-headless, the test extra) is the reference")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def official_band(label: np.ndarray) -> np.ndarray:
    """SSA-Seg's ``get_bd`` on one map: OpenCV Canny, 6-px border zeroed, 3×3 dilation (empty below 12 px, where
    the official code crashes)."""
    edge = cv2.Canny(label.astype(np.uint8), 0.1, 0.2)
    edge[:6], edge[-6:], edge[:, :6], edge[:, -6:] = 0, 0, 0, 0
    return (cv2.dilate(edge, np.ones((3, 3), np.uint8)) > 0).astype(np.float32)


@st.composite
def label_maps(draw, max_side: int = 48):
    """Random label maps: half-planes at any angle, discs, thin lines and noise, values from a random palette
    (255 included), some ignored pixels."""
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    palette = rng.choice(np.arange(256), size=rng.integers(2, 9), replace=False)
    if rng.random() < 0.5:
        palette[0] = 255
    yy, xx = np.mgrid[:h, :w]
    label = np.full((h, w), palette[0], np.int64)
    for _ in range(rng.integers(1, 6)):
        value, kind = rng.choice(palette), rng.integers(4)
        if kind == 0:  # half-plane at any angle
            a = rng.uniform(0, 2 * np.pi)
            label[np.cos(a) * (xx - w / 2) + np.sin(a) * (yy - h / 2) > rng.uniform(-0.5, 0.5) * (h + w)] = value
        elif kind == 1:  # disc
            r = rng.uniform(1, max(2.0, max(h, w) / 2))
            label[(yy - rng.uniform(0, h)) ** 2 + (xx - rng.uniform(0, w)) ** 2 < r * r] = value
        elif kind == 2:  # thin slanted line
            a = rng.uniform(0, np.pi)
            label[np.abs(np.cos(a) * (xx - rng.uniform(0, w)) + np.sin(a) * (yy - rng.uniform(0, h))) < 0.7] = value
        else:  # scattered pixels (e.g. ignore)
            label[rng.random((h, w)) < 0.05] = value
    return label


@settings(max_examples=150, deadline=None)
@given(label=label_maps())
def test_canny_edges_bit_identical_to_opencv(label):
    ours = AF.canny_edges(torch.from_numpy(label)[None], 0.1, 0.2)[0].numpy()
    np.testing.assert_array_equal(ours, cv2.Canny(label.astype(np.uint8), 0.1, 0.2) > 0)


@settings(max_examples=150, deadline=None)
@given(label=label_maps())
def test_label_boundary_equals_the_official_opencv_band(label):
    np.testing.assert_array_equal(AF.label_boundary(torch.from_numpy(label)[None])[0].numpy(), official_band(label))


@pytest.mark.parametrize(("low", "high"), [(10, 30), (50, 100), (100, 50), (0.5, 40.7)])
def test_canny_edges_with_hysteresis_matches_opencv(low, high):
    rng = np.random.default_rng(int(low * 7 + high))
    for _ in range(40):
        h, w = rng.integers(3, 48, 2)
        image = cv2.GaussianBlur(rng.integers(0, 256, (h, w)).astype(np.uint8), (5, 5), 1.0)
        ours = AF.canny_edges(torch.from_numpy(image.astype(np.int64))[None], low, high)[0].numpy()
        np.testing.assert_array_equal(ours, cv2.Canny(image, low, high) > 0)


def test_golden_16x20_band_and_distillation_term_equal_opencv():
    labels = torch.zeros(2, 16, 20, dtype=torch.long)
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(20), indexing="ij")
    labels[0][(xx + 2 * yy) > 22] = 3  # a slanted step
    labels[0][(yy - 8) ** 2 + (xx - 12) ** 2 < 10] = 255  # an ignored disc on it
    labels[1][:, 7:9] = 1  # a thin stripe
    labels[1][10:, :] = 4  # meeting a horizontal step: a junction
    reference = torch.from_numpy(np.stack([official_band(lab.numpy()) for lab in labels]))
    band = AF.label_boundary(labels)
    assert torch.equal(band, reference) and band.sum() > 0
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 16, 20, generator=g), torch.randn(2, 5, 16, 20, generator=g)
    torch.testing.assert_close(
        AF.boundary_distillation(student, teacher, labels, 5),
        AF.boundary_distillation(student, teacher, labels, 5, boundary=reference),
        rtol=0,
        atol=0,
    )


def test_band_is_empty_below_the_official_minimum_size():
    for h, w in ((1, 1), (5, 30), (12, 12), (30, 11)):
        labels = torch.randint(0, 3, (2, h, w))
        assert AF.label_boundary(labels).sum() == 0  # the official code crashes below 12 px; nothing is marked
