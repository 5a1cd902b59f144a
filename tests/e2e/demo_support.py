"""Helpers for the demo's browser test: a tiny trained model, a `medmvl demo` server on a free port,
and headless Chromium (Debian's `chromium` + `chromium-driver`, never a downloaded browser)."""

from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1440,1000",
)

TINY_RECIPE = """
stage: finetune
seed: 0
output_dir: runs/tiny-demo
model:
  llm: {preset: tiny-qwen2, max_length: 256, dtype: float32}
  image:
    encoder: {type: clip, preset: tiny}
    connector: {type: mlp, depth: 2, activation: gelu}
  image3d:
    encoder: {type: vit3d, preset: tiny, select_layer: 0}
    connector: {type: spatial_pooling, pool: 2, depth: 2}
    volume: {size: [16, 32, 32], window: [-1000, 1000], orientation: RAS, crop_foreground: false}
data:
  train:
    - {annotations: data/demo_2d.json, image_root: data}
    - {annotations: data/demo_3d.json, volume_root: data}
  group_by_length: false
  num_workers: 0
train:
  max_steps: 12
  batch_size: 8
  lr: 3.0e-3
  lr_scheduler: constant
  warmup_ratio: 0.0
  gradient_checkpointing: false
  logging_steps: 1
  save_steps: 1000
  report_to: [none]
"""


def chromium_paths() -> tuple[str | None, str | None]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    return browser, driver


# The tiny model learns to give this one answer, to every question and at every turn, in a few
# steps: so the page has a known, non-empty answer to show (a random model often says nothing).
TINY_ANSWER = "No acute findings."


_TRAINED: dict[str, Path] = {}


def tiny_model(tmp_path_factory) -> Path:
    """``train_tiny_model`` once per test session, shared by the handler and browser tests."""
    if "run" not in _TRAINED:
        _TRAINED["run"] = train_tiny_model(tmp_path_factory.mktemp("demo-model"))
    return _TRAINED["run"]


def train_tiny_model(root: Path) -> Path:
    """A two-branch tiny model trained a few steps on synthetic 2D + 3D files to answer
    TINY_ANSWER in one- and two-turn conversations; returns the run folder."""
    import json

    from medmvl_cli.config.loader import load_recipe
    from medmvl_cli.data.synth import synthesize
    from medmvl_cli.engine.stages import train_stage

    data = root / "data"
    synthesize(data, kind="both", n=16, seed=0)
    for dim, key, placeholder in (("2d", "image", "<image>"), ("3d", "image3d", "<image3d>")):
        records = []
        for record in json.loads((data / f"train_{dim}.json").read_text()):
            question = record["conversations"][0]["value"]
            turns = [question, TINY_ANSWER] + (["And the other side?", TINY_ANSWER] if len(records) % 2 else [])
            records.append({"id": record["id"], key: record[key], "conversations": [
                {"from": "human" if i % 2 == 0 else "gpt", "value": text} for i, text in enumerate(turns)]})
            assert question.startswith(placeholder)
        (data / f"demo_{dim}.json").write_text(json.dumps(records))
    recipe_path = root / "tiny-demo.yaml"
    recipe_path.write_text(TINY_RECIPE)
    return Path(train_stage(load_recipe(recipe_path, [], "finetune"), quiet=True))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DemoServer:
    """`medmvl demo` in a subprocess; `url` is the address it prints on stdout."""

    def __init__(self, model: Path, port: int, workdir: Path, extra: tuple[str, ...] = (), timeout: float = 120):
        # Its own TMPDIR: Gradio's upload cache and the demo's temporary folders land there, to be checked.
        self.tmpdir = workdir / "tmp"
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1",
                   TMPDIR=str(self.tmpdir))
        env.pop("GRADIO_TEMP_DIR", None)
        log = workdir / "stderr.log"
        self.log_path = log
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "medmvl_cli", "demo", "--model", str(model), "--port", str(port), *extra],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=model.parent,
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + timeout
        self.url = None
        while self.url is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"medmvl demo exited with {self.proc.returncode}:\n{self.stderr()}")
            try:
                line = lines.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"medmvl demo printed no address in {timeout:.0f} s:\n{self.stderr()}") from None
                continue
            if line.startswith("http"):
                self.url = line.strip()

    def stderr(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-4000:]

    def stop(self) -> int:
        """SIGTERM (the demo closes its server and removes its temporary files), then the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def chrome(browser: str, driver: str, profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(service=Service(driver), options=options)


def full_page_screenshot(driver, path: Path) -> None:
    """The whole page, not only the window (the chat and settings sit below the fold on small screens)."""
    import base64

    width = driver.execute_script("return document.documentElement.scrollWidth")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
