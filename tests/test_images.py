import io

import pytest
from PIL import Image

from pipeline.images import process_image
from tests.hostile import hostile_files


@pytest.mark.parametrize("name", sorted(hostile_files()))
def test_hostile_file_gets_expected_status(name):
    data, expected = hostile_files()[name]
    res = process_image(data, 128)
    assert res.status == expected, (name, res.error)
    if expected == "success":
        im = Image.open(io.BytesIO(res.jpeg))
        assert im.mode == "RGB" and im.format == "JPEG"
        assert min(im.size) <= 128
        assert (res.width, res.height) == im.size
        assert len(res.sha256) == 64
    else:
        assert res.error and res.jpeg is None


def test_exif_rotation_applied():
    data, _ = hostile_files()["exif_rotated.jpg"]
    res = process_image(data, 150)
    assert res.height > res.width  # stored landscape, displayed portrait
    assert (res.orig_width, res.orig_height) == (400, 300)


def test_shorter_side_resized_and_never_upscaled():
    big = Image.new("RGB", (1600, 1200), (10, 200, 30))
    buf = io.BytesIO()
    big.save(buf, format="JPEG")
    res = process_image(buf.getvalue(), 256)
    assert (res.width, res.height) == (341, 256)
    small = io.BytesIO()
    Image.new("RGB", (100, 60)).save(small, format="PNG")
    res = process_image(small.getvalue(), 256)
    assert (res.width, res.height) == (100, 60)


def test_transparency_composited_on_white():
    im = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    res = process_image(buf.getvalue(), 64)
    px = Image.open(io.BytesIO(res.jpeg)).getpixel((10, 10))
    assert min(px) > 240


def test_deterministic_bytes():
    data, _ = hostile_files()["good.jpg"]
    assert process_image(data, 64).jpeg == process_image(data, 64).jpeg
