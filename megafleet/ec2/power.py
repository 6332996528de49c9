"""Start and stop instances and wait (boto3 waiters) until they have got there.

    plan = power_plan("stop", instances)               # which change, which are there already
    after = change_state("stop", ["i-0abc"], region="us-east-1")   # list[Instance], all stopped

Stopping ends the instance's compute billing but keeps its disks; a stopped instance usually
gets a new public IP when started again (`megafleet ec2 import --update` refreshes the
inventory). Instance-store (local NVMe) data is lost on stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from megafleet.ec2.aws import aws_errors, ec2_client
from megafleet.ec2.discover import Instance, find_instances, split_ids
from megafleet.errors import MegafleetError, UsageError

TARGET = {"start": "running", "stop": "stopped"}
WAITER = {"running": "instance_running", "stopped": "instance_stopped"}
# a state an instance must leave before the action can be asked for -> the state it will reach
SETTLE = {"start": {"stopping": "stopped"}, "stop": {"pending": "running"}}


@dataclass
class PowerPlan:
    action: str  # "start" | "stop"
    change: list[Instance]  # the instances the action applies to
    already: list[Instance]  # already in (or heading to) the target state

    def to_dict(self) -> dict:
        return {
            "action": self.action,
            "target_state": TARGET[self.action],
            "change": [{"id": i.id, "name": i.name, "state": i.state} for i in self.change],
            "already": [{"id": i.id, "name": i.name, "state": i.state} for i in self.already],
        }


def power_plan(action: str, instances: list[Instance]) -> PowerPlan:
    if action not in TARGET:
        raise UsageError(f"unknown action {action!r} (start or stop)")
    heading = {"start": ("running", "pending"), "stop": ("stopped", "stopping")}[action]
    return PowerPlan(
        action,
        [i for i in instances if i.state not in heading],
        [i for i in instances if i.state in heading],
    )


def lookup_ids(ids, client) -> list[Instance]:
    """The instances with these ids (every id must exist and not be terminated)."""
    wanted = split_ids(ids)
    if not wanted:
        raise UsageError(
            "--ids is required (instance ids, comma-separated)",
            hint="megafleet ec2 list shows the ids",
        )
    found = find_instances(ids=wanted, client=client)
    missing = sorted(set(wanted) - {i.id for i in found})
    if missing:
        raise UsageError(
            f"no such instance (or terminated): {', '.join(missing)}",
            hint="megafleet ec2 list shows the ids",
        )
    return found


def change_state(
    action: str,
    ids,
    region: str | None = None,
    profile: str | None = None,
    client=None,
    wait: bool = True,
    delay: float = 15,
    max_attempts: int = 80,
    on_progress: Callable[[str], None] | None = None,
) -> list[Instance]:
    """Start or stop the instances and (with `wait`) return once all have reached the target
    state (`delay` seconds between polls, at most `max_attempts` polls)."""
    client = client or ec2_client(region, profile)
    instances = lookup_ids(ids, client)
    plan = power_plan(action, instances)
    say = on_progress or (lambda _msg: None)
    unsettled = [i for i in plan.change if i.state in SETTLE[action]]
    for state in sorted({SETTLE[action][i.state] for i in unsettled}):
        say(f"waiting for {', '.join(i.id for i in unsettled)} to be {state} first")
        _wait(
            client,
            state,
            [i.id for i in unsettled if SETTLE[action][i.state] == state],
            delay,
            max_attempts,
        )
    todo = [i.id for i in plan.change]
    if todo:
        say(f"{action} {', '.join(todo)}")
        with aws_errors(client):
            getattr(client, f"{action}_instances")(InstanceIds=todo)
    target = [i.id for i in instances]
    if wait:
        say(f"waiting until {len(target)} instance(s) are {TARGET[action]}")
        _wait(client, TARGET[action], target, delay, max_attempts)
    return find_instances(ids=target, client=client)


def _wait(client, state: str, ids: list[str], delay: float, max_attempts: int) -> None:
    import botocore.exceptions as bx

    try:
        with aws_errors(client):
            client.get_waiter(WAITER[state]).wait(
                InstanceIds=ids, WaiterConfig={"Delay": delay, "MaxAttempts": max_attempts}
            )
    except bx.WaiterError as exc:
        why = (exc.last_response or {}).get("Error", {}).get("Message") or str(exc)
        raise MegafleetError(
            f"instances {', '.join(ids)} did not become {state} within "
            f"{delay * max_attempts:g}s ({why})",
            hint="megafleet ec2 list shows their state; retry the command",
        ) from None
