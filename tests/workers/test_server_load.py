"""A model server's load (workers/server.py): the job-seconds it has had in hand, on its own
clock, from which the pool (workers/replicas.py) takes its mean jobs in hand between two reports,
the measure the replica scaler sizes a model by. The server runs as the plain class (no Ray),
with the echo family.
"""

from __future__ import annotations

import threading

from workers.replicas import mean_in_hand
from workers.server import ModelServer


def test_the_server_counts_its_job_seconds_in_hand_and_the_pool_their_mean() -> None:
    server = ModelServer("echo", None, {})
    first = server.info()
    idle = server.info()
    assert mean_in_hand(first, idle) == 0.0  # nothing in hand between the two
    slow = {"message": "x", "delay_s": 0.3}
    threads = [
        threading.Thread(target=lambda n=n: list(server.generate(f"job-{n}", slow, "a")))
        for n in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    later = server.info()
    assert later["active_jobs"] == []
    # Each job was in hand at least for its delay; both at once, so the mean over the span
    # between the reports is their seconds over its seconds.
    held_s = later["in_hand_job_s"] - idle["in_hand_job_s"]
    assert held_s >= 0.6
    mean = mean_in_hand(idle, later)
    assert mean == held_s / (later["clock_s"] - idle["clock_s"])
    assert 0 < mean <= 2  # never more than the jobs it had
    assert mean_in_hand({}, later) is None  # one report is no span
