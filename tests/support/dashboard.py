"""Helpers of the dashboard tests (tests/api/dashboard/, and tests/api's keys and serving
tests): log in through the form with its CSRF token, read the audit rows an action left, and
read a job's row."""

from __future__ import annotations

import re

import sqlalchemy as sa
from flask.testing import FlaskClient

from core.db import Database
from core.tables import AuditEntry, Job


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, "no CSRF token in the page"
    return found.group(1)


def login(client: FlaskClient, key: str) -> str:
    """Log in; returns the session's CSRF token."""
    token = csrf_of(client.get("/admin/login").get_data(as_text=True))
    response = client.post("/admin/login", data={"key": key, "csrf_token": token})
    assert response.status_code == 302, response.get_data(as_text=True)
    return csrf_of(client.get("/admin/").get_data(as_text=True))


def audit(database: Database, action: str) -> list[AuditEntry]:
    with database.transaction() as session:
        return list(
            session.scalars(
                sa.select(AuditEntry).where(AuditEntry.action == action).order_by(AuditEntry.id)
            )
        )


def job_row(database: Database, job_id: str) -> Job:
    with database.transaction() as session:
        found = session.get(Job, job_id)
        assert found is not None
        return found
