"""Compression on a pets model: the figures of docs/compression.md and the checks of issue 5.

1. Train (or reuse, in --work) a pets model: ``--model cnn`` at Fovea's CPU defaults, or e.g.
   ``--model resnet18 --image-size 128``.
2. ``fovea compress`` it with every method: each artifact is loaded back and measured in this process,
   interleaved with the float32 model (``--rounds`` passes, medians), so every ratio is against a baseline
   measured in the same minute.
3. Print the table as markdown, then the issue's checks with the measured figures:
   int8 weights <= 0.3x the fp32 size with <= 1 point lost; ONNX gives the same argmax on every pets/val
   image; ONNX Runtime int8 >= 1.5x fp32 throughput at batch 32; bf16 on the GPU (when there is one).

    python bench/compression.py ../shared/data
    python bench/compression.py ../shared/data --model resnet18 --image-size 128 --epochs 30

Run it on a quiet machine: another process on the same cores moves the latency figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="../shared/data (pets/ is used)")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--work", type=Path, default=Path("bench-work/compression"))
    ap.add_argument("--run", type=Path, default=None, help="an existing pets run to compress instead of training")
    ap.add_argument("--methods", default=None, help="comma-separated (default: all)")
    ap.add_argument("--seconds", type=float, default=3.0, help="per model, for latency and for throughput")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import torch

    import fovea
    from fovea.compress import compress
    from fovea.compress._report import HEADER, table_rows

    tag = f"{args.model}-{args.image_size or 'default'}-{args.epochs or 'default'}"
    run = args.run or args.work / tag
    if not (run / "model.json").exists():
        t0 = time.perf_counter()
        kw = {k: v for k, v in (("image_size", args.image_size), ("epochs", args.epochs)) if v is not None}
        fovea.train(args.data / "pets", model=args.model, out=str(run), progress=False, **kw)
        print(f"trained {run} in {time.perf_counter() - t0:.0f} s")
    methods = args.methods.split(",") if args.methods else None
    t0 = time.perf_counter()
    r = compress(run, methods=methods, data=args.data / "pets" / "val", seconds=args.seconds, rounds=args.rounds,
                 progress=False)
    print(f"compressed and measured in {time.perf_counter() - t0:.0f} s on {r['hardware_summary']}\n")
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for cells in table_rows(r):
        print("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")

    rows = {(x["method"], x["device"]): x for x in r["rows"]}
    base = rows[("fp32", "cpu")]
    print("\nchecks (issue 5):")

    def check(name: str, ok: bool, figure: str) -> None:
        print(f"  [{'met' if ok else 'NOT MET'}] {name}: {figure}")

    for m in ("int8-sym", "int8-asym"):
        if (m, "cpu") in rows:
            x = rows[(m, "cpu")]
            ratio, loss = x["size_bytes"] / base["size_bytes"], (base["accuracy"] - x["accuracy"]) * 100
            check(f"{m} <= 0.3x size, <= 1 point lost", ratio <= 0.3 and loss <= 1,
                  f"{ratio:.3f}x, {loss:+.2f} points lost ({x['size_bytes']:,} vs {base['size_bytes']:,} bytes)")
    if ("onnx", "cpu") in rows:
        p = rows[("onnx", "cpu")]["details"]["parity"]
        check("ONNX same argmax on every pets/val image", p["same_argmax"] == p["images"],
              f"{p['same_argmax']}/{p['images']}, max |logit diff| {p['max_abs_logit_diff']:.2e}")
    onnx = rows.get(("onnx", "cpu"))
    for m in ("ort-int8-minmax", "ort-int8-percentile", "ort-int8-entropy"):
        if (m, "cpu") in rows:
            x = rows[(m, "cpu")]
            vs_onnx = f", {x['throughput'] / onnx['throughput']:.2f}x float32 ONNX Runtime" if onnx else ""
            check(f"{m} >= 1.5x fp32 throughput at batch 32", x["throughput"] >= 1.5 * base["throughput"],
                  f"{x['throughput'] / base['throughput']:.2f}x PyTorch fp32 ({x['throughput']:,.0f} vs "
                  f"{base['throughput']:,.0f} images/s){vs_onnx}; top-1 {x['accuracy'] * 100:.1f} %")
    if torch.cuda.is_available():
        gpu = rows.get(("bf16", "cuda"))
        check("bf16 on the GPU", gpu is not None,
              f"{gpu['throughput']:,.0f} images/s, top-1 {gpu['accuracy'] * 100:.1f} %" if gpu else "no row")
    else:
        print("  [unmeasured] bf16 on the GPU: no CUDA device on this machine")
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.work / f"{run.name}.json"
    out.write_text(json.dumps(r, indent=2, default=str))
    print(f"\nfull result: {out}")


if __name__ == "__main__":
    main()
