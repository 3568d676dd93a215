"""Config: YAML + overrides, one-line errors that name the key, flattening for MLflow."""
import dataclasses
import re
import typing
from pathlib import Path

import pytest

from otc_ray import config as C
from otc_ray.config import Config, ConfigError, config_from_dict, flatten, load_config, replace, validate


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
    (["rematch.gate=margin"], ["'rematch.gate'", "'evidence'"]),
    (["rematch.alpha=1.5"], ["'rematch.alpha'", "[0, 1]"]),
    (["ot.eps=0"], ["'ot.eps'", "> 0"]),
    (["rematch.min_actors=3", "rematch.max_actors=2"], ["'rematch.min_actors'"]),
    (["rematch.candidate_neighbours=-1"], ["'rematch.candidate_neighbours'", ">= 0"]),
    (["rematch.every_epochs=0"], ["'rematch.every_epochs'", ">= 1"]),
    (["rematch.flagged_weight=1.5"], ["'rematch.flagged_weight'", "[0, 1]"]),
    (["rematch.duplicate_similarity=0"], ["'rematch.duplicate_similarity'", "> 0"]),
    (["ot.tol=0"], ["'ot.tol'", "> 0"]),
    (["train.keep_checkpoints=0"], ["'train.keep_checkpoints'", ">= 1"]),
    (["train.safeclip_warmup=-1"], ["'train.safeclip_warmup'", ">= 0"]),
    (["poison.sig_frequency=-2"], ["'poison.sig_frequency'", ">= 0"]),
    (["data.s3.retries=-1"], ["'data.s3.retries'", ">= 0"]),
    (["eval.batch_size=0"], ["'eval.batch_size'", ">= 1"]),
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


def test_every_numeric_field_has_a_range_and_every_shipped_config_is_in_it():
    """A numeric field is range-checked (`config._RANGES`) unless it is declared unbounded."""
    def numeric(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return tp in (int, float) or (bool(args) and set(args) <= {int, float})

    for cls, prefix in C._section_prefixes().items():
        for f in dataclasses.fields(cls):
            if numeric(typing.get_type_hints(cls)[f.name]):
                assert f.name in C._RANGES or f.name in C._UNBOUNDED, f"{prefix}{f.name} has no range"
    root = Path(__file__).resolve().parents[1]
    for path in [*root.glob("jobs/configs/*.yaml"), *root.glob("otc_ray/configs/*.yaml")]:
        assert isinstance(load_config(path), Config), path


def test_replace_and_validate_name_the_full_key():
    cfg = load_config()
    with pytest.raises(ConfigError, match=r"^config key 'rematch\.k': must be >= 1, got 0$"):
        replace(cfg.rematch, k=0)
    with pytest.raises(ConfigError, match=r"'data\.s3\.connect_timeout': must be > 0"):
        replace(cfg.data.s3, connect_timeout=0)
    built = dataclasses.replace(cfg.rematch, candidate_neighbours=-1)   # bypasses load_config / replace
    with pytest.raises(ConfigError, match=r"'rematch\.candidate_neighbours': must be >= 0"):
        validate(built)
    with pytest.raises(ConfigError, match=r"'train\.lr'"):
        validate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=-1.0)))
    assert validate(cfg) is cfg and validate(cfg.ot) is cfg.ot
    with pytest.raises(TypeError):
        validate({"k": 1})


@pytest.mark.parametrize("written, attacks", [
    ("backdoor+targeted", ("backdoor", "targeted")), ("targeted+backdoor", ("backdoor", "targeted")),
    ("backdoor", ("backdoor",)), ("none", ()), ("", ()), ("[targeted]", ("targeted",))])
def test_poison_attack_is_a_tuple_written_with_plus(written, attacks):
    cfg = load_config(None, [f"poison.attack={written}"])
    assert cfg.poison.attack == attacks
    assert flatten(cfg)["poison.attack"] == cfg.poison.attack_name == ("+".join(attacks) or "none")
    assert config_from_dict(C.to_dict(cfg)).poison.attack == attacks          # what the workers rebuild
    if not written.startswith("["):                                           # a YAML list is an override only
        assert C.PoisonConfig(attack=written).attack == attacks               # built directly


@pytest.mark.parametrize("written, words", [("backdoor+backdoor", "each attack at most once"),
                                            ("backdoor+clean", "'poison.attack[1]': 'clean' is not one of"),
                                            ("3", "expected a list")])
def test_poison_attack_errors_name_the_key(written, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(None, [f"poison.attack={written}"])


def test_every_field_says_what_it_means():
    """Each config field's line ends in a comment stating its meaning (what `otc-ray config` prints beside the key);
    a field whose comment runs on takes the following comment-only lines too."""
    import ast
    import inspect

    import otc_ray.config as C

    lines = inspect.getsource(C).splitlines()
    missing = []
    for node in ast.parse("\n".join(lines)).body:
        if isinstance(node, ast.ClassDef) and dataclasses.is_dataclass(getattr(C, node.name, None)):
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and "Config" not in ast.unparse(stmt.annotation):
                    if "#" not in lines[stmt.end_lineno - 1]:
                        missing.append(f"{node.name}.{stmt.target.id}")
    assert not missing, f"fields without a trailing comment: {missing}"
