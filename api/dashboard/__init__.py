"""The admin dashboard under `/admin`: server-rendered pages of jobs, queues, models, data sets,
tenants and the cluster, read from SQL (so it survives restarts) and from the workers' cluster
snapshots in Redis (so the API process never imports Ray), made live by a small script that polls
JSON endpoints. No build step and nothing from a CDN: the templates, the CSS and the script ship
in this package.

Operators log in with an admin key and get a signed session cookie (HttpOnly, SameSite=Strict,
Secure over https, path `/admin`); every POST carries a CSRF token; every action goes through the
same core services as `/v1` and writes an audit row. `/v1` keeps accepting only Bearer keys: the
Bearer check in `api.auth` never looks at the session.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from flask import Blueprint, Flask, request

from core.settings import Settings

bp = Blueprint(
    "dashboard",
    __name__,
    url_prefix="/admin",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)

SESSION_LIFETIME = timedelta(hours=12)

# Sent with every dashboard answer: only our own scripts, styles and images (style attributes
# set the progress bars' widths), no framing (clickjacking), no sniffing, no referrer leaving
# the site, forms posting only back to us.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; "
        "style-src-attr 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


def _security_headers(response: Any) -> Any:
    """Every answer under /admin, the error pages and unknown paths included."""
    if request.path == "/admin" or request.path.startswith("/admin/"):
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
    return response


def install(app: Flask, settings: Settings) -> None:
    """Register the dashboard on `app`: session settings, the blueprint, and the marks that
    exempt its views from the `/v1` Bearer check (they check the session instead)."""
    from api.dashboard import (  # noqa: F401  (they register routes)
        actions,
        deletions,
        health,
        pages,
        scheduling,
        serving,
        session,
    )

    app.secret_key = settings.read_secret_key()
    app.session_interface = session.DashboardSessionInterface()
    app.config.update(
        SESSION_COOKIE_NAME="genq_admin",
        SESSION_COOKIE_PATH="/admin",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=SESSION_LIFETIME,
    )
    app.register_blueprint(bp)
    app.after_request(_security_headers)
    for endpoint, view in list(app.view_functions.items()):
        if endpoint.startswith("dashboard."):
            app.view_functions[endpoint] = _without_bearer(view)


def _without_bearer(view: Callable[..., Any]) -> Callable[..., Any]:
    """The view, marked for `api.auth` as needing no Bearer key (the session guard of
    `api.dashboard.session` checks these requests instead)."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return view(*args, **kwargs)

    wrapped.genq_public = True  # type: ignore[attr-defined]
    return wrapped
