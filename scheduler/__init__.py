"""genq's scheduler: the Celery app, the `run_job` task (a message is a token for a free slot of
its queue: the task claims the best queued job of that queue and drives its Ray worker),
publishing job ids to the broker, and the periodic reaper and reconciler.

The API reaches this package only through `scheduler.enqueue` (docs/architecture.md)."""
