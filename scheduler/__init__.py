"""genq's scheduler: the Celery app, the `run_job` task that claims a job and drives its Ray
worker, publishing job ids to the broker, and the periodic reaper and reconciler."""
