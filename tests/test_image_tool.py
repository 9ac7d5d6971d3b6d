"""The image tool gives the expected pixels on generated images and refuses bad input clearly."""

import asyncio
import io

import pytest
from PIL import Image

from agentrl.executor import ToolExecutor
from agentrl.parsing import ToolCall
from agentrl.tool import ToolContext


def canvas() -> Image.Image:
    """100x80 white canvas with a red 10x10 square at (60, 20)."""
    image = Image.new("RGB", (100, 80), "white")
    image.paste((255, 0, 0), (60, 20, 70, 30))
    return image


def run_ops(images, calls):
    async def main():
        executor = ToolExecutor(["image"])
        context = ToolContext("t", images=images)
        async with executor.session("t", context) as session:
            return [(await session.run([ToolCall("image", args)]))[0] for args in calls]

    return asyncio.run(main())


def test_crop_returns_exactly_the_region():
    (result,) = run_ops([canvas()], [{"operation": "crop", "box": [60, 20, 70, 30]}])
    (image,) = result.observation.images
    assert image.size == (10, 10) and set(image.getdata()) == {(255, 0, 0)}


def test_normalized_crop_and_zoom():
    images = [canvas()]
    crop, zoom = run_ops(images, [
        {"operation": "crop", "box": [0.6, 0.25, 0.7, 0.375], "normalized": True},
        {"operation": "zoom", "box": [55, 15, 75, 35], "factor": 3, "image_index": 0},
    ])
    assert crop.observation.images[0].size == (10, 10)
    zoomed = zoom.observation.images[0]
    assert zoomed.size == (60, 60)
    assert zoomed.getpixel((30, 30)) == (255, 0, 0) and zoomed.getpixel((2, 2)) == (255, 255, 255)
    assert len(images) == 3  # results are appended for later calls


def test_rotate_flip_resize_contrast():
    rotate, flip, resize, contrast = run_ops([canvas()], [
        {"operation": "rotate", "angle": 90, "image_index": 0},
        {"operation": "flip", "direction": "horizontal", "image_index": 0},
        {"operation": "resize", "width": 50, "image_index": 0},
        {"operation": "contrast", "factor": 0.0, "image_index": 0},
    ])
    assert rotate.observation.images[0].size == (80, 100)
    assert rotate.observation.images[0].getpixel((20, 100 - 65)) == (255, 0, 0)
    assert flip.observation.images[0].getpixel((100 - 65, 25)) == (255, 0, 0)
    assert resize.observation.images[0].size == (50, 40)
    assert len(set(contrast.observation.images[0].getdata())) == 1  # zero contrast: one flat grey


@pytest.mark.parametrize(
    "args, message",
    [
        ({"operation": "crop", "box": [70, 20, 60, 30]}, "outside"),
        ({"operation": "crop", "box": [0, 0, 500, 10]}, "outside"),
        ({"operation": "crop"}, "needs a box"),
        ({"operation": "crop", "box": [0, 0, 2, 2], "normalized": True}, "between 0 and 1"),
        ({"operation": "zoom", "box": [0, 0, 10, 10], "factor": 50}, "between 1 and 8"),
        ({"operation": "resize", "width": 100000, "height": 100000}, "pixels"),
        ({"operation": "crop", "box": [0, 0, 1, 1], "image_index": 7}, "out of range"),
        ({"operation": "blur"}, "parameter 'operation'"),
    ],
)
def test_bad_requests_are_clear_errors(args, message):
    (result,) = run_ops([canvas()], [args])
    assert result.status == "error" and message in result.observation.text


def test_decompression_bomb_and_garbage_are_refused():
    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, format="PNG")  # tiny file, 400 M pixels
    results = run_ops([bomb.getvalue(), b"not an image"], [
        {"operation": "crop", "box": [0, 0, 1, 1], "image_index": 0},
        {"operation": "crop", "box": [0, 0, 1, 1], "image_index": 1},
    ])
    assert "too large" in results[0].observation.text or "pixel limit" in results[0].observation.text
    assert "cannot be read" in results[1].observation.text


@pytest.mark.parametrize("format", ["TIFF", "ICO", "PPM", "TGA"])
def test_only_allowlisted_formats_are_decoded(format):
    from agentrl.tools.image import IMAGE_FORMATS, load_image

    from agentrl.tool import ToolError

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format=format)
    with pytest.raises(ToolError, match="accepted formats"):
        load_image(buffer.getvalue())
    for allowed in IMAGE_FORMATS:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), "red").save(buffer, format=allowed)
        assert load_image(buffer.getvalue()).size == (8, 8)


def test_the_images_a_trajectory_accumulates_are_bounded():
    big = Image.new("L", (4000, 4000))  # 16 MP, allowed alone
    results = run_ops([big], [{"operation": "flip"}] * 5)
    # the original plus three flips hold 64 MP: the fourth flip would pass the budget
    assert [r.status for r in results] == ["ok", "ok", "ok", "error", "error"]
    assert "pixel budget" in results[3].observation.text and "crop" in results[3].observation.text
