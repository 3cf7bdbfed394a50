"""Fault suite, data side (issue #16): decompression bombs, damaged TFRecord shards, EXIF
orientation after other JPEG segments, the "P too large" hint and progress output in logs.

Every input is made here, tiny on disk; each test fails on the code before its fix.
"""
import glob
import io
import json
import os
import struct
import zlib

import cv2
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data import decode, file_check, memory_cache, pipeline, tfrecords
from data.dataset import IdentityDataset, scan_identity_folder
from data.image_io import declared_pixels, jpeg_frame_size, probe_image, read_image
from data.progress import progress

BOMB_SIDE = 16_000  # 256 MP grey: above data.image_io.DEFAULT_MAX_PIXELS (250 MP); 768 MB as RGB


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _zeros_zlib(nbytes, chunk=1 << 24):
    """A zlib stream of ``nbytes`` zero bytes, built without compressing them all: deflate blocks
    ended by a full flush do not depend on what came before, so one block is repeated. The Adler-32
    of n zeros is (n mod 65521) << 16 | 1."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(b"\0" * chunk) + c.flush(zlib.Z_FULL_FLUSH)
    full, rest = divmod(nbytes, chunk)
    tail = c.compress(b"\0" * rest) + c.flush(zlib.Z_FINISH)
    return (b"\x78\xda" + block * full + tail
            + struct.pack(">I", ((nbytes % 65521) << 16) | 1))


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _grey_png_bomb(path, side=BOMB_SIDE):
    """A valid side x side 8-bit grey PNG (all black) of ~250 kB: every row is filter 0 + zeros."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", _zeros_zlib((side + 1) * side)) + _chunk(b"IEND", b""))
    path.write_bytes(data)
    return str(path)


def _reset_peak_rss():
    """Reset the process's peak RSS (Linux clear_refs); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


class _PeakRss:
    """Context: asserts the peak RSS grew by less than ``limit_mb`` inside (when measurable)."""

    def __init__(self, limit_mb):
        self.limit_mb = limit_mb

    def __enter__(self):
        self.ok = _reset_peak_rss()
        self.start = _rss_mb()
        return self

    def __exit__(self, *exc):
        if self.ok and exc[0] is None:
            grew = _peak_rss_mb() - self.start
            assert grew < self.limit_mb, f"peak RSS grew by {grew:.0f} MB: the bomb was decoded"


def _write_png(path, rgb):
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))


def _small_tree(root, ids=3, per_id=4, size=12, seed=0):
    rng = np.random.default_rng(seed)
    for c in range(ids):
        os.makedirs(root / f"id{c}", exist_ok=True)
        for i in range(per_id):
            _write_png(root / f"id{c}" / f"{i}.png",
                       rng.integers(0, 256, [size, size, 3]).astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def bomb_tree(tmp_path_factory):
    """3 identities x 4 small PNGs, plus a valid 16000 x 16000 grey PNG in id0."""
    root = _small_tree(tmp_path_factory.mktemp("bomb"))
    bomb = _grey_png_bomb(root / "id0" / "zz_bomb.png")
    return root, bomb


# ---------------------------------------------------------------------------------------------
# 1. Decompression bombs: refused from the header on every decoding path
# ---------------------------------------------------------------------------------------------

def test_bomb_is_a_real_small_png(bomb_tree):
    _, bomb = bomb_tree
    assert os.path.getsize(bomb) < 400_000
    assert probe_image(bomb) == (BOMB_SIDE, BOMB_SIDE, "L")
    assert declared_pixels(bomb) == BOMB_SIDE * BOMB_SIDE
    # The stream really holds every row: the first 16 MB inflate to zeros and it ends cleanly.
    with open(bomb, "rb") as f:
        data = f.read()
    idat = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
    head = zlib.decompressobj().decompress(idat, 1 << 24)
    assert len(head) == 1 << 24 and not any(head)


def test_validate_files_refuses_the_bomb_from_its_header(bomb_tree, tmp_path):
    root, bomb = bomb_tree
    ds = scan_identity_folder(root)
    assert len(ds) == 13
    with _PeakRss(300):
        clean, skipped = file_check.validate_files(ds, cache_path=str(tmp_path / "v.json"))
    assert skipped == [(bomb, "too_large")]
    assert len(clean) == 12 and bomb not in clean.paths
    # The cached verdict keeps it out, with its reason, without decoding it either.
    with _PeakRss(300):
        clean, skipped = file_check.validate_files(ds, cache_path=str(tmp_path / "v.json"))
    assert skipped == [(bomb, "too_large")] and len(clean) == 12


def test_pipeline_and_memory_cache_refuse_the_bomb_without_decoding(bomb_tree, tmp_path):
    root, bomb = bomb_tree
    # Eagerly the reader's own error comes out; inside a graph (tf.data) it is an OpError.
    refused = (tf.errors.OpError, ValueError)
    with _PeakRss(300):
        with pytest.raises(refused, match="zz_bomb.png: too_large"):
            decode.load_image(tf.constant(bomb))
        with pytest.raises(tf.errors.OpError, match="too_large"):
            tf.function(decode.load_image)(tf.constant(bomb))
        with pytest.raises(refused, match=r"encoded image \(.*too_large"):
            decode.decode_image(tf.io.read_file(bomb))  # the TFRecord (bytes) route
        only = IdentityDataset((bomb,), np.array([0], np.int32), ("id0",))
        with pytest.raises(ValueError, match="zz_bomb.png.*too_large"):
            memory_cache.decode_to_memory(only, (8, 8), progress=False)
    # A BMP header declaring 60000 x 60000 (10.8 GB as RGB) is refused the same way.
    header = b"BM" + struct.pack("<IHHI", 54, 0, 0, 54)
    header += struct.pack("<IiiHHIIiiII", 40, 60_000, 60_000, 1, 24, 0, 0, 2835, 2835, 0, 0)
    (tmp_path / "b.bmp").write_bytes(header + b"\0" * 16)
    assert declared_pixels(tmp_path / "b.bmp") == 60_000 * 60_000
    with pytest.raises(refused, match="too_large"):
        decode.load_image(tf.constant(str(tmp_path / "b.bmp")))


def test_tfrecord_writer_skips_and_counts_the_bomb(bomb_tree, tmp_path):
    root, bomb = bomb_tree
    with _PeakRss(300):
        summary = tfrecords.write_tfrecords(scan_identity_folder(root), tmp_path / "s", 2,
                                            progress=False)
    assert summary["images_written"] == 12 and summary["skipped"] == 1
    assert summary["skipped_files"] == [[bomb, "too_large"]]


def _fake_jpeg(height, width, exif=False, comment=False, xmp=False):
    """SOI [COM] APP0 [APP1 Exif | APP1 XMP] SOF0(height x width) SOS: only the header matters."""
    out = b"\xff\xd8"
    if comment:
        out += b"\xff\xfe\x00\x08" + b"commen"
    out += b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    if exif:
        out += b"\xff\xe1\x00\x10Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08"
    if xmp:
        text = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta><tiff:Orientation>6</tiff:Orientation>"
        out += b"\xff\xe1" + struct.pack(">H", len(text) + 2) + text
    out += b"\xff\xc0\x00\x11\x08" + struct.pack(">HH", height, width) + b"\x03" + b"\x01" * 9
    return out + b"\xff\xda\x00\x08" + b"\x00" * 20


@pytest.mark.parametrize("jpeg,native", [
    (_fake_jpeg(100, 200), True),
    (_fake_jpeg(100, 200, comment=True), True),
    (_fake_jpeg(100, 200, exif=True), False),
    (_fake_jpeg(100, 200, exif=True, comment=True), False),  # EXIF after a COM segment
    (_fake_jpeg(100, 200, xmp=True, comment=True), False),   # XMP orientation (Pillow reads it)
], ids=["plain", "comment", "exif", "comment+exif", "comment+xmp"])
def test_routing_finds_orientation_data_after_other_segments(jpeg, native):
    assert (tfrecords.native_format(jpeg) == "jpeg") == native
    assert bool(decode._tf_decodable(tf.constant(jpeg))) == native
    assert bool(tf.function(decode._tf_decodable)(tf.constant(jpeg))) == native


def _jpeg_declaring(height, width):
    """A real 16 x 16 baseline JPEG whose SOF0 segment is patched to declare height x width."""
    buf = io.BytesIO()
    Image.fromarray(np.full([16, 16, 3], 128, np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_jpeg_declaring_too_many_pixels_is_refused_from_its_header(tmp_path):
    big = _jpeg_declaring(20_000, 20_000)  # 400 MP declared, 1.2 GB as RGB; 600 bytes on disk
    (tmp_path / "big.jpg").write_bytes(big)
    assert jpeg_frame_size(big) == (20_000, 20_000)
    assert declared_pixels(tmp_path / "big.jpg") == 20_000 * 20_000
    assert tfrecords.native_format(big) is None
    assert tfrecords.native_format(_jpeg_declaring(10_000, 10_000)) == "jpeg"
    with pytest.raises((tf.errors.OpError, ValueError), match="big.jpg: too_large"):
        decode.load_image(tf.constant(str(tmp_path / "big.jpg")))
    with pytest.raises(tf.errors.OpError, match="too_large"):
        tf.function(decode.decode_image)(tf.constant(big))


# ---------------------------------------------------------------------------------------------
# 3. EXIF orientation after a COM segment: every reader returns the same upright pixels
# ---------------------------------------------------------------------------------------------

def _oriented_jpeg(path):
    """Upright 48 x 80 test card stored rotated, with EXIF orientation 6 after a COM segment."""
    upright = np.zeros([48, 80, 3], np.uint8)
    upright[:24, :40] = (220, 30, 30)
    upright[:24, 40:] = (30, 200, 40)
    upright[24:, :40] = (30, 40, 210)
    upright[24:, 40:] = (230, 220, 20)
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # orientation 6 turns it back clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    data = buf.getvalue()
    comment = b"made by test_faults_data"
    data = data[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + data[2:]
    path.write_bytes(data)
    return upright, str(path)


def test_exif_after_a_comment_is_applied_by_every_reader(tmp_path):
    os.makedirs(tmp_path / "ids" / "a")
    upright, path = _oriented_jpeg(tmp_path / "ids" / "a" / "rotated.jpg")
    with open(path, "rb") as f:
        data = f.read()
    assert data[2:4] == b"\xff\xfe"  # the COM segment comes first: EXIF is not at a fixed place
    reference = read_image(path)
    assert reference.shape == (48, 80, 3)
    # Upright and the right way round (a wrong turn would put other colours in each quadrant).
    assert np.abs(reference.astype(int) - upright).mean() < 4

    got = {
        "decode.load_image": decode.load_image(tf.constant(path)).numpy(),
        "tf.function(load_image)": tf.function(decode.load_image)(tf.constant(path)).numpy(),
        "decode.decode_image(bytes)": decode.decode_image(tf.constant(data)).numpy(),
    }
    ds = scan_identity_folder(tmp_path / "ids")
    got["memory_cache"] = memory_cache.decode_to_memory(ds, (48, 80), progress=False)[0]
    summary = tfrecords.write_tfrecords(ds, tmp_path / "shards", 1, progress=False)
    assert summary["reencoded"] == 1  # stored upright, not as the sideways original bytes
    table = tfrecords.load_tfrecords(str(tmp_path / "shards"), cache=False)
    got["tfrecords"] = decode.decode_image(tf.constant(table.encoded[0])).numpy()
    for name, image in got.items():
        assert image.shape == (48, 80, 3), name
        diff = np.abs(image.astype(int) - reference)
        assert diff.mean() < 2 and diff.max() <= 12, name


# ---------------------------------------------------------------------------------------------
# 2. Damaged TFRecord shards: named, or skipped with a count
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def shards(tmp_path):
    src = _small_tree(tmp_path / "src", ids=4, per_id=6, size=10)
    out = tmp_path / "shards"
    tfrecords.write_tfrecords(scan_identity_folder(src), out, 3, progress=False)
    files = sorted(glob.glob(str(out / "*.tfrecord")))
    with open(out / "classes.json") as f:
        per_shard = json.load(f)["images_per_shard"]
    return out, files, per_shard


def _readable_records(path):
    n = 0
    try:
        for _ in tf.data.TFRecordDataset(path):
            n += 1
    except tf.errors.DataLossError:
        pass
    return n


def test_truncated_shard_is_named_and_can_be_skipped_with_a_count(shards, caplog):
    out, files, per_shard = shards
    assert sum(per_shard) == 24
    damaged = files[1]
    size = os.path.getsize(damaged)
    with open(damaged, "r+b") as f:
        f.truncate(size // 2)
    kept = _readable_records(damaged)
    assert 0 < kept < per_shard[1]
    glob_ = str(out / "*.tfrecord")

    with pytest.raises(tfrecords.DamagedShardError) as err:
        tfrecords.load_tfrecords(glob_, cache=False)
    assert isinstance(err.value, ValueError)
    assert err.value.path == damaged and damaged in str(err.value)
    assert err.value.records_read == kept and err.value.records_expected == per_shard[1]
    assert "\n" not in str(err.value)
    with pytest.raises(tfrecords.DamagedShardError, match=os.path.basename(damaged)):
        pipeline.balanced_dataset(glob_, 2, 2, (8, 8), seed=0)

    table = tfrecords.load_tfrecords(glob_, skip_damaged=True)
    assert len(table) == 24 - (per_shard[1] - kept)
    assert [d.path for d in table.damaged] == [damaged]
    warnings = [r.getMessage() for r in caplog.records if "damaged shard" in r.getMessage()]
    assert len(warnings) == 1 and damaged in warnings[0]
    assert f"{kept:,} records readable" in warnings[0]
    assert f"{per_shard[1] - kept:,} of {per_shard[1]:,} lost" in warnings[0]
    # The cached table does not hide the damage from a caller that did not ask to skip it.
    with pytest.raises(tfrecords.DamagedShardError):
        tfrecords.load_tfrecords(glob_)
    # The option reaches the reader from the pipeline and the memory cache.
    assert len(pipeline.resolve_source(glob_, skip_damaged_shards=True)[0]) == len(table)
    ds = pipeline.balanced_dataset(glob_, 2, 2, (8, 8), seed=0, skip_damaged_shards=True)
    assert ds.element_spec[0].shape == (4, 8, 8, 3)
    cached = memory_cache.decode_to_memory(glob_, (8, 8), progress=False,
                                           skip_damaged_shards=True)
    assert cached.shape == (len(table), 8, 8, 3)


def test_shard_cut_at_a_record_boundary_is_caught_by_its_count(shards):
    """TensorFlow reads a shard cut between two records as a clean end: classes.json tells."""
    out, files, per_shard = shards
    damaged = files[0]
    with open(damaged, "rb") as f:
        first = 8 + 4 + struct.unpack("<Q", f.read(8))[0] + 4  # length, crc, data, crc
    with open(damaged, "r+b") as f:
        f.truncate(first)
    assert _readable_records(damaged) == 1  # no error from TensorFlow itself
    with pytest.raises(tfrecords.DamagedShardError, match="classes.json lists") as err:
        tfrecords.load_tfrecords(str(out), cache=False)
    assert err.value.path == damaged and err.value.records_read == 1
    table = tfrecords.load_tfrecords(str(out), cache=False, skip_damaged=True)
    assert len(table) == 24 - per_shard[0] + 1


# ---------------------------------------------------------------------------------------------
# 9. The "P too large" hint; progress lines in logs
# ---------------------------------------------------------------------------------------------

def test_p_too_large_suggests_replace_only_when_not_set(tmp_path):
    ds = scan_identity_folder(_small_tree(tmp_path, ids=3, per_id=2, size=6))
    with pytest.raises(ValueError, match="only 3 identities") as err:
        pipeline.balanced_dataset(ds, 4, 2, (6, 6), small_identities="replace")
    assert "small_identities='replace'" not in str(err.value).split(";", 1)[1]
    with pytest.raises(ValueError, match="use small_identities='replace'"):
        pipeline.balanced_dataset(ds, 2, 4, (6, 6), small_identities="drop")


def _assert_plain(text):
    assert "\r" not in text and "\x1b" not in text and "\b" not in text, repr(text[:200])


def test_progress_writes_plain_lines_when_not_a_terminal(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("data.progress.time.monotonic", lambda: clock[0])
    stream = io.StringIO()
    bar = progress(11_562, unit="image", stream=stream, label="decoding", interval=10)
    for t, done in [(1, 1024), (5, 2048), (10, 4096), (15, 6000), (19, 8000), (20.5, 10_000),
                    (21, 11_562), (22, 11_562)]:  # a repeated final update writes nothing more
        clock[0] = t
        bar.update(done)
    _assert_plain(stream.getvalue())
    assert stream.getvalue().splitlines() == [
        "decoding: 4,096/11,562 images (35%), 10 s",   # every 10 s, not at every update
        "decoding: 10,000/11,562 images (86%), 20 s",
        "decoding: 11,562/11,562 images (100%), 21 s",  # and once at the end
    ]


def test_progress_on_a_terminal_draws_a_bar_on_that_stream(capsys):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = progress(10, stream=stream, label="decoding")
    bar.update(10)
    assert "10/10" in stream.getvalue()
    assert capsys.readouterr().out == ""  # not on stdout, where results go


def test_library_progress_bars_write_no_redraws_into_logs(tmp_path, capfd):
    ds = scan_identity_folder(_small_tree(tmp_path / "src", ids=2, per_id=3, size=6))
    memory_cache.decode_to_memory(ds, (6, 6), progress=True)
    tfrecords.write_tfrecords(ds, tmp_path / "s", 1, progress=True)
    out, err = capfd.readouterr()  # pytest's captured streams are not terminals
    _assert_plain(out + err)
    assert "decoding into memory: 6/6 images (100%)" in err
    assert "writing shards: 6/6 images (100%)" in err and "skipped: 0" in err
