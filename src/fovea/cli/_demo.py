"""``fovea demo``: the whole job on real data that needs no network, shown as a user would run it.

Data, in order: ``$FOVEA_DEMO_DATA``; the cats-vs-dogs photos in ``shared/data/pets`` when a checkout sits
beside them; otherwise scikit-learn's bundled handwritten digits (1797 real 8x8 scans) written out as
PNG files in ``$FOVEA_HOME/demo-data/digits`` - a real data set that every installation has.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

log = logging.getLogger("fovea.demo")


def find_pets() -> Path | None:
    here = Path.cwd().resolve()
    pkg = Path(__file__).resolve()
    for base in [here, *here.parents[:3], *pkg.parents[:5]]:
        for cand in (base / "shared" / "data" / "pets", base / "data" / "pets"):
            if (cand / "train").is_dir():
                return cand
    return None


def make_digits(root: Path) -> Path:
    """Write sklearn's digits as ROOT/{train,val}/CLASS/*.png (8-bit; once, reused after).

    A fixed, stratified 80/20 split written to disk, so that evaluating ROOT measures the val images
    only: never the ones the model trained on.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if (root / "val").is_dir() and sum(1 for _ in root.rglob("*.png")) == 1797:
        return root
    if root.exists():
        import shutil

        shutil.rmtree(root)  # an older or partial copy
    d = load_digits()
    index = np.arange(len(d.target))
    train, val = train_test_split(index, test_size=0.2, stratify=d.target, random_state=0)
    for split, ids in (("train", train), ("val", val)):
        for i in ids:
            folder = root / split / str(d.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            arr = (255 - d.images[i] * 255 / 16).astype(np.uint8)  # dark ink on white, like a scan
            Image.fromarray(arr, mode="L").save(folder / f"digit_{i:04d}.png")
    return root


def run_demo(out: Path = Path("runs/demo"), data: Path | None = None, epochs: int | None = None) -> Path:
    import json

    from rich.console import Console

    import fovea
    from fovea._home import home
    from fovea.cli._render import check_report
    from fovea.data import discover

    con = Console()
    env = os.environ.get("FOVEA_DEMO_DATA")
    if data is None and env:
        data = Path(env)
    if data is None:
        data = find_pets()
        if data is not None:
            con.print(f"[bold]Demo data:[/] cats and dogs photos in {data}")
            epochs = epochs or 20  # ~1.5 min on 2 CPU cores, ~83 %; `fovea train` defaults to a 5-minute budget
        else:
            data = make_digits(home() / "demo-data" / "digits")
            con.print(f"[bold]Demo data:[/] scikit-learn's handwritten digits, written to {data}")
    if out.exists() and any(out.iterdir()):
        import shutil

        con.print(f"replacing the previous demo run in {out}")
        shutil.rmtree(out)
    con.rule("1. check the data")
    check_report(fovea.check(data))
    con.rule("2. train")
    run = fovea.train(data, model="cnn", epochs=epochs, out=str(out))
    con.rule("3. evaluate")
    m = fovea.evaluate(run, data, report=run / "evaluation.html")
    con.print(f"accuracy {m['accuracy']:.4f}  balanced accuracy {m['balanced_accuracy']:.4f}  "
              f"ROC-AUC {m['roc_auc'] if m['roc_auc'] is None else round(m['roc_auc'], 4)}  on {m['n_images']} {m['split']} images")
    con.rule("4. predict")
    ds = discover(data)
    picks = random.Random(0).sample(ds.splits["val"], k=min(6, len(ds.splits["val"])))
    preds, _ = fovea.load(run).predict([s.path for s in picks])
    for s, p in zip(picks, preds):
        truth = ds.classes[s.label]
        mark = "[green]✓[/]" if p.label == truth else "[red]✗[/]"
        con.print(f"{mark} {Path(p.path).name}: {p.label} ({p.probability:.2f}), truly {truth}")
    con.rule("done")
    metrics = json.loads((run / "metrics.json").read_text())
    con.print(f"model and report in [bold]{run}[/]: open {run / 'report.html'} "
              f"(trained in {metrics['train_seconds']:.0f} s)")
    return run
