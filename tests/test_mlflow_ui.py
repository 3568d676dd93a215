"""MLflow as a person sees it: a real MLflow server and headless Chromium (Debian package `chromium`) open the
link the demo prints for the experiment of a tiny run; its training-runs view must list the run with its data set.

`.ci/run` installs chromium when it is missing and sets CI; under CI a missing browser fails this test instead of
skipping it."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from otc_ray.config import load_config
from otc_ray.track.mlflow_logger import RunLogger, start_or_resume_run, tracking_uri
from otc_ray.track.run_context import ShardSet, log_shard_sets, mark_model_development, ui_link

TINY = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny.yaml"
pytestmark = pytest.mark.slow


def _browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed (apt-get install -y chromium; .ci/run does it)")
    pytest.skip("chromium is not installed (apt-get install -y chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"mlflow server at {url} not healthy after {seconds} s")


def _page_text(browser: str, url: str) -> str:
    """The rendered page's visible text (scripts and styles removed) after its JavaScript ran."""
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--virtual-time-budget=15000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=180).stdout
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", text).split())


def test_training_runs_view_lists_the_run_with_its_data_set(tmp_path):
    browser = _browser()
    cfg = load_config(TINY, [f"output_dir={tmp_path}", "name=tiny-ui-run", "tracking.experiment=ui-check"])
    uri = tracking_uri(cfg)
    run_id = start_or_resume_run(cfg)
    exp_id = mark_model_development(uri, "ui-check")
    log_shard_sets(uri, run_id, [ShardSet("my-drawings/train", str(tmp_path / "train"), "training", 256),
                                 ShardSet("my-drawings/test", str(tmp_path / "test"), "evaluation", 96)])
    log = RunLogger(uri, run_id)
    log.metrics({"final/zeroshot_top1": 0.42}, step=1)
    log.finish()

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host",
                               "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
                                   "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})   # no job consumer processes
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(base, server, 120)
        text = _page_text(browser, ui_link(base, exp_id))
    finally:
        os.killpg(server.pid, signal.SIGTERM)           # the server and its workers
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    landing = text[text.find("Experiments ui-check"):]
    assert landing.startswith("Experiments ui-check Runs"), text[:800]      # the runs table, not GenAI traces
    assert "Traces 0" not in text and "Evaluation runs" not in text, text[:800]
    assert "Run Name Created Dataset" in landing and "tiny-ui-run" in landing, landing[:800]
    assert re.search(r"tiny-ui-run .{0,40}my-drawings/train \([0-9a-f]{8}\) training", landing), landing[:800]
