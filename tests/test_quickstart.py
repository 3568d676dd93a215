"""The README's "Quickstart (3 minutes)" block, run exactly as written: each command in one bash session (so that
`source .venv/bin/activate` holds for the rest), in a fresh folder holding only a link to this checkout's `.venv`;
every command must exit 0 and print what a new user is told to expect, the MLflow UI line must serve its page.

`make setup` is the one line not run, and only while it is literally that and `.venv` exists (it would rebuild
the shared environment; the Makefile's own tests cover it). Slow: about 3 minutes on an idle 2-core machine.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Quickstart (3 minutes)"
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def quickstart_commands(readme: str) -> list[str]:
    """The commands of the first ```bash block under HEADING, one per logical line (continuations joined)."""
    section = readme.split(HEADING, 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, f"no bash block under {HEADING!r}"
    commands, pending = [], ""
    for line in match.group(1).splitlines():
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip() and not pending.lstrip().startswith("#"):
            commands.append(pending.strip())
        pending = ""
    return commands


def test_readme_quickstart_block_is_what_the_test_runs():
    commands = quickstart_commands((ROOT / "README.md").read_text())
    words = [shlex.split(c, comments=True)[:2] for c in commands]
    assert words[0] == ["make", "setup"] and commands[1] == "source .venv/bin/activate"
    assert [w for w in words if w[0] == "otc-ray"] == [["otc-ray", "data"], ["otc-ray", "data"], ["otc-ray", "poison"],
                                                        ["otc-ray", "train"], ["otc-ray", "eval"],
                                                        ["otc-ray", "compare"]]
    assert words[-1] == ["mlflow", "ui"]


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _run_block(commands: list[str], cwd: Path, env: dict) -> list[tuple[str, int, str, str]]:
    """Run `commands` in one bash session; [(command, exit code, stdout, stderr)] up to the first failure."""
    script = ["set -u"]
    for i, command in enumerate(commands):
        if command == "make setup" and (ROOT / ".venv").exists():
            script.append(f"echo 0 > rc{i}; : > out{i}; : > err{i}")      # the shared venv is built already
            continue
        script.append(f"{command} > out{i} 2> err{i}; rc=$?; echo $rc > rc{i}; [ $rc = 0 ] || exit $rc")
    (cwd / "quickstart.sh").write_text("\n".join(script) + "\n")
    subprocess.run(["bash", "quickstart.sh"], cwd=cwd, env=env, timeout=1500)
    done = []
    for i, command in enumerate(commands):
        if not (cwd / f"rc{i}").exists():
            break
        done.append((command, int((cwd / f"rc{i}").read_text()), (cwd / f"out{i}").read_text(),
                     (cwd / f"err{i}").read_text()))
    return done


def test_quickstart_runs_as_written(tmp_path):
    commands = quickstart_commands((ROOT / "README.md").read_text())
    *steps, ui = commands
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "CI"))}
    env |= {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true"}

    start = time.monotonic()
    done = _run_block(steps, tmp_path, env)
    seconds = time.monotonic() - start
    for command, rc, out, err in done:
        assert rc == 0, f"`{command}` exited {rc}:\n{out[-3000:]}\n{err[-3000:]}"
    assert len(done) == len(steps)
    print(f"\nquickstart without the UI: {seconds:.0f} s")

    out = "".join(d[2] for d in done if d[0].startswith("otc-ray data make"))
    assert "wrote 512 samples in 1 shards to runs/quickstart/train" in out
    assert "wrote 128 samples in 1 shards to runs/quickstart/test" in out
    (_, _, out, _) = next(d for d in done if d[0].startswith("otc-ray poison"))
    assert re.search(r"poisoned\s+16 of \d+ eligible", out) and "backdoor: " in out

    # train on the user's poisoned set: the set's own attack, new run name, the final table, a predictable checkpoint
    (_, _, out, err) = next(d for d in done if d[0].startswith("otc-ray train"))
    assert "already carries" not in err and "Traceback" not in err
    assert re.search(r"^run tiny-\d{8}-\d{6} \(new", err, re.M), err
    assert re.search(r"^MLflow run tiny-\S+ \(\w+\): mlflow ui --backend-store-uri sqlite:", err, re.M), err
    table = dict(re.findall(r"^(zero-shot|backdoor ASR|det P|det R)\s+(\S+)$", out, re.M))
    assert set(table) == {"zero-shot", "backdoor ASR", "det P", "det R"}, out       # detection: from the manifest
    assert all(re.fullmatch(r"[\d.]+", table[k]) for k in ("zero-shot", "backdoor ASR", "det R")), out
    assert re.fullmatch(r"[\d.]+|-", table["det P"]), out                        # "-": nothing flagged
    assert (tmp_path / "runs" / "latest-checkpoint" / "model.pt").is_file()
    assert f"checkpoint  {tmp_path}" in out or "checkpoint  /" in out

    # eval of what train pointed at, with the poisoned set's trigger
    (_, _, out, _) = next(d for d in done if d[0].startswith("otc-ray eval"))
    assert "(from the manifest)" in out and re.search(r"^backdoor_asr\s+[\d.]+$", out, re.M), out

    # compare: the run's row names the attack it trained on and has detection figures
    (_, _, out, _) = next(d for d in done if d[0] == "otc-ray compare")
    from otc_ray.track.compare import GROUP_PARAMS, METRICS

    rows = [line.split() for line in out.splitlines()[1:] if line.strip() and not line.startswith("plot:")]
    (row,) = [r for r in rows if r[:5] == ["shapes", "otcclip", "backdoor", "patch", "16"]]
    det_p = len(GROUP_PARAMS) + 1 + [label for label, _ in METRICS].index("det P")   # single seed: one word a cell
    assert re.fullmatch(r"[\d.]+|-", row[det_p]) and re.fullmatch(r"[\d.]+", row[det_p + 1]), out

    # the UI line as written serves the MLflow page
    port = int(re.search(r"--port (\d+)", ui).group(1))
    if _port_busy(port):
        pytest.skip(f"port {port} is taken on this machine: the `mlflow ui` line cannot be run as written")
    server = subprocess.Popen(["bash", "-c", f"source .venv/bin/activate && exec {ui}"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, page = time.monotonic() + 120, ""
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}", timeout=3) as r:
                    page = r.read().decode(errors="replace")
                    break
            except OSError:
                time.sleep(1)
        assert "<title>MLflow" in page, f"no MLflow page at port {port} (server exit code {server.poll()})"
        url = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name=otc-ray"
        with urllib.request.urlopen(url, timeout=30) as r:        # the UI reads the store the commands wrote
            assert r.status == 200 and '"name": "otc-ray"' in r.read().decode().replace('":"', '": "')
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)             # uvicorn's workers may outlive a SIGTERM
            server.wait(timeout=15)
