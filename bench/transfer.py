"""Transfer learning on ants/bees with a backbone Fovea pretrained itself.

1. Pretrain ``--model`` (default resnet18) from scratch on pets-extra + pets/train (5000 cats and dogs),
   validated on pets/val.
2. On hymenoptera (243 train / 153 val): scratch, features, finetune and auto, each over ``--seeds``
   seeds, from that backbone.
3. Print a markdown table: mean ± std validation accuracy and wall time per mode, and the best transfer
   mode's gain over scratch (issue 3 asks for >= 5 points on the GPU).

    python bench/transfer.py ../shared/data                       # GPU: the issue's measurement
    python bench/transfer.py ../shared/data --image-size 112 --pretrain-epochs 15 --device cpu

The pretrained run is kept in --work (reused when it exists), so the modes can be re-measured alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def pretrain_set(data: Path, work: Path) -> Path:
    """pets-extra + pets/train as train, pets/val as val: a folder of symlinks, nothing copied."""
    root = work / "pretrain-data"
    if root.exists():
        return root
    for cls in ("cat", "dog"):
        dst = root / "train" / cls
        dst.mkdir(parents=True)
        for src in (data / "pets-extra" / cls, data / "pets" / "train" / cls):
            for p in sorted(src.glob("*.jpg")):
                (dst / f"{src.parts[-2]}-{p.name}").symlink_to(p.resolve())
        (root / "val").mkdir(exist_ok=True)
        (root / "val" / cls).symlink_to((data / "pets" / "val" / cls).resolve())
    return root


def timed_train(data: Path, **kw: object) -> tuple[dict, float]:
    import fovea

    t0 = time.perf_counter()
    run = fovea.train(data, progress=False, **kw)
    wall = time.perf_counter() - t0
    m = json.loads((run / "metrics.json").read_text())
    meta = json.loads((run / "model.json").read_text())
    m["transfer"] = meta.get("transfer", {})
    return m, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="the folder holding pets, pets-extra and hymenoptera")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", type=int, default=None, help="default: the model's (224 for resnet18)")
    ap.add_argument("--pretrain-epochs", type=int, default=None, help="default: fovea's choice")
    ap.add_argument("--epochs", type=int, default=None, help="epochs on hymenoptera (default: fovea's choice)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--modes", default="scratch,features,finetune,auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-transfer"))
    a = ap.parse_args()
    os.environ.setdefault("FOVEA_HOME", str(a.work / "home"))
    a.work.mkdir(parents=True, exist_ok=True)
    size = {"image_size": a.image_size} if a.image_size else {}

    backbone = a.work / "backbone"
    if not (backbone / "model.json").exists():
        m, wall = timed_train(pretrain_set(a.data, a.work), model=a.model, pretrained=False, out=str(backbone),
                              epochs=a.pretrain_epochs, device=a.device, **size)
        print(f"backbone: {a.model} on pets-extra + pets/train: pets/val accuracy {m['accuracy']:.4f} in {wall:.0f} s")
    else:
        print(f"backbone: reusing {backbone}")
    ants = a.data / "hymenoptera"
    results: dict[str, list[tuple[float, float]]] = {}
    chosen = []
    for mode in a.modes.split(","):
        for seed in range(a.seeds):
            out = a.work / f"{mode}-{seed}"
            if mode == "scratch":
                kw: dict = {"model": a.model, "pretrained": False, **size}
            else:
                kw = {"weights": str(backbone), "mode": mode}
            if out.exists():
                import shutil

                shutil.rmtree(out)
            m, wall = timed_train(ants, out=str(out), seed=seed, epochs=a.epochs, device=a.device, **kw)
            results.setdefault(mode, []).append((m["accuracy"], wall))
            if mode == "auto":
                chosen.append(m["transfer"].get("mode"))
            print(f"{mode:9s} seed {seed}: val accuracy {m['accuracy']:.4f}  {wall:6.1f} s", flush=True)

    print(f"\n| mode | val accuracy (mean ± std over {a.seeds} seeds) | wall time per run |")
    print("| --- | --- | --- |")
    means = {}
    for mode, rs in results.items():
        accs = [r[0] for r in rs]
        means[mode] = statistics.mean(accs)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        note = f" (chose {', '.join(sorted(set(map(str, chosen))))})" if mode == "auto" else ""
        print(f"| {mode}{note} | {100 * means[mode]:.1f} % ± {100 * sd:.1f} | {statistics.mean(r[1] for r in rs):.1f} s |")
    transfer = {k: v for k, v in means.items() if k != "scratch"}
    if "scratch" in means and transfer:
        best = max(transfer, key=lambda k: transfer[k])
        print(f"\nbest transfer mode: {best}, {100 * (transfer[best] - means['scratch']):+.1f} points over scratch")


if __name__ == "__main__":
    main()
