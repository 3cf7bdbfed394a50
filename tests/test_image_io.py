"""data.image_io: every awkward input kind, generated in tmp_path."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from data import image_io
from data.image_io import UnreadableImageError, probe_image, read_image, read_image_downscaled


def _blocks(h=48, w=64):
    """RGB test card: four flat quadrants (red, green, blue, yellow), uint8 [h, w, 3]."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (220, 30, 30)
    a[: h // 2, w // 2:] = (30, 200, 40)
    a[h // 2:, : w // 2] = (30, 40, 210)
    a[h // 2:, w // 2:] = (230, 220, 20)
    return a


def _assert_close(got, want, tol):
    assert got.dtype == np.uint8 and got.shape == want.shape
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.mean() < tol, diff.mean()


def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(path, width, height):
    """A PNG header declaring width x height RGB with a tiny IDAT; never allocates the pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    payload = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
               + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))
    path.write_bytes(payload)
    return path


def test_rgb_png_roundtrip_exact(tmp_path):
    a = _blocks()
    Image.fromarray(a).save(tmp_path / "a.png")
    got = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(got, a)
    assert got.flags["C_CONTIGUOUS"]
    assert probe_image(tmp_path / "a.png") == (64, 48, "RGB")


def test_grey_pgm_becomes_three_equal_channels(tmp_path):
    g = (np.arange(30 * 20).reshape(30, 20) % 256).astype(np.uint8)
    Image.fromarray(g, "L").save(tmp_path / "g.pgm")
    got = read_image(tmp_path / "g.pgm")
    assert got.shape == (30, 20, 3)
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], g)


def test_one_bit_image(tmp_path):
    b = np.zeros((10, 12), bool)
    b[:, 6:] = True
    Image.fromarray(b).save(tmp_path / "b.png")
    got = read_image(tmp_path / "b.png")
    assert got.shape == (10, 12, 3)
    assert (got[:, :6] == 0).all() and (got[:, 6:] == 255).all()


def test_16bit_grey_png_keeps_top_byte(tmp_path):
    g16 = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert probe_image(tmp_path / "g16.png")[2].startswith("I")
    got = read_image(tmp_path / "g16.png")
    want = (g16 >> 8).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], want)


def test_16bit_rgb_png(tmp_path):
    cv2 = pytest.importorskip("cv2")
    rgb16 = np.zeros((8, 8, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 65535, 32768, 256
    cv2.imwrite(str(tmp_path / "c16.png"), rgb16[..., ::-1])  # cv2 writes BGR
    got = read_image(tmp_path / "c16.png")
    np.testing.assert_array_equal(got[0, 0], [255, 128, 1])


def test_rgba_composited_on_white(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., :3] = (200, 0, 0)
    a[:2, :, 3] = 255  # top opaque red
    a[2:, :, 3] = 0  # bottom fully transparent (colour underneath is red, must not show)
    a[2:, :2, 3] = 128  # half transparent red over white
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    got = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(got[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(got[3, 3], [255, 255, 255])
    # 128/255 * 200 + 127/255 * 255 ~ 227, 127/255*255 = 127
    np.testing.assert_allclose(got[3, 0], [227, 127, 127], atol=2)


def test_palette_with_transparency_and_plain_palette(tmp_path):
    p = Image.new("P", (6, 6), 0)
    p.putpalette([10, 20, 30] + [250, 0, 0] + [0] * (256 * 3 - 6))
    p.paste(1, (0, 0, 3, 6))
    p.save(tmp_path / "plain.png")
    got = read_image(tmp_path / "plain.png")
    np.testing.assert_array_equal(got[0, 0], [250, 0, 0])
    np.testing.assert_array_equal(got[0, 5], [10, 20, 30])
    p.info["transparency"] = 0
    p.save(tmp_path / "trans.png", transparency=0)
    got = read_image(tmp_path / "trans.png")
    np.testing.assert_array_equal(got[0, 5], [255, 255, 255])
    np.testing.assert_array_equal(got[0, 0], [250, 0, 0])


def test_cmyk_jpeg_colours(tmp_path):
    a = _blocks(64, 64)
    Image.fromarray(a).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert probe_image(tmp_path / "c.jpg")[2] == "CMYK"
    got = read_image(tmp_path / "c.jpg")
    _assert_close(got, a, tol=6)
    # Each quadrant keeps its hue (a channel swap or inversion would fail this).
    np.testing.assert_allclose(got[8, 8], [220, 30, 30], atol=20)
    np.testing.assert_allclose(got[56, 56], [230, 220, 20], atol=20)


@pytest.mark.parametrize("orientation,rot_k,flip", [(3, 2, False), (6, -1, False), (8, 1, False),
                                                    (2, 0, True)])
def test_exif_orientation_applied(tmp_path, orientation, rot_k, flip):
    a = _blocks(40, 64)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(tmp_path / "o.jpg", quality=95, exif=exif.tobytes())
    got = read_image(tmp_path / "o.jpg")
    want = np.fliplr(a) if flip else np.rot90(a, k=rot_k)
    _assert_close(got, np.ascontiguousarray(want), tol=4)


def test_truncated_jpeg_and_png_refused(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    for ext in ("jpg", "png"):
        full = tmp_path / f"full.{ext}"
        Image.fromarray(noise).save(full)
        cut = tmp_path / f"cut.{ext}"
        cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
        with pytest.raises(UnreadableImageError) as err:
            read_image(cut)
        assert err.value.reason == "truncated", err.value
        assert "cut." in str(err.value)


def test_empty_file(tmp_path):
    (tmp_path / "z.jpg").write_bytes(b"")
    with pytest.raises(UnreadableImageError) as err:
        read_image(tmp_path / "z.jpg")
    assert err.value.reason == "empty"
    assert isinstance(err.value, ValueError)
    with pytest.raises(UnreadableImageError):
        probe_image(tmp_path / "z.jpg")


def test_text_named_jpg(tmp_path):
    (tmp_path / "t.jpg").write_text("this is not a picture\n" * 20)
    with pytest.raises(UnreadableImageError) as err:
        read_image(tmp_path / "t.jpg")
    assert err.value.reason == "not_an_image"
    assert "t.jpg" in str(err.value)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "nope.png")


def test_animated_gif_and_webp_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    frames[0].save(tmp_path / "a.webp", save_all=True, append_images=frames[1:], duration=50,
                   lossless=True)
    for name in ("a.gif", "a.webp"):
        got = read_image(tmp_path / name)
        assert got.shape == (16, 16, 3)
        np.testing.assert_allclose(got[8, 8], [255, 0, 0], atol=3)


def test_decompression_bomb_header_refused_without_allocation(tmp_path):
    bomb = _bomb_png(tmp_path / "bomb.png", 100_000, 100_000)  # declares 10 GP = 30 GB RGB
    assert probe_image(bomb)[:2] == (100_000, 100_000)
    with pytest.raises(UnreadableImageError) as err:
        read_image(bomb)
    assert err.value.reason == "too_large" and "100000x100000" in str(err.value)
    with pytest.raises(UnreadableImageError) as err:
        read_image_downscaled(bomb, 1000)
    assert err.value.reason == "too_large"
    # Between the limits, a non-JPEG has no reduced decode: still refused, never allocated.
    mid = _bomb_png(tmp_path / "mid.png", 20_000, 20_000)
    with pytest.raises(UnreadableImageError) as err:
        read_image_downscaled(mid, 1000)
    assert err.value.reason == "too_large" and "only JPEG" in str(err.value)
    # Pillow's own guard is restored after our reads.
    assert Image.MAX_IMAGE_PIXELS is not None


def test_bmp_bomb_header(tmp_path):
    w, h = 60_000, 60_000
    header = b"BM" + struct.pack("<IHHI", 54, 0, 0, 54)
    header += struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
    (tmp_path / "b.bmp").write_bytes(header + b"\x00" * 16)
    with pytest.raises(UnreadableImageError) as err:
        read_image(tmp_path / "b.bmp")
    assert err.value.reason == "too_large"


def test_max_pixels_parameter(tmp_path):
    Image.fromarray(_blocks(48, 64)).save(tmp_path / "a.png")
    with pytest.raises(UnreadableImageError) as err:
        read_image(tmp_path / "a.png", max_pixels=1000)
    assert err.value.reason == "too_large"
    assert read_image(tmp_path / "a.png", max_pixels=None).shape == (48, 64, 3)


def test_downscaled_small_image_is_unchanged(tmp_path):
    a = _blocks(48, 64)
    Image.fromarray(a).save(tmp_path / "a.png")
    got, scale = read_image_downscaled(tmp_path / "a.png", 100)
    np.testing.assert_array_equal(got, a)
    assert scale == 1.0
    got, scale = read_image_downscaled(tmp_path / "a.png", 32)
    assert got.shape == (24, 32, 3) and scale == pytest.approx(2.0)
    with pytest.raises(ValueError):
        read_image_downscaled(tmp_path / "a.png", 0)


def test_downscaled_exif_rotated_jpeg_scale(tmp_path):
    a = _blocks(400, 800)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "r.jpg", quality=90, exif=exif.tobytes())
    got, scale = read_image_downscaled(tmp_path / "r.jpg", 200)
    assert got.shape == (200, 100, 3)  # upright portrait
    assert scale == pytest.approx(4.0, rel=0.01)
    want = np.rot90(a, k=-1)[::4, ::4]
    _assert_close(got, np.ascontiguousarray(want), tol=6)


def test_large_jpeg_decoded_reduced(tmp_path, monkeypatch):
    """8000x8000 (64 MP) flat JPEG with a marker: draft decode to <= 1000 px, boxes map back."""
    big = Image.new("RGB", (8000, 8000), (90, 120, 150))
    big.paste((250, 250, 0), (6000, 2000, 7000, 4000))  # x0, y0, x1, y1 in source pixels
    path = tmp_path / "big.jpg"
    big.save(path, quality=70)
    del big
    with pytest.raises(UnreadableImageError) as err:
        read_image(path, max_pixels=50_000_000)
    assert err.value.reason == "too_large"
    decoded_sizes = []
    real = image_io._to_rgb_array
    monkeypatch.setattr(image_io, "_to_rgb_array",
                        lambda p, img: decoded_sizes.append(img.size) or real(p, img))
    got, scale = read_image_downscaled(path, 1000, max_pixels=image_io.HARD_MAX_PIXELS)
    assert decoded_sizes == [(1000, 1000)]  # the decoder itself reduced 1/8: no 64 MP buffer
    assert got.shape == (1000, 1000, 3)
    assert scale == pytest.approx(8.0)
    ys, xs = np.nonzero((got[..., 0] > 200) & (got[..., 2] < 60))
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) * scale
    np.testing.assert_allclose(box, [6000, 2000, 7000, 4000], atol=2 * scale)
    np.testing.assert_allclose(got[100, 100], [90, 120, 150], atol=4)


def test_failure_reason_names_why_a_read_failed(tmp_path):
    """One mapping from a failed read to its reported reason (file checks and the embedder)."""
    from data.image_io import UnreadableImageError, failure_reason, read_image

    with pytest.raises(FileNotFoundError) as missing:
        read_image(str(tmp_path / "nope.png"))
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(UnreadableImageError) as empty:
        read_image(str(tmp_path / "empty.jpg"))
    assert failure_reason(missing.value) == "missing"
    assert failure_reason(empty.value) == "empty"
    assert failure_reason(OSError("disk on fire")) == "OSError: disk on fire"
