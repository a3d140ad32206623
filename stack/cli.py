"""The `genq` command line: run the stack or one of its processes, migrate, manage keys, and
submit and watch jobs over the HTTP API.

Each command builds `Settings` from the environment and passes it down.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from core.logs import configure_logging, gunicorn_log_config
from core.settings import Settings
from genq_client import APIError, Client, GenqClientError, Job


def _settings(process: str = "cli") -> Settings:
    settings = Settings()
    configure_logging(settings, process=process)
    # Alembic lists each plugin it sets up at INFO; its migration lines stay.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    return settings


@click.group()
def main() -> None:
    """genq: a self-hosted job queue for generative AI."""


@main.command()
def up() -> None:
    """Start the whole stack in the foreground (Ctrl-C stops it)."""
    from stack.supervisor import up as run_stack

    sys.exit(run_stack(_settings("up")))


def _require_schema(settings: Settings, process: str) -> None:
    """Refuse to start `process` on a database whose schema is older than this genq (it would
    fail on its first query of a new column); start, with a warning, on one a newer genq has
    migrated (genq's migrations only add tables and nullable or defaulted columns). A
    database that cannot be reached now is left to the process's own retries."""
    from sqlalchemy.exc import SQLAlchemyError

    import migrations

    log = logging.getLogger("stack.cli")
    try:
        state = migrations.schema_state(settings)
    except SQLAlchemyError as exc:
        log.warning("genq %s: could not read the database's schema revision: %s", process, exc)
        return
    if state.up_to_date:
        return
    if state.ahead:
        log.warning(
            "genq %s: %s. genq's migrations only add tables and columns, so this genq runs on"
            " it; upgrade it to use what they added",
            process,
            state.describe(),
        )
        return
    raise click.ClickException(f"genq {process} did not start: {state.describe()}")


@main.command()
@click.option(
    "--check",
    is_flag=True,
    help="Change nothing: say where the schema stands; exit 0 if it is up to date, else 1.",
)
def migrate(check: bool) -> None:
    """Bring the database schema up to date and create the built-in models and data sets."""
    import migrations
    from stack.supervisor import bootstrap

    settings = _settings()
    if check:
        from sqlalchemy.exc import SQLAlchemyError

        try:
            state = migrations.schema_state(settings)
        except SQLAlchemyError as exc:
            raise click.ClickException(f"could not read the database's schema: {exc}") from None
        click.echo(state.describe())
        sys.exit(0 if state.up_to_date else 1)
    try:
        new_key = bootstrap(settings)
    except migrations.SchemaError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("database is up to date")
    if new_key:
        click.echo(f"admin key (shown once): {new_key}")


@main.command()
@click.option("--queues", default="generate,train,webhooks", show_default=True)
@click.option("--hostname", default="", help="Celery node name (default: genq@<host>).")
def worker(queues: str, hostname: str) -> None:
    """Run a Celery worker that runs jobs on Ray."""
    settings = _settings("worker")
    _require_schema(settings, "worker")
    from scheduler.worker import main as worker_main

    worker_main(settings, tuple(q for q in queues.split(",") if q), hostname)


@main.command()
@click.option("--head", is_flag=True, help="Start the cluster's head (GCS) on GENQ_RAY_HEAD_PORT.")
def node(head: bool) -> None:
    """Run this machine's Ray node in the foreground: the head, or a node that joins
    GENQ_RAY_ADDRESS declaring this machine's GPUs and their memory (gpu_memory_gb), bound to
    GENQ_NODE_IP. Needs RAY_AUTH_MODE=token and the cluster's RAY_AUTH_TOKEN."""
    from scheduler.raynode import gpu_node_argv

    settings = _settings()
    try:
        argv = gpu_node_argv(settings, head=head)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(" ".join(argv), err=True)
    os.execv(argv[0], argv)


@main.command()
def api() -> None:
    """Serve the HTTP API with gunicorn (GENQ_HOST, GENQ_PORT, GENQ_API_WORKERS/THREADS)."""
    settings = _settings("api")
    _require_schema(settings, "api")
    gunicorn = os.path.join(os.path.dirname(sys.executable), "gunicorn")
    # The workers' metrics (api/instruments.py) live in files here, summed by any worker that
    # answers GET /metrics; a new start begins from an empty folder.
    metrics_dir = (settings.var_dir / "metrics" / f"api-{settings.port}").resolve()
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    # gunicorn's own lines in genq's format (core/logs.py); in JSON the app writes the access
    # lines itself (api/problems.py), with the request id, instead of gunicorn's text ones.
    log_dir = settings.var_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_config = log_dir / "gunicorn-logging.json"
    log_config.write_text(json.dumps(gunicorn_log_config(settings)))
    access = [] if settings.log_format == "json" else ["--access-logfile", "-"]
    argv = [
        gunicorn,
        "--config",
        "python:api.gunicorn_conf",
        "--bind",
        f"{settings.host}:{settings.port}",
        "--workers",
        str(settings.api_workers),
        "--worker-class",
        "gthread",
        "--threads",
        str(settings.api_threads),
        "--graceful-timeout",
        "5",
        "--log-config-json",
        str(log_config),
        *access,
        "api.wsgi:create()",
    ]
    os.execv(gunicorn, argv)


@main.command()
def scheduler() -> None:
    """Run the periodic scheduler (reaper, reconciler, delayed jobs)."""
    settings = _settings("scheduler")
    _require_schema(settings, "scheduler")
    from scheduler.periodic import main as periodic_main

    periodic_main(settings)


@main.group()
def keys() -> None:
    """Manage API keys."""


@keys.command("create")
@click.option("--tenant", required=True, help="Tenant name (created if new).")
@click.option("--admin", is_flag=True, help="An admin key sees every tenant's objects.")
@click.option(
    "--scope",
    type=click.Choice(["read", "submit", "admin"]),
    default=None,
    help="read: only reads; submit (default): reads and writes; admin (same as --admin).",
)
@click.option("--label", default="", help="A note to tell keys apart.")
def keys_create(tenant: str, admin: bool, scope: str | None, label: str) -> None:
    """Create a key and print it (it is shown once)."""
    from core.db import Database
    from core.keys import KeyScope, create_key, get_or_create_tenant

    database = Database(_settings())
    with database.transaction() as session:
        row = get_or_create_tenant(session, tenant)
        chosen = KeyScope(scope) if scope else None
        _, raw = create_key(session, row, is_admin=admin, label=label, scope=chosen)
    click.echo(raw)


@keys.command("list")
def keys_list() -> None:
    """List keys: prefix, tenant, scope, created, last used (to the minute), expires,
    revoked."""
    from sqlalchemy import select

    from core.db import Database
    from core.tables import ApiKey, Tenant

    database = Database(_settings())
    with database.transaction() as session:
        rows = session.execute(
            select(ApiKey, Tenant.name).join(Tenant).order_by(ApiKey.created_at)
        ).all()
        for key, tenant in rows:
            revoked = key.revoked_at.isoformat() if key.revoked_at else "-"
            used = f"{key.last_used_at:%Y-%m-%d %H:%M}" if key.last_used_at else "never"
            expires = f"{key.expires_at:%Y-%m-%d %H:%M}" if key.expires_at else "-"
            click.echo(
                f"{key.prefix}…\t{tenant}\t{key.scope}\t{key.created_at:%Y-%m-%d}\t{used}"
                f"\t{expires}\t{revoked}"
            )


@keys.command("revoke")
@click.argument("prefix")
def keys_revoke(prefix: str) -> None:
    """Revoke the one key that starts with PREFIX (as `keys list` shows it), matched literally:
    a prefix that matches several keys, or holds a character no key has, is refused."""
    from core.db import Database
    from core.errors import GenqError
    from core.keys import find_key_by_prefix, revoke_key

    database = Database(_settings())
    try:
        with database.transaction() as session:
            key = find_key_by_prefix(session, prefix)
            revoke_key(session, key)
            shown = key.prefix
    except GenqError as exc:
        raise click.ClickException(exc.detail) from None
    click.echo(f"revoked {shown}…")


# -- the HTTP client side: genq_client (client/) ----------------------------------------------


def _client(url: str | None, key: str | None) -> Client:
    settings = Settings()
    url = url or os.environ.get("GENQ_URL") or f"http://127.0.0.1:{settings.port}"
    key = key or os.environ.get("GENQ_API_KEY") or settings.admin_key
    if not key:
        raise click.ClickException("no API key: pass --key or set GENQ_API_KEY")
    return Client(url, key)


@contextmanager
def _api_errors() -> Iterator[None]:
    """The client's exceptions as the command line's errors."""
    try:
        yield
    except APIError as err:
        detail = err.detail
        for e in err.errors:
            detail += f"\n  {e.get('field')}: {e.get('message')}"
        raise click.ClickException(f"{err.status}: {detail}") from None
    except GenqClientError as err:
        raise click.ClickException(str(err)) from None


_client_options = [
    click.option("--url", default=None, help="API base URL (env GENQ_URL)."),
    click.option("--key", default=None, help="API key (env GENQ_API_KEY)."),
]


def client_options(f: Any) -> Any:
    for option in reversed(_client_options):
        f = option(f)
    return f


@main.command()
@click.option("--kind", type=click.Choice(["generate", "train", "finetune"]), default="generate")
@click.option("--model", default=None, help="Model name or name:version.")
@click.option("--family", default=None, help="Model family (train).")
@click.option("--dataset", default=None, help="Data set name or id (train, finetune).")
@click.option("--name", default=None, help="Name to register the trained model under.")
@click.option("--params", default="{}", help="Parameters as JSON.")
@click.option("--priority", type=int, default=None)
@click.option("--wait", is_flag=True, help="Show a progress bar until the job ends.")
@client_options
def submit(
    kind: str,
    model: str | None,
    family: str | None,
    dataset: str | None,
    name: str | None,
    params: str,
    priority: int | None,
    wait: bool,
    url: str | None,
    key: str | None,
) -> None:
    """Submit a job and print it (or wait for it with --wait)."""
    try:
        parsed = json.loads(params)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--params") from None
    body: dict[str, Any] = {"kind": kind, "params": parsed}
    for field, value in (
        ("model", model),
        ("family", family),
        ("dataset", dataset),
        ("name", name),
        ("priority", priority),
    ):
        if value is not None:
            body[field] = value
    with _client(url, key) as client, _api_errors():
        job = client.submit(**body)
        if not wait:
            click.echo(json.dumps(job.raw, indent=2))
            return
        click.echo(f"job {job.id} {job.state}", err=True)
        job = _wait(client, job)
    click.echo(json.dumps(job.raw, indent=2))
    if job.state != "succeeded":
        sys.exit(1)


def _wait(client: Client, job: Job) -> Job:
    with click.progressbar(length=1000, label=job.state, file=sys.stderr) as bar:
        done = 0

        def show(current: Job) -> None:
            nonlocal done
            progress = current.progress
            total = progress.get("total") or 0
            fraction = (progress.get("step") or 0) / total if total else 0.0
            if current.state == "succeeded":
                fraction = 1.0
            target = int(1000 * fraction)
            bar.label = f"{current.state:<9} {progress.get('message') or ''}"[:40]
            if target > done:
                bar.update(target - done)
                done = target

        return client.wait(job, poll_s=0.5, max_poll_s=0.5, on_update=show, raise_on_failure=False)


@main.command()
@click.argument("job_id")
@client_options
def status(job_id: str, url: str | None, key: str | None) -> None:
    """Print a job."""
    with _client(url, key) as client, _api_errors():
        click.echo(json.dumps(client.get_job(job_id).raw, indent=2))


if __name__ == "__main__":
    main()
