"""A user's own data and models: img2dataset-layout shards with plain captions, a labelled test set with a classes
file (no built-in data set, no `_info.json`), poisoning with that file, a pretrained start (local and s3://)."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from otc_ray.cli import main
from otc_ray.config import DataConfig, ModelConfig, PoisonConfig, load_config
from otc_ray.data.builtin import generate
from otc_ray.data.class_file import classes_from_dict, meta_label, read_classes_file, shard_set_classes
from otc_ray.data.storage import s3_filesystem
from otc_ray.model import build_model, check_image_size
from otc_ray.model_checkpoint import load_checkpoint_model, pretrained_model, read_state_dict
from otc_ray.poison.manifest import read_manifest
from otc_ray.poison.transform import poison_shards
from otc_ray.track.compare import compare
from otc_ray.track.run_context import start_parent_run

TINY = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny.yaml"
CLASSES = {"name": "my-drawings", "classes": ["circle", "square", "triangle", "cross", "ring"],
           "synonyms": {"circle": ["circle", "round blob"], "ring": ["ring", "donut"]},
           "zeroshot_templates": ["a drawing of a {c}.", "a sketch of a {c}."]}


def _jpg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _img2dataset_shards(out: Path, split: str, num: int, labelled: bool, per_shard: int = 64) -> None:
    """What img2dataset writes: NNNNN.tar of {key}.jpg/.txt/.json (url, caption, status; no class), a per-shard
    parquet of the metadata and NNNNN_stats.json. Captions are plain sentences; a labelled set's JSON also carries
    `label` as a class name (its curator's annotation). Images are the shapes generator's."""
    out.mkdir(parents=True)
    chunk = next(generate("shapes", split, num, seed=11, image_size=32))
    for shard in range(0, num, per_shard):
        buf, rows = io.BytesIO(), []
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(shard, min(num, shard + per_shard)):
                key, name = f"{shard // per_shard:05d}{i:04d}", CLASSES["classes"][int(chunk["labels"][i])]
                meta = {"url": f"https://example.com/{key}.jpg", "key": key, "status": "success",
                        "caption": f"my kid drew this {name} at school ({i})"}
                if labelled:
                    meta["label"] = name
                rows.append(meta)
                for ext, data in (("jpg", _jpg(chunk["images"][i])), ("txt", meta["caption"].encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (out / f"{shard // per_shard:05d}.tar").write_bytes(buf.getvalue())
        pq.write_table(pa.Table.from_pylist(rows), out / f"{shard // per_shard:05d}.parquet")
        (out / f"{shard // per_shard:05d}_stats.json").write_text(json.dumps({"count": len(rows)}))


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> Path:
    """train/ (256 plain-captioned pairs), test/ (96 labelled), classes.json; no _info.json anywhere."""
    root = tmp_path_factory.mktemp("own")
    _img2dataset_shards(root / "train", "train", 256, labelled=False)
    _img2dataset_shards(root / "test", "test", 96, labelled=True)
    (root / "classes.json").write_text(json.dumps(CLASSES))
    return root


# ----------------------------------------------------------------------------------------- classes file
def test_classes_file_defaults_and_errors(own, tmp_path):
    info = read_classes_file(str(own / "classes.json"), DataConfig().s3)
    assert info.name == "my-drawings" and info.classes[4] == "ring"
    assert info.synonyms["ring"] == ["ring", "donut"] and info.synonyms["square"] == ["square"]   # default: the name
    assert info.caption_templates == ("a drawing of a {c}", "a sketch of a {c}")
    minimal = tmp_path / "pets.json"
    minimal.write_text(json.dumps({"classes": ["cat", "dog"]}))
    pets = read_classes_file(str(minimal), DataConfig().s3)
    assert pets.name == "pets" and pets.zeroshot_templates == ("a photo of a {c}.",)
    bad = [({"classes": []}, "'classes' must be a non-empty list"),
           ({"classes": ["cat", "cat"]}, "class names repeat"),
           ({"classes": ["cat"], "synonyms": {"dog": ["puppy"]}}, "names classes not in 'classes'"),
           ({"classes": ["cat"], "zeroshot_templates": ["a photo"]}, "must hold {c}"),
           ({"classes": ["cat"], "zeroshot_templates": ["a {c} of {d}"]}, "must hold {c} and no other field"),
           (["cat"], "expected a JSON object")]
    for raw, message in bad:
        with pytest.raises(ValueError, match=message):
            classes_from_dict(raw, "x.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_classes_file(str(tmp_path / "broken.json"), DataConfig().s3)
    with pytest.raises(ValueError, match="classes file not found"):
        read_classes_file(str(tmp_path / "nope.json"), DataConfig().s3)
    with pytest.raises(ValueError, match="set eval.classes"):
        shard_set_classes(str(own / "test"), "", DataConfig().s3)


def test_meta_label_reads_indices_and_names_and_rejects_foreign_labels():
    classes = tuple(CLASSES["classes"])
    assert meta_label({"label": 2}, classes) == 2 and meta_label({"label": "ring"}, classes) == 4
    assert meta_label({"class": "square"}, classes) == 1 and meta_label({"url": "x"}, classes) == -1
    with pytest.raises(ValueError, match="label 7 is outside the 5 classes"):
        meta_label({"label": 7}, classes)
    with pytest.raises(ValueError, match="'hexagon' is not one of the 5 classes"):
        meta_label({"label": "hexagon"}, classes)


def test_poison_a_users_set_with_a_classes_file(own, tmp_path):
    """Backdoor and targeted poisoning of img2dataset shards without _info.json: classes from the file, the class of
    a plain caption from its words; the output carries the classes for later evaluation."""
    data = DataConfig(samples_per_shard=64)
    with pytest.raises(ValueError, match="set eval.classes"):
        poison_shards(str(own / "train"), str(tmp_path / "x"), PoisonConfig(attack="backdoor", target="ring"), data)
    report = poison_shards(str(own / "train"), str(tmp_path / "bd"), PoisonConfig(attack="backdoor", target="ring",
                           count=10), data, progress=False, classes=str(own / "classes.json"))
    assert report.poisoned == 10 and report.read == 256
    rows = read_manifest(str(tmp_path / "bd"), data.s3).to_pylist()
    assert len(rows) == 10 and {r["target_class"] for r in rows} == {"ring"}
    assert shard_set_classes(str(tmp_path / "bd"), "", data.s3).name == "my-drawings"
    assert main(["poison", "--in", str(own / "train"), "--out", str(tmp_path / "tg"), "--attack", "targeted",
                 "--targets", "2", "--per-target", "3", "--adversarial", "square", "--target-source",
                 str(own / "test"), "--classes", str(own / "classes.json"), "--quiet"]) == 0
    assert len(read_manifest(str(tmp_path / "tg"), data.s3)) == 6


# ----------------------------------------------------------------------------------------- models
def test_image_size_must_be_the_models_input_size():
    check_image_size("otc-tiny-vit-32", 32)
    with pytest.raises(ValueError, match=r"data.image_size=64 but model arch 'otc-tiny-vit-32' takes 32x32 images"):
        check_image_size("otc-tiny-vit-32", 64)
    with pytest.raises(ValueError, match="set data.image_size=224"):
        check_image_size("ViT-B-32", 32)


def _saved_model(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model(ModelConfig()).model.state_dict()


def test_pretrained_start_local_formats(tmp_path):
    """model.pretrained: a plain state dict, open_clip's {"state_dict": ...} with DDP's `module.` prefix, and
    .safetensors all load into the architecture; random otherwise; a pickled object is refused."""
    from safetensors.torch import save_file

    state = _saved_model(5)
    torch.save(state, tmp_path / "plain.pt")
    torch.save({"epoch": 3, "name": "x", "state_dict": {f"module.{k}": v for k, v in state.items()}},
               tmp_path / "epoch_3.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "open_clip_model.safetensors"))
    for name in ("plain.pt", "epoch_3.pt", "open_clip_model.safetensors"):
        bundle = pretrained_model(ModelConfig(pretrained=str(tmp_path / name)))
        for k, v in bundle.model.state_dict().items():
            torch.testing.assert_close(v, state[k], msg=f"{name}: {k}")
    torch.manual_seed(6)
    fresh = pretrained_model(ModelConfig()).model.state_dict()
    assert not torch.equal(fresh["visual.conv1.weight"], state["visual.conv1.weight"])
    torch.save({"weights": state, "opt": object()}, tmp_path / "pickled.pt", _use_new_zipfile_serialization=True)
    with pytest.raises(ValueError, match="not a weights-only torch state dict"):
        read_state_dict(str(tmp_path / "pickled.pt"))
    with pytest.raises(ValueError, match="does not fit model arch 'otc-tiny-vit-64'"):
        pretrained_model(ModelConfig(arch="otc-tiny-vit-64", pretrained=str(tmp_path / "plain.pt")))


def test_pretrained_start_from_s3(s3_bucket):
    s3, bucket = s3_bucket
    state = _saved_model(7)
    buf = io.BytesIO()
    torch.save(state, buf)
    with s3_filesystem(s3).open(f"{bucket}/models/start.pt", "wb") as f:
        f.write(buf.getvalue())
    bundle = load_checkpoint_model(f"s3://{bucket}/models/start.pt", ModelConfig(), s3)
    torch.testing.assert_close(bundle.model.state_dict()["visual.conv1.weight"], state["visual.conv1.weight"])


# ----------------------------------------------------------------------------------------- end to end
@pytest.mark.ray
def test_train_on_own_shards_from_a_pretrained_start_and_evaluate_with_a_classes_file(ray_local, own, tmp_path,
                                                                                      capsys):
    """One epoch on img2dataset shards with plain captions, evaluated on the labelled test shards through the
    classes file; lr 0 so that the final checkpoint must equal the pretrained start it loaded."""
    from mlflow.tracking import MlflowClient

    from otc_ray.pipelines.train import run_training

    state = _saved_model(9)
    torch.save(state, tmp_path / "start.pt")
    base = load_config(TINY, [f"output_dir={tmp_path}", "name=group"])
    parent = start_parent_run(base, "own-group", "demo")
    cfg = load_config(TINY, [f"output_dir={tmp_path}", "name=own", "train.defense=none", "train.epochs=1",
                             "poison.attack=none", "poison.target=sneaker", f"data.train={own / 'train'}",
                             f"data.test={own / 'test'}",
                             f"eval.classes={own / 'classes.json'}", f"model.pretrained={tmp_path / 'start.pt'}",
                             "train.lr=0", "train.weight_decay=0", "data.samples_per_shard=64", "eval.num_eval=96",
                             "eval.linear_probe_train=64"])
    result = run_training(cfg, progress=False, parent_run_id=parent)
    m = result.metrics
    assert m["final/eval_count"] == 96 and m["final/eval_labeled_count"] == 96      # every test row labelled
    assert 0.0 <= m["final/zeroshot_top1"] <= 1.0 and "final/backdoor_asr" not in m  # target no class
    logged = MlflowClient(result.tracking_uri).get_run(result.run_id).data.metrics
    assert logged["progress/epoch"] == 0 and logged["progress/step_in_epoch"] == 4       # 256 rows / batch 64
    assert logged["progress/samples_per_s"] > 0
    trained = torch.load(Path(result.checkpoint) / "model.pt", weights_only=True)
    for k, v in state.items():
        torch.testing.assert_close(trained[k], v, msg=k)
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.tags["dataset"] == "my-drawings" and run.data.params["model.pretrained"].endswith("start.pt")
    # what a person sees in MLflow: a model-development experiment, the shard sets, the config, the group
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    inputs = {(d.dataset.name, d.tags[0].value, json.loads(d.dataset.profile)["num_rows"])
              for d in run.inputs.dataset_inputs}
    assert inputs == {(f"{own.name}/train", "training", 256), (f"{own.name}/test", "evaluation", 96)}
    assert run.data.tags["mlflow.parentRunId"] == parent
    local = client.download_artifacts(result.run_id, "config.yaml", str(tmp_path))
    assert load_config(local) == cfg                                             # the file trains the run again
    table, _ = compare(result.tracking_uri, cfg.tracking.experiment, "csv")
    assert "my-drawings" in table and len(table.strip().splitlines()) == 2      # the parent is no row of its own

    assert main(["eval", "--data", str(own / "test"), "--classes", str(own / "classes.json"), "--num-eval", "96",
                 f"model.pretrained={tmp_path / 'start.pt'}"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint  {tmp_path / 'start.pt'}" in out
    row = next(line for line in out.splitlines() if line.startswith("zeroshot_top1"))
    assert float(row.split()[1]) == pytest.approx(m["final/zeroshot_top1"], abs=1e-4)   # same model, same score
    assert main(["eval", "--data", str(own / "test"), f"model.pretrained={tmp_path / 'start.pt'}"]) == 2
    assert "set eval.classes" in capsys.readouterr().err


@pytest.mark.ray
def test_clean_starts_from_the_pretrained_model(ray_local, own, tmp_path):
    """`clean` without --checkpoint re-matches with model.pretrained's weights; a size mismatch stops it first."""
    from otc_ray.pipelines.clean import clean_shards

    torch.save(_saved_model(3), tmp_path / "start.pt")
    cfg = load_config(None, [f"model.pretrained={tmp_path / 'start.pt'}", "data.samples_per_shard=64",
                             "rematch.min_actors=1", "rematch.max_actors=1", "rematch.block_size=64",
                             "rematch.bank_size=128", "rematch.gate_reference=16", "ot.iters=20"])
    summary = clean_shards(str(own / "train"), str(tmp_path / "clean"), cfg)
    assert summary.checkpoint == str(tmp_path / "start.pt") and summary.total == 256
    assert summary.kept + summary.recaptioned + summary.dropped == 256
    wrong = load_config(None, [f"model.pretrained={tmp_path / 'start.pt'}", "data.image_size=64"])
    with pytest.raises(ValueError, match="data.image_size=64 but model arch 'otc-tiny-vit-32' takes 32x32"):
        clean_shards(str(own / "train"), str(tmp_path / "clean2"), wrong)
