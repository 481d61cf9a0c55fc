"""fovea.ops: every operation on a real photo, a property per operation that a wrong implementation fails,
the gallery, the CLI, and --preprocess through train -> model.json -> predict / evaluate."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from conftest import make_subset
from PIL import Image

import fovea
from fovea import ops
from fovea.data import load_images, load_square, read_image
from fovea.data._layout import Sample
from fovea.errors import FoveaError
from fovea.runtime import infer

OPS = [o.name for o in ops.list_ops()]


def fovea_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fovea.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=os.environ.copy())


@pytest.fixture(scope="module")
def photo_path(pets_root: Path) -> Path:
    return sorted((pets_root / "train" / "cat").glob("*.jpg"))[0]


@pytest.fixture(scope="module")
def photo(photo_path: Path) -> np.ndarray:
    return read_image(photo_path)  # (180, 180, 3) uint8, a real cat


def square_mask(size: int = 64, lo: int = 22, hi: int = 42) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[lo:hi, lo:hi] = 255  # a 20 x 20 white square
    return m


# --- every operation, on a real photo ------------------------------------------------------------


@pytest.mark.parametrize("name", OPS)
def test_every_operation_on_a_real_photo(name: str, photo: np.ndarray) -> None:
    op = ops.get_op(name)
    other = ops.apply("otsu", photo) if op.inputs == 2 else None
    out = ops.apply(name, photo, other)
    assert out.dtype == np.uint8
    assert out.shape[:2] == photo.shape[:2]
    assert out.ndim == 2 or out.shape[2] == 3
    assert out.min() < out.max(), f"{name} gave a constant image on a photo"
    if op.preprocess:  # as a training step: always (H, W, 3) RGB
        assert ops.preprocess(photo, [name]).shape == photo.shape


def test_registry_lists_the_issue_operations() -> None:
    wanted = {"gray", "hsv", "rgb", "stretch", "equalize", "clahe", "threshold", "otsu", "adaptive", "invert", "erode",
              "dilate", "open", "close", "and", "or", "xor", "not", "sobel", "scharr", "laplacian", "canny", "contours",
              "hough", "conv"}
    assert wanted <= set(OPS)
    assert {"horizontal", "vertical", "diagonal"} <= set(ops.KERNELS)


# --- colour spaces and contrast -------------------------------------------------------------------


def test_gray_is_luma_and_rgb_of_gray_has_three_equal_channels(photo: np.ndarray) -> None:
    g = ops.apply("gray", photo)
    r, gr, b = (photo[..., i].astype(np.float64) for i in range(3))
    assert g.ndim == 2
    assert np.abs(g - (0.299 * r + 0.587 * gr + 0.114 * b)).max() <= 1  # BT.601, not BGR order
    back = ops.apply("rgb", g)
    assert back.shape == photo.shape
    assert (back[..., 0] == back[..., 1]).all() and (back[..., 1] == back[..., 2]).all()
    assert (back[..., 0] == g).all()


def test_hsv_round_trip_returns_the_image(photo: np.ndarray) -> None:
    hsv = ops.apply("hsv", photo)
    assert hsv[..., 0].max() <= 179  # OpenCV's hue: degrees / 2
    back = ops.apply("rgb", hsv)
    diff = np.abs(back.astype(int) - photo)
    assert diff.max() <= 3 and diff.mean() < 0.5  # uint8 HSV rounds; the course's 0-179 hue loses a little


def test_stretch_maps_the_percentiles_to_the_full_range(photo: np.ndarray) -> None:
    dull = (photo.astype(np.float32) * 0.3 + 90).astype(np.uint8)  # values in 90..166
    out = ops.apply("stretch", dull, low=2, high=98)
    assert np.percentile(out, 2) <= 2 and np.percentile(out, 98) >= 252
    assert ops.apply("stretch", np.full((8, 8), 7, np.uint8)).max() == 7  # flat: nothing to stretch


def test_equalize_flattens_the_histogram(photo: np.ndarray) -> None:
    dull = (ops.apply("gray", photo) // 4 + 100).astype(np.uint8)
    out = ops.apply("equalize", dull)
    # Equalized, a level's share of pixels at or below it is the level / 255: the CDF is the diagonal
    # (at the levels used; one input level cannot be split, so the CDF steps between them).
    cdf = np.cumsum(np.bincount(out.ravel(), minlength=256)) / out.size
    used = np.unique(out)
    assert np.abs(cdf[used] - used / 255).max() < 0.03
    assert out.min() == 0 and out.max() == 255
    before = np.cumsum(np.bincount(dull.ravel(), minlength=256)) / dull.size
    assert np.abs(before[np.unique(dull)] - np.unique(dull) / 255).max() > 0.3


def test_clahe_adds_local_contrast_and_keeps_colour(photo: np.ndarray) -> None:
    g = ops.apply("gray", photo)
    dull = (g // 4 + 100).astype(np.uint8)
    assert ops.apply("clahe", dull).std() > 1.5 * dull.std()
    out = ops.apply("clahe", photo, clip=3.0, tile=4)
    lab_in, lab_out = cv2.cvtColor(photo, cv2.COLOR_RGB2LAB), cv2.cvtColor(out, cv2.COLOR_RGB2LAB)
    assert np.abs(lab_in[..., 0].astype(int) - lab_out[..., 0]).mean() > 3  # lightness changed
    assert np.abs(lab_in[..., 1:].astype(int) - lab_out[..., 1:]).mean() < 1.5  # a*, b* (the colour) kept


# --- thresholds and masks --------------------------------------------------------------------------


def test_threshold_is_gray_above_the_value(photo: np.ndarray) -> None:
    out = ops.apply("threshold", photo, value=100)
    assert set(np.unique(out)) == {0, 255}
    assert ((out == 255) == (ops.apply("gray", photo) > 100)).all()


def test_otsu_is_binary_and_splits_two_modes(photo: np.ndarray) -> None:
    assert set(np.unique(ops.apply("otsu", photo))) == {0, 255}
    rng = np.random.default_rng(0)
    img = np.where(np.arange(64)[None, :] < 32, 60, 190).repeat(64, 0) + rng.integers(-20, 21, (64, 64))
    img = img.astype(np.uint8)
    out = ops.apply("otsu", img)
    assert ((out == 255) == (np.arange(64)[None, :] >= 32)).all()  # the level falls between the two modes


def test_adaptive_finds_a_dark_patch_on_a_ramp_where_no_global_level_can() -> None:
    ramp = np.tile(np.linspace(0, 255, 96), (96, 1)).astype(np.uint8)  # lighting from left to right
    img = ramp.copy()
    img[40:50, 60:70] = np.clip(img[40:50, 60:70].astype(int) - 40, 0, 255)
    out = ops.apply("adaptive", img, block=21, c=5)  # a block about twice the patch
    assert (out[40:50, 60:70] == 0).all()
    assert (out[:30] == 255).all()  # the ramp alone is above its local mean - c everywhere
    global_ = ops.apply("threshold", img, value=int(img[40:50, 60:70].max()))
    assert (global_[:30] == 0).sum() > 1000  # any level dark enough for the patch blacks out the ramp's left


def test_invert_twice_is_identity(photo: np.ndarray) -> None:
    once = ops.apply("invert", photo)
    assert (once.astype(int) == 255 - photo.astype(int)).all()
    assert (ops.apply("invert", once) == photo).all()


def test_bitwise_truth_tables_on_masks() -> None:
    a = np.zeros((10, 10), np.uint8)
    a[:, :5] = 255  # left half
    b = np.zeros((10, 10), np.uint8)
    b[:5] = 255  # top half
    left, top = a == 255, b == 255
    assert ((ops.apply("and", a, b) == 255) == (left & top)).all()
    assert ((ops.apply("or", a, b) == 255) == (left | top)).all()
    assert ((ops.apply("xor", a, b) == 255) == (left ^ top)).all()
    assert ((ops.apply("not", a) == 255) == ~left).all()
    # A mask read back from a file is RGB with equal channels, perhaps JPEG-noisy: still a mask.
    noisy = np.repeat(np.clip(a.astype(int) + np.where(left, -30, 30), 0, 255).astype(np.uint8)[..., None], 3, 2)
    assert (ops.apply("and", noisy, b) == ops.apply("and", a, b)).all()
    with pytest.raises(FoveaError, match="differ in size"):
        ops.apply("and", a, b[:5])
    with pytest.raises(FoveaError, match="second"):
        ops.apply("xor", a)


# --- morphology ------------------------------------------------------------------------------------


def test_erosion_shrinks_and_dilation_grows_a_white_square() -> None:
    m = square_mask()
    assert (ops.apply("erode", m) == 255).sum() == 18 * 18
    assert (ops.apply("dilate", m) == 255).sum() == 22 * 22
    assert (ops.apply("erode", m, size=5) == 255).sum() == 16 * 16
    assert (ops.apply("dilate", m, iterations=2) == 255).sum() == 24 * 24


def test_structuring_element_shape_and_size() -> None:
    dot = np.zeros((15, 15), np.uint8)
    dot[7, 7] = 255
    assert (ops.apply("dilate", dot, shape="rect") == 255).sum() == 9
    assert (ops.apply("dilate", dot, shape="cross") == 255).sum() == 5
    ellipse = (ops.apply("dilate", dot, size=7, shape="ellipse") == 255).sum()
    assert 25 < ellipse < 49  # rounder than the 7 x 7 square, more than the cross


def test_opening_removes_a_speck_and_closing_fills_a_hole() -> None:
    m = square_mask()
    m[5, 5] = m[5:7, 50:52] = 255  # a 1-px and a 2 x 2 speck
    opened = ops.apply("open", m, size=3)
    assert opened[5, 5] == 0 and (opened[5:7, 50:52] == 0).all()
    assert (opened[22:42, 22:42] == 255).all()  # the square survives whole
    holed = square_mask()
    holed[30, 30] = 0
    assert ops.apply("close", holed)[30, 30] == 255


# --- edges and filters -----------------------------------------------------------------------------


def vertical_edge() -> np.ndarray:
    img = np.zeros((40, 40), np.uint8)
    img[:, 20:] = 255
    return img


def test_sobel_and_scharr_see_a_vertical_edge_in_x_only() -> None:
    img = vertical_edge()
    for name in ("sobel", "scharr"):
        gx = ops.apply(name, img, dx=1, dy=0)
        gy = ops.apply(name, img, dx=0, dy=1)
        assert gx[:, 19:21].min() >= 127 and gx[:, 19:21].max() == 255  # a 0 -> 255 step scales to 255
        assert gx[:, :17].max() == 0 and gx[:, 23:].max() == 0
        assert gy.max() == 0
        assert (ops.apply(name, img) == gx).all()  # magnitude: the y part is 0 here


def test_laplacian_marks_a_thin_line() -> None:
    img = np.zeros((30, 30), np.uint8)
    img[:, 15] = 255
    out = ops.apply("laplacian", img)
    assert (out[:, 15] == 255).all()
    assert out[:, :12].max() == 0 and out[:, 19:].max() == 0


def test_canny_finds_a_drawn_rectangle_exactly_at_its_border() -> None:
    img = np.zeros((100, 100), np.uint8)
    x0, y0, x1, y1 = 20, 30, 69, 79
    cv2.rectangle(img, (x0, y0), (x1, y1), 200, -1)
    edges = ops.apply("canny", img)
    ys, xs = np.nonzero(edges)
    assert len(ys) > 0.9 * 2 * ((x1 - x0) + (y1 - y0))
    on_border = (((np.abs(xs - x0) <= 1) | (np.abs(xs - x1) <= 1)) & (ys >= y0 - 1) & (ys <= y1 + 1)) | (
        ((np.abs(ys - y0) <= 1) | (np.abs(ys - y1) <= 1)) & (xs >= x0 - 1) & (xs <= x1 + 1))
    assert on_border.all()  # every edge pixel within one pixel of the outline, none inside or outside
    for side in (xs <= x0 + 1, xs >= x1 - 1, ys <= y0 + 1, ys >= y1 - 1):
        assert side.sum() >= (y1 - y0) * 0.9  # and all four sides are found


def test_conv_with_the_course_kernels_responds_to_its_own_edge_direction() -> None:
    v = vertical_edge()
    h = v.T.copy()  # a horizontal edge
    assert ops.apply("conv", v, kernel="vertical")[:, 19:21].min() == 255
    assert ops.apply("conv", h, kernel="vertical").max() == 0
    assert ops.apply("conv", h, kernel="horizontal")[19:21].min() == 255
    assert ops.apply("conv", v, kernel="horizontal").max() == 0
    d = np.tril(np.full((40, 40), 255, np.uint8))  # a 45-degree edge
    assert ops.apply("conv", d, kernel="diagonal").max() == 255
    # A custom kernel as rows; the same as the built-in Sobel.
    assert (ops.apply("conv", v, kernel="1,0,-1;2,0,-2;1,0,-1") == ops.apply("conv", v, kernel="sobel_x")).all()
    with pytest.raises(FoveaError, match="rows of numbers"):
        ops.apply("conv", v, kernel="1,0;1")


def test_conv_is_a_true_convolution_and_smoothing_keeps_brightness(photo: np.ndarray) -> None:
    dot = np.zeros((9, 9), np.uint8)
    dot[4, 4] = 100
    out = ops.apply("conv", dot, kernel="0,0,0;0,0,1;0,0,0")  # not zero-sum: no abs, clipped
    assert out[4, 5] == 100 and out.sum() == 100  # convolution moves the impulse by the kernel's offset
    blurred = ops.apply("conv", photo, kernel="blur")
    assert abs(float(blurred.mean()) - float(photo.mean())) < 1


def test_median_removes_salt_noise_that_blur_only_smears() -> None:
    img = np.full((20, 20), 50, np.uint8)
    img[10, 10] = 255
    assert ops.apply("median", img, size=3)[10, 10] == 50
    assert ops.apply("blur", img, size=3)[10, 10] > 50


# --- contours and lines ------------------------------------------------------------------------------


def shapes_image() -> np.ndarray:
    img = np.full((120, 160, 3), 30, np.uint8)
    cv2.rectangle(img, (10, 10), (29, 39), (220, 220, 220), -1)  # 20 x 30 px
    cv2.rectangle(img, (60, 10), (69, 19), (200, 180, 160), -1)  # 10 x 10 px
    cv2.circle(img, (110, 80), 25, (250, 250, 250), -1)
    return img


def test_contours_count_the_drawn_shapes_and_their_areas() -> None:
    found = ops.find_contours(shapes_image())
    assert found.count == 3
    circle, rect, small = found.areas
    assert rect == 19 * 29 and small == 9 * 9  # polygon through the boundary pixels' centres
    assert abs(circle - np.pi * 25**2) / (np.pi * 25**2) < 0.05
    assert found.image.shape == (120, 160, 3)
    assert (found.image[10, 10] == (0, 255, 0)).all()  # the outline drawn in green
    assert ops.find_contours(shapes_image(), min_area=100).count == 2
    dark = ops.find_contours(255 - shapes_image(), objects="dark")
    assert dark.count == 3 and dark.areas[1:] == [19 * 29, 9 * 9]


def test_hough_finds_a_drawn_line_and_nothing_on_a_blank_image() -> None:
    img = np.zeros((200, 200, 3), np.uint8)
    cv2.line(img, (10, 150), (190, 40), (255, 255, 255), 2)
    found = ops.find_lines(img)
    assert found.lines
    p, q = np.array([10, 150]), np.array([190, 40])
    normal = np.array([-(q - p)[1], (q - p)[0]]) / np.linalg.norm(q - p)
    for x1, y1, x2, y2 in found.lines:  # every segment lies on the drawn line
        assert abs((np.array([x1, y1]) - p) @ normal) < 3 and abs((np.array([x2, y2]) - p) @ normal) < 3
    x1, y1, x2, y2 = found.lines[0]
    assert np.hypot(x2 - x1, y2 - y1) > 0.8 * np.linalg.norm(q - p)  # the longest covers most of it
    assert ops.find_lines(np.zeros((100, 100), np.uint8)).lines == []


# --- parameters and steps -----------------------------------------------------------------------------


def test_bad_names_and_parameters_say_what_to_do(photo: np.ndarray) -> None:
    with pytest.raises(FoveaError, match=r"did you mean clahe\?.*choose from gray"):
        ops.apply("clahee", photo)
    with pytest.raises(FoveaError, match="clahe has no parameter 'clipp'; it takes clip=2.0 tile=8"):
        ops.apply("clahe", photo, clipp=3)
    with pytest.raises(FoveaError, match="tile must be an integer"):
        ops.apply("clahe", photo, tile="two")
    with pytest.raises(FoveaError, match="shape must be one of rect, ellipse, cross"):
        ops.apply("erode", photo, shape="star")
    with pytest.raises(FoveaError, match="block must be an odd integer"):
        ops.apply("adaptive", photo, block=10)
    with pytest.raises(FoveaError, match="uint8"):
        ops.apply("gray", photo.astype(np.float32))
    assert (ops.apply("clahe", photo, clip="3", tile="4") == ops.apply("clahe", photo, clip=3.0, tile=4)).all()


def test_steps_parse_record_and_replay(photo: np.ndarray) -> None:
    steps = ops.parse_steps("gray, clahe:clip=3")
    assert [s.to_dict() for s in steps] == [{"op": "gray", "params": {}}, {"op": "clahe", "params": {"clip": 3.0, "tile": 8}}]
    assert [str(s) for s in steps] == ["gray", "clahe:clip=3.0"]
    assert ops.parse_steps([s.to_dict() for s in steps]) == steps  # from model.json
    out = ops.preprocess(photo, steps)
    by_hand = ops.apply("clahe", ops.apply("gray", photo), clip=3.0)
    assert out.shape == photo.shape and (out == by_hand[..., None]).all()
    for bad, why in [("gray,contours", "cannot be a preprocessing step"), ("and", "second mask"),
                     ("blurr", "did you mean blur"), ("clahe:clip", "KEY=VALUE"), ("blur:size=4", "odd")]:
        with pytest.raises(FoveaError, match=why):
            ops.parse_steps(bad)


# --- the gallery ----------------------------------------------------------------------------------


def test_gallery_writes_one_png_with_every_operation(photo: np.ndarray, tmp_path: Path) -> None:
    from fovea.ops._gallery import LABEL_PX

    g = ops.gallery(photo, tmp_path / "g.png", columns=6)
    assert g.tiles == 1 + len(OPS) + 3  # the photo, every operation, conv with 4 kernels
    sheet = np.asarray(Image.open(g.path))
    assert sheet.shape == (g.height, g.width, 3)
    cell_w, cell_h = g.width // 6, g.height // -(-g.tiles // 6)
    h, w = photo.shape[:2]

    def tile(i: int) -> np.ndarray:
        x, y = (i % 6) * cell_w + 4, (i // 6) * cell_h + 4 + LABEL_PX
        return sheet[y : y + h, x : x + w]

    assert (tile(0) == photo).all()
    assert (tile(1) == ops.apply("gray", photo)[..., None]).all()  # the second tile: gray, as listed
    last = tile(g.tiles - 1)
    assert (last == ops.apply("hough", photo, thickness=2)).all()  # drawn thicker in the gallery
    with pytest.raises(FoveaError, match="PNG"):
        ops.gallery(photo, tmp_path / "g.jpg")


# --- the CLI ---------------------------------------------------------------------------------------


def test_cli_gallery_and_a_bad_name(photo_path: Path, tmp_path: Path) -> None:
    done = fovea_cli("ops", "gallery", str(photo_path), "--out", str(tmp_path / "gallery.png"))
    assert done.returncode == 0, done.stderr
    assert "32 tiles" in done.stdout and Image.open(tmp_path / "gallery.png").format == "PNG"
    done = fovea_cli("ops", "blurr", str(photo_path), cwd=tmp_path)  # exit 2, one line, no traceback
    assert done.returncode == 2 and done.stderr.startswith("error:") and "did you mean blur" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_cli_masks_hough_chains_and_parameter_errors(photo_path: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fovea.cli import app

    def run(*args: str) -> Any:
        return CliRunner().invoke(app, ["ops", *args])

    shapes = tmp_path / "shapes.png"
    Image.fromarray(shapes_image()).save(shapes)
    r = run("contours", str(shapes), "--out", str(tmp_path / "c.png"))
    assert r.exit_code == 0 and r.output.startswith("3 contours") and "551, 81" in r.output
    assert (np.asarray(Image.open(tmp_path / "c.png")) == ops.apply("contours", shapes_image())).all()
    mask = tmp_path / "mask.png"
    assert run("otsu", str(photo_path), "--out", str(mask)).exit_code == 0
    m = np.asarray(Image.open(mask))
    assert m.ndim == 2 and set(np.unique(m)) == {0, 255}  # a mask is written as a gray PNG
    assert run("xor", str(mask), "--mask2", str(mask), "--out", str(tmp_path / "xor.png")).exit_code == 0
    assert np.asarray(Image.open(tmp_path / "xor.png")).max() == 0  # a mask xor itself is empty
    assert run("erode", str(mask), "-p", "size=5", "--out", str(tmp_path / "e.png")).exit_code == 0
    assert (np.asarray(Image.open(tmp_path / "e.png")) == ops.apply("erode", m, size=5)).all()
    lines = tmp_path / "line.png"
    img = np.zeros((100, 100), np.uint8)
    cv2.line(img, (10, 50), (90, 50), 255, 2)
    Image.fromarray(img).save(lines)
    r = run("hough", str(lines), "--out", str(tmp_path / "h.png"))
    assert r.exit_code == 0 and "2 line segments" in r.output  # the two borders of the 2-px stroke
    segs = re.findall(r"\((\d+), (\d+)\) - \((\d+), (\d+)\)", r.output)
    assert len(segs) == 2 and all(y1 == y2 and abs(int(y1) - 50) <= 2 for _, y1, _, y2 in segs)
    r = run("gray,clahe:clip=3", str(photo_path), "--out", str(tmp_path / "chain.png"))
    assert r.exit_code == 0
    want = ops.preprocess(read_image(photo_path), "gray,clahe:clip=3")
    assert (np.asarray(Image.open(tmp_path / "chain.png")) == want).all()
    assert "clahe" in run("list").output
    for args, message in [(("clahe", str(photo_path), "-p", "clipp=3"), "it takes clip=2.0 tile=8"),
                          (("gray", str(tmp_path / "missing.jpg")), "file not found"),
                          (("gray", str(photo_path), "--out", "x.jpg"), "PNG"),
                          (("and", str(photo_path)), "--mask2"),
                          (("gray,hough", str(photo_path)), "cannot be a preprocessing step")]:
        r = run(*args)
        assert isinstance(r.exception, FoveaError) and message in str(r.exception), (args, r.output)


# --- --preprocess: the cache, training, the artifact, predict and evaluate -------------------------------


def test_cache_key_includes_the_steps(pets_root: Path, tmp_path: Path) -> None:
    samples = [Sample(str(p), 0) for p in sorted((pets_root / "train" / "cat").glob("*.jpg"))[:6]]
    kw = {"cache": tmp_path, "progress": False}
    plain = load_images(samples, 32, **kw)
    steps = ops.parse_steps("gray,clahe")
    pre = load_images(samples, 32, preprocess=steps, **kw)  # must not reuse the colour entry
    x = pre.images.numpy()
    assert (x[:, 0] == x[:, 1]).all() and not (plain.images == pre.images).all()
    by_hand = np.stack([ops.preprocess(load_square(s.path, 32), steps) for s in samples]).transpose(0, 3, 1, 2)
    assert (x == by_hand).all()
    assert len(list(tmp_path.glob("*.npy"))) == 2
    again = load_images(samples, 32, preprocess=steps, **kw)  # a hit on its own entry
    assert (again.images == pre.images).all() and len(list(tmp_path.glob("*.npy"))) == 2


def test_forked_decoders_apply_the_steps_like_threads(pets_root: Path) -> None:
    # >= 512 images and >= 4 workers take the forked-process path; OpenCV then runs in the children.
    files = sorted((pets_root / "train" / "cat").glob("*.jpg"))[:256] + sorted((pets_root / "train" / "dog").glob("*.jpg"))[:256]
    samples = [Sample(str(p), i // 256) for i, p in enumerate(files)]
    steps = ops.parse_steps("gray,clahe")
    forked = load_images(samples, 24, cache=False, progress=False, workers=4, preprocess=steps)
    threads = load_images(samples[:40], 24, cache=False, progress=False, workers=2, preprocess=steps)
    assert (forked.images[:40] == threads.images).all()


@pytest.fixture(scope="module")
def pre_run(pets_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    data = make_subset(tmp_path_factory.mktemp("pre_data"), 16, 8, pets_root)
    run = fovea.train(data, model="cnn", image_size=32, epochs=2, out=str(tmp_path_factory.mktemp("pre") / "run"),
                      preprocess=("gray", "clahe"), progress=False, seed=0)
    return data, run


def _by_hand(model: fovea.runtime.TorchModel, path: Path, steps: bool) -> np.ndarray:
    x = load_square(path, model.image_size)
    if steps:
        x = np.repeat(ops.apply("clahe", ops.apply("gray", x))[..., None], 3, axis=2)
    t = torch.from_numpy(x.transpose(2, 0, 1).copy())[None]
    logits = infer(model.net, t, mean=model.mean, std=model.std, device=torch.device("cpu"), tta=model.tta)
    return logits.softmax(1)[0].numpy()


def test_preprocess_survives_train_predict_round_trip(pre_run: tuple[Path, Path]) -> None:
    data, run = pre_run
    meta = json.loads((run / "model.json").read_text())
    assert meta["preprocessing"]["steps"] == [{"op": "gray", "params": {}},
                                              {"op": "clahe", "params": {"clip": 2.0, "tile": 8}}]
    assert meta["training"]["preprocess"] == ["gray", "clahe"]
    img = sorted((data / "val" / "dog").glob("*.jpg"))[0]
    done = fovea_cli("predict", str(run), str(img), "--json", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.splitlines()[0])["probabilities"]
    model = fovea.load(run, "cpu")
    want = _by_hand(model, img, steps=True)
    raw = _by_hand(model, img, steps=False)
    probs = np.array([got[c] for c in model.classes])
    assert np.abs(probs - want).max() < 1e-5
    assert np.abs(probs - raw).max() > 1e-4  # the steps matter: without them the net says something else


def test_explain_maps_what_the_network_saw_after_the_steps(pre_run: tuple[Path, Path]) -> None:
    from fovea.explain import explain
    from fovea.explain._cam import _net_maps, resolve_layer

    data, run = pre_run
    model = fovea.load(run, "cpu")
    paths = sorted((data / "val" / "dog").glob("*.jpg"))[:3]
    raw, _, _ = model.load_images(paths)
    got = explain(model, raw)
    by_hand = torch.from_numpy(np.stack([
        np.repeat(ops.apply("clahe", ops.apply("gray", x))[..., None], 3, axis=2).transpose(2, 0, 1)
        for x in raw.permute(0, 2, 3, 1).numpy()]))
    _, layer = resolve_layer(model.net, model.image_size, None)
    kw = dict(method="gradcam", layer=layer, mean=model.mean, std=model.std, batch_size=8)
    want = _net_maps(model.net, by_hand, got.targets, **kw)
    unprocessed = _net_maps(model.net, raw, got.targets, **kw)
    assert np.abs(got.maps - want).max() < 1e-4
    assert np.abs(got.maps - unprocessed).max() > 1e-3


def test_evaluate_applies_the_steps_like_training_did(pre_run: tuple[Path, Path]) -> None:
    data, run = pre_run
    trained = json.loads((run / "metrics.json").read_text())
    m = fovea.evaluate(run, data, progress=False)  # decodes val itself; the model applies its steps
    assert m["n_images"] == trained["n_val"] == 16
    assert m["accuracy"] == trained["accuracy"] and m["roc_auc"] == pytest.approx(trained["roc_auc"], abs=1e-9)


def test_artifacts_without_steps_load_as_before_and_unknown_steps_fail(pre_run: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = pre_run
    img = sorted((data / "val" / "cat").glob("*.jpg"))[0]
    for name in ("model.safetensors", "model.json"):
        (tmp_path / name).write_bytes((run / name).read_bytes())
    meta = json.loads((tmp_path / "model.json").read_text())
    del meta["preprocessing"]["steps"]  # as written before --preprocess existed
    (tmp_path / "model.json").write_text(json.dumps(meta))
    old = fovea.load(tmp_path, "cpu")
    assert old.steps == []
    p = old.predict([img])[0][0].probabilities
    assert np.abs(np.array([p[c] for c in old.classes]) - _by_hand(old, img, steps=False)).max() < 1e-5
    meta["preprocessing"]["steps"] = [{"op": "sepia", "params": {}}]
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(FoveaError, match="upgrade fovea"):
        fovea.load(tmp_path, "cpu")


def test_bad_preprocess_fails_before_training(tiny_pets: Path, tmp_path: Path) -> None:
    with pytest.raises(FoveaError, match="--preprocess .*cannot be a preprocessing step"):
        fovea.train(tiny_pets, preprocess="gray,hough", out=str(tmp_path / "a"), progress=False)
    assert not (tmp_path / "a").exists()
    from typer.testing import CliRunner

    from fovea.cli import app

    r = CliRunner().invoke(app, ["train", str(tiny_pets), "--preprocess", "gray,blurr", "--out", str(tmp_path / "b")])
    assert isinstance(r.exception, FoveaError) and "did you mean blur" in str(r.exception)
    assert not (tmp_path / "b").exists()
