"""The console's web application: server-rendered pages (Jinja2 templates and a stylesheet
shipped in the package; no script, nothing from a CDN), their actions, and the routers of
``/metrics``, ``/healthz``, ``/readyz`` and STOW-RS.

Who sees what (node.console.context.Role): a viewer sees counts, states, UIDs, job ids, AE
titles and the node's own reason texts, never an image and never patient data; a reviewer
also sees the outputs held for review (thumbnails of what would leave, and the header summary
with the outputs' values) and the audit trail, and decides; an admin also sees quarantined
images (identifiable), releases or discards them, retries dead jobs and manages users.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import math
import time
import urllib.parse
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.requests import Request

from node import __version__, audit
from node.console.auth import (
    COOKIE,
    FAILED_LOGIN_DELAY_S,
    Authenticator,
    Users,
    csrf_ok,
    proxy_secret,
)
from node.console.context import ConsoleContext, Role, User
from node.console.samples import Samples, measure, rate, series, spark
from node.jobs import JobState, review
from node.jobs import quarantine as quarantined

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
PAGE = 50
"""Rows per page."""


class LoginNeeded(Exception):
    def __init__(self, path: str) -> None:
        self.path = path


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def make_app(ctx: ConsoleContext, users: Users, samples: Samples | None = None) -> FastAPI:
    """The console for ``ctx``; ``samples`` feeds the overview's charts."""
    settings = ctx.settings
    auth = Authenticator(users, settings.console, proxy_secret(settings.console))
    ctx.authenticate = auth
    app = FastAPI(title="synthnode console", docs_url=None, redoc_url=None, openapi_url=None)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(version=__version__, age=_age, bytes=_bytes,
                                 ae=settings.node.ae_title)
    templates.env.filters["when"] = lambda t: (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "")
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    secure = settings.console.tls_certificate is not None

    for module, factory in (("node.console.ops", "ops_router"),
                            ("node.console.stow", "stow_router")):
        try:
            found = importlib.import_module(module)
        except ModuleNotFoundError:
            continue
        app.include_router(getattr(found, factory)(ctx))

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        token = getattr(request.state, "new_session", None)
        if token:
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=secure,
                                max_age=int(settings.console.session_timeout_s), path="/")
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'none'; "
            "frame-ancestors 'none'; form-action 'self'")
        return response

    @app.exception_handler(LoginNeeded)
    async def to_login(request: Request, exc: LoginNeeded) -> Response:
        return RedirectResponse("/login?next=" + urllib.parse.quote(exc.path), status_code=303)

    def who(request: Request, needed: Role = Role.VIEWER) -> tuple[User, str]:
        found = auth.with_csrf(request)
        if found is None or found[0].via == "basic":
            raise LoginNeeded(request.url.path)
        if not found[0].role.allows(needed):
            raise HTTPException(403, f"this needs the {needed.value} role; you are "
                                     f"{found[0].role.value}")
        return found

    async def posted(request: Request, needed: Role) -> tuple[User, dict[str, str]]:
        """A state-changing request: its user (of ``needed`` role) and form, its CSRF token
        checked."""
        user, csrf = who(request, needed)
        form = {k: str(v) for k, v in (await request.form()).items()}
        if not csrf_ok(csrf, form.get("csrf") or request.headers.get("x-csrf-token")):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and try "
                                     "again")
        return user, form

    def page(request: Request, name: str, user: User, csrf: str, **data: Any) -> Response:
        return templates.TemplateResponse(request, name, {
            "user": user, "csrf": csrf, "Role": Role, "path": request.url.path, **data})

    def back(url: str, message: str = "") -> Response:
        if message:
            url += ("&" if "?" in url else "?") + "msg=" + urllib.parse.quote(message)
        return RedirectResponse(url, status_code=303)

    # -- login -----------------------------------------------------------------------------

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/", error: str = "") -> Response:
        return templates.TemplateResponse(request, "login.html", {
            "next": next if next.startswith("/") and not next.startswith("//") else "/",
            "error": error, "user": None, "path": "/login"})

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        name, password = str(form.get("username", "")), str(form.get("password", ""))
        target = str(form.get("next", "/"))
        if not target.startswith("/") or target.startswith("//"):
            target = "/"
        address = request.client.host if request.client else ""
        user = await asyncio.to_thread(users.check_password, name, password)
        if user is None:
            # a name that is no user's is not recorded: it may be anything typed there
            known = name[:64] if users.get(name[:64]) is not None else "(unknown user)"
            audit.record(settings, "login", known, known, ok=False, address=address)
            await asyncio.sleep(FAILED_LOGIN_DELAY_S)
            return RedirectResponse("/login?error=1&next=" + urllib.parse.quote(target),
                                    status_code=303)
        token, _ = users.start_session(user.name)
        audit.record(settings, "login", user.name, user.name, ok=True, address=address,
                     role=user.role.value)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=secure,
                            max_age=int(settings.console.session_timeout_s), path="/")
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        user, _ = await posted(request, Role.VIEWER)
        token = request.cookies.get(COOKIE)
        if token:
            users.end_session(token)
        audit.record(settings, "login", user.name, user.name, action="logout")
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # -- overview, studies, jobs -----------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request) -> Response:
        user, csrf = who(request)
        now = measure(ctx)
        history = samples.history() if samples is not None else []
        history = [*history, now]
        charts = {
            "instances received per minute": spark(rate(history, "stored")),
            "associations per minute": spark(rate(history, "associations")),
            "queue depth (cpu + gpu)": spark([(s.at, s.values["queue_cpu"]
                                               + s.values["queue_gpu"]) for s in history]),
            "spool size (bytes)": spark(series(history, "spool_bytes")),
            "free disk (bytes)": spark(series(history, "free_bytes")),
            "dead jobs": spark(series(history, "dead")),
            "quarantined": spark(series(history, "quarantined")),
        }
        c = ctx.counters
        return page(request, "overview.html", user, csrf, now=now.values, charts=charts,
                    counters=c, sizes=ctx.queues.sizes(),
                    states=ctx.queues.store.count_by_state(),
                    hours=settings.console.history_h)

    @app.get("/studies", response_class=HTMLResponse)
    def studies(request: Request, page_no: int = 1) -> Response:
        user, csrf = who(request)
        page_no = max(1, page_no)
        total, _, _ = ctx.spool.index.totals()
        rows = ctx.spool.index.study_page((page_no - 1) * PAGE, PAGE)
        return page(request, "studies.html", user, csrf, rows=rows, page_no=page_no,
                    pages=max(1, math.ceil(total / PAGE)), total=total, now=time.time())

    @app.get("/jobs", response_class=HTMLResponse)
    def jobs(request: Request, state: str = "", q: str = "", page_no: int = 1) -> Response:
        user, csrf = who(request)
        chosen = JobState(state) if state in {s.value for s in JobState} else None
        counts = ctx.queues.store.count_by_state()
        page_no = max(1, page_no)
        rows = ctx.queues.store.page(chosen, (page_no - 1) * PAGE, PAGE + 1, q.strip())
        return page(request, "jobs.html", user, csrf, rows=rows[:PAGE], more=len(rows) > PAGE,
                    counts=counts, state=chosen.value if chosen else "", q=q,
                    page_no=page_no, states=list(JobState), now=time.time())

    @app.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_detail(request: Request, job_id: str, msg: str = "") -> Response:
        user, csrf = who(request)
        job = ctx.queues.store.get(job_id)
        if job is None:
            raise HTTPException(404, f'no job "{job_id}"')
        rule = next((r for r in settings.rules if r.name == job.rule), None)
        match = ({k: v for k, v in rule.match.model_dump(mode="json").items() if v}
                 if rule is not None else None)
        # (audit records and decisions hold reasons people typed: reviewers and admins only)
        history = (ctx.audit.search(subject=job.id, limit=50)
                   if ctx.audit and user.role.allows(Role.REVIEWER) else [])
        return page(request, "job.html", user, csrf, job=job, match=match, msg=msg,
                    history=history, needs_review=review.needs_review(settings, job),
                    now=time.time())

    @app.post("/jobs/{job_id}/retry")
    async def job_retry(request: Request, job_id: str) -> Response:
        user, _ = await posted(request, Role.ADMIN)
        try:
            ctx.queues.retry(job_id, user=user.name)
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        return back(f"/jobs/{job_id}", "re-queued")

    # -- review ----------------------------------------------------------------------------

    @app.get("/review", response_class=HTMLResponse)
    def review_page(request: Request, page_no: int = 1, msg: str = "") -> Response:
        user, csrf = who(request, Role.REVIEWER)
        page_no = max(1, page_no)
        jobs_held = review.held(ctx.queues.store, (page_no - 1) * 10, 10)
        items = []
        for job in jobs_held:
            outputs = review.staged_outputs(settings, job)
            summary = []
            if outputs:
                try:
                    summary = review.header_summary(settings, job, outputs[0])
                except Exception as exc:  # noqa: BLE001 - shown, not fatal to the page
                    log.warning("review summary of job %s: %s", job.id, type(exc).__name__)
            groups = review.series_groups(settings, job)
            series = [{"uid": uid, "n": len(found), "thumbs": found[:4],
                       "decision": job.series_decision(uid)} for uid, found in groups.items()]
            items.append({"job": job, "outputs": outputs[:8], "more": max(0, len(outputs) - 8),
                          "summary": summary, "series": series if len(series) > 1 else []})
        return page(request, "review.html", user, csrf, items=items, page_no=page_no,
                    total=review.count_held(ctx.queues.store), msg=msg, now=time.time())

    @app.get("/review/{job_id}/{n}.png")
    def review_thumb(request: Request, job_id: str, n: int) -> Response:
        who(request, Role.REVIEWER)
        job = ctx.queues.store.get(job_id)
        if job is None or job.state not in (JobState.REVIEW, JobState.REJECTED):
            raise HTTPException(404, "no such output held for review")
        outputs = review.staged_outputs(settings, job)
        if not 0 <= n < len(outputs):
            raise HTTPException(404, "no such output")
        return Response(review.thumbnail_png(outputs[n]), media_type="image/png",
                        headers={"Cache-Control": "private, no-store"})

    @app.post("/review/decide")
    async def review_decide(request: Request) -> Response:
        user, form = await posted(request, Role.REVIEWER)
        target = form.get("target", "")
        decision = form.get("decision", "")
        if decision not in ("approve", "reject"):
            raise HTTPException(400, 'decision is "approve" or "reject"')
        try:
            shown = form.get("revision", "")
            done = review.decide(ctx.queues, target, decision == "approve", user.name,
                                 form.get("reason", "").strip(),
                                 int(shown) if shown.isdigit() else None,
                                 series=form.get("series") or None, settings=settings)
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        except ValueError as exc:
            return back("/review", str(exc))
        verb = "approved" if decision == "approve" else "rejected"
        if form.get("series"):
            left = sum(1 for j in done if j.state is JobState.REVIEW)
            return back("/review", f"series {verb}" + (
                f"; {left} job(s) wait for their other series" if left else
                f"; {len(done)} job(s) decided"))
        return back("/review", f"{len(done)} job(s) {verb}")

    # -- quarantine ------------------------------------------------------------------------

    @app.get("/quarantine", response_class=HTMLResponse)
    def quarantine_page(request: Request, page_no: int = 1, msg: str = "") -> Response:
        user, csrf = who(request)
        entries = quarantined.entries(settings)
        page_no = max(1, page_no)
        return page(request, "quarantine.html", user, csrf, total=len(entries), msg=msg,
                    rows=entries[(page_no - 1) * PAGE: page_no * PAGE], page_no=page_no,
                    pages=max(1, math.ceil(len(entries) / PAGE)),
                    images=user.role.allows(Role.ADMIN), now=time.time())

    @app.get("/quarantine/image/{job_id}/{sop}.png")
    def quarantine_image(request: Request, job_id: str, sop: str) -> Response:
        who(request, Role.ADMIN)
        entry = quarantined.find(settings, f"{job_id}/{sop}")
        if entry is None:
            raise HTTPException(404, "no such quarantined object")
        return Response(review.thumbnail_png(entry.path), media_type="image/png",
                        headers={"Cache-Control": "private, no-store"})

    @app.post("/quarantine/decide")
    async def quarantine_decide(request: Request) -> Response:
        user, form = await posted(request, Role.ADMIN)
        entry_id, action = form.get("entry", ""), form.get("action", "")
        try:
            if action == "release":
                outcome = await asyncio.to_thread(quarantined.release, settings, ctx.queues,
                                                  entry_id, user.name)
            elif action == "discard":
                quarantined.discard(settings, entry_id, user.name, form.get("reason", ""))
                outcome = "discarded"
            else:
                raise HTTPException(400, 'action is "release" or "discard"')
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        except ValueError as exc:
            outcome = str(exc)
        return back("/quarantine", f"{entry_id}: {outcome}")

    # -- models, audit, users --------------------------------------------------------------

    @app.get("/models", response_class=HTMLResponse)
    def models(request: Request) -> Response:
        user, csrf = who(request)
        return page(request, "models.html", user, csrf, models=_models(ctx))

    @app.get("/audit", response_class=HTMLResponse)
    def audit_page(request: Request, event: str = "", actor: str = "", subject: str = "",
                   q: str = "", before: int | None = None) -> Response:
        user, csrf = who(request, Role.REVIEWER)
        rows = ctx.audit.search(event=event, actor=actor, subject=subject, text=q.strip(),
                                before_seq=before, limit=PAGE) if ctx.audit else []
        return page(request, "audit.html", user, csrf, rows=rows, event=event, actor=actor,
                    subject=subject, q=q, events=list(audit.EVENTS), enabled=ctx.audit is not None)

    @app.get("/users", response_class=HTMLResponse)
    def users_page(request: Request, msg: str = "") -> Response:
        user, csrf = who(request, Role.ADMIN)
        return page(request, "users.html", user, csrf, rows=users.list(), roles=list(Role),
                    msg=msg)

    @app.post("/users")
    async def users_change(request: Request) -> Response:
        from node.console.auth import UserError

        user, form = await posted(request, Role.ADMIN)
        action, name = form.get("action", ""), form.get("name", "").strip()
        try:
            if action == "add":
                role = Role(form.get("role", ""))
                await asyncio.to_thread(users.add, name, role, form.get("password", ""))
                audit.record(settings, "user", user.name, name, action="add", role=role.value)
            elif action == "remove":
                if name == user.name:
                    raise UserError("you cannot remove yourself")
                users.remove(name)
                audit.record(settings, "user", user.name, name, action="remove")
            elif action == "role":
                role = Role(form.get("role", ""))
                users.set_role(name, role)
                audit.record(settings, "user", user.name, name, action="role", role=role.value)
            else:
                raise UserError('action is "add", "remove" or "role"')
        except (UserError, ValueError) as exc:
            return back("/users", str(exc))
        return back("/users", f"{name}: {action} done")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if request.url.path.startswith(("/dicomweb/", "/metrics", "/healthz", "/readyz")):
            return Response(json.dumps({"detail": exc.detail}), status_code=exc.status_code,
                            media_type="application/json", headers=exc.headers)
        found = auth.with_csrf(request)
        user, csrf = found if found is not None and found[0].via != "basic" else (None, "")
        return templates.TemplateResponse(request, "error.html", {
            "status": exc.status_code, "detail": exc.detail, "user": user, "csrf": csrf,
            "Role": Role, "path": ""}, status_code=exc.status_code)

    return app


def _models(ctx: ConsoleContext) -> list[dict[str, Any]]:
    """What the models page shows of ``[generate] model`` and ``inpaint_model``: where, the
    weight files with their sizes, the training record and the last evaluation if present."""
    from node.generate.training import TRAINING_RECORD

    g = ctx.settings.generate
    found = []
    for role, name in (("model", g.model), ("inpaint_model", g.inpaint_model)):
        if not name:
            continue
        entry: dict[str, Any] = {"role": role, "name": str(name), "files": [], "record": None,
                                 "evaluation": None}
        path = Path(str(name))
        if str(name) == "tiny":
            entry["note"] = ("the tiny random-weight model built in code (plumbing, not "
                             "fidelity)")
        elif path.exists():
            folder = path if path.is_dir() else path.parent
            files = sorted(p for p in (folder.rglob("*") if path.is_dir() else [path])
                           if p.suffix in (".safetensors", ".ckpt", ".bin", ".npz"))
            entry["files"] = [(str(p.relative_to(folder)), p.stat().st_size)
                              for p in files[:40]]
            record = folder / TRAINING_RECORD
            if record.exists():
                entry["record"] = json.loads(record.read_text())
            for candidate in ("evaluation.json", "synthnode-evaluation.json"):
                if (folder / candidate).exists():
                    entry["evaluation"] = json.loads((folder / candidate).read_text())
        else:
            entry["note"] = "not found on this machine (a hub id, or missing)"
        found.append(entry)
    return found
