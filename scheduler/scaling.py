"""The replica scaler: a thread in each Celery worker that reads, every `scale_interval_s`, each
model's queued plus running generate jobs from SQL and its replicas' mean jobs in hand from the
model pool (workers/pool.py), and tells the pool how many replicas the model should run
(core/scaling.py decides: sized by the jobs in hand, up at once, down after the cool-down). The
pool starts replicas into free room and unloads idle ones past their policy's delay. It lives
here because it needs both SQL (the queue) and Ray (the pool); a second worker running it sends
the same numbers, which the pool takes as they come.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy import func, select

from core.scaling import Decision, decide, model_policy
from core.settings import Settings
from core.states import JobKind, JobState
from core.tables import Job, Model
from scheduler.runner import Runner

log = logging.getLogger(__name__)

_DEPTH = (
    select(Job.model_id, func.count())
    .where(
        Job.kind == JobKind.GENERATE,
        Job.state.in_([JobState.QUEUED, JobState.RUNNING]),
        Job.model_id.is_not(None),
    )
    .group_by(Job.model_id)
)


class Scaler(threading.Thread):
    def __init__(self, settings: Settings, runner: Runner) -> None:
        super().__init__(name="replica-scaler", daemon=True)
        self.settings, self.runner = settings, runner
        self.decisions: dict[str, Decision] = {}
        self.stopped = threading.Event()

    def tick(self) -> dict[str, int]:
        """One look: the replicas asked of each model that has jobs, a floor, or replicas the
        scaler asked for before. Returns model id -> replicas asked."""
        from workers.registry import get_family
        from workers.routing import call_pool

        now = time.monotonic()
        cooldown_s = max(self.settings.scale_cooldown_s, self.settings.scale_interval_s)
        with self.runner.database.read() as session:
            depth: dict[str, int] = {str(m): int(n) for m, n in session.execute(_DEPTH)}
            known = set(depth) | {m for m, d in self.decisions.items() if d.desired > 0}
            models = list(
                session.scalars(
                    select(Model).where(Model.id.in_(known) | Model.serving.is_not(None))
                )
            )
            # An adapter version's jobs run on its base's replicas: they count for the base.
            for m in [m for m in models if (m.config or {}).get("served_by_base")]:
                models.remove(m)
                if m.parent_id is None:
                    continue
                depth[m.parent_id] = depth.get(m.parent_id, 0) + depth.pop(m.id, 0)
                if all(other.id != m.parent_id for other in models):
                    base = session.get(Model, m.parent_id)
                    if base is not None:
                        models.append(base)
            found: list[dict[str, Any]] = [
                {
                    "id": m.id,
                    "family": m.family,
                    "path": m.path,
                    "config": dict(m.config or {}),
                    "serving": dict(m.serving or {}),
                }
                for m in models
            ]
        asked: dict[str, int] = {}
        in_hand: dict[str, float] = {}
        if found:  # the replicas' own load: where a model's jobs wait for it
            self.runner.connect_ray()
            try:
                in_hand = call_pool("loads")
            except AttributeError:
                # A pool started by an older genq (a detached actor that outlived the upgrade)
                # has no loads(): size by the queue, as that genq did, until it is replaced.
                log.warning("the model pool reports no replica loads; scaling on the queue")
        for model in found:
            family = get_family(model["family"])
            policy = model_policy(family.scaling.as_dict(), model["serving"], self.settings)
            jobs = depth.get(model["id"], 0)
            decision = self.decisions.get(model["id"])
            if decision is None:
                if jobs == 0 and policy.min_replicas == 0:
                    continue  # nothing to do for a model nobody uses
                decision = self.decisions[model["id"]] = Decision()
            desired = decide(decision, jobs, policy, now, cooldown_s, in_hand.get(model["id"]))
            # The model's path as registered: each replica fetches the folder on its machine.
            model_dir = model["path"] or None
            self.runner.connect_ray()
            call_pool(
                "scale",
                model["id"],
                family.name,
                model_dir,
                model["config"],
                self.runner.serving,
                policy,
                desired,
            )
            asked[model["id"]] = desired
            if desired == 0 and jobs == 0:
                del self.decisions[model["id"]]  # the pool unloads what is idle
        return asked

    def run(self) -> None:
        while not self.stopped.wait(self.settings.scale_interval_s):
            try:
                self.tick()
            except Exception:  # the database or Ray briefly away: the next look tries again
                log.exception("the replica scaler's look failed")

    def stop(self) -> None:
        self.stopped.set()
