"""Unknown images end to end, and what the score costs: issue 17's server and timing checks.

1. Through the server (in this process, with its store, review queue and /metrics): N uploads of held-out
   cats and dogs (pets/val), then N of ants and bees (hymenoptera/val). Prints how many of each were answered
   "unknown", what `fovea_unknown_answers` read before and after each batch, how many landed in the review queue,
   and the drift check's unknown-rate family on the ants window.
2. `fovea predict`'s time per image with the score and without it (``fovea.load(..., unknown=False)``), side by
   side: interleaved rounds over the same decoded images, medians.

The model needs an unknown score: a run trained by this Fovea has one; an older run gets one first with
`fovea calibrate-unknown RUN ../shared/data/pets` (``--calibrate`` does it here, into the run folder).

    .venv/bin/python bench/unknown_serve.py --model bench-work/pets-cnn --calibrate
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a run folder (a pets model)")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--n", type=int, default=20, help="uploads of each kind")
    ap.add_argument("--calibrate", action="store_true", help="fit and calibrate the score on pets first")
    ap.add_argument("--rounds", type=int, default=7, help="timing rounds (interleaved)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import torch

    from fovea._system import machine

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {machine()}")
    pets, ants = a.data / "pets", a.data / "hymenoptera"
    if a.calibrate:
        from fovea.monitor import reference_from_folder
        from fovea.training import calibrate_unknown

        entry = calibrate_unknown(a.model, pets, progress=False)

        reference_from_folder(str(a.model), pets / "val")  # the drift reference with the new score
        print(f"calibrated: {entry['score']}, threshold {entry['threshold']:.4g}, kept {entry['kept']:.3f} of "
              f"{entry['calibrated_on']} pets/val images")
    rng = np.random.default_rng(a.seed)
    known = sorted((pets / "val").glob("*/*.jpg"))
    strange = sorted((ants / "val").glob("*/*.jpg"))
    known = [known[i] for i in rng.choice(len(known), a.n, replace=False)]
    strange = [strange[i] for i in rng.choice(len(strange), a.n, replace=False)]
    serve_check(a.model, known, strange)
    timing(a.model, sorted((pets / "val").glob("*/*.jpg"))[:256], a.rounds)


def serve_check(model: Path, known: list[Path], strange: list[Path]) -> None:
    from fastapi.testclient import TestClient

    from fovea.serve import ServeConfig, create_app

    def metric(c: TestClient) -> float:
        for line in c.get("/metrics").text.splitlines():
            if line.startswith("fovea_unknown_answers_total"):
                return float(line.split()[-1])
        return 0.0

    with tempfile.TemporaryDirectory() as home:
        os.environ["FOVEA_HOME"] = home
        with TestClient(create_app(ServeConfig(model=str(model), drift_every_s=0, drift_window=len(strange)))) as c:
            print("\n| uploads | answered unknown | fovea_unknown_answers before -> after |")
            print("| --- | --- | --- |")
            for name, files in (("pets/val (cats and dogs)", known), ("hymenoptera/val (ants and bees)", strange)):
                before = metric(c)
                answers = [c.post("/v1/predict", content=p.read_bytes(), headers={"content-type": "image/jpeg"}).json()
                           for p in files]
                unknown = sum(bool(x.get("unknown")) for x in answers)
                print(f"| {len(files)} {name} | {unknown} | {before:g} -> {metric(c):g} |")
            time.sleep(1.0)  # the prediction log and the review queue write in the background
            queue = c.get("/v1/reviews").json()["reviews"]
            print(f"\nreview queue: {len(queue)} images, {sum(q['predicted'] == 'unknown' for q in queue)} answered "
                  "'unknown'")
            check = c.post("/v1/drift/check").json()
            family = next((t for t in check.get("drift", {}).get("tests", []) if t["family"] == "unknown_rate"), None)
            if family:
                d = family["detail"]
                print(f"drift check on the newest {check['drift']['n_window']} answers (the ants and bees): "
                      f"unknown_rate p = {family['p_value']:.3g} (window {d['window']:.0%} over the threshold, "
                      f"reference {d['reference']:.0%})")
            else:
                print(f"drift check: {check.get('summary') or check}")


def timing(model_path: Path, files: list[Path], rounds: int) -> None:
    import fovea

    scored, closed = fovea.load(model_path, "cpu"), fovea.load(model_path, "cpu", unknown=False)
    x, _, _ = scored.load_images(files)
    for m in (scored, closed):  # warm-up: allocation, oneDNN kernel choice
        m.outputs(x[:8])
    results: dict[str, dict[int, list[float]]] = {"with score": {}, "without": {}}
    for _ in range(rounds):
        for label, m in (("with score", scored), ("without", closed)):
            for batch in (1, 64):
                t = time.perf_counter()
                for i in range(0, 64 if batch == 1 else len(x), batch):
                    m.predictions(["x"] * len(x[i : i + batch]), m.outputs(x[i : i + batch]))
                n = 64 if batch == 1 else len(x)
                results[label].setdefault(batch, []).append((time.perf_counter() - t) / n * 1000)
    print("\n| batch | ms per image with the score | without | added |")
    print("| --- | --- | --- | --- |")
    for batch in (1, 64):
        w, wo = np.median(results["with score"][batch]), np.median(results["without"][batch])
        print(f"| {batch} | {w:.3f} | {wo:.3f} | {100 * (w / wo - 1):+.1f} % |")


if __name__ == "__main__":
    main()
