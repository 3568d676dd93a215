"""Config: YAML + overrides, one-line errors that name the key, flattening for MLflow."""
import pytest

from otc_ray.config import Config, ConfigError, config_from_dict, flatten, load_config, replace


def test_defaults_follow_method(tmp_path):
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.ot.eps == 0.05 and cfg.ot.iters == 50
    assert cfg.rematch.k == 8 and cfg.rematch.alpha == 0.5
    assert cfg.train.lambda_inter == 0.5 and cfg.train.lambda_intra == 0.5


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n  lr: 1.0e-3\ndata:\n  dataset: shapes\n  s3:\n    endpoint_url: http://x\n")
    cfg = load_config(path, ["train.epochs=5", "rematch.gate=none", "ot.tol=1e-6", "train.lr=1"])
    assert cfg.train.epochs == 5 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.dataset == "shapes" and cfg.data.s3.endpoint_url == "http://x"
    assert cfg.rematch.gate == "none" and cfg.ot.tol == 1e-6


@pytest.mark.parametrize("override, words", [
    (["train.epochz=3"], ["unknown config key 'train.epochz'"]),
    (["nosection.x=1"], ["unknown config key 'nosection'"]),
    (["train.epochs=three"], ["'train.epochs'", "integer"]),
    (["train.epochs=2.5"], ["'train.epochs'", "integer"]),
    (["train.use_gpu=yes please"], ["'train.use_gpu'", "true/false"]),
    (["rematch.method=magic"], ["'rematch.method'", "'otcclip'"]),
    (["rematch.alpha=1.5"], ["'rematch.alpha'", "[0, 1]"]),
    (["ot.eps=0"], ["'ot.eps'", "> 0"]),
    (["rematch.min_actors=3", "rematch.max_actors=2"], ["'rematch.min_actors'"]),
    (["train.epochs"], ["key.sub=value"]),
    (["train.epochs.x=1"], ["'train.epochs'"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    message = str(err.value)
    assert "\n" not in message
    for w in words:
        assert w in message


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="'data'"):
        config_from_dict({"data": 3})


def test_flatten_redacts_secrets_and_covers_every_section():
    cfg = load_config(None, ["data.s3.access_key_id=AKIAEXAMPLE", "data.s3.secret_access_key=shh"])
    flat = flatten(cfg)
    assert flat["data.s3.access_key_id"] == "***" and flat["data.s3.secret_access_key"] == "***"
    assert "AKIAEXAMPLE" not in repr(flat) and "shh" not in repr(flat)
    assert flatten(cfg, redact=False)["data.s3.secret_access_key"] == "shh"
    sections = {k.split(".")[0] for k in flat}
    assert {"data", "poison", "model", "ot", "rematch", "train", "eval", "tracking"} <= sections
    assert all(not isinstance(v, dict) for v in flat.values())


def test_replace_validates():
    cfg = load_config()
    assert replace(cfg, train__epochs=2).train.epochs == 2
    with pytest.raises(ConfigError):
        replace(cfg, train__epochs="x")
