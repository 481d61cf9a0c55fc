"""The answer path, without HTTP: image files in, answers out.

Decoding runs on the decoder pool, inference on the one thread the micro-batcher feeds, logging to the store on
the prediction log's thread; the event loop only routes. Which version answers is the fleet's ``Route``: a
failing canary falls back to production, and a shadow (or a canary's production reference) sees the same images
in the background. Every answer is logged with the image's fingerprint, unsure answers go to the review queue,
Grad-CAM overlays are drawn on the inference thread, and ``--hybrid`` answers from the predictions ``fovea
batch`` stored for the same bytes and model version. A request Fovea cannot serve raises ``HTTPProblem``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import Any

import numpy as np
import torch
from starlette.concurrency import run_in_threadpool

from fovea import review
from fovea.errors import ImageError
from fovea.runtime import TorchModel
from fovea.serve import _oip as oip
from fovea.serve._fleet import Route, Served
from fovea.serve._state import HTTPProblem, ModelFailed, ServerState
from fovea.store import Store, fingerprint, stored_predictions

log = logging.getLogger("fovea.serve")

# (images uint8 (N, 3, S, S), indexes decoded, (index, reason) for the rest, image statistics (N, 9) or None)
Decoded = tuple[torch.Tensor, list[int], list[tuple[int, str]], np.ndarray | None]


def decode_files(model: Any, blobs: list[bytes], max_pixels: int, stats: bool = True,
                 sizes: list[tuple[int, int]] | None = None) -> Decoded:
    """Decode and resize with the model's preprocessing; with ``stats``, the image statistics of the kept images
    for drift monitoring (``sizes``: each file's (width, height) from its header, when already read)."""
    from fovea.data import load_square
    from fovea.monitor import header_size, image_stats

    arrays, kept, bad = [], [], []
    for i, blob in enumerate(blobs):
        if not blob:
            bad.append((i, "empty file"))
            continue
        try:
            arrays.append(load_square(blob, model.image_size, max_pixels=max_pixels))
            kept.append(i)
        except ImageError as e:
            bad.append((i, e.reason))
    if not arrays:
        return torch.zeros(0, 3, model.image_size, model.image_size, dtype=torch.uint8), kept, bad, np.zeros((0, 9))
    x = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())
    if not stats:
        return x, kept, bad, None
    sizes = sizes if sizes is not None else [header_size(b) for b in blobs]
    return x, kept, bad, image_stats(x, [sizes[i] for i in kept])


# A request holding more pixels than this (by the files' headers; about a 16-megapixel photo) decodes on the large
# decoder thread. Before, two concurrent uploads of 64 PNGs just under the pixel guard took both decoder threads
# of a 2-core machine and held every other request for ~48 s (issue 18).
LARGE_REQUEST_PIXELS = 16_000_000


async def decode(state: ServerState, model: Any, blobs: list[bytes]) -> Decoded:
    """``decode_files`` on a decoder thread, within the request's time limit (504 past it, saying why)."""
    from fovea.monitor import header_size

    sizes = [header_size(b) for b in blobs]  # headers only: microseconds an image (the drift statistics use them too)
    pixels = sum(w * h for w, h in sizes)
    # Pools of their own, one thread per core: decoding on the 40 threads of the default pool gave glibc a
    # malloc arena per thread, each keeping freed image buffers (resident memory grew through a soak).
    pool = state.large_decoders if pixels > LARGE_REQUEST_PIXELS else state.decoders
    job = asyncio.get_running_loop().run_in_executor(pool, decode_files, model, blobs, state.config.max_pixels,
                                                     state.config.log_predictions, sizes)
    try:
        return await asyncio.wait_for(job, state.config.timeout_s)
    except TimeoutError:
        raise HTTPProblem(504, f"decoding {len(blobs)} images of {pixels / 1e6:,.0f} megapixels in all took over "
                               f"{state.config.timeout_s:g} s (requests over {LARGE_REQUEST_PIXELS / 1e6:g} "
                               "megapixels decode one at a time): send smaller images") from None


def split(s: Served, out: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The forward pass returns probabilities, the unknown score (where the model answers "unknown") and the
    embedding (where the model exposes it) side by side: (probabilities, scores, embeddings)."""
    c = len(s.model.classes)
    scores = out[:, c] if s.model.answers_unknown else None
    first = c + (1 if scores is not None else 0)
    return out[:, :c], scores, (out[:, first:] if out.shape[1] > first else None)


def answers(s: Served, probs: np.ndarray, scores: np.ndarray | None) -> list[dict[str, Any]]:
    """One answer per image: the label ("unknown" over the model's threshold), its probability, every class's, and
    for a model that answers "unknown" its score, the threshold and the class it would otherwise have said."""
    from fovea.runtime import Outputs

    out = []
    threshold = s.model.unknown_threshold
    for k, (label, top, top_class, unknown) in enumerate(Outputs(probs, None, scores).answers(s.model.classes,
                                                                                               threshold)):
        a: dict[str, Any] = {"label": label, "probability": top,
                             "probabilities": {c: float(v) for c, v in zip(s.model.classes, probs[k])}}
        if scores is not None:
            a.update(unknown=unknown, unknown_score=float(scores[k]), unknown_threshold=threshold,
                     class_otherwise=top_class)
        out.append(a)
    return out


async def run_model(state: ServerState, s: Served, x: torch.Tensor) -> np.ndarray:
    timeout = state.config.timeout_s
    try:
        return await asyncio.wait_for(s.batcher.submit(x), timeout)
    except asyncio.TimeoutError as e:
        raise HTTPProblem(504, f"no answer within {timeout:g} s") from e
    except Exception as e:  # noqa: BLE001 - the model's own failure (a canary may fall back)
        raise ModelFailed(f"{s.name}:{s.version} failed: {e}") from e


async def predict_files(state: ServerState, s: Served, blobs: list[bytes]) -> tuple[
        torch.Tensor, np.ndarray, list[int], list[tuple[int, str]], dict[str, Any]]:
    """(decoded images, probabilities, indexes decoded, (index, reason) for the rest, what drift monitoring
    keeps: embeddings and image statistics); ModelFailed if the model itself fails."""
    x, kept, bad, stats = await decode(state, s.model, blobs)
    if not kept:
        reasons = "; ".join(f"#{i}: {r}" for i, r in bad)
        raise HTTPProblem(422, f"not a usable image: {reasons}" if len(blobs) > 1 else f"not a usable image: {bad[0][1]}")
    probs, scores, emb = split(s, await run_model(state, s, x))
    state.metrics.images.labels(str(s.version)).inc(len(kept))
    return x, probs, kept, bad, {"embeddings": emb, "stats": stats, "unknown_scores": scores}


def record(state: ServerState, s: Served, request_id: str, blobs: list[bytes], kept: list[int],
           probs: np.ndarray | None, latency_ms: float, client: str | None, role: str = "served",
           deployment_id: int | None = None, error: str | None = None, seen: dict[str, Any] | None = None) -> None:
    """Queue one row per image for the store (``probs`` None: the model failed on them, ``error`` says how;
    ``seen``: embeddings and image statistics, row for row with ``kept``)."""
    pl = state.log
    if pl is None:
        return
    scores = None if seen is None else seen.get("unknown_scores")
    for k, i in enumerate(kept):
        row: dict[str, Any] = {"request_id": request_id, "model_name": s.name, "model_version": s.version,
                               "role": role, "deployment_id": deployment_id, "latency_ms": latency_ms,
                               "fingerprint": fingerprint(blobs[i]), "client_id": client}
        if probs is None:
            row.update(label="", confidence=0.0, probabilities={}, error=error)
        else:
            a = answers(s, probs[k : k + 1], None if scores is None else scores[k : k + 1])[0]
            row.update(label=a["label"], confidence=a["probability"], probabilities=a["probabilities"],
                       unknown_score=a.get("unknown_score"))
        if seen is not None:
            if seen.get("embeddings") is not None:
                row["embedding"] = np.asarray(seen["embeddings"][k], "<f4").tobytes()
            if seen.get("stats") is not None and k < len(seen["stats"]):
                row["image_stats"] = [round(float(v), 5) for v in seen["stats"][k]]
        pl.put(row)
    state.metrics.log_dropped.set(pl.dropped)


def in_background(state: ServerState, route: Route, blobs: list[bytes], x: torch.Tensor, kept: list[int],
                  request_id: str, client: str | None) -> None:
    """The shadow (or a canary's production reference) sees the same images; nobody waits for it."""
    b = route.background
    assert b is not None

    async def work() -> None:
        start = time.perf_counter()
        xb, kept_b = x, kept
        try:
            if b.model.image_size != route.answer.model.image_size:
                xb, kept_b, _, _ = await decode(state, b.model, blobs)
            probs, scores, _ = split(b, await run_model(state, b, xb))
            record(state, b, request_id, blobs, kept_b, probs, (time.perf_counter() - start) * 1000, client,
                   route.background_role, route.deployment_id, seen={"unknown_scores": scores})
            outcome = "ok"
        except (ModelFailed, HTTPProblem) as e:
            record(state, b, request_id, blobs, kept_b, None, (time.perf_counter() - start) * 1000, client,
                   route.background_role, route.deployment_id, error=str(e))
            outcome = "error"
        state.metrics.background.labels(route.background_role, str(b.version), outcome).inc()

    state.spawn(work())


def to_review(state: ServerState, s: Served, request_id: str, unsure: list[tuple[bytes, dict[str, Any]]]) -> None:
    """Queue unsure and unknown answers for people to label, in the background."""
    store = state.store
    assert store is not None

    def save() -> None:
        for blob, a in unsure:
            review.enqueue(store, s.name, s.version, request_id, blob, a["probabilities"],
                           unknown=bool(a.get("unknown")))

    state.spawn(run_in_threadpool(save))


def check_explainable(s: Served, method: str) -> None:
    from fovea.explain import METHODS

    if method not in METHODS:
        raise HTTPProblem(422, f"explain={method!r}: choose one of {', '.join(METHODS)}")
    if not isinstance(s.model, TorchModel):
        raise HTTPProblem(422, f"{s.name}:{s.version} cannot be explained here: overlays need one PyTorch "
                               "network (not ONNX Runtime, torch.export or an ensemble)")


def overlays(s: Served, x: torch.Tensor, method: str) -> list[str]:
    """Grad-CAM (or another method) over each image, as PNG data URLs; runs on the inference thread."""
    import io

    from PIL import Image

    from fovea.explain import explain, overlay

    e = explain(s.model, x, method=method)
    urls = []
    for img, heat in zip(x.permute(0, 2, 3, 1).numpy(), e.maps):
        buf = io.BytesIO()
        Image.fromarray(overlay(img, heat)).save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


async def answer(state: ServerState, route: Route, blobs: list[bytes], request_id: str, client: str | None,
                 start: float, all_or_nothing: bool = False) -> tuple[Route, torch.Tensor, list[dict[str, Any]],
                                                                      list[int], list[tuple[int, str]]]:
    """Image files answered as the roll-out routes them: a failing canary falls back to production, the
    shadow or reference sees the same images in the background, every answer is logged, unsure and unknown
    ones go to review. Returns the route that answered, the images, the answers (``answers``), indexes decoded
    and the rest (``all_or_nothing``: one unusable file fails the request, and nothing is logged)."""
    s = route.answer
    try:
        x, probs, kept, bad, seen = await predict_files(state, s, blobs)
    except ModelFailed as e:
        if route.fallback is None:
            raise HTTPProblem(500, str(e)) from e
        log.warning("%s; answered by %s:%s instead", e, route.fallback.name, route.fallback.version)
        _, kept_e, _, _ = await decode(state, s.model, blobs)
        record(state, s, request_id, blobs, kept_e, None, (time.perf_counter() - start) * 1000, client,
               deployment_id=route.deployment_id, error=str(e))
        route = Route(route.fallback, route.deployment_id)
        s = route.answer
        x, probs, kept, bad, seen = await predict_files(state, s, blobs)
    if bad and all_or_nothing:
        raise HTTPProblem(422, "; ".join(f"#{i}: {r}" for i, r in bad))
    if route.background is not None:
        in_background(state, route, blobs, x, kept, request_id, client)
    record(state, s, request_id, blobs, kept, probs, (time.perf_counter() - start) * 1000, client,
           deployment_id=route.deployment_id, seen=seen)
    given = answers(s, probs, seen.get("unknown_scores"))
    state.similar.saw(s, request_id, seen.get("embeddings"), [a["label"] for a in given])  # /v1/similar?in=seen
    if any(a.get("unknown") for a in given):
        state.metrics.unknown.labels(str(s.version)).inc(sum(bool(a.get("unknown")) for a in given))
    # to people: answers under --review-below, and every image of none of the classes (name it, or a new class)
    unsure = [(blobs[k], a) for k, a in zip(kept, given) if a.get("unknown") or a["probability"] < state.config.review_below]
    if unsure and state.store is not None:
        to_review(state, s, request_id, unsure)
    return route, x, given, kept, bad


def _stored_answers(store: Store, s: Served, blobs: list[bytes]) -> dict[int, dict[str, Any]]:
    """{index: answer} for the images a batch job already predicted with this model version."""
    prints = [fingerprint(b) for b in blobs]
    found = stored_predictions(store, name=s.name, version=s.version, fingerprints=prints)
    out = {}
    for i, f in enumerate(prints):
        if f in found:
            probabilities, score = found[f]
            p = np.array([[probabilities.get(c, 0.0) for c in s.model.classes]], np.float64)  # as stored, exactly
            scores = None if score is None or not s.model.answers_unknown else np.array([score])
            out[i] = answers(s, p, scores)[0]
    return out


async def predict(state: ServerState, route: Route, blobs: list[bytes], *, request_id: str, client: str | None,
                  start: float, explain: str | None) -> dict[str, Any]:
    """The /v1/predict answer: one entry per file (a prediction, or ``{"error": reason}``)."""
    config, s = state.config, route.answer
    results: list[dict[str, Any]] = [{} for _ in blobs]
    online = list(range(len(blobs)))
    if config.hybrid and explain is None:  # precomputed by `fovea batch` with this very version: no inference
        assert state.store is not None  # --hybrid opens the store
        stored = await run_in_threadpool(_stored_answers, state.store, s, blobs)
        for i, a in stored.items():
            results[i] = {**a, "source": "batch"}
        online = [i for i in online if i not in stored]
        state.metrics.hybrid_hits.labels(str(s.version)).inc(len(stored))
    given: list[dict[str, Any]] = []
    kept, bad, x = [], [], None
    if online:
        route, x, given, kept_o, bad_o = await answer(state, route, [blobs[i] for i in online], request_id, client,
                                                      start)
        s = route.answer
        kept, bad = [online[k] for k in kept_o], [(online[k], r) for k, r in bad_o]
    latency_ms = (time.perf_counter() - start) * 1000
    for i, a in zip(kept, given):
        results[i] = {**a, "source": "online"} if config.hybrid else a
    if explain is not None and x is not None:
        urls = await asyncio.get_running_loop().run_in_executor(state.fleet.executor, overlays, s, x, explain)
        for i, url in zip(kept, urls):
            results[i]["overlay"] = url
    for i, reason in bad:
        results[i] = {"error": reason}
    body: dict[str, Any] = {"request_id": request_id, "model": s.name, "model_version": s.version,
                            "predictions": results, "latency_ms": round(latency_ms, 3)}
    if route.deployment_id is not None:
        body["deployment_id"] = route.deployment_id
    if len(blobs) == 1:
        body.update(results[0])
    return body


async def infer(state: ServerState, route: Route, req: oip.InferRequest, *, client: str | None,
                start: float) -> tuple[Served, list[oip.Output]]:
    """The Open Inference Protocol answer: the version that answered, and its output tensors (probabilities
    (N, C), labels (N,) and, for a model that answers "unknown", its scores (N,)); ``oip.encode`` picks the ones
    asked for and frames them."""
    s = route.answer
    size = s.model.image_size
    oip.check_outputs(req, oip.output_names(s.model.answers_unknown))
    if req.datatype == "UINT8":  # decoded pixels: answered, not logged (no file to fingerprint) nor shadowed
        x = oip.pixels(req, size, state.config.max_images)
        try:
            probs, scores, _ = split(s, await run_model(state, s, x))
        except ModelFailed as e:
            if route.fallback is None or route.fallback.model.image_size != size:
                raise HTTPProblem(500, str(e)) from e
            s = route.fallback
            probs, scores, _ = split(s, await run_model(state, s, x))
        given = answers(s, probs, scores)
    else:  # BYTES: image files (oip.read_request takes no other datatype)
        blobs = oip.files(req, state.config.max_images)
        # OIP answers one tensor: every input has a row, or the request fails
        route, _, given, _, _ = await answer(state, route, blobs, req.id, client, start, all_or_nothing=True)
        s = route.answer
    n, classes = len(given), s.model.classes
    outputs = [oip.Output("probabilities", "FP32", [n, len(classes)],
                          np.array([[a["probabilities"][c] for c in classes] for a in given], np.float32)),
               oip.Output("label", "BYTES", [n], [a["label"] for a in given])]
    if s.model.answers_unknown:  # label "unknown" over the threshold: the score says how far
        outputs.append(oip.Output("unknown_score", "FP32", [n], np.array([a["unknown_score"] for a in given], np.float32),
                                  {"threshold": s.model.unknown_threshold}))
    return s, outputs
