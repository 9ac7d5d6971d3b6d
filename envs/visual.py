"""A visual task that needs a closer look: a large canvas holding one small label (a few digits, or
a small coloured shape) among faint clutter. At full size the detail is a handful of pixels; the
model finds it with the image tool (crop or zoom) and answers with what it read.

The images go to the policy as ``Task.images`` and come back from every image-tool call as
``Observation.images``. With a vision-language model (``configs/visual.yaml``, docs/vision.md) the
HF engine feeds them to the model as pixels: the task's image in the prompt, each tool result in
the observation that follows the call. A text-only model gets the tool's text label only.

Data: local JSONL with ``image`` (a path), ``question`` and ``answer``; or, without a path, a
deterministic generator: the rows hold only the drawing parameters and each image is drawn when
its task is made.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Literal

from agentrl.envs.base import Env, Reward, Task, load_rows
from PIL import Image, ImageDraw

from agentrl.trajectory import Trajectory

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 220), "orange": (240, 140, 20),
           "purple": (140, 40, 170)}
SHAPES = ("square", "circle", "triangle")
SIZE = 1024

PROMPT = (
    "You are given an image of {width}x{height} pixels. Somewhere in it there is a small detail that is "
    "too small to read at this size. Use the image tool to crop or zoom into regions (for example "
    '<tool_call>{{"name": "image", "arguments": {{"operation": "zoom", "box": [0, 0, 512, 512], "factor": 4}}}}</tool_call>) '
    "until you can read it, then answer as <answer> your answer </answer>.\nQuestion: {question}"
)


def generate_rows(count: int, seed: int) -> list[dict[str, Any]]:
    """Drawing parameters for ``count`` images; even rows hold digits, odd rows a coloured shape."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        x, y = rng.randint(16, SIZE - 48), rng.randint(16, SIZE - 32)
        row: dict[str, Any] = {"id": f"visual-{seed}-{index}", "x": x, "y": y, "seed": rng.randrange(2**31)}
        if index % 2 == 0:
            digits = str(rng.randint(100, 9999))
            row.update(kind="digits", text=digits, question="What number is written in the small box?", answer=digits)
        else:
            colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
            row.update(kind="shape", colour=colour, shape=shape,
                       question=f"What colour is the small {shape}? Answer with one word.", answer=colour)
        rows.append(row)
    return rows


def draw(row: dict[str, Any]) -> Image.Image:
    """The image for a generated row: faint grey specks everywhere, the detail at (x, y)."""
    rng = random.Random(row["seed"])
    image = Image.new("RGB", (SIZE, SIZE), (250, 250, 248))
    canvas = ImageDraw.Draw(image)
    for _ in range(400):
        px, py = rng.randrange(SIZE), rng.randrange(SIZE)
        shade = rng.randint(200, 235)
        canvas.point((px, py), fill=(shade, shade, shade))
    x, y = row["x"], row["y"]
    if row["kind"] == "digits":
        canvas.rectangle((x - 2, y - 2, x + 6 * len(row["text"]) + 2, y + 12), outline=(90, 90, 90))
        canvas.text((x, y), row["text"], fill=(20, 20, 20))
    else:
        fill, box = COLOURS[row["colour"]], (x, y, x + 7, y + 7)
        if row["shape"] == "square":
            canvas.rectangle(box, fill=fill)
        elif row["shape"] == "circle":
            canvas.ellipse(box, fill=fill)
        else:
            canvas.polygon([(x + 3, y), (x, y + 7), (x + 7, y + 7)], fill=fill)
    return image


def normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


class VisualEnv(Env):
    """Options: ``train_size`` and ``eval_size`` of the generated data; ``image_dir`` to resolve
    relative ``image`` paths of local data."""

    name = "visual"
    option_names = ("train_size", "eval_size", "image_dir")
    tools = ("image",)
    action_format = "json"
    answer_tag = "answer"
    final_turn_message = "You have no tool calls left. Give your final answer now as <answer> ... </answer>."

    def load(self, split: Literal["train", "eval"], path: str | None = None) -> list[dict[str, Any]]:
        if path is not None:
            return load_rows(path)
        size = int(self.options.get(f"{split}_size", 1000 if split == "train" else 100))
        return generate_rows(size, seed=0 if split == "train" else 1)

    def image(self, row: dict[str, Any]) -> Image.Image:
        if "image" not in row:
            return draw(row)
        path = Path(row["image"])
        if not path.is_absolute() and "image_dir" in self.options:
            path = Path(self.options["image_dir"]) / path
        if not path.is_file():
            raise FileNotFoundError(f"image {str(path)!r} not found; set env.options.image_dir for relative paths")
        image = Image.open(path)
        image.load()
        return image

    def make_task(self, row: dict[str, Any], index: int) -> Task:
        image = self.image(row)
        content = PROMPT.format(width=image.width, height=image.height, question=row["question"])
        return Task(id=str(row.get("id", index)), messages=[{"role": "user", "content": content}],
                    answer=str(row["answer"]), images=[image])

    def reward(self, task: Task, trajectory: Trajectory) -> Reward:
        """1 when the answer, lower-cased and stripped of punctuation and spaces, equals the gold."""
        if not trajectory.answer:
            return Reward(0.0, False, info={"answered": 0.0})
        correct = normalise(trajectory.answer) == normalise(task.answer)
        return Reward(float(correct), correct, info={"answered": 1.0})
