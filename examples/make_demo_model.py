"""Make the demo model shipped with bigcare (``bigcare/demo_model``): rerun to reproduce it.

Trains the demo's 3D CARE U-Net (depth 2, 8 base filters: 62,569 parameters, 252 kB of
safetensors) on synthetic pairs that are never the demo's test volume, on CPU with a fixed seed,
and copies the best epoch's model folder into the package. About 6.5 minutes on 2 CPU cores.

    python examples/make_demo_model.py [--epochs 30] [--steps-per-epoch 40]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from bigcare.demo import DEMO_MODEL, train_demo_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--steps-per-epoch", type=int, default=40)
    parser.add_argument("--n-filter-base", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bigcare-demo-model-") as tmp:
        trained = train_demo_model(Path(tmp) / "model", epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                                   device="cpu", seed=args.seed, n_filter_base=args.n_filter_base)
        if DEMO_MODEL.exists():
            shutil.rmtree(DEMO_MODEL)
        shutil.copytree(trained / "best", DEMO_MODEL)
    print(f"wrote {DEMO_MODEL}")


if __name__ == "__main__":
    main()
