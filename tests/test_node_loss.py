"""Node loss and helper-actor restarts with real Ray: the weight and flag stores come back with their state after
their process dies, and a two-node Ray cluster on this machine loses the node that runs the re-match actors in
the middle of an epoch; the run finishes with every sample accounted for and screened."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from otc_ray.rematch.flags import flag_store
from otc_ray.rematch.weights import WeightFollower, publish, weight_store
from otc_ray.train.checkpoint import MODEL_FILE

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "tiny.yaml"


def _restart(ray, actor) -> None:
    """Kill the actor's process the way a crash would (Ray restarts it: max_restarts=-1); returns once a new
    process answers."""
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    ray.kill(actor, no_restart=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10) != pid:
                return
        except Exception:                          # the restart is under way
            pass
        time.sleep(0.2)
    raise TimeoutError("the actor was not restarted within 60 s")


def test_a_restarted_weight_store_republishes_the_newest_checkpoint(ray_local, tmp_path):
    """The store forgets its state with its process; restarted, it publishes the newest checkpoint's model under a
    new incarnation, and a follower that held a higher version number takes it."""
    run = tmp_path / "ray_results" / "run"
    for i, value in ((0, 1.0), (1, 2.0)):          # two checkpoints: the newest (000001) must win
        (run / f"checkpoint_00000{i}").mkdir(parents=True)
        torch.save({"w": torch.full((3,), value)}, run / f"checkpoint_00000{i}" / MODEL_FILE)
    store = weight_store("otc-test-restart", recover_from=str(run))
    follower = WeightFollower(store)
    for _ in range(3):
        publish(store, {"w": torch.zeros(3)}, active=False)
    assert follower.poll() is not None and follower.version == 3 and not follower.active
    assert ray_local.get(store.current_version.remote()) == 3, "a fresh store recovers nothing"
    _restart(ray_local, store)
    state = follower.poll()
    assert state is not None, "the follower ignored the restarted store (its version number is lower: 1 < 3)"
    assert torch.equal(state["w"], torch.full((3,), 2.0)) and follower.active and follower.version == 1
    assert follower.poll() is None
    publish(store, {"w": torch.ones(3)})
    assert torch.equal(follower.poll()["w"], torch.ones(3))
    ray_local.kill(store)


def test_a_restarted_flag_store_keeps_its_flags_through_its_journal(ray_local, tmp_path):
    """Restarted (its process died) or resumed (a run continuing from its checkpoint), the store reads its journal
    back; a store without one forgets, and a new run's store starts its journal empty."""
    journal = tmp_path / "flags.txt"
    kept, forgetful = flag_store(journal=str(journal)), flag_store()
    for store in (kept, forgetful):
        ray_local.get(store.add.remote(["a", "b", "a"]))
        ray_local.get(store.add.remote(["c", "b"]))
    assert journal.read_text().splitlines() == ["a", "b", "c"]
    for store in (kept, forgetful):
        _restart(ray_local, store)
    assert ray_local.get(kept.query.remote(["a", "b", "c", "d"])) == [True, True, True, False]
    assert ray_local.get(forgetful.size.remote()) == 0, "without a journal a restart forgets (what the journal is for)"
    resumed = flag_store(journal=str(journal), resume=True)          # a run resumed from its checkpoint
    assert ray_local.get(resumed.query.remote(["a", "c", "d"])) == [True, True, False]
    fresh = flag_store(journal=str(journal))                        # a new run with the same journal path
    assert ray_local.get(fresh.size.remote()) == 0 and journal.read_text() == "", "a fresh store starts empty"
    for store in (kept, forgetful, resumed, fresh):
        ray_local.kill(store)


# ----------------------------------------------------------------------------------------- two nodes, one lost
def _progress(db: Path) -> tuple[int, int] | None:
    """(epoch, step in epoch) that rank 0 last reported to the run's sqlite store, or None before the first."""
    import sqlite3

    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            rows = dict(con.execute("SELECT key, value FROM latest_metrics WHERE key IN "
                                    "('progress/epoch', 'progress/step_in_epoch')").fetchall())
    except sqlite3.Error:
        return None
    return (int(rows["progress/epoch"]), int(rows["progress/step_in_epoch"])) if len(rows) == 2 else None


def test_losing_the_node_of_the_rematch_actors_mid_epoch(tmp_path):
    """A head node (CPUs: driver, reads, the Train worker, the helper stores) and a node that alone declares the
    `rematch` resource, so the re-match actor runs there and only there. The node is killed (no graceful
    shutdown: raylet, object store and actor die at once) a few steps into epoch 0, and a replacement joins as an
    autoscaler would add one: Ray Data restarts the actor there (and redoes whatever it had not delivered: how much
    depends on how far the stage had read ahead), the stores stay on the head, never restarted, and each epoch
    delivers every row of the run exactly once, all of them screened."""
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    from otc_ray.track.mlflow_logger import metric_history

    temp = tempfile.mkdtemp(prefix="otcnl-", dir="/tmp")     # its own session folder, short (unix sockets)
    node = {"object_store_memory": 200 << 20, "temp_dir": temp}
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={**node, "num_cpus": 4, "include_dashboard": False})
    doomed = cluster.add_node(**node, num_cpus=0, resources={"rematch": 1})
    cluster.wait_for_nodes()
    out = tmp_path / "run"
    overrides = [f"output_dir={out}", "name=node-loss", f"ray.address={cluster.address}", "train.epochs=2",
                 "train.batch_size=32", "train.log_every=1", "rematch.block_size=32", "rematch.publish_every=2",
                 "rematch.actor_num_cpus=0", "rematch.actor_resource=rematch", "eval.num_eval=64",
                 "eval.linear_probe_train=64", "ray.progress_bars=false"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true"}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen([sys.executable, "-m", "otc_ray", "train", "--config", str(TINY), *overrides],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    killed_at, deadline = None, time.monotonic() + 1200
    try:
        while driver.poll() is None and time.monotonic() < deadline:
            at = _progress(out / "mlflow.db")
            if killed_at is None and at is not None and at >= (0, 3):
                cluster.remove_node(doomed, allow_graceful=False)
                killed_at = at
                cluster.add_node(**node, num_cpus=0, resources={"rematch": 1})
            time.sleep(0.2)
        if driver.poll() is None:
            driver.kill()
        actors = [(a["ActorClassName"], a["Address"]["NodeID"], a["NumRestarts"])
                  for a in cluster.global_state.actor_table(None).values()]
        head, replacement = cluster.head_node.node_id, next(iter(cluster.worker_nodes)).node_id
    finally:
        cluster.shutdown()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
    output = (tmp_path / "driver.log").read_text()[-6000:]
    assert driver.returncode == 0, output
    assert killed_at is not None and killed_at[0] == 0, f"the node was not killed during epoch 0: {killed_at}"

    stores = [a for a in actors if a[0] in ("WeightStore", "FlagStore")]
    assert sorted(a[0] for a in stores) == ["FlagStore", "WeightStore"] and all(a[1:] == (head, 0) for a in stores), \
        f"the helper stores must live on the driver's node, never restarted: {stores}"
    matchers = {a[1] for a in actors if "MapWorker" in a[0]}      # each epoch's pool has its own actor
    assert matchers == {doomed.node_id, replacement}, f"re-match actors ran on {matchers}, not on the lost node " \
        f"{doomed.node_id} and then its replacement {replacement}"

    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("otc-ray").experiment_id])
    assert run.info.status == "FINISHED"
    ok = run.data.metrics["data/ok"]
    for name, expected in (("data/epoch_rows", ok), ("data/epoch_repeated_rows", 0.0),
                           ("rematch/screened_rate", 1.0)):
        history = dict(metric_history(uri, run.info.run_id, name))
        assert sorted(history) == [0, 1] and set(history.values()) == {expected}, f"{name}: {history}"
