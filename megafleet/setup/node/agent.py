"""The node agent: `main(request)` probes this host, plans the setup steps, or runs them.

Modes (request["mode"]):
  probe  facts about the host (python, GPUs, driver, venv, marker, uploaded files); read-only
  plan   probe + every step with its state (skip / run / recheck / blocked), the reason, and the
         exact commands and environment it would run; read-only (this is `--dry-run`)
  run    take the lock, then run the steps, skipping those whose marker entry still holds

Everything goes to stdout as one JSON event per line, prefixed with EVENT_MARK (the operator's
live display reads them): start, step (running / skipped / done / failed), activity (the
latest log line, at most twice a second), and finally result. Command output goes only to the
log file on the node. Exit codes: 0 done, 1 the final environment check failed, 2 bad
request, 3 another setup holds the lock, 4 a step failed.
"""

from __future__ import annotations

import os
import time
import traceback
from typing import List, Optional

from . import CHECK
from .context import CommandFailed, Ctx, StepError
from .core import (
    LockBusy,
    Marker,
    Redactor,
    SetupLock,
    StepLog,
    digest,
    dir_manifest,
    emit,
    host_identity,
    lock_is_held,
    torch_cuda,
    utc_now,
    write_atomic,
)
from .steps import STEP_IDS, Step, selected_steps

ACTIVITY_EVERY = 0.5


def main(request: dict, sources: Optional[dict] = None) -> int:
    redact = Redactor(dict(os.environ), CHECK.SECRET_NAME)
    try:
        ctx = Ctx(request, redact)
    except (KeyError, TypeError, ValueError) as exc:
        emit({"ev": "result", "status": "error", "message": "bad request: %r" % (exc,)})
        return 2
    mode = request.get("mode")
    if mode == "probe":
        emit({"ev": "probe", "facts": probe(ctx, bool(request.get("hash_files")))})
        return 0
    if mode == "plan":
        emit(
            {"ev": "plan", "facts": probe(ctx, bool(request.get("hash_files"))), "steps": plan(ctx)}
        )
        return 0
    if mode == "run":
        return run(ctx, sources)
    emit({"ev": "result", "status": "error", "message": "unknown mode %r" % (mode,)})
    return 2


# ----------------------------------------------------------------------------------- probe


def probe(ctx: Ctx, hash_files: bool) -> dict:
    smi = ctx.smi()
    site = ctx.site_dirs()
    marker = Marker(ctx.marker_path, ctx.venv)
    mem = CHECK.mem_available_bytes()
    facts = {
        "home": ctx.home,
        "identity": host_identity(),
        "venv": ctx.venv,
        "venv_python": ctx.python_version(ctx.python),
        "base_python": ctx.base_python,
        "base_python_version": ctx.python_version(ctx.base_python),
        "installer": ctx.installer,
        "uv": ctx.uv,
        "gpus": [g.get("name") for g in smi["gpus"]],
        "driver": smi["driver"],
        "driver_cuda": smi["driver_cuda"],
        "nvidia_smi_error": smi["error"],
        "torch": ctx.dists().get("torch") if site else None,
        "torch_cuda": torch_cuda(site),
        "cpus": CHECK.cpu_count(),
        "mem_available_gib": round(mem / 2**30, 1) if mem else None,
        "disk_free_gib": _free_gib(ctx.venv),
        "lock_held": lock_is_held(os.path.join(ctx.setup_dir, "setup.lock")),
        "marker": ctx.marker_path,
        "done_steps": sorted(marker.data["steps"]),
    }
    if hash_files:
        facts["files"] = {
            "wheels": dir_manifest(os.path.join(ctx.setup_dir, "wheels")),
            "wheelhouse": dir_manifest(os.path.join(ctx.setup_dir, "wheelhouse")),
        }
    return facts


def _free_gib(path: str) -> Optional[float]:
    try:
        _, free = CHECK.fs_space(CHECK.nearest_existing(path))
        return round(free / 2**30, 1)
    except OSError:
        return None


# ------------------------------------------------------------------------------- decisions


def decide(ctx: Ctx, marker: Marker, step: Step, upstream: List[dict]):
    """(inputs, fingerprint, why it must run or None to skip). The inputs include what the
    steps before it left installed, so a changed torch rebuilds what depends on it."""
    inputs = dict(step.inputs(ctx), after=digest(upstream))
    fingerprint = digest(inputs)
    force = ctx.req.get("force") or []
    rec = marker.record(step.id)
    if step.id in force or "all" in force:
        return inputs, fingerprint, "forced (--force)"
    if rec is None:
        return inputs, fingerprint, "not done yet"
    if rec.get("state") in ("running", "failed"):
        return (
            inputs,
            fingerprint,
            "%s during the last run (%s)"
            % ("interrupted" if rec["state"] == "running" else "failed", rec.get("started", "?")),
        )
    if rec.get("fingerprint") != fingerprint:
        old = rec.get("inputs", {})
        changed = sorted(k for k in set(old) | set(inputs) if old.get(k) != inputs.get(k))
        names = ["an earlier step's result" if k == "after" else k for k in changed]
        return inputs, fingerprint, "changed since last run: " + ", ".join(names)
    return inputs, fingerprint, step.verify(ctx, rec.get("outcome", {}))


def plan(ctx: Ctx) -> List[dict]:
    """Every selected step as the run would see it now (read-only)."""
    marker = Marker(ctx.marker_path, ctx.venv)
    out, upstream, first_to_run = [], [], None
    for step in selected_steps(ctx):
        entry = {"id": step.id, "title": step.title}
        if first_to_run:
            entry.update(
                state="recheck",
                reason="decided after %s runs (skipped then if "
                "nothing it depends on changed)" % first_to_run,
            )
        else:
            try:
                _, _, why = decide(ctx, marker, step, upstream)
            except StepError as exc:
                why = exc.message
            if why is None:
                rec = marker.record(step.id)
                upstream.append(rec["outcome"])
                entry.update(
                    state="skip",
                    reason="done " + rec.get("done", "?"),
                    detail=step.detail(rec["outcome"]),
                )
            else:
                entry.update(state="run", reason=why)
                first_to_run = step.id
        if entry["state"] != "skip":
            _plan_commands(ctx, step, entry)
        out.append(entry)
    return out


def _plan_commands(ctx: Ctx, step: Step, entry: dict) -> None:
    if step.id in ("te", "apex", "flash_attn"):
        entry["build_plan"] = ctx.build_plan()
    try:
        commands = step.commands(ctx)
        entry["commands"] = [c.to_dict(ctx) for c in commands]
        if not commands:
            entry["note"] = step.nothing_to_do(ctx)
    except StepError as exc:
        entry["blocked"] = {"message": exc.message, "fix": exc.fix}
        if entry["state"] == "run":
            entry["state"] = "blocked"


# -------------------------------------------------------------------------------------- run


def run(ctx: Ctx, sources: Optional[dict]) -> int:
    lock = SetupLock(os.path.join(ctx.setup_dir, "setup.lock"))
    try:
        lock.acquire(host_identity())
    except LockBusy as exc:
        emit(
            {
                "ev": "result",
                "status": "locked",
                "holder": exc.holder,
                "message": "another megafleet setup is running on this host",
            }
        )
        return 3
    try:
        return _run_locked(ctx, sources or {})
    finally:
        lock.release()


class Failure(Exception):
    def __init__(self, **info):
        super().__init__(info.get("message"))
        self.info = info


def _run_locked(ctx: Ctx, sources: dict) -> int:
    started = time.monotonic()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    log = StepLog(
        os.path.join(ctx.setup_dir, "logs", "setup-%s-%d.log" % (stamp, os.getpid())), ctx.redact
    )
    log.line(
        "megafleet setup %s: venv %s, installer %s, %s"
        % (
            utc_now(),
            ctx.venv,
            ctx.installer,
            "offline from " + ctx.wheelhouse if ctx.offline else "online",
        ),
        keep=False,
    )
    if sources.get("check"):
        write_atomic(ctx.check_script, sources["check"], 0o755)
    _sync_wheelhouse(ctx, log)
    marker = Marker(ctx.marker_path, ctx.venv)
    steps = selected_steps(ctx)
    emit(
        {
            "ev": "start",
            "steps": [[s.id, s.title] for s in steps],
            "log": log.path,
            "venv": ctx.venv,
            "installer": ctx.installer,
        }
    )
    results, upstream, failure, report = [], [], None, None
    for n, step in enumerate(steps, 1):
        entry = {"id": step.id, "title": step.title, "n": n, "of": len(steps)}
        try:
            outcome, state = _one_step(ctx, marker, step, upstream, log, entry)
        except Failure as exc:
            failure = dict(
                exc.info,
                step=step.id,
                title=step.title,
                tail=list(log.tail),
                torch_cuda=torch_cuda(ctx.site_dirs()),
            )
            entry.update(state="failed", message=exc.info.get("message"))
            results.append(entry)
            emit(dict(entry, ev="step"))
            break
        upstream.append(outcome)
        results.append(entry)
        if step.id == "check":
            report = outcome.get("report")
            if state != "skipped" and not outcome.get("ok"):
                failure = {
                    "step": "check",
                    "title": step.title,
                    "check_failed": True,
                    "message": "the environment check failed: " + step.detail(outcome),
                }
    status = (
        "ok" if failure is None else ("check_failed" if failure.get("check_failed") else "failed")
    )
    log.line("<== setup %s in %.1fs" % (status, time.monotonic() - started), keep=False)
    log.close()
    emit(
        {
            "ev": "result",
            "status": status,
            "steps": results,
            "failed": failure,
            "log": log.path,
            "marker": ctx.marker_path,
            "venv": ctx.venv,
            "python": ctx.python,
            "python_version": ctx.python_version(ctx.python),
            "report": report,
            "seconds": round(time.monotonic() - started, 2),
        }
    )
    return {"ok": 0, "check_failed": 1}.get(status, 4)


def _one_step(ctx, marker, step, upstream, log, entry):
    """Skip or run one step; returns (outcome, state) or raises Failure. While it runs, its
    marker entry says so: a killed setup shows up next time as "interrupted"."""
    t0 = time.monotonic()
    try:
        inputs, fingerprint, why = decide(ctx, marker, step, upstream)
    except StepError as exc:
        raise Failure(message=exc.message, fix=exc.fix)
    if why is None:
        rec = marker.record(step.id)
        entry.update(state="skipped", detail=step.detail(rec["outcome"]), seconds=0.0)
        log.line(
            "--- [%d/%d] %s: skipped, done %s: %s"
            % (entry["n"], entry["of"], step.id, rec.get("done"), entry["detail"]),
            keep=False,
        )
        emit(dict(entry, ev="step"))
        return rec["outcome"], "skipped"
    entry.update(state="running", reason=why)
    emit(dict(entry, ev="step"))
    started = {"state": "running", "started": utc_now(), "inputs": inputs}
    marker.save_step(step.id, started)
    log.new_step()
    log.line("==> [%d/%d] %s: %s" % (entry["n"], entry["of"], step.id, why), keep=False)
    try:
        outcome = _run_step(ctx, step, log)
    except Failure:
        marker.save_step(step.id, dict(started, state="failed"))
        raise
    seconds = round(time.monotonic() - t0, 2)
    entry.update(state="done", detail=step.detail(outcome), seconds=seconds)
    if step.id != "check" or outcome.get("ok"):
        marker.save_step(
            step.id,
            {
                "fingerprint": fingerprint,
                "inputs": inputs,
                "outcome": outcome,
                "done": utc_now(),
                "seconds": seconds,
                "detail": entry["detail"],
            },
        )
    else:  # a failed check is redone next time
        marker.save_step(step.id, dict(started, state="failed"))
    log.line("<== %s done in %.1fs: %s" % (step.id, seconds, entry["detail"]), keep=False)
    emit(dict(entry, ev="step"))
    return outcome, "done"


def _run_step(ctx, step, log):
    """step.run with its errors turned into Failure."""
    try:
        return step.run(ctx, log, _activity(step.id))
    except StepError as exc:
        log.line("error: %s" % exc.message)
        raise Failure(message=exc.message, fix=exc.fix, build_plan=_build_plan_or_none(ctx, step))
    except CommandFailed as exc:
        raise Failure(
            message="`%s` %s"
            % (exc.command.title or exc.command.argv[0], CHECK.describe_returncode(exc.exit_code)),
            exit_code=exc.exit_code,
            command=exc.command.to_dict(ctx),
            build_plan=_build_plan_or_none(ctx, step),
        )
    except Exception as exc:  # a bug here must still end in a result the operator can show
        for line in traceback.format_exc().splitlines():
            log.line(line)
        raise Failure(message="internal error in step %s: %r" % (step.id, exc))


def _build_plan_or_none(ctx: Ctx, step: Step) -> Optional[dict]:
    if step.id not in ("te", "apex", "flash_attn"):
        return None
    try:
        return ctx.build_plan()
    except Exception:  # the failure report matters more than this detail
        return None


def _activity(step_id: str):
    last = [0.0]

    def on_line(text: str) -> None:
        now = time.monotonic()
        if text.strip() and now - last[0] >= ACTIVITY_EVERY:
            last[0] = now
            emit({"ev": "activity", "step": step_id, "line": text.strip()[-160:]})

    return on_line


def _sync_wheelhouse(ctx: Ctx, log: StepLog) -> None:
    """Make the node's wheelhouse exactly the operator's: remove files it no longer has."""
    wanted = ctx.req.get("wheelhouse_files")
    if not ctx.wheelhouse or wanted is None:
        return
    try:
        names = os.listdir(ctx.wheelhouse)
    except OSError:
        return
    for name in sorted(set(names) - set(wanted)):
        path = os.path.join(ctx.wheelhouse, name)
        if os.path.isfile(path):
            os.unlink(path)
            log.line("removed %s from the wheelhouse (not in the operator's)" % name, keep=False)


__all__ = ["main", "probe", "plan", "run", "decide", "STEP_IDS"]
