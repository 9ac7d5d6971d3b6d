"""The viewer shows a vision-language trajectory's images inline (headless Chromium): the prompt's
above the token stream, each tool result's after the observation of its turn, inline or stored by
reference."""

import re

from PIL import Image

from agentrl.engines.hf import HFEngine
from agentrl.multimodal import store_images_by_reference
from agentrl.trajectory import write_jsonl
from agentrl.viewer import load_run, write_viewer
from tests.test_multimodal import CROP, ZOOM, ScriptThenModel, run_one, vision  # noqa: F401 (a fixture)
from tests.test_viewer import body_attributes, chromium


def test_the_page_shows_every_image_inline_where_the_model_saw_it(vision, tmp_path):  # noqa: F811
    model, tokenizer, _ = vision
    trajectory = run_one(ScriptThenModel(HFEngine(model, tokenizer), tokenizer, [ZOOM, CROP]), tokenizer)
    assert [r.turn for r in trajectory.images] == [-1, 0, 1]
    write_jsonl([trajectory], tmp_path / "samples" / "step-000001.jsonl")  # images inline
    store_images_by_reference([trajectory], tmp_path / "eval" / "images", base_dir=tmp_path / "eval")
    write_jsonl([trajectory], tmp_path / "eval" / "trajectories.jsonl")  # images as files beside it

    views = load_run(tmp_path)
    sources = sorted(image["src"][:22] if image["src"].startswith("data:") else image["src"][:12]
                     for view in views for image in view["images"])
    assert sources == ["data:image/png;base64,"] * 3 + ["eval/images/"] * 3

    page, count = write_viewer(tmp_path)
    assert count == 2
    profile = tmp_path / "profile"
    dom = chromium(f"--user-data-dir={profile}", "--dump-dom", page.as_uri()).stdout
    assert body_attributes(dom) == {"data-rendered": "2", "data-shown": "2"}  # no script errors
    loaded = re.findall(r'<img src="[^"]*" alt="image (\d)" data-loaded="(\d+)"', dom)  # set once decoded
    assert len(loaded) == 6
    assert {(int(i), int(w)) for i, w in loaded} == {(i, r.width) for i, r in enumerate(trajectory.images)}
    assert dom.count("tool result, turn 0") == 2 and dom.count("tool result, turn 1") == 2 and dom.count("· prompt") == 2
    for card in dom.split('class="card"')[1:]:
        stream = card[card.rindex('class="stream"'):]  # the token stream (the prompt's text comes first)
        # each tool result's image follows the observation span of its turn, inside the token stream
        assert re.search(r'<span class="observation" title="observation, turn 0[^"]*">.*?</span><figure class="image">'
                         r'<img src="[^"]*" alt="image 1"', stream, re.S)
        assert "image 0 ·" not in stream  # the prompt's image is shown above the stream

    shot = tmp_path / "shot.png"
    chromium(f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri())
    colours = {c for _, c in Image.open(shot).convert("RGB").getcolors(maxcolors=1_000_000)}
    assert (220, 30, 30) in colours  # the red square of the prompt's image is on screen
