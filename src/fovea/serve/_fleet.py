"""The versions one server process holds and which of them answers each request.

``current`` answers by default; a running deployment adds a ``candidate`` (shadow: it sees a copy of every
request; canary: it answers its share, sticky per client id; blue-green: it is warmed, then swapped in);
``previous`` is the version production replaced, kept warm so that a rollback is instant. A controller task
(``run``) follows the store every ``poll_s`` seconds: every replica converges on the same production version
and deployment, and the canary steps and automatic rollbacks happen there (``fovea.deploy.advance``).
All versions share one inference thread: two OpenMP pools on two cores would slow both.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from starlette.concurrency import run_in_threadpool

from fovea import deploy, model_registry
from fovea.errors import FoveaError
from fovea.serve._batcher import MicroBatcher

log = logging.getLogger("fovea.serve")


@dataclass
class Served:
    """One loaded version and its micro-batcher."""

    name: str
    version: int  # 0 for a model folder outside the registry
    model: Any  # a loaded artifact (Predictor or Ensemble)
    batcher: MicroBatcher
    digest: str = ""
    version_id: int | None = None  # the registry row
    ready: bool = False


@dataclass
class Route:
    """Who answers a request, and who else sees it in the background (and as what)."""

    answer: Served
    deployment_id: int | None = None
    background: Served | None = None
    background_role: str = ""  # shadow (the candidate behind production) | reference (production behind a canary)
    fallback: Served | None = None  # answers if ``answer`` (a canary) fails


def _forward(model: Any) -> Any:
    """uint8 images -> probabilities (N, C), then the unknown score (N, 1) where the model answers "unknown", then
    the penultimate embedding (N, D) where it has one (kept for drift monitoring): one array through the
    micro-batcher, whose columns the server splits (``serve._service.split``)."""
    def forward(x: torch.Tensor) -> np.ndarray:
        out = model.outputs(x, embed=True)
        probs = np.asarray(out.probabilities, np.float32)
        if not np.isfinite(probs).all():  # a broken model must fail loudly, not answer NaN
            raise FoveaError("the model produced non-finite probabilities")
        columns = [probs]
        if model.answers_unknown:
            columns.append(np.asarray(out.unknown_scores, np.float32).reshape(-1, 1))
        if out.embeddings is not None:
            columns.append(np.asarray(out.embeddings, np.float32))
        return np.concatenate(columns, 1) if len(columns) > 1 else probs
    return forward


class Fleet:
    def __init__(self, config: Any, on_batch: Any = None) -> None:
        self.config = config
        self.on_batch = on_batch  # (version, size) -> None: the batch-size histogram
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fovea-infer")
        self.current: Served | None = None
        self.candidate: Served | None = None
        self.previous: Served | None = None
        self.deployment: deploy.View | None = None
        self.follows = False  # a registry name (not a pinned version or a folder): follow production and deployments
        self.store: Any = None
        self.wake = asyncio.Event()
        self._turn = 0
        self._retiring: dict[asyncio.Task[None], Served] = {}

    # loading -------------------------------------------------------------------------------------------------

    async def _start(self, name: str, version: int, model: Any, digest: str, version_id: int | None) -> Served:
        label = str(version)
        batcher = MicroBatcher(_forward(model), self.config.max_batch_size, self.config.max_wait_ms,
                               on_batch=(lambda n: self.on_batch(label, n)) if self.on_batch else None,
                               executor=self.executor)
        batcher.start()
        served = Served(name, version, model, batcher, digest, version_id)
        # Warm up before answering: the first batch of each size pays allocation and kernel selection.
        for n in sorted({1, self.config.max_batch_size}):
            await batcher.submit(torch.zeros(n, 3, model.image_size, model.image_size, dtype=torch.uint8))
        served.ready = True
        return served

    async def _load_version(self, v: model_registry.Version) -> Served:
        loop = asyncio.get_running_loop()
        model = await loop.run_in_executor(self.executor, model_registry.open_version, v, self.config.device,
                                           self.config.unknown)
        log.info("loaded %s and warmed it up", v.ref)
        return await self._start(v.name, v.version, model, v.digest, v.id)

    async def open(self, store: Any) -> None:
        """Load what ``config.model`` names: a folder (served as version 0) or a registry reference."""
        from fovea.artifact import META
        from fovea.runtime import load

        self.store = store
        ref, loop = self.config.model, asyncio.get_running_loop()
        folder = Path(ref)
        if (folder / META).exists():
            model = await loop.run_in_executor(self.executor, lambda: load(folder, self.config.device,
                                                                           unknown=self.config.unknown))
            self.current = await self._start(folder.resolve().name, 0, model, "", None)
            return
        if ":" not in ref and ("/" in ref or folder.exists()):
            raise FoveaError(f"{ref} is not a model folder (no {META}) and not a registry name")
        name, _, which = ref.partition(":")
        self.follows = which in ("", "production")
        v = await run_in_threadpool(model_registry.resolve, ref, store=store)
        self.current = await self._load_version(v)
        if self.follows:
            await self.sync()

    async def _get(self, v: model_registry.Version) -> Served:
        for s in (self.current, self.candidate, self.previous):
            if s is not None and s.version_id == v.id:
                return s
        return await self._load_version(v)

    def _retire(self, s: Served | None) -> None:
        """Stop a version no longer held, after the requests already given to it are answered."""
        if s is None or s in (self.current, self.candidate, self.previous):
            return

        async def later() -> None:
            await asyncio.sleep(self.config.timeout_s)
            await s.batcher.stop(close_executor=False)

        task = asyncio.get_running_loop().create_task(later())
        self._retiring[task] = s
        task.add_done_callback(lambda t: self._retiring.pop(t, None))

    # following the store ---------------------------------------------------------------------------------------

    async def _switch_to(self, v: model_registry.Version) -> None:
        assert self.current is not None
        if self.current.version_id == v.id:
            return
        new = await self._get(v)  # warm before the swap: requests never wait for a load
        old, replaced = self.current, self.previous
        self.current, self.previous = new, old  # one assignment each: a request sees the old or the new, never none
        if self.candidate is new:
            self.candidate = None
        log.info("%s: production is now version %d (was %d)", v.name, new.version, old.version)
        self._retire(replaced)

    async def sync(self) -> None:
        """One controller tick: follow production and the running deployment; judge a canary."""
        if not self.follows or self.current is None:
            return
        name, store = self.current.name, self.store
        d = await run_in_threadpool(deploy.active, name, store)
        if d is not None and d.strategy == "canary":
            d = await run_in_threadpool(deploy.advance, d, store)
            if d.state != "running":
                log.warning("%s deployment #%d: %s (%s)", name, d.id, d.state, d.reason)
                d = None
        try:
            prod = await run_in_threadpool(deploy.production, name, store)
        except FoveaError:  # no production alias (a registry from before Fovea set one): keep what is served
            prod = None
        if prod is not None:
            await self._switch_to(prod)
        if d is not None and d.candidate is not None and (prod is None or d.candidate.id != prod.id):
            held = self.candidate
            try:
                self.candidate = await self._get(d.candidate)
            except FoveaError as e:  # files gone or changed: end it, rather than retry at every tick forever
                log.warning("%s deployment #%d: %s; rolled back", name, d.id, e)
                await run_in_threadpool(deploy.abort, d, f"automatic rollback: the candidate cannot be loaded: {e}", store)
                self.candidate, self.deployment = None, None
                self._retire(held)
                return
            if held is not self.candidate:
                self._retire(held)
            if d.strategy == "blue-green":  # warm here: switch production for every replica, then here
                won = await run_in_threadpool(deploy.promote, d, store,
                                              f"blue-green: {d.candidate.ref} warmed beside {d.production.ref}, switched")
                log.info("%s: blue-green switch to %s (%s)", name, d.candidate.ref,
                         "this replica" if won else "another replica")
                await self._switch_to(d.candidate)
                d = None
        elif self.candidate is not None:
            held, self.candidate = self.candidate, None
            self._retire(held)
        self.deployment = d

    async def run(self, poll_s: float) -> None:
        """Follow the store until cancelled; ``wake.set()`` makes it look at once (after an admin call)."""
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), poll_s)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()
            try:
                await self.sync()
            except Exception as e:  # noqa: BLE001 - a database hiccup must not stop the controller
                log.warning("could not follow the store: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)

    # routing ---------------------------------------------------------------------------------------------------

    def loaded(self) -> list[Served]:
        """The versions held and warm: production, the candidate, the previous production."""
        return [v for v in (self.current, self.candidate, self.previous) if v is not None and v.ready]

    def route(self, client: str | None) -> Route:
        current, d, cand = self.current, self.deployment, self.candidate
        assert current is not None
        if d is None or cand is None or not cand.ready:
            return Route(current)
        if d.strategy == "shadow":
            return Route(current, d.id, cand, "shadow")
        if d.strategy == "canary":
            if client:
                chosen = deploy.sticky_bucket(d.id, client) < d.percent
            else:
                self._turn += 1
                chosen = deploy.takes_turn(self._turn, d.percent)
            if chosen:
                return Route(cand, d.id, current, "reference", fallback=current)
            return Route(current, d.id)
        return Route(current, d.id)  # blue-green: warming, not switched yet

    def held(self) -> list[Served]:
        return [s for s in (self.current, self.candidate, self.previous) if s is not None]

    async def close(self) -> None:
        retiring = list(self._retiring.items())
        for task, _ in retiring:
            task.cancel()
        for s in self.held() + [s for _, s in retiring]:
            s.ready = False
            await s.batcher.stop(close_executor=False)
        self.executor.shutdown(wait=False, cancel_futures=True)
