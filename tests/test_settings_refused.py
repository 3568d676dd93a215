"""Issue 34, item 6: settings refused up front, one line each: upper bounds of resource and size fields, relative
paths that climb out of their folder with '..', YAML alias bombs and oversized config files."""
from __future__ import annotations

import time

import pytest

from otc_ray.config import ConfigError, load_config

TOO_BIG = ["data.read_num_cpus=1e300", "data.samples_per_shard=100000000000000000000", "rematch.k=100000000000000000000",
           "rematch.actor_num_cpus=1e9", "rematch.max_actors=1000000", "rematch.bank_size=1000000000000",
           "data.image_size=100000", "tracking.flush_timeout_s=1e12", "data.read_num_cpus=.inf"]


@pytest.mark.parametrize("override", TOO_BIG)
def test_resource_and_size_fields_have_upper_bounds(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"'{key}': must be <=") as refused:
        load_config(None, [override])
    assert "\n" not in str(refused.value)


def test_the_bounds_leave_the_defaults_and_large_real_values_alone():
    cfg = load_config(None, ["data.read_num_cpus=64", "data.samples_per_shard=100000", "rematch.k=256",
                             "rematch.bank_size=65536"])
    assert cfg.rematch.k == 256


@pytest.mark.parametrize("value", ["a/../../escape", "../x", "runs/../../x"])
def test_a_relative_output_path_climbing_out_with_dotdot_is_refused(value):
    with pytest.raises(ConfigError, match="climbs out of the working folder") as refused:
        load_config(None, [f"output_dir={value}"])
    assert "resolves to /" in str(refused.value)


@pytest.mark.parametrize("value", ["runs/a/../b", "/abs/../elsewhere", "s3://bkt/x"])
def test_paths_that_stay_below_or_are_absolute_are_taken(value):
    assert load_config(None, [f"output_dir={value}"]).output_dir == value


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        prev, name = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert len(bomb.read_bytes()) < 600
    start = time.process_time()
    with pytest.raises(ConfigError, match="alias"):
        load_config(bomb)
    assert time.process_time() - start < 2.0


def test_an_oversized_config_file_is_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("output_dir: runs\n# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="over the"):
        load_config(big)
