"""`ray job submit` entry point for training: joins the cluster (RAY_ADDRESS is set by the job server).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train.py --config jobs/configs/tiny.yaml train.epochs=1
"""
import sys

from otc_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
