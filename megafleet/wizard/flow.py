"""The wizard from top to bottom: machines, job, review, save, setup, launch, logs."""

from __future__ import annotations

import socket

from megafleet import ui
from megafleet.errors import EXIT_INTERRUPTED, EXIT_OK, MegafleetError
from megafleet.inventory import Inventory
from megafleet.wizard import finish, job, machines
from megafleet.wizard.ask import Asker
from megafleet.wizard.state import WizardState

INTRO = (
    "[bold]megafleet wizard[/bold]: from your machines to a running training job. Every "
    "question has a default (Enter takes it); Ctrl-C cancels at any step. Nothing is "
    "written until you confirm the job."
)


def run_wizard(ask: Asker, timeout: float = 10.0, dry_run: bool = False) -> int:
    """Run the whole flow; the exit code (the run's own once its logs were followed)."""
    state = WizardState(Inventory.load(), timeout=timeout)
    try:
        return _flow(ask, state, dry_run)
    except KeyboardInterrupt:
        state.say_cancelled()
        return EXIT_INTERRUPTED
    except MegafleetError as exc:
        ui.print_error(exc)
        if not state.committed:
            ui.info("Nothing was written: no job file, no inventory change, no run.")
        return exc.exit_code
    finally:
        state.close()


def _flow(ask: Asker, state: WizardState, dry_run: bool) -> int:
    ui.info(INTRO)
    state.mode = machines.ask_where(ask, state)
    pick = {"local": machines.local_node, "ssh": machines.ssh_hosts, "ec2": machines.ec2_hosts}
    names = pick[state.mode](ask, state)
    state.nodes = machines.ask_distribute(ask, state, names)
    machines.show_fleet(state, state.nodes)
    gpus = machines.gpu_facts(state)
    if not gpus.per_node and not ask.confirm(
        "cpu_ok",
        f"No NVIDIA GPU on {', '.join(state.nodes)}. Run on CPU instead (a smoke "
        "run for tiny models)?",
        default=True,
    ):
        raise KeyboardInterrupt
    job.ask_task(ask, state)
    state.job.launch.hosts = list(state.nodes)
    hf = job.ask_model(ask, state)
    job.ask_dataset(ask, state)
    job.ask_max_length(ask, state, hf, gpus)
    while gpus.per_node:
        verdict = job.plan_layout(ask, state, hf, gpus)
        if verdict == "ok":
            break
        if verdict == "model":
            hf = job.ask_model(ask, state)
        job.ask_max_length(ask, state, hf, gpus)
    if not gpus.per_node:
        job.cpu_settings(state)
    job.ask_schedule(ask, state)
    if state.mode == "local" and not _port_free(state.job.launch.master_port):
        state.job.launch.master_port = _free_port()
    what = finish.review(ask, state, dry_run)
    if what != "launch":
        return EXIT_OK
    if not finish.prepare_nodes(ask, state):
        return EXIT_OK
    run = finish.launch(state)
    state.run_id = run.run_id
    return finish.follow(ask, run)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
