"""The trajectory viewer: the page holds every trajectory with its spans coloured by role, and it
renders in headless Chromium without script errors (screenshot and DOM checked)."""

import asyncio
import json
import re
import shutil
import subprocess

import pytest
from agentrl.envs.search_qa import SearchQAEnv
from PIL import Image

from agentrl.config import RolloutConfig, ToolsConfig
from agentrl.executor import ToolExecutor
from agentrl.rollout import RolloutWorker
from agentrl.trajectory import write_jsonl
from agentrl.viewer import find_trajectory_files, load_run, write_viewer
from tests.helpers.scripted import ScriptedEngine

QUESTIONS = [
    {"id": "q0", "question": "What was the profession of Laskam Glimbys?", "golden_answers": ["beekeeper"]},
    {"id": "q1", "question": "Where was Laskam Glimbys born? </script><script>boom()</script>", "golden_answers": ["Drournix"]},
]


def script(conversation):
    if "<information>" not in conversation.split("Question:")[-1]:
        return "Searching. <search> Laskam Glimbys </search>"
    return "<answer> beekeeper </answer>"


@pytest.fixture()
def run_dir(tmp_path, tokenizer):
    env = SearchQAEnv(prompt="short")
    worker = RolloutWorker(ScriptedEngine(tokenizer, script), tokenizer, env, ToolExecutor(["search"]), RolloutConfig(), ToolsConfig())
    batch = asyncio.run(worker.run_batch([env.make_task(q, i) for i, q in enumerate(QUESTIONS)], group_size=2))
    batch.trajectories[-1].status, batch.trajectories[-1].stop_reason = "infra_error", "infra_error"
    batch.trajectories[-1].reward = float("nan")
    write_jsonl(batch.trajectories, tmp_path / "eval" / "trajectories.jsonl")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")  # not trajectories
    return tmp_path


def test_run_files_are_found_and_spans_keep_their_roles_and_text(run_dir, tokenizer):
    assert [p.name for p in find_trajectory_files(run_dir)] == ["trajectories.jsonl"]
    views = load_run(run_dir)  # no tokenizer: the span texts the rollout stored
    assert len(views) == 4 and views[0]["spans"][0] == {
        "role": "assistant", "turn": 0, "version": 0, "tokens": views[0]["spans"][0]["tokens"],
        "text": "Searching. <search> Laskam Glimbys </search>"}
    assert views[0]["spans"][1]["role"] == "observation" and "<information>" in views[0]["spans"][1]["text"]
    with_tokenizer = load_run(run_dir, tokenizer)
    assert [s["text"] for s in with_tokenizer[0]["spans"]] == [s["text"] for s in views[0]["spans"]]
    assert "<|im_start|>user" in with_tokenizer[0]["prompt"]


def body_attributes(dom):
    """The attributes of the <body> tag that the page's script sets (``data-errors`` on any error)."""
    tag = re.search(r"<body([^>]*)>", dom).group(1)
    return dict(re.findall(r'([\w-]+)="([^"]*)"', tag))


def chromium(*args, timeout=90):
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (scripts/setup.sh installs it)")
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                           "--enable-logging=stderr", "--v=0", *args], capture_output=True, text=True, timeout=timeout)


def test_page_renders_in_headless_chromium_without_errors(run_dir, tmp_path, tokenizer):
    page, count = write_viewer(run_dir, tokenizer=tokenizer)
    html = page.read_text()
    assert count == 4 and "http://" not in html and "https://" not in html  # self-contained
    assert "</script><script>boom" not in html  # data cannot break out of its script element
    profile = tmp_path / "profile"
    shot = tmp_path / "shot.png"
    result = chromium(f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri())
    assert shot.is_file(), result.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1_000_000)
    assert image.size == (1200, 1600) and len(colours) > 50  # not a blank page
    assert any(c == (0xdc, 0xeb, 0xff) for _, c in colours)  # model-token spans are drawn
    assert "Uncaught" not in result.stderr and "SyntaxError" not in result.stderr

    dom = chromium(f"--user-data-dir={profile}", "--dump-dom", page.as_uri()).stdout
    assert body_attributes(dom) == {"data-rendered": "4", "data-shown": "4"}  # no data-errors
    assert dom.count('class="card"') == 4 and dom.count('<span class="assistant" title=') == 8
    assert "&lt;/script&gt;&lt;script&gt;boom()" in dom  # the hostile question is shown as text

    filtered = chromium(f"--user-data-dir={profile}", "--dump-dom", page.as_uri() + "#status=infra_error").stdout
    assert body_attributes(filtered) == {"data-shown": "1", "data-rendered": "4"}
    positive = chromium(f"--user-data-dir={profile}", "--dump-dom", page.as_uri() + "#reward=pos").stdout
    assert body_attributes(positive)["data-shown"] == "2"  # q0 is answered right, q1 wrong (one is an infra error)
