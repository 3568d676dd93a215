"""benchmarks/scale_bench.py's process sampler: what it reports per role is what the processes used."""
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("scale_bench", ROOT / "benchmarks" / "scale_bench.py")
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench
spec.loader.exec_module(bench)


def test_roles_come_from_ray_process_titles():
    assert bench.role_of("ray::FlagStore.add", 1) == "flag store"
    assert bench.role_of("ray::MapWorker(MapBatches(RematchActor))", 1) == "re-match actor"
    assert bench.role_of("ray::WeightStore.latest", 1) == "weight store"
    assert bench.role_of("/x/ray/core/src/ray/raylet/raylet --flag", 1) == "ray: raylet/gcs"
    assert bench.role_of("ray::IDLE", 1) == "ray: other workers"
    import os

    assert bench.role_of("anything", os.getpid()) == "driver"


def test_the_sampler_counts_a_child_s_cpu_and_peak_memory_after_it_exits():
    """A child that allocates ~200 MB and burns ~0.5 s of CPU, then exits between two samples: its last reading
    stays in the totals (its role: 'ray: other', not a Ray title)."""
    code = "import time; b = bytearray(200 << 20); t = time.process_time()\nwhile time.process_time() - t < 0.5: pass"
    with bench.ProcessSampler(period=0.05) as sampler:
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    peak, cpu = sampler.by_role()["ray: other"]
    assert peak >= 200 << 20 and 0.3 <= cpu < 5.0
