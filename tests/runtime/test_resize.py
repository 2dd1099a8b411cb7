"""The numpy resize back-ends (molmo_runtime.resize).

The golden files test them on 10 images (test_image_processing.py); here they are tested on many
more sizes: back-end A against torch's own antialiased bilinear kernel where torch is installed
(skipped in the torch-free environment), and properties of the tap tables everywhere.

Tolerances (why): against torch on an AVX2/AVX512 CPU the recipe is bit-exact (golden README
§4.5: the SIMD build's accumulation order and FMA tail are what the numpy port reproduces), so
the comparison is exact; torch's generic ("default" capability) build does not fuse, which moves
values by <= 1 ulp of [0, 1] values (max 9.5e-7 observed in the golden README), hence 1.2e-7 * 8.
"""

from __future__ import annotations

import numpy as np
import pytest
from molmo_runtime import resize as R
from molmo_runtime.tolerances import TABLE

SIMD_EXACT = TABLE["preprocess/golden_images"].atol
GENERIC_BUILD_ATOL = TABLE["preprocess/torch_generic_build"].atol  # torch without AVX2/AVX512


def _torch_reference(image: np.ndarray, height: int, width: int) -> np.ndarray:
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).to(torch.float32) / 255
    if (height, width) != image.shape[:2]:  # torchvision returns the input for equal sizes
        t = torch.nn.functional.interpolate(t[None], size=(height, width), mode="bilinear",
                                            antialias=True, align_corners=False)[0]
    return t.clamp(0, 1).permute(1, 2, 0).contiguous().numpy()


def _torch_atol() -> float:
    torch = pytest.importorskip("torch")
    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    return SIMD_EXACT if ("AVX2" in capability or "AVX512" in capability) else GENERIC_BUILD_ATOL


SIZES = [
    # (H, W) -> (h, w): down by < 2 (<= 5 taps), strong downscales (mixed plain/FMA taps, the
    # global crop of a large photo), upscales (2 taps), one axis unchanged, odd sizes, 1-pixel.
    ((872, 1000), (784, 899)), ((872, 1000), (292, 336)), ((300, 451), (223, 336)),
    ((50, 80), (210, 336)), ((1, 1), (336, 336)), ((7, 3), (5, 11)), ((97, 64), (97, 17)),
    ((64, 97), (13, 97)), ((1200, 150), (336, 42)), ((2000, 31), (336, 5)), ((33, 1000), (11, 336)),
    ((5, 5), (5, 5)), ((640, 480), (99, 75)), ((411, 619), (137, 206)),
]


@pytest.mark.parametrize("src, dst", SIZES)
def test_torch_backend_matches_torch(src: tuple[int, int], dst: tuple[int, int]) -> None:
    rng = np.random.default_rng(hash((src, dst)) % 2**32)
    image = rng.integers(0, 256, size=(*src, 3), dtype=np.uint8)
    want = _torch_reference(image, *dst)
    got = R.resize_uint8(image, *dst, "torch-bilinear")
    assert got.shape == want.shape and got.dtype == np.float32
    assert float(np.abs(got - want).max()) <= _torch_atol()


def test_torch_backend_on_smooth_content_matches_torch() -> None:
    # Smooth gradients give long runs of equal neighbours: the case where rounding order shows.
    y, x = np.mgrid[0:517, 0:733]
    image = np.stack([(x * 255) // 732, (y * 255) // 516, ((x + y) * 255) // 1248],
                     axis=-1).astype(np.uint8)
    for dst in [(336, 476), (112, 159), (700, 990)]:
        assert float(np.abs(R.resize_uint8(image, *dst) - _torch_reference(image, *dst)).max()) \
            <= _torch_atol()


def test_identity_is_the_plain_conversion() -> None:
    image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    out = R.resize_uint8(image, 16, 16)
    np.testing.assert_array_equal(out, image.astype(np.float32) / np.float32(255))
    tf = R.resize_uint8(image, 16, 16, "tensorflow")  # TF always resamples: identity weights
    np.testing.assert_array_equal(tf, image.astype(np.float32) * np.float32(1 / 255))


@pytest.mark.parametrize("method", R.RESIZE_METHODS)
@pytest.mark.parametrize("n_in, n_out", [(1000, 899), (1000, 336), (50, 210), (1, 336), (7, 7),
                                         (2000, 5), (3, 1)])
def test_tap_tables_are_normalised_interpolation_weights(method: str, n_in: int,
                                                         n_out: int) -> None:
    table = R._TAPS[method](n_in, n_out)
    assert table.index.shape == table.weight.shape == table.kind.shape
    assert table.index.min() >= 0 and table.index.max() < n_in
    used = table.kind != R.NONE
    assert (table.weight[~used] == 0).all() and (table.weight >= 0).all()
    np.testing.assert_allclose(table.weight.sum(axis=0, dtype=np.float64), 1.0, atol=1e-6)
    # Taps are consecutive input samples.
    starts = table.index[0]
    for t in range(table.taps):
        assert (table.index[t][used[t]] == np.minimum(starts + t, n_in - 1)[used[t]]).all()


def test_torch_fma_rule() -> None:
    """<= 4 taps: every tap after the first fused; 5: none; 6..8: the last 1..3 (golden §4.5)."""
    table = R.torch_taps(1000, 336)  # 6-7 taps in the interior
    n = (table.kind != R.NONE).sum(axis=0)
    for i in range(table.n_out):
        k = table.kind[: n[i], i]
        m = n[i] - 1
        expect_fused = set(range(1 + 4 * (m // 4), n[i])) if m >= 4 else set(range(1, n[i]))
        assert {t for t in range(n[i]) if k[t] == R.FUSED} == expect_fused
    assert {int(v) for v in n} >= {4, 6}  # both border and interior patterns present


def test_schedule_runs_cover_every_tap_once() -> None:
    for method in R.RESIZE_METHODS:
        for n_in, n_out, c in [(1000, 336, 3), (872, 784, 1), (150, 1200, 3)]:
            table = R._TAPS[method](n_in, n_out)
            sched = R.schedule(method, n_in, n_out, c, 1)
            order = np.argsort(sched.unsort) if sched.unsort is not None else \
                np.arange(n_out * c)
            kind = np.repeat(table.kind, c, axis=1)[:, order]
            for t, runs in enumerate(sched.runs, start=1):
                covered = np.zeros(n_out * c, dtype=bool)
                for r in runs:
                    assert not covered[r.start:r.stop].any()
                    covered[r.start:r.stop] = True
                    k = kind[t, r.start:r.stop]
                    assert (k[k != R.NONE] == (R.FUSED if r.fused else R.PLAIN)).all()
                assert covered[kind[t] != R.NONE].all()


def test_resize_into_a_canvas_view_normalises_and_leaves_the_rest() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    canvas = np.full((50, 70, 3), 7.0, dtype=np.float32)
    mean, std = np.float32([0.1, 0.2, 0.3]), np.float32([0.5, 0.6, 0.7])
    R.resize_into(image, canvas[5:35, 10:55], mean=mean, std=std)
    plain = R.resize_uint8(image, 30, 45)
    np.testing.assert_array_equal(canvas[5:35, 10:55], (plain - mean) / std)
    assert (canvas[:5] == 7).all() and (canvas[35:] == 7).all() and (canvas[:, :10] == 7).all()


def test_block_size_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(123, 211, 3), dtype=np.uint8)
    want = R.resize_uint8(image, 47, 80)
    want_tf = R.resize_uint8(image, 47, 80, "tensorflow")
    monkeypatch.setattr(R, "SINGLE_BLOCK_VALUES", 0)  # always split into blocks
    for block in (1, 300, 1 << 12, 1 << 24):
        monkeypatch.setattr(R, "BLOCK_VALUES", block)
        np.testing.assert_array_equal(R.resize_uint8(image, 47, 80), want)
        np.testing.assert_array_equal(R.resize_uint8(image, 47, 80, "tensorflow"), want_tf)


def test_workspace_reuses_buffers_and_respects_its_cap() -> None:
    ws = R.Workspace(max_bytes=1000)
    a = ws.get("x", (10, 10))
    assert ws.get("x", (10, 10)) is a  # 400 bytes: kept
    assert ws.get("x", (10, 11)) is not a
    big = ws.get("y", (100, 100))  # 40 kB > cap: not kept
    assert ws.get("y", (100, 100)) is not big
    ws.clear()
    assert ws.get("x", (10, 10)) is not a


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        R.resize_uint8(np.zeros((4, 4, 3), np.float32), 2, 2)
    with pytest.raises(ValueError):
        R.resize_uint8(np.zeros((4, 4, 3), np.uint8), 0, 2)
    with pytest.raises(ValueError):
        R.resize_uint8(np.zeros((4, 4, 3), np.uint8), 2, 2, "pil")  # type: ignore[arg-type]


@pytest.mark.parametrize("method", R.RESIZE_METHODS)
def test_blockwise_conversion_of_huge_images_gives_the_same_result(
        method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(90, 130, 3), dtype=np.uint8)
    shared = R.ResizeSource(image)
    want = [R.resize_uint8(image, *hw, method) for hw in ((40, 60), (90, 61), (90, 130))]
    monkeypatch.setattr(R.ResizeSource, "SHARED_FLOAT_PIXELS", 0)  # as for a > 8 MP image
    monkeypatch.setattr(R, "SINGLE_BLOCK_VALUES", 0)
    monkeypatch.setattr(R, "BLOCK_VALUES", 1000)
    assert shared.as_float(method).dtype == np.uint8
    for hw, w in zip(((40, 60), (90, 61), (90, 130)), want):
        out = np.empty((*hw, 3), np.float32)
        R.resize_into(shared, out, method)
        np.testing.assert_array_equal(out, w)
