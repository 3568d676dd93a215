"""`ray job submit` entry point of the cleaning job (see otc_ray/pipelines/clean.py): `otc-ray clean`, every flag
and override of it, the same exit statuses (0 on success, 2 for a bad request: config, paths, checkpoint; 1 for a
failure while cleaning, 3 when the tracking server stayed away).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/clean.py --in s3://bkt/train --out s3://bkt/train_clean --checkpoint s3://bkt/ckpt/model.pt \
        --config jobs/configs/X.yaml rematch.gate_threshold=-2.5

Inside a submitted job `init_ray` joins the cluster (RAY_ADDRESS is set); run directly, it starts a local Ray.
"""
import sys

from otc_ray.cli import entry

if __name__ == "__main__":
    entry(["clean", *sys.argv[1:]])
