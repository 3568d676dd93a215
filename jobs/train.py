"""`ray job submit` entry point for training: joins the cluster (RAY_ADDRESS is set by the job server).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train.py --config jobs/configs/tiny.yaml train.epochs=1

Takes every flag and override of `otc-ray train`; exits like it (0 on success, 2 for a bad request, 1 on a failure,
3 when the tracking server stayed away).
Each submission is a new run (`name` plus its start time); a resubmission continues one with `--resume NAME`.
"""
import sys

from otc_ray.cli import entry

if __name__ == "__main__":
    entry(["train", *sys.argv[1:]])
