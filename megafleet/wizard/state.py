"""What the wizard has gathered, what it has staged, and the one place it writes.

Until the user picks "save" at the confirmation step, nothing of the operator's is changed:
new hosts live in an in-memory copy of the inventory, and the host keys that connecting to them
pins go to a staged copy of megafleet's known_hosts in a private temporary directory. `commit()`
then writes, in this order: the inventory (only if hosts were added), the newly pinned host keys
into megafleet's known_hosts, and the job file. Later steps change hosts (setup) or start a run
(launch) only after that, each one announced before it starts.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from megafleet import paths, ui
from megafleet.inventory import Host, Inventory


@dataclass
class WizardState:
    inventory: Inventory  # the operator's inventory plus the hosts added here (not yet saved)
    mode: str = "ssh"  # "local" | "ssh" | "ec2"
    added: list[str] = field(default_factory=list)  # hosts new to the inventory, in order
    nodes: list[str] = field(default_factory=list)  # the hosts the job runs on, node 0 first
    rows: dict[str, dict] = field(default_factory=dict)  # host name -> its `hosts check` row
    ec2_types: dict[str, str] = field(default_factory=dict)  # host name -> EC2 instance type
    job: object = None  # the JobConfig being built
    template: str = "sft-full"
    job_file: Path | None = None
    committed: bool = False
    run_id: str | None = None  # set once the launch has started a run
    timeout: float = 10.0
    _staging: Path | None = None
    _pool: object = None

    # -- SSH with staged host keys ---------------------------------------------------------
    @property
    def staged_known_hosts(self):
        from megafleet.ssh.known_hosts import KnownHosts

        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix="megafleet-wizard-"))
            real = paths.known_hosts_path()
            if real.exists():
                shutil.copy2(real, self._staging / "known_hosts")
        return KnownHosts(self._staging / "known_hosts")

    @property
    def pool(self):
        """One connection pool for the whole wizard, pinning keys in the staged known_hosts."""
        if self._pool is None:
            from megafleet.ssh.connection import ConnectionPool

            self._pool = ConnectionPool(
                self.inventory.jump_for,
                known_hosts=self.staged_known_hosts,
                connect_timeout=self.timeout,
            )
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)

    # -- the one write ---------------------------------------------------------------------
    def commit(self, job_text: str) -> list[str]:
        """Write the inventory (if hosts were added), the new host keys and the job file;
        return what was written, for the summary."""
        from megafleet.templates import write_text_file

        written = []
        if self.added:
            written.append(f"inventory {self.inventory.save()} (+{', '.join(self.added)})")
        pinned = self._pin_new_keys()
        if pinned:
            written.append(f"host keys of {', '.join(pinned)} in {paths.known_hosts_path()}")
        write_text_file(self.job_file, job_text, overwrite=False)
        written.append(f"job file {self.job_file}")
        self.committed = True
        return written

    def _pin_new_keys(self) -> list[str]:
        from megafleet.ssh.known_hosts import KnownHosts, host_id

        if self._staging is None or not (self._staging / "known_hosts").exists():
            return []
        staged, real, out = self.staged_known_hosts, KnownHosts(), []
        for name in self.rows:  # every host connected to
            host = self.inventory.hosts.get(name)
            if host is None:
                continue
            hid = host_id(host.address, host.port)
            have = real.lookup(hid)
            for key in staged.lookup(hid).values():
                if have.get(key.get_name()) != key:
                    real.pin(hid, key)
                    out.append(name)
        return out

    # -- telling the user how to go on -----------------------------------------------------
    def resume_commands(self) -> list[str]:
        """Commands that redo by hand what was answered so far (nothing was saved)."""
        out = []
        for name in self.added:
            out.append(add_command(self.inventory.hosts[name]))
        job = self.job
        if job is not None and job.model.model and job.data.dataset:
            sets = [f"model={job.model.model}", f"dataset={','.join(job.data.dataset)}"]
            if self.nodes:
                sets.append(f"hosts={','.join(self.nodes)}")
            out.append(
                "megafleet render "
                + self.template
                + " "
                + " ".join(f"--set {shlex.quote(s)}" for s in sets)
                + " -o job.yaml"
            )
        return out

    def say_cancelled(self) -> None:
        ui.err_console.print("[yellow]cancelled[/yellow]")
        if self.run_id:
            ui.info(
                f"Run {self.run_id} was started and keeps running; the job is in {self.job_file}."
            )
            ui.hint(
                f"megafleet logs {self.run_id} -f",
                f"megafleet status {self.run_id}",
                f"megafleet stop {self.run_id}",
                title="To follow it, or stop it",
            )
            return
        if not self.committed:
            ui.info("Nothing was written: no job file, no inventory change, no run.")
            ui.hint("megafleet wizard", *self.resume_commands(), title="To start again")
            return
        ui.info(f"The job is saved in {self.job_file}.")
        ui.hint(f"megafleet launch {self.job_file}", title="To launch it")


def add_command(h: Host) -> str:
    target = f"{h.user}@{h.address}" + (f":{h.port}" if h.port != 22 else "")
    parts = ["megafleet hosts add", h.name, target]
    if h.identity_file:
        parts += ["-i", shlex.quote(h.identity_file)]
    if h.private_address:
        parts += ["--private-address", h.private_address]
    return " ".join(parts)
