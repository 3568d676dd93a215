"""Driver-side jobs that join the stages (data, poison, rematch, train, evaluate, track). The stages never
import this package.

    prepare.py    the shard sets of a training run: given, or generated and poisoned once (cached)
    train.py      `otc-ray train`: prepare + MLflow run + TorchTrainer (train.trainer) + final report
    evaluate.py   `otc-ray eval`: shards and poison manifest read into the arrays the metrics take
    clean.py      `otc-ray clean`: a shard set re-matched with a fixed checkpoint into cleaned shards
    demo.py       `otc-ray demo`: three defenses trained on the poisoned built-in data and compared
    runtime.py    Ray start-up: join a cluster or start a local instance
"""
