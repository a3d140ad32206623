"""Dashboard sessions and CSRF. Logging in takes an admin key (a tenant key is refused) and
starts a server-side session (core/sessions.py) whose random token is kept in Flask's signed
cookie; every request looks the session and its key up, so logout, "log out everywhere"
(`POST /admin/sessions/end`, or `DELETE /v1/admin/sessions`) and revoking or expiring the key
end it at once, and a copied cookie is worth nothing afterwards.

CSRF: a random token kept in the session must come back with every POST (form field
`csrf_token` or header `X-CSRF-Token`), compared in constant time. That is the
synchronizer-token pattern Flask-WTF implements; written out here (about 20 lines) because it
must guard only `/admin`, whereas CSRFProtect guards every POST of the app, `/v1` included,
whose Bearer-key clients have no token to send.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from flask import Flask, g, redirect, render_template, request, session, url_for
from flask.sessions import SecureCookieSessionInterface
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as BaseResponse

from api.auth import rate_guarded
from api.dashboard import SESSION_LIFETIME, bp
from api.problems import problem_response
from api.ratelimits import client_address
from api.state import genq
from core.audit import Actor, record_action
from core.errors import ForbiddenError, GenqError, UnauthorizedError
from core.keys import authenticate
from core.sessions import end_all_sessions, end_session, session_key, start_session

PUBLIC_ENDPOINTS = {"dashboard.login", "dashboard.static"}


class DashboardSessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie, marked Secure whenever the request came over https (behind a
    proxy, run the API with the proxy's headers trusted so that this is known)."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(request.is_secure) or super().get_cookie_secure(app)


class CsrfError(ForbiddenError):
    type, title = "csrf", "CSRF token missing or wrong"


@dataclass(frozen=True)
class Admin:
    key_id: str
    key_prefix: str
    tenant_id: str

    @property
    def actor(self) -> Actor:
        return Actor(key_id=self.key_id, key_prefix=self.key_prefix, tenant_id=self.tenant_id)


def csrf_token() -> str:
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return str(token)


def _check_csrf() -> None:
    sent = request.form.get("csrf_token") or request.headers.get("X-CSRF-Token") or ""
    expected = session.get("csrf") or ""
    # Bytes: compare_digest refuses non-ASCII str, and a forged token may be anything.
    if not expected or not hmac.compare_digest(str(sent).encode(), str(expected).encode()):
        raise CsrfError("this form is stale or did not come from the dashboard; reload and retry")


def admin() -> Admin:
    found: Admin = g.admin
    return found


@bp.before_request
def _guard() -> Any:
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        _check_csrf()
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    token = session.get("sid")
    if isinstance(token, str) and token:
        with genq().database.transaction() as db:
            key = session_key(db, token)
            if key is not None:
                g.admin = Admin(key.id, key.prefix, key.tenant_id)
                return None
        session.clear()
    if request.path.startswith("/admin/live/"):
        raise UnauthorizedError("log in to the dashboard")
    return redirect(url_for("dashboard.login", next=request.full_path.rstrip("?")))


@bp.app_context_processor
def _template_globals() -> dict[str, Any]:
    return {"csrf_token": csrf_token, "current_admin": g.get("admin")}


def _safe_next(target: str | None) -> str:
    # Only a path inside the dashboard: never an open redirect to another site.
    if target and target.startswith("/admin") and not target.startswith("//"):
        return target
    return url_for("dashboard.overview")


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    if request.method == "GET":
        return render_template("dashboard/login.html", next=request.args.get("next", ""))
    raw = request.form.get("key", "").strip()
    if not raw:
        return _login_failed("key", "enter an admin API key", 422)
    limits = genq().rate_limits
    if limits is not None:  # guessing keys here is throttled like on /v1
        rate_guarded(lambda: limits.check_address(client_address()))
    try:
        with genq().database.transaction() as db:
            who = authenticate(db, raw)
            if not who.is_admin:
                return _login_failed("key", "this key is not an admin key", 403)
            actor = Actor.of_key(db, who.key_id)
            record_action(db, actor, "login", "key", who.key_id)
            token = start_session(db, who.key_id, SESSION_LIFETIME)
    except UnauthorizedError:
        if limits is not None:
            rate_guarded(lambda: limits.count_failure(client_address()))
        return _login_failed("key", "unknown, expired or revoked key", 401)
    session.clear()  # a new session (and CSRF token) at each login: no fixation
    session.permanent = True
    session["sid"] = token
    csrf_token()
    return redirect(_safe_next(request.form.get("next")))


def _login_failed(field: str, message: str, status: int) -> tuple[str, int]:
    page = render_template(
        "dashboard/login.html", next=request.form.get("next", ""), error=message, field=field
    )
    return page, status


@bp.post("/logout")
def logout() -> BaseResponse:
    with genq().database.transaction() as db:
        record_action(db, admin().actor, "logout", "key", admin().key_id)
        end_session(db, str(session.get("sid")))
    session.clear()
    return redirect(url_for("dashboard.login"))


@bp.post("/sessions/end")
def end_every_session() -> BaseResponse:
    """Log out everywhere: every dashboard session of every admin ends, this one included."""
    with genq().database.transaction() as db:
        count = end_all_sessions(db)
        record_action(db, admin().actor, "end_sessions", "key", admin().key_id, {"count": count})
    session.clear()
    return redirect(url_for("dashboard.login"))


@bp.errorhandler(GenqError)
def _genq_error(error: GenqError) -> Any:
    if request.path.startswith("/admin/live/"):
        return problem_response(
            error.status, error.type, error.title, error.detail, extra=_extra(error)
        )
    problem = error.problem()
    page = render_template(
        "dashboard/error.html",
        status=error.status,
        title=error.title,
        detail=error.detail,
        errors=problem.get("errors", []),
    )
    return page, error.status, error.headers


def _extra(error: GenqError) -> dict[str, Any]:
    return {k: v for k, v in error.problem().items() if k not in ("type", "title", "detail")}


@bp.errorhandler(HTTPException)
def _http_error(error: HTTPException) -> Any:
    status = error.code or 500
    page = render_template(
        "dashboard/error.html",
        status=status,
        title=error.name,
        detail=error.description,
        errors=[],
    )
    return page, status
