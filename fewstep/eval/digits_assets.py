"""Rebuild the shipped digits assets: ``python -m fewstep.eval.digits_assets``.

Trains recipes/digits_features.yaml with fewstep's loop (deterministic on CPU), copies the network
into fewstep/assets/digits_features/, and writes the reference statistics of its features over all
1797 sklearn digits to fewstep/assets/digits_stats.npz.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .digits_net import NET_DIR, STATS_FILE, digits_features, load_digits_net
from .stats import RunningStats, save_stats


def reference_stats(net) -> tuple[np.ndarray, np.ndarray, int]:
    from ..data.digits import load_digits_tensors

    images, _ = load_digits_tensors(net.config.resolution)
    stats = RunningStats(net.config.feature_dim)
    stats.update(digits_features(net, images))
    return stats.mean, stats.cov, stats.n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--final", default=None, help="use this trained final/ directory instead of training")
    args = ap.parse_args(argv)
    if args.final is None:
        from ..config import load_recipe
        from ..run import run_recipe

        out = Path(tempfile.mkdtemp()) / "digits_features"
        run_recipe(load_recipe("digits_features", [f"train.output_dir={out}", "train.progress=false"]))
        final = out / "final"
    else:
        final = Path(args.final)
    shutil.rmtree(NET_DIR, ignore_errors=True)
    shutil.copytree(final / "classifier", NET_DIR)
    mu, sigma, n = reference_stats(load_digits_net(NET_DIR))
    save_stats(STATS_FILE, mu, sigma, n=np.array(n))
    print(f"wrote {NET_DIR} and {STATS_FILE} (N={n})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
