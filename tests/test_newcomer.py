"""A new user's first hour, without starting Ray: a set poisoned with `otc-ray poison` trains as what it is, `data
make` never mixes two sets, path typos are named at once, `eval` takes what `train` prints, every run gets its own
name, the console stays short, and the CLI explains itself (`--version`, `config`, help, suggestions)."""
from __future__ import annotations

import ast
import io
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from otc_ray.cli import build_parser, main
from otc_ray.config import PACKAGED_CONFIGS, ConfigError, Config, DataConfig, load_config, replace
from otc_ray.config_help import describe, meanings
from otc_ray.data.make import make_shards
from otc_ray.pipelines.prepare import carried_poison, prepare_data

ROOT = Path(__file__).resolve().parents[1]
SHAPES = DataConfig(dataset="shapes", samples_per_shard=100)


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    """shapes train (200) and test (60) sets, and the train set poisoned with a backdoor by the CLI."""
    root = tmp_path_factory.mktemp("sets")
    make_shards(SHAPES, "train", 200, str(root / "train"), "wds", progress=False)
    make_shards(SHAPES, "test", 60, str(root / "test"), "wds", progress=False)
    assert main(["poison", "--in", str(root / "train"), "--out", str(root / "bd"), "--attack", "backdoor",
                 "--target", "circle", "--count", "9", "--trigger", "solid", "--trigger-size", "3", "--seed", "4",
                 "--quiet"]) == 0
    return {"train": root / "train", "test": root / "test", "bd": root / "bd"}


# ----------------------------------------------------------------------------------------- poisoned sets
@pytest.mark.parametrize("config_attack", ["backdoor", "none", "targeted"])
def test_training_on_a_poisoned_set_takes_its_poison_history(sets, tmp_path, config_attack):
    """Whatever the config says about poison, the run describes the attack the set carries (tags, params, compare
    row) and uses its manifest (detection metrics); nothing is poisoned again (which used to fail)."""
    cfg = load_config("tiny", [f"data.train={sets['bd']}", f"data.test={sets['test']}", f"output_dir={tmp_path}",
                               f"poison.attack={config_attack}"])
    carried, notes = carried_poison(cfg)
    p = carried.poison
    assert (p.attack, p.target, p.count, p.trigger, p.trigger_size, p.seed) == (("backdoor",), "circle", 9, "solid",
                                                                                  3, 4)
    assert notes and "carries backdoor" in notes[0]
    data = prepare_data(carried, progress=False)
    assert data.train == data.manifest == str(sets["bd"]) and not (tmp_path / "data").exists()


def test_a_clean_or_built_in_training_set_keeps_the_configured_poison(sets, tmp_path):
    for train in ("", str(sets["train"])):
        cfg = load_config("tiny", [f"data.train={train}", f"output_dir={tmp_path}"])
        assert carried_poison(cfg) == (cfg, [])


# ----------------------------------------------------------------------------------------- data make --out
def test_data_make_refuses_a_non_empty_out_and_overwrite_replaces_only_a_shard_set(tmp_path, capsys):
    out = tmp_path / "set"
    make = ["data", "make", "--dataset", "shapes", "--out", str(out), "--quiet"]
    assert main([*make, "--num", "30"]) == 0
    assert main([*make, "--num", "10"]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--overwrite" in err
    assert main([*make, "--num", "10", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "_info.json"]
    assert sum(1 for _ in __import__("tarfile").open(out / "00000.tar")) == 3 * 10   # jpg/png, txt, json a sample
    (out / "notes.txt").write_text("mine")
    assert main([*make, "--num", "10", "--overwrite"]) == 2
    assert "only a shard set" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and (out / "00000.tar").exists()    # nothing removed


# ----------------------------------------------------------------------------------------- path mistakes
@pytest.mark.parametrize("argv, named", [
    (["train", "--config", "tiny", "data.train={root}/trian"], "data.train {root}/trian: no such file or folder"),
    (["poison", "--in", "{root}/trian", "--out", "{root}/x", "--attack", "backdoor"], "--in {root}/trian"),
    (["eval", "--checkpoint", "{root}/train", "--data", "{root}/tset"], "--data {root}/tset"),
    (["clean", "--in", "{root}/train", "--out", "{root}/c", "--manifest", "{root}/nope/m"], "nor its folder"),
    (["data", "inspect", "{root}/tx*n"], "no file matches"),
    (["data", "inspect", "{root}/empty"], "{root}/empty is not a shard set"),
])
def test_path_mistakes_are_named_in_seconds_before_ray(tmp_path, capsys, monkeypatch, argv, named):
    import otc_ray.pipelines.runtime as runtime

    def no_ray(*_, **__):
        raise AssertionError("the command started Ray before checking its paths")

    monkeypatch.setattr(runtime, "init_ray", no_ray)      # a guard: Ray may already run in this test session
    make_shards(SHAPES, "train", 5, str(tmp_path / "train"), "wds", progress=False)
    (tmp_path / "empty").mkdir()
    start = time.process_time()
    assert main([a.format(root=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert named.format(root=tmp_path) in err, err
    assert time.process_time() - start < 3.0


def test_a_typo_gets_a_suggestion(tmp_path, capsys):
    (tmp_path / "shapes-train").mkdir()
    assert main(["poison", "--in", str(tmp_path / "shapes-trian"), "--out", str(tmp_path / "o"),
                 "--attack", "backdoor"]) == 2
    assert f"did you mean {tmp_path / 'shapes-train'}?" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- eval --checkpoint
def test_a_checkpoint_folder_or_run_folder_loads_like_its_model_file(tmp_path):
    from otc_ray.config import ModelConfig
    from otc_ray.model import build_model
    from otc_ray.model_checkpoint import MODEL_FILE, read_state_dict

    state = build_model(ModelConfig()).model.state_dict()
    folder = tmp_path / "run" / "checkpoint_000001"
    folder.mkdir(parents=True)
    torch.save(state, folder / MODEL_FILE)
    (tmp_path / "run" / "checkpoint_000000").mkdir()
    for path in (folder, folder.parent, folder / MODEL_FILE):
        assert read_state_dict(str(path)).keys() == state.keys()
    with pytest.raises(ValueError, match=f"without {MODEL_FILE}"):
        read_state_dict(str(tmp_path / "run" / "checkpoint_000000"))


def test_error_details_are_cut_at_a_word(tmp_path):
    from otc_ray.config import ModelConfig
    from otc_ray.model import build_model
    from otc_ray.model_checkpoint import load_weights, shorten

    text = shorten("alpha " * 100, 50)
    assert len(text) <= 50 and text.endswith(" ...") and set(text[:-4].split()) == {"alpha"}
    model = build_model(ModelConfig()).model
    torch.save({"visual.conv1.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError) as full:
        model.load_state_dict(torch.load(tmp_path / "bad.pt"), strict=True)
    whole = " ".join(str(full.value).split())
    with pytest.raises(ValueError) as e:
        load_weights(model, str(tmp_path / "bad.pt"), "otc-tiny-vit-32")
    detail = str(e.value).split("'otc-tiny-vit-32': ", 1)[1]
    assert detail.endswith(" ...") and len(whole) > len(detail)
    kept = detail[:-4]
    assert whole.startswith(kept) and whole[len(kept)] == " ", "cut inside a word"


# ----------------------------------------------------------------------------------------- run names
def test_every_run_gets_a_new_name_unless_resumed(tmp_path):
    from otc_ray.cli import _run_name

    cfg = load_config("tiny", [f"output_dir={tmp_path}"])
    first = _run_name(cfg, None)
    assert re.fullmatch(r"tiny-\d{8}-\d{6}", first.name)
    (tmp_path / "ray_results" / first.name).mkdir(parents=True)          # that run exists now
    second = _run_name(cfg, None)
    assert second.name != first.name and second.name.startswith(first.name[:5])
    assert _run_name(cfg, first.name).name == first.name                 # --resume NAME
    with pytest.raises(ValueError, match="no run of that name"):
        _run_name(cfg, True)                                               # --resume: `tiny` never ran here
    assert build_parser().parse_args(["train", "--resume"]).resume is True


# ----------------------------------------------------------------------------------------- console
def test_the_cli_module_loads_nothing_heavy():
    """The first status line comes before torch, Ray, numpy or MLflow are imported (each takes seconds)."""
    code = "import sys, otc_ray.cli; print(sorted({'torch', 'ray', 'numpy', 'mlflow', 'pyarrow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_train_prints_its_first_line_before_heavy_imports(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "otc_ray", "train", "--config", "tiny", f"output_dir={tmp_path}",
                             "train.epochs=1"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        first = proc.stderr.readline()
        cpu = sum(map(int, Path(f"/proc/{proc.pid}/stat").read_text().split(")")[1].split()[11:13])) \
            / os.sysconf("SC_CLK_TCK")
    finally:
        proc.kill()
        proc.wait()
    assert first.startswith("otc-ray train: defense otcclip, 1 epochs") and "loading torch and Ray" in first
    assert cpu < 3.0, f"{cpu:.1f} s of CPU before the first line"


def test_every_shipped_config_keeps_worker_logs_off():
    shipped = sorted(PACKAGED_CONFIGS.glob("*.yaml")) + sorted((ROOT / "jobs" / "configs").glob("*.yaml"))
    assert len(shipped) >= 6 and not Config().ray.worker_logs
    for path in shipped:
        cfg = load_config(path) if "gpu-cluster" not in path.name else None
        if cfg is not None:
            assert not cfg.ray.worker_logs, path
        assert re.search(r"^ray:\n(  .*\n)*  worker_logs: false$", path.read_text(), re.M), path


def test_no_random_init_warning(caplog):
    from otc_ray.config import ModelConfig
    from otc_ray.model import build_model

    with caplog.at_level(logging.WARNING):
        build_model(ModelConfig())
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]


def test_final_metrics_table_is_short():
    from otc_ray.cli import final_table
    from otc_ray.track import metric_names

    table = final_table({metric_names.FINAL_ZEROSHOT_TOP1: 0.5, metric_names.FINAL_BACKDOOR_ASR: 0.0625, metric_names.REMATCH_DETECT_PRECISION: 0.25,
                         metric_names.REMATCH_DETECT_RECALL: float("nan"), metric_names.RUN_SECONDS: 1234.5, "final/eval_count": 128.0,
                         "eval/zeroshot_top1": 0.4})
    assert table.splitlines() == ["zero-shot     0.5", "backdoor ASR  0.0625", "det P         0.25",
                                  "det R         -", "time s        1234"]


# ----------------------------------------------------------------------------------------- CLI
def test_version_and_packaged_configs(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0 and re.fullmatch(r"otc-ray \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)
    assert load_config("demo").name == "demo" and load_config("tiny").name == "tiny"
    assert load_config(ROOT / "jobs" / "configs" / "tiny.yaml") == load_config("tiny")   # the old path still works
    with pytest.raises(ConfigError, match="packaged config: demo, tiny"):
        load_config("tiyn")


def test_config_command_prints_every_key_with_its_meaning(capsys):
    assert main(["config", "--config", "tiny", "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^train\.epochs = 3 +# passes over the training shards$", out, re.M)
    assert re.search(r"^poison\.count = 16 +# poisoned samples; used unless rate > 0$", out, re.M)
    assert re.search(r"^name = tiny +# ", out, re.M)
    from otc_ray.config import flatten

    assert all(re.search(rf"^{re.escape(k)} = ", out, re.M) for k in flatten(Config()))


def test_meanings_are_the_trailing_comments_of_config_py():
    """Every field line of a config section with a trailing comment has that comment as its meaning; a comment on
    the lines below, indented past the field, continues it; one above the next field does not."""
    source = '''
from dataclasses import dataclass
@dataclass(frozen=True)
class OTConfig:
    """Doc."""

    eps: float = 0.05
    iters: int = 50                 # iterations
    tol: float = 1.0                # first part
                                    # second part
    # a comment about the next field
    backend: str = "torch"
'''
    assert meanings(source) == {"ot.iters": "iterations", "ot.tol": "first part second part"}
    real = meanings()
    tree = ast.parse((ROOT / "otc_ray" / "config.py").read_text())
    commented = [item.target.id for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "DataConfig"
                 for item in node.body if isinstance(item, ast.AnnAssign)]
    assert real["data.train"].startswith("shard folder/glob")
    assert set(k.split(".", 1)[1] for k in real if k.startswith("data.") and k.count(".") == 1) < set(commented)
    assert describe(load_config("tiny")).count("\n# --- ") >= 9


def test_clean_gate_takes_the_values_of_rematch_gate():
    from typing import get_args, get_type_hints

    from otc_ray.config import RematchConfig

    gates = get_args(get_type_hints(RematchConfig)["gate"])
    for gate in gates:
        assert build_parser().parse_args(["clean", "--in", "a", "--out", "b", "--gate", gate]).gate == gate
    assert RematchConfig().gate in gates


def test_every_flag_has_help():
    parser = build_parser()

    def walk(p):
        for action in p._actions:
            if action.dest in ("help", "version") or action.option_strings == []:
                if hasattr(action, "choices") and isinstance(action.choices, dict):
                    for sub in action.choices.values():
                        yield from walk(sub)
                continue
            yield p.prog, action

    missing = [f"{prog} {a.option_strings[0]}" for prog, a in walk(parser) if not a.help]
    assert not missing, missing


def test_unknown_key_gets_a_suggestion_and_yaml_errors_name_file_and_line(tmp_path, capsys):
    assert main(["config", "train.epoch=3"]) == 2
    assert "unknown config key 'train.epoch' (did you mean 'train.epochs'?)" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 2\n  lr: [1\n")
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(bad))}, line \d+: not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("train:\n  epohcs: 2\n")
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(wrong))}: unknown config key 'train.epohcs' "
                                          r"\(did you mean 'train.epochs'\?\)"):
        load_config(wrong)
