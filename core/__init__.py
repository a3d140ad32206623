"""genq's core: settings, SQL tables, the job state machine and the job services.

Everything else in genq imports from here; this package imports no other genq package and
neither torch, ray, celery nor flask.
"""
