"""Room for everyone, on a real local Ray with 3 CPUs and no GPU: servers and trainers that fit
nowhere make the pool unload idle servers (least recently used first), never one with a job in
hand, and a trainer that must wait says what for.

The family does not matter here (the pool places any 1-CPU actor alike): the servers and
trainers are tiny gan ones, whose processes start without diffusers. A server is kept with a
job in hand by a job that waits for its batch to fill (`Busy`), so no CPU is spent on it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("torch")

from core.events import ModelSaved, Output, Placement  # noqa: E402
from tests.support.ray_cluster import local_ray  # noqa: E402
from workers.actors import start_trainer, trainer_resources  # noqa: E402
from workers.families.base import CanceledError  # noqa: E402
from workers.pool import get_pool  # noqa: E402
from workers.registry import get_family  # noqa: E402
from workers.room import (  # noqa: E402
    CLAIM_MAX_S,
    CLAIM_S,
    HANDOVER_S,
    Claim,
    is_room_on_its_way,
    is_unplaced,
    trainer_need,
)
from workers.routing import admit_trainer, get_model_server  # noqa: E402
from workers.server import ServingOptions  # noqa: E402

# The module starts a real Ray of its own: real processes, marker `stack`.
pytestmark = pytest.mark.stack

GAN = get_family("gan")
# Nothing unloads for idling (only to make room). A batch holds at most 2 rows and waits up to
# HOLD_S for them: a 2-image job runs at once; a 1-image job stays in hand, waiting for a row
# that never comes, until it is canceled (or HOLD_S passes, and `Busy` sends the next).
HOLD_S = 600
SERVING = ServingOptions(idle_unload_s=None, batch_max_rows=2, batch_max_wait_ms=HOLD_S * 1000)
NOW = {"num_images": 2}  # a job that runs as soon as it comes
LOOK_S = 0.1


@pytest.fixture(scope="module", autouse=True)
def ray_cluster() -> Iterator[None]:
    with local_ray(num_cpus=3):  # three 1-CPU servers fill it
        yield


def wait_until(check: Any, what: str, limit: int = 1200) -> Any:
    """Poll `check` until it is truthy (at most limit looks: a hang fails, not a slow run)."""
    for _ in range(limit):
        value = check()
        if value:
            return value
        time.sleep(LOOK_S)
    raise AssertionError(f"timed out waiting for {what}")


class Running:
    """A generate job running in a thread, its events collected as they come."""

    def __init__(self, server: Any, job_id: str, params: dict[str, Any]) -> None:
        self.server, self.job_id, self.events = server, job_id, []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(params,), daemon=True)
        self.thread.start()

    def _run(self, params: dict[str, Any]) -> None:
        try:
            for ref in self.server.generate.remote(self.job_id, params):
                self.events.append(ray.get(ref))
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            self.error = exc

    def wait(self) -> list[Any]:
        self.thread.join()
        assert self.error is None, self.error
        return self.events


class Busy:
    """Keeps a job in hand on a server until stopped: a 1-image job, which waits for its batch
    to fill (see SERVING) without using the CPU, and the next as soon as one ends."""

    def __init__(self, server: Any, name: str) -> None:
        self.server, self.name = server, name
        self.lock = threading.Lock()
        self.stopping = False
        self.started = threading.Event()
        self.current = ""
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        n = 0
        while True:
            with self.lock:
                if self.stopping:
                    return
                n += 1
                job_id = self.current = f"{self.name}-{n}"
            try:
                for ref in self.server.generate.remote(job_id, {"num_images": 1, "seed": n}):
                    if isinstance(ray.get(ref), Placement):  # the server holds the job now
                        self.started.set()
            except CanceledError:
                return

    def stop(self) -> None:
        with self.lock:  # no job starts after this one: a cancel that overtakes it still works
            self.stopping = True
            job_id = self.current
        ray.get(self.server.cancel.remote(job_id))
        self.thread.join()


def evicted() -> list[str]:
    return [e["replica"] for e in ray.get(get_pool().info.remote())["evictions"]]


def train_ctx(root: Any, job_id: str) -> dict[str, Any]:
    return {
        "dataset": {"name": "digits", "kind": "images", "path": None},
        "checkpoint_dir": str(root / "checkpoints" / job_id),
        "model_dir": str(root / "models" / job_id),
        "model_dir_rel": f"models/{job_id}",
    }


def test_idle_servers_make_room_for_a_new_model_and_a_trainer_never_a_busy_one(
    tiny_gan: tuple[str, dict], tmp_path: Any
) -> None:
    busy = get_model_server("room-busy", GAN, *tiny_gan, SERVING)
    long_job = Busy(busy, "long")
    wait_until(long_job.started.is_set, "the busy server to hold its job")
    idle_b = get_model_server("room-b", GAN, *tiny_gan, SERVING)
    idle_c = get_model_server("room-c", GAN, *tiny_gan, SERVING)
    for server in (idle_b, idle_c):  # both loaded, served a job, now idle
        assert any(isinstance(e, Output) for e in Running(server, "warm", NOW).wait())
    assert ray.available_resources().get("CPU", 0) == 0  # every CPU is held

    # A job on a third model: its server fits nowhere until an idle one goes.
    third = get_model_server("room-d", GAN, *tiny_gan, SERVING)
    job = Running(third, "third", {**NOW, "seed": 3})
    job.thread.join()
    assert job.error is None and any(isinstance(e, Output) for e in job.events)
    servers = {"model-room-b": idle_b, "model-room-c": idle_c, "model-room-d": third}
    [first] = evicted()
    assert first in {"model-room-b", "model-room-c"}  # an idle one (test_batching: LRU order)

    # A trainer: room is made for it the same way (another idle server goes).
    trainer = start_trainer("room-t", GAN)
    need = trainer_need(trainer_resources(GAN))
    admit_trainer("trainer-room-t", trainer._actor_id.hex(), need, 5)
    events = [
        ray.get(ref)
        for ref in trainer.train.remote(
            "room-t",
            "train",
            {"preset": "tiny", "steps": 2, "batch_size": 4},
            train_ctx(tmp_path, "room-t"),
        )
    ]
    assert isinstance(events[0], Placement) and isinstance(events[-1], ModelSaved)
    assert len(evicted()) == 2 and set(evicted()) < set(servers)  # only idle servers went
    [survivor] = set(servers) - set(evicted())

    # Now every CPU gets busy: the busy server, the surviving one and a new one, each with a
    # job in hand. A second trainer cannot be placed, and says why; once the survivor's jobs
    # end, it (now idle) is unloaded for the trainer by the pool's watcher.
    held = Busy(servers[survivor], "held")
    ray.kill(trainer)  # as the runner does when a training job ends
    wait_until(lambda: ray.available_resources().get("CPU", 0) >= 1, "the trainer's CPU")
    other = get_model_server("room-e", GAN, *tiny_gan, SERVING)
    other_job = Busy(other, "other")
    wait_until(
        lambda: held.started.is_set() and other_job.started.is_set(), "two more servers busy"
    )
    assert len(evicted()) == 2  # the new server found room without evicting anything
    second = start_trainer("room-t2", GAN)
    waiting = admit_trainer("trainer-room-t2", second._actor_id.hex(), need, 5)
    assert waiting == "waiting for CPU"
    assert is_unplaced(second._actor_id.hex())
    assert ray.get(get_pool().info.remote())["waiting"]["trainer-room-t2"] == "waiting for CPU"
    held.stop()
    wait_until(lambda: not is_unplaced(second._actor_id.hex()), "the second trainer to start")
    assert ray.get(second.info.remote())["family"] == "gan"
    assert evicted()[2:] == [survivor]
    # The servers with a job in hand all along were never evicted.
    assert ray.get(busy.info.remote())["active_jobs"]
    assert ray.get(other.info.remote())["active_jobs"]
    long_job.stop()
    other_job.stop()
    for actor in (busy, other, second, servers[survivor]):
        ray.kill(actor)


def test_room_made_by_unloading_stays_the_actors_until_ray_can_have_handed_it_over() -> None:
    # An actor still without a process seconds after a server was unloaded for it is being
    # started there, not short of room: the pool must not unload a second server for it.
    unload = Claim("node", {"CPU": 1.0}, -1, "model-x", at=100.0, actor_id="x")
    assert is_room_on_its_way(100.0, [unload], now=100.0 + CLAIM_MAX_S - 1)  # not seen dead
    assert not is_room_on_its_way(100.0, [unload], now=100.0 + CLAIM_MAX_S)
    unload.gone_at = 110.0  # reported dead: its room goes to the actor's worker process
    assert is_room_on_its_way(100.0, [unload], now=110.0 + HANDOVER_S - 1)
    assert not is_room_on_its_way(100.0, [unload], now=110.0 + HANDOVER_S)  # went to another
    # Room that was free (nothing unloaded for it) is only late in Ray's report.
    assert is_room_on_its_way(100.0, [], now=100.0 + CLAIM_S - 0.1)
    assert not is_room_on_its_way(100.0, [], now=100.0 + CLAIM_S)
