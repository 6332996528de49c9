"""Node setup: one command installs a working Megatron stack on every host.

    from megafleet.setup import SetupOptions, setup_hosts, needs_setup
    options = SetupOptions(with_te=True)                      # venv ~/megafleet/venv by default
    results = setup_hosts(inventory.select(None), options, pool=pool,
                          on_event=lambda host, ev: ...)      # {host: HostSetupResult}
    todo = needs_setup(host, options, pool=pool)              # [] when the host is ready

Steps on each host, each skipped when its marker entry still holds: venv, torch (for the
node's driver), packages (megatron-core, transformers, ...), project (this operator's code as a
wheel), te / apex / flash_attn (optional builds with venv-local cuDNN/NCCL headers), check
(scripts/check_megatron_env.py in that venv). See megafleet.setup.node for the node side and
its file layout, and `megafleet setup --help` for the command.

This package imports nothing heavy (and `megafleet.setup.node` only the standard library).
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # pragma: no cover
    from megafleet.setup.remote import HostSetupResult, OnEvent
    from megafleet.setup.request import SetupOptions


def __getattr__(name):
    if name == "SetupOptions":
        from megafleet.setup.request import SetupOptions

        return SetupOptions
    if name == "HostSetupResult":
        from megafleet.setup.remote import HostSetupResult

        return HostSetupResult
    raise AttributeError(name)


def _runners(hosts: Iterable, pool):
    from megafleet.runner import Runner, SSHRunner

    return [h if isinstance(h, Runner) else SSHRunner(h, pool=pool) for h in hosts]


def setup_hosts(
    hosts: Iterable,
    options: "SetupOptions",
    *,
    pool=None,
    on_event: "OnEvent | None" = None,
    dry_run: bool = False,
    artifacts=None,
    timeout: float | None = None,
) -> dict[str, "HostSetupResult"]:
    """Set up (or with `dry_run`, plan) every host in parallel; {host name: HostSetupResult} in
    the order given. `hosts` are inventory Hosts (through SSHRunner with `pool`) or Runners;
    `on_event(host, event)` receives the node agent's progress events as they arrive."""
    from megafleet.setup import artifacts as art_mod
    from megafleet.setup.remote import HostSetupResult, plan_host, setup_host

    options.validate()
    art = artifacts or art_mod.prepare(options.wheelhouse)
    runners = _runners(hosts, pool)
    if not runners:
        return {}

    def one(runner):
        try:
            if dry_run:
                return plan_host(runner, options, art)
            return setup_host(runner, options, art, on_event, timeout)
        except Exception as exc:  # one host's bug must not hide the others' results
            return HostSetupResult(runner.name, "error", message=f"{type(exc).__name__}: {exc}")

    with cf.ThreadPoolExecutor(
        max_workers=min(32, len(runners)), thread_name_prefix="megafleet-setup"
    ) as ex:
        futures = [ex.submit(one, r) for r in runners]
        try:
            return {r.name: f.result() for r, f in zip(runners, futures)}
        except KeyboardInterrupt:
            for r in runners:  # closing the connections stops the agents on the hosts
                r.close()
            raise


def needs_setup(host, options: "SetupOptions", *, pool=None, artifacts=None) -> list[str]:
    """The steps a setup would run on `host` now ("upload" first when files must be sent);
    [] when it is set up. Raises UnreachableError / RemoteCommandError when it cannot tell."""
    from megafleet.errors import RemoteCommandError, UnreachableError

    res = setup_hosts([host], options, pool=pool, dry_run=True, artifacts=artifacts)
    (result,) = res.values()
    if result.status == "unreachable":
        raise UnreachableError(f"{result.host}: {result.message}", hint=result.hint)
    if result.status != "planned":
        raise RemoteCommandError(f"{result.host}: {result.message}", hint=result.hint)
    return result.needs()
