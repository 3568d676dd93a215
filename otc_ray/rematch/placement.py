"""Where the re-match stage's helper actors live, and how they come back.

The weight store and the flag store are small actors every re-matching actor talks to. If they sat on a node that
goes away (a pre-empted spot node, a node that runs re-match actors), the stage would lose its weights and its
sticky flags with it. So both are pinned to the node of the process that creates them (the driver: the job's
head node, which a cluster does not pre-empt), are restarted by Ray when their process dies (`max_restarts=-1`,
calls retried), and rebuild their state when restarted (weights.py, flags.py).

    Store.options(**helper_options(), name=...).remote(...)
"""
from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


def helper_options() -> dict[str, Any]:
    """Actor options for a helper actor: on this process's node (hard affinity: a soft one let Ray place it on
    another node now and then, tried on a two-node cluster), restarted without limit, its calls retried across a
    restart. A store whose node is gone cannot come back, but neither can the driver that created it."""
    node = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=False),
            "max_restarts": -1, "max_task_retries": -1}


def restarted() -> bool:
    """Inside an actor: whether Ray is re-creating it after its process died (its state must be rebuilt)."""
    return ray.get_runtime_context().was_current_actor_reconstructed
