"""Decoding any image a user might have: formats, orientation, transparency, bit depth, bad files, resizing."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fovea.data import load_square, read_image
from fovea.data._io import MAX_PIXELS, resize_square
from fovea.errors import FoveaError, ImageError

RNG = np.random.default_rng(0)
NOISE = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)  # H=24, W=32: not square, so a transpose shows


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, followed by far too little pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def reason_of(source: str | Path | bytes, **kw: object) -> str:
    with pytest.raises(ImageError) as info:
        read_image(source, **kw)  # type: ignore[arg-type]
    assert isinstance(info.value, FoveaError)  # the CLI's one-line error handling covers it
    assert info.value.reason == str(info.value)
    return info.value.reason


# ------------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize(
    ("fmt", "suffix", "options"),
    [
        ("PNG", ".png", {}),
        ("BMP", ".bmp", {}),
        ("TIFF", ".tiff", {}),
        ("PPM", ".ppm", {}),
        ("WEBP", ".webp", {"lossless": True}),
    ],
)
def test_lossless_formats_decode_to_the_exact_pixels(tmp_path: Path, fmt: str, suffix: str, options: dict) -> None:
    path = tmp_path / f"noise{suffix}"
    Image.fromarray(NOISE).save(path, fmt, **options)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3)
    np.testing.assert_array_equal(out, NOISE)


def test_jpeg_decodes_to_rgb_close_to_the_original(tmp_path: Path) -> None:
    smooth = np.zeros((24, 32, 3), np.uint8)
    smooth[..., 0] = np.linspace(0, 255, 32, dtype=np.uint8)[None, :]
    smooth[..., 2] = 90
    path = tmp_path / "photo.jpg"
    Image.fromarray(smooth).save(path, quality=95)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3)
    assert np.abs(out.astype(int) - smooth).mean() < 3


def test_bytes_and_path_give_the_same_pixels(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(NOISE).save(path)
    np.testing.assert_array_equal(read_image(path.read_bytes()), read_image(path))
    np.testing.assert_array_equal(read_image(str(path)), read_image(path))


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = RNG.integers(0, 256, (10, 12), dtype=np.uint8)
    path = tmp_path / "gray.png"
    Image.fromarray(gray, "L").save(path)
    out = read_image(path)
    assert out.shape == (10, 12, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 8), (0, 0, 0, 0)).save(path, quality=95)  # no ink: white paper
    out = read_image(path)
    assert out.shape == (8, 16, 3)
    assert out.min() >= 250


# ------------------------------------------------------------------------------------------- transparency


def test_rgba_transparent_pixels_are_white_and_opaque_keep_their_colour(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[...] = (10, 200, 30, 255)  # opaque green
    rgba[0, :] = (0, 0, 0, 0)  # fully transparent black: must not come out black
    rgba[1, :] = (255, 0, 0, 128)  # half-transparent red over white -> pink
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = read_image(path).astype(int)
    assert out.shape == (4, 4, 3)
    np.testing.assert_array_equal(out[0], np.full((4, 3), 255))
    assert np.all(out[1, :, 0] == 255) and np.all(np.abs(out[1, :, 1:] - 127) <= 2)
    np.testing.assert_array_equal(out[2:], np.broadcast_to([10, 200, 30], (2, 4, 3)))


def test_gray_with_alpha_is_composited_on_white(tmp_path: Path) -> None:
    la = np.zeros((2, 2, 2), np.uint8)  # black everywhere
    la[..., 1] = [[0, 255], [255, 0]]  # transparent on one diagonal
    path = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(path)
    out = read_image(path)
    np.testing.assert_array_equal(out[..., 0], [[255, 0], [0, 255]])
    assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2])


def test_palette_png_transparent_index_is_white(tmp_path: Path) -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))  # index 0 black, index 1 blue
    img.putpixel((0, 0), 1)
    path = tmp_path / "palette.png"
    img.save(path, transparency=0)  # index 0 is the transparent colour
    assert Image.open(path).mode == "P"
    out = read_image(path)
    assert out.shape == (4, 4, 3)
    assert out[0, 0].tolist() == [0, 0, 255]  # opaque blue kept
    assert (out.reshape(-1, 3)[1:] == 255).all()  # transparent black became white, not black


# -------------------------------------------------------------------------------------------- bit depth


def test_16bit_png_is_scaled_by_the_full_16bit_range(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.all(out[..., 0] == out[..., 2])


def test_16bit_scaling_does_not_stretch_a_dark_image(tmp_path: Path) -> None:
    """Brightness means the same across images: a dark 16-bit image stays dark (no min/max stretch)."""
    values = np.array([[0, 1000, 2570]], dtype=np.uint16)
    path = tmp_path / "dark.png"
    Image.fromarray(values).save(path)
    assert read_image(path)[0, :, 0].tolist() == [0, 4, 10]


def test_16bit_tiff(tmp_path: Path) -> None:
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    assert read_image(path)[0, :, 1].tolist() == [0, 128, 255]


def test_32bit_tiff_is_scaled_by_the_signed_32bit_range(tmp_path: Path) -> None:
    values = np.array([[0, 65535, 2**30, 2**31 - 1, -5]], dtype=np.int32)
    path = tmp_path / "deep32.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I"
    assert read_image(path)[0, :, 0].tolist() == [0, 0, 128, 255, 0]


def test_one_bright_pixel_does_not_change_the_scale_of_a_32bit_mode_image_without_a_depth() -> None:
    """Pillow holds some 16-bit images in 32-bit mode "I"; their scale must not hang on their own maximum."""
    from fovea.data._io import _to_rgb

    values = np.array([[0, 32768, 65535]], dtype=np.int32)
    brighter = np.array([[0, 32768, 65535, 70000]], dtype=np.int32)
    assert _to_rgb(Image.fromarray(values, mode="I"))[0, :, 0].tolist() == [0, 128, 255]
    assert _to_rgb(Image.fromarray(brighter, mode="I"))[0, :, 0].tolist() == [0, 128, 255, 255]


# ------------------------------------------------------------------------------------------ orientation


def corner_image() -> np.ndarray:
    """H=20, W=40, black with a red top-left corner."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:8, :8] = (255, 0, 0)
    return a


def save_with_orientation(path: Path, arr: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, quality=95, exif=exif)


def is_red(px: np.ndarray) -> bool:
    return bool(px[0] > 200 and px[1] < 60 and px[2] < 60)


def test_exif_orientation_6_is_rotated_upright(tmp_path: Path) -> None:
    path = tmp_path / "phone.jpg"
    save_with_orientation(path, corner_image(), 6)  # stored landscape, shown rotated 90 degrees clockwise
    out = read_image(path)
    assert out.shape == (40, 20, 3)
    assert is_red(out[2, -3]), "the stored top-left corner should be shown top-right"
    assert not is_red(out[2, 2]) and not is_red(out[-3, 2]) and not is_red(out[-3, -3])


def test_exif_orientation_3_is_turned_upside_down(tmp_path: Path) -> None:
    path = tmp_path / "upside.jpg"
    save_with_orientation(path, corner_image(), 3)
    out = read_image(path)
    assert out.shape == (20, 40, 3)
    assert is_red(out[-3, -3]) and not is_red(out[2, 2])


def test_without_exif_orientation_nothing_turns(tmp_path: Path) -> None:
    path = tmp_path / "plain.jpg"
    Image.fromarray(corner_image()).save(path, quality=95)
    out = read_image(path)
    assert out.shape == (20, 40, 3) and is_red(out[2, 2])


def test_load_square_applies_orientation_too(tmp_path: Path) -> None:
    big = np.zeros((200, 400, 3), np.uint8)  # large enough for the JPEG draft path at size 32
    big[:80] = (255, 0, 0)  # stored top rows red: shown upright, the right-hand columns are red
    path = tmp_path / "phone.jpg"
    save_with_orientation(path, big, 6)
    out = load_square(path, 32)
    assert out.shape == (32, 32, 3)
    assert is_red(out[16, -2]) and is_red(out[1, -2])
    assert not is_red(out[16, 1]) and not is_red(out[1, 16])  # unrotated, the top row would be red


# ------------------------------------------------------------------------------------- unusable files


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert "empty" in reason_of(path)
    assert "empty" in reason_of(b"")


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = encode(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in reason_of(path)


def test_truncated_png(tmp_path: Path) -> None:
    data = encode(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    assert "truncated" in reason_of(data[: len(data) // 2])


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a photo\n")
    assert "not an image" in reason_of(path)


def test_missing_file(tmp_path: Path) -> None:
    assert "not found" in reason_of(tmp_path / "nowhere.jpg")


def test_image_over_the_pixel_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    Image.new("1", (9000, 8000)).save(path)  # 72 MP > 64 MP, a few kB on disk
    assert path.stat().st_size < 100_000
    reason = reason_of(path)
    assert reason.startswith("too large") and "9000x8000" in reason and f"{MAX_PIXELS:,}" in reason


@pytest.mark.parametrize("side", [9000, 20000])
def test_pixel_limit_is_checked_before_decoding(side: int) -> None:
    """The header alone decides: a file claiming a huge size is refused, not decoded (or reported truncated)."""
    reason = reason_of(png_claiming(side, side))
    assert reason.startswith("too large") and f"{MAX_PIXELS:,}-pixel limit" in reason  # Fovea's words, not Pillow's


def test_max_pixels_is_a_parameter(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    Image.fromarray(NOISE).save(path)
    assert "too large" in reason_of(path, max_pixels=24 * 32 - 1)
    assert read_image(path, max_pixels=24 * 32).shape == (24, 32, 3)


# ---------------------------------------------------------------------------------------------- resizing


def test_resize_square_keeps_the_centre_of_a_wide_image() -> None:
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, :20] = (255, 0, 0)
    wide[:, 20:60] = (0, 255, 0)
    wide[:, 60:] = (0, 0, 255)
    out = resize_square(wide, 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    inner = out[:, 1:-1]  # the outermost columns may blend a little of the cut-off sides (antialiasing)
    assert np.all(inner[..., 1] >= 250) and np.all(inner[..., 0] <= 5) and np.all(inner[..., 2] <= 5)
    assert np.all(out[..., 1] >= 200) and out[..., 0].max() < 64 and out[..., 2].max() < 64


def test_resize_square_keeps_the_centre_of_a_tall_image() -> None:
    tall = np.zeros((90, 30, 3), np.uint8)
    tall[:30] = 255  # white top third, black middle, white bottom third
    tall[60:] = 255
    out = resize_square(tall, 10)
    assert out.shape == (10, 10, 3)
    assert out[1:-1].max() <= 5
    assert out.max() < 64


def test_resize_square_upscales_small_images() -> None:
    out = resize_square(NOISE[:5, :7], 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_resize_square_of_the_right_size_changes_nothing() -> None:
    square = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_square(square, 16), square)


def test_load_square_matches_read_then_resize(tmp_path: Path) -> None:
    """The JPEG draft shortcut of load_square is close to a full decode followed by the same resize."""
    yy, xx = np.mgrid[0:300, 0:400]
    smooth = np.stack([xx * 255 // 400, yy * 255 // 300, (xx + yy) * 255 // 700], -1).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(smooth).save(path, quality=95)
    fast = load_square(path, 32).astype(int)
    full = resize_square(read_image(path), 32).astype(int)
    assert fast.shape == full.shape == (32, 32, 3)
    assert np.abs(fast - full).mean() < 3
