"""Image loading and bad input: every odd image either gives correct arrays or one clear
InputError (never a crash deep inside numpy or Pillow)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from molmo_runtime.errors import InputError
from molmo_runtime.image_io import DEFAULT_MAX_IMAGE_PIXELS, load_image
from molmo_runtime.image_processing import MolmoImageProcessor
from PIL import Image

from tests.conftest import golden_path


def _png(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _rgb(h: int = 30, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# --- the official conversion ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "PA", "CMYK", "1", "YCbCr", "I;16", "I",
                                  "F", "RGB"])
def test_modes_convert_like_pil_convert_rgb(mode: str, tmp_path: Path) -> None:
    base = Image.fromarray(_rgb())
    img = base.convert(mode) if mode not in ("I;16", "I", "F") else base.convert("L").convert(mode)
    want = np.asarray(img.convert("RGB"))  # what the official processor feeds its resize
    got = load_image(img)
    assert got.dtype == np.uint8 and got.shape == (30, 40, 3)
    np.testing.assert_array_equal(got, want)
    if mode in ("RGBA", "LA", "L", "P", "RGB", "I;16"):  # PNG-encodable: same via a file
        path = tmp_path / f"x_{mode.replace(';', '')}.png"
        img.save(path)
        np.testing.assert_array_equal(load_image(path), np.asarray(Image.open(path).convert("RGB")))


def test_rgba_drops_alpha_without_compositing() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent: still red after conversion
    assert (load_image(Image.fromarray(rgba, "RGBA"))[..., 0] == 200).all()
    assert (load_image(rgba)[..., 0] == 200).all()  # numpy RGBA: same rule


def test_16_bit_values_are_clipped_like_the_official_path_with_a_warning() -> None:
    arr = np.array([[0, 100, 255, 256, 1000, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    with pytest.warns(UserWarning, match="clipped"):
        got = load_image(img)
    np.testing.assert_array_equal(got[0, :, 0], [0, 100, 255, 255, 255, 255])
    np.testing.assert_array_equal(got, np.asarray(img.convert("RGB")))


def test_exif_orientation_is_not_applied(tmp_path: Path) -> None:
    img = Image.fromarray(_rgb(20, 50))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes())
    assert Image.open(path).getexif().get(0x0112) == 6
    assert load_image(path).shape == (20, 50, 3)  # stored orientation, like the hub processor


def test_golden_exif_case_keeps_stored_orientation() -> None:
    path = golden_path("preprocess", "images", "exif_orient6_160x100.png")
    assert load_image(path).shape == (100, 160, 3)


def test_sources_path_bytes_file_object_pil_numpy(tmp_path: Path) -> None:
    arr = _rgb()
    data = _png(Image.fromarray(arr))
    path = tmp_path / "a.png"
    path.write_bytes(data)
    for source in (path, str(path), data, bytearray(data), io.BytesIO(data), Image.fromarray(arr),
                   arr):
        np.testing.assert_array_equal(load_image(source), arr)


def test_numpy_inputs() -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(load_image(grey), np.repeat(grey[..., None], 3, axis=2))
    np.testing.assert_array_equal(load_image(grey[..., None]), load_image(grey))
    ints = np.full((2, 2, 3), 255, dtype=np.int64)
    assert load_image(ints).dtype == np.uint8 and (load_image(ints) == 255).all()
    whole_floats = np.full((2, 2, 3), 17.0)
    assert (load_image(whole_floats) == 17).all()  # = the official astype(np.uint8)
    with pytest.raises(InputError, match=r"\* 255"):
        load_image(np.full((2, 2, 3), 0.5, dtype=np.float32))  # [0, 1] floats: refused, not 0
    with pytest.raises(InputError, match="outside 0..255"):
        load_image(np.full((2, 2, 3), 300, dtype=np.int32))
    with pytest.raises(InputError, match="NaN"):
        load_image(np.full((2, 2, 3), np.nan))
    with pytest.raises(InputError, match="transpose"):
        load_image(np.zeros((3, 20, 20), dtype=np.uint8))
    with pytest.raises(InputError, match="no pixels"):
        load_image(np.zeros((0, 5, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="dtype"):
        load_image(np.zeros((2, 2, 3), dtype=object))


# --- bad files -----------------------------------------------------------------------------------

def test_bad_files_give_one_clear_error(tmp_path: Path) -> None:
    good_png = _png(Image.fromarray(_rgb(64, 64)))
    good_jpg = _jpeg(Image.fromarray(_rgb(64, 64)))
    cases = {
        "empty.png": b"",
        "text.jpg": b"this is not an image, it is a text file\n" * 10,
        "truncated.png": good_png[: len(good_png) // 2],
        "truncated.jpg": good_jpg[: len(good_jpg) // 2],
        "header_only.png": good_png[:40],
        "garbage.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(InputError) as info:
            load_image(path)
        assert name in str(info.value)  # names the file
    with pytest.raises(InputError, match="no such image file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InputError, match="not a regular file"):
        load_image(tmp_path)
    with pytest.raises(InputError, match="empty"):
        load_image(b"")
    with pytest.raises(InputError, match="unsupported image type"):
        load_image(12345)  # type: ignore[arg-type]


def test_decompression_bomb_refused_from_the_header(tmp_path: Path) -> None:
    # A 1-bit 10000 x 10000 PNG is a few kB but would decode to 300 MB of RGB (100 MP: above our
    # 64 MP limit, inside the range where Pillow only warns).
    bomb = Image.new("1", (10000, 10000))
    path = tmp_path / "bomb.png"
    bomb.save(path, optimize=True)
    assert path.stat().st_size < 2_000_000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow DecompressionBombWarning leaks out either
        with pytest.raises(InputError, match="exceeds the limit"):
            load_image(path)
    with pytest.raises(InputError, match="exceeds the limit"):
        load_image(path, max_pixels=10_000)
    assert DEFAULT_MAX_IMAGE_PIXELS == 64_000_000
    small = MolmoImageProcessor(max_image_pixels=100)
    with pytest.raises(InputError, match="max_image_pixels"):
        small(np.zeros((20, 20, 3), dtype=np.uint8))


def test_pillow_own_bomb_error_becomes_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    Image.new("1", (15000, 15000)).save(path)  # 225 MP > 2 x Pillow's default limit
    with pytest.raises(InputError):
        load_image(path, max_pixels=10**9)  # our limit allows it; Pillow's guard refuses


# --- odd sizes through the whole image processor --------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (2, 1), (13, 7), (111, 113), (336, 336),
                                   (3, 1000), (1000, 3)])
def test_odd_sizes_preprocess(shape: tuple[int, int]) -> None:
    out = MolmoImageProcessor()(np.full((*shape, 3), 128, dtype=np.uint8))
    n = out["plan"].n_crops
    assert out["images"].shape == (n, 576, 588) and np.isfinite(out["images"]).all()
    assert out["image_masks"].shape == (n, 576) and out["image_input_idx"].shape == (n, 144)


MODES = ["RGB", "RGBA", "L", "LA", "P", "CMYK", "1", "I;16", "I", "F"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=st.integers(1, 1200), w=st.integers(1, 1200), mode=st.sampled_from(MODES),
       seed=st.integers(0, 2**16), max_crops=st.integers(1, 12),
       via=st.sampled_from(["pil", "png", "numpy"]))
@example(h=1, w=1, mode="P", seed=0, max_crops=12, via="png")
@example(h=1, w=2000, mode="RGB", seed=0, max_crops=12, via="numpy")
@example(h=20000, w=20, mode="L", seed=0, max_crops=12, via="png")
@example(h=1200, w=1199, mode="CMYK", seed=1, max_crops=12, via="pil")
@example(h=337, w=3, mode="I;16", seed=2, max_crops=1, via="png")
def test_property_any_size_and_mode_never_crashes(h: int, w: int, mode: str, seed: int,
                                                  max_crops: int, via: str) -> None:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    img = img.convert("L").convert(mode) if mode in ("I;16", "I", "F") else img.convert(mode)
    if via == "png":
        if mode in ("CMYK", "F", "I"):
            source: object = img  # not PNG-encodable
        else:
            source = _png(img)
    elif via == "numpy":
        source = np.asarray(img.convert("RGB"))
    else:
        source = img
    proc = MolmoImageProcessor(max_crops=max_crops)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # 16-bit clipping notice
            out = proc(source)  # type: ignore[arg-type]
    except InputError as e:
        # The only refusal possible for these sizes: a too-thin image (aspect beyond ~1:336).
        assert "too thin" in str(e) and max(h, w) / min(h, w) > 100
        return
    n = out["plan"].n_crops
    assert 2 <= n <= max_crops + 1
    assert out["images"].shape == (n, 576, 588) and out["images"].dtype == np.float32
    assert np.isfinite(out["images"]).all()
    masks = out["image_masks"]
    assert ((masks >= 0) & (masks <= 1)).all(axis=None) or (masks[-1] == -1).all()
    assert (masks[-1] == -1).all() and ((masks[:-1] >= 0) & (masks[:-1] <= 1)).all()
    idx = out["image_input_idx"]
    assert int((idx >= 0).sum()) == out["plan"].n_valid_features
