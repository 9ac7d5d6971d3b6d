"""Image operations for vision-language agents: crop, zoom, rotate, flip, resize and contrast on the
trajectory's images. Every result is appended to the trajectory's images, so a later call can work
on it (``image_index=-1`` is the most recent).

The result is an image for the model: the observation holds it in ``images``, and the rollout puts
it before a vision-language model as pixels (a block of image tokens after the observation's
text, see :mod:`agentrl.multimodal`). The observation's text is only a label (``image 3: zoom ->
1024x1024``) naming the index a later call can use. How many images, and how many pixels, one
trajectory may show the model is the rollout's budget (``rollout.max_images``,
``rollout.max_image_pixels``); ``max_trajectory_pixels`` bounds what the tool keeps in memory."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

from agentrl.tool import Observation, Tool, ToolError

MAX_PIXELS = 16_000_000  # refuse to create or accept anything larger (decompression bombs)
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Every result is kept with the trajectory's images: their pixels together are bounded too.
MAX_TRAJECTORY_PIXELS = 64_000_000
# Only these decoders ever see outside bytes: others are rarely needed and some run external
# programs (EPS calls Ghostscript) or are large attack surfaces.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def load_image(source: Any) -> Image.Image:
    """An image from a PIL image, a path or raw bytes; malformed or oversized files are clear errors."""
    if isinstance(source, Image.Image):
        return check_image(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source), formats=IMAGE_FORMATS)
            check_image(image)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ToolError(f"the image is too large to open safely: {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ToolError(f"the image cannot be read (accepted formats: {', '.join(IMAGE_FORMATS)}): {error}") from None
    return image


def check_image(image: Image.Image) -> Image.Image:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ToolError("the image is empty")
    if width * height > MAX_PIXELS:
        raise ToolError(f"the image is {width}x{height}, over the {MAX_PIXELS:,}-pixel limit")
    return image


def pixel_box(box: list[float], size: tuple[int, int], normalized: bool) -> tuple[int, int, int, int]:
    """A crop box as integer pixels ``(left, top, right, bottom)``, checked against the image."""
    if len(box) != 4:
        raise ToolError(f"box must be [left, top, right, bottom], got {len(box)} numbers")
    width, height = size
    if normalized:
        if not all(0.0 <= v <= 1.0 for v in box):
            raise ToolError("a normalized box needs values between 0 and 1")
        box = [box[0] * width, box[1] * height, box[2] * width, box[3] * height]
    left, top, right, bottom = (int(round(v)) for v in box)
    if not (0 <= left < right <= width and 0 <= top < bottom <= height):
        raise ToolError(f"box {box} is outside the {width}x{height} image or empty (need left < right, top < bottom)")
    return left, top, right, bottom


class ImageTool(Tool):
    """Transform one of the task's images (crop, zoom into a region, rotate, flip, resize or change
    contrast) and look at the result."""

    option_names = ("max_trajectory_pixels",)

    name = "image"
    timeout = 20.0

    def call(
        self,
        operation: Literal["crop", "zoom", "rotate", "flip", "resize", "contrast"],
        image_index: int = -1,
        box: list[float] | None = None,
        normalized: bool = False,
        factor: float = 2.0,
        angle: float = 90.0,
        direction: Literal["horizontal", "vertical"] = "horizontal",
        width: int | None = None,
        height: int | None = None,
    ) -> Observation:
        """
        Args:
            operation: what to do to the image.
            image_index: which image (0 = the first; -1 = the most recent).
            box: region [left, top, right, bottom] for crop and zoom, in pixels or, with normalized, 0-1.
            normalized: the box is given as fractions of the image size.
            factor: magnification for zoom, or contrast multiplier for contrast.
            angle: degrees counter-clockwise for rotate.
            direction: horizontal or vertical, for flip.
            width: target width for resize.
            height: target height for resize.
        """
        images = self.context.images if self.context is not None else []
        if not images:
            raise ToolError("this task has no images")
        if not -len(images) <= image_index < len(images):
            raise ToolError(f"image_index {image_index} is out of range: there are {len(images)} images")
        image = load_image(images[image_index])
        if operation in ("crop", "zoom"):
            if box is None:
                raise ToolError(f"{operation} needs a box [left, top, right, bottom]")
            result = image.crop(pixel_box(box, image.size, normalized))
            if operation == "zoom":
                if not 1.0 <= factor <= 8.0:
                    raise ToolError("zoom factor must be between 1 and 8")
                result = self._resized(result, round(result.width * factor), round(result.height * factor))
        elif operation == "rotate":
            result = image.rotate(angle, expand=True)
        elif operation == "flip":
            result = ImageOps.mirror(image) if direction == "horizontal" else ImageOps.flip(image)
        elif operation == "resize":
            if width is None and height is None:
                raise ToolError("resize needs a width, a height or both")
            width = width or round(image.width * height / image.height)
            height = height or round(image.height * width / image.width)
            result = self._resized(image, width, height)
        else:  # contrast
            if not 0.0 <= factor <= 10.0:
                raise ToolError("contrast factor must be between 0 and 10")
            result = ImageEnhance.Contrast(image.convert("RGB")).enhance(factor)
        check_image(result)  # a rotation with expand can grow the canvas
        budget = int(self.options.get("max_trajectory_pixels", MAX_TRAJECTORY_PIXELS))
        held = sum(i.width * i.height for i in images if isinstance(i, Image.Image))
        if held + result.width * result.height > budget:
            raise ToolError(f"this trajectory's images already hold {held:,} pixels; the result would pass the "
                            f"{budget:,}-pixel budget. Work on a smaller region (crop) of an existing image")
        images.append(result)
        return Observation(f"image {len(images) - 1}: {operation} -> {result.width}x{result.height}", [result])

    @staticmethod
    def _resized(image: Image.Image, width: int, height: int) -> Image.Image:
        if width <= 0 or height <= 0 or width * height > MAX_PIXELS:
            raise ToolError(f"the result would be {width}x{height}; keep it above 0 and under {MAX_PIXELS:,} pixels")
        return image.resize((width, height), Image.Resampling.LANCZOS)
