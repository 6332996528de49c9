"""Turn running EC2 instances into inventory hosts.

Each running instance becomes a host named after its Name tag (made a valid, unique host name;
the instance id when there is no Name tag) with: `address` = the public IP (what this machine
connects to; the private IP when there is none), `private_address` = the private IP (what the
nodes use among themselves, e.g. as the master address: never the public IP), the given user
and key, and the instance's EC2 tags plus `ec2_instance_id`, `ec2_region`, `ec2_instance_type`.
An instance already in the inventory (same `ec2_instance_id` tag, else same address) is
skipped, or refreshed in place with `update=True` (keeping its name, port and jump host).

    plan = plan_import(instances, inventory, user="ubuntu", key="/abs/key.pem", update=False,
                       connect_via="public")  # "private": SSH to the private IPs (in the VPC)
    result = import_instances(instances, "ubuntu", "~/.ssh/k.pem")   # plans, validates, saves
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from megafleet.ec2.discover import Instance
from megafleet.errors import UsageError
from megafleet.inventory import NAME_RE, Host, Inventory

ID_TAG, REGION_TAG, TYPE_TAG = "ec2_instance_id", "ec2_region", "ec2_instance_type"


@dataclass
class ImportAction:
    action: str  # "add" | "update" | "skip"
    instance_id: str
    name: str | None  # the inventory host name (None: skipped and not in the inventory)
    host: Host | None = None  # the host to write (add / update)
    reason: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "action": self.action,
            "instance_id": self.instance_id,
            "name": self.name,
            "reason": self.reason,
            "notes": self.notes,
            "host": self.host.to_dict() if self.host else None,
        }


@dataclass
class ImportResult:
    actions: list[ImportAction]
    inventory: str
    written: bool

    def count(self, action: str) -> int:
        return sum(1 for a in self.actions if a.action == action)

    def to_dict(self) -> dict:
        return {
            "inventory": self.inventory,
            "written": self.written,
            "added": self.count("add"),
            "updated": self.count("update"),
            "skipped": self.count("skip"),
            "actions": [a.to_dict() for a in self.actions],
        }


def match_hosts(instances: list[Instance], inventory: Inventory) -> dict[str, Host]:
    """instance id -> the inventory host for it (by `ec2_instance_id` tag, else by address)."""
    by_tag = {h.tags.get(ID_TAG): h for h in inventory if h.tags.get(ID_TAG)}
    out = {}
    for inst in instances:
        host = by_tag.get(inst.id)
        if host is None:
            addresses = {a for a in (inst.public_ip, inst.public_dns, inst.private_ip) if a}
            host = next(
                (
                    h
                    for h in inventory
                    if h.address in addresses and h.tags.get(ID_TAG) in (None, inst.id)
                ),
                None,
            )
        if host is not None:
            out[inst.id] = host
    return out


def host_name(inst: Instance, taken: set[str]) -> str:
    """The Name tag as a valid host name (else the instance id), suffixed -2, -3 ... if taken."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", inst.name or "").strip("-._")[:56] or inst.id
    name, n = base, 1
    while name in taken or not NAME_RE.match(name):
        n += 1
        name = f"{base}-{n}"
    return name


def ssh_address(inst: Instance, connect_via: str = "public") -> str:
    """The address this machine connects to: the public IP (then DNS name), falling back to the
    private IP; `connect_via="private"` when megafleet runs inside the VPC (or over a VPN)."""
    if connect_via == "private":
        return inst.private_ip or ""
    return inst.public_ip or inst.public_dns or inst.private_ip or ""


def host_for(
    inst: Instance,
    name: str,
    user: str,
    key: str | None,
    old: Host | None = None,
    connect_via: str = "public",
) -> Host:
    tags = dict(old.tags) if old else {}
    tags.update(inst.tags)
    tags.update({ID_TAG: inst.id, REGION_TAG: inst.region, TYPE_TAG: inst.type})
    return Host(
        name=name,
        address=ssh_address(inst, connect_via),
        user=user,
        port=old.port if old else 22,
        identity_file=key,
        private_address=inst.private_ip,
        jump_host=old.jump_host if old else None,
        tags=tags,
    )


def plan_import(
    instances: list[Instance],
    inventory: Inventory,
    user: str,
    key: str | None,
    update: bool = False,
    connect_via: str = "public",
) -> list[ImportAction]:
    """What importing `instances` would do to `inventory` (nothing is changed).
    `connect_via`: the address SSH connects to, "public" (default) or "private"."""
    if connect_via not in ("public", "private"):
        raise UsageError(f"connect_via {connect_via!r}: use 'public' or 'private'")
    matched = match_hosts(instances, inventory)
    taken = set(inventory.names())
    out = []
    for inst in instances:
        old = matched.get(inst.id)
        if inst.state != "running":
            out.append(
                ImportAction(
                    "skip",
                    inst.id,
                    old.name if old else None,
                    reason=f"{inst.state}, not running (megafleet ec2 start --ids {inst.id})",
                )
            )
            continue
        if old is not None:
            out.append(_existing(inst, old, user, key, update, connect_via))
            continue
        name = host_name(inst, taken)
        taken.add(name)
        action = ImportAction(
            "add", inst.id, name, host_for(inst, name, user, key, connect_via=connect_via)
        )
        if not inst.public_ip and connect_via == "public":
            action.notes.append(
                "no public IP: connecting to the private address "
                "(works only from inside the VPC or through a jump host)"
            )
        out.append(action)
    return out


def _existing(
    inst: Instance, old: Host, user: str, key: str | None, update: bool, connect_via: str
) -> ImportAction:
    if not update:
        return ImportAction(
            "skip",
            inst.id,
            old.name,
            reason=f"already in the inventory as {old.name} (--update refreshes it)",
        )
    new = host_for(inst, old.name, user, key, old, connect_via)
    if new == old:
        return ImportAction("skip", inst.id, old.name, reason="already up to date")
    changed = [
        f
        for f in ("address", "user", "identity_file", "private_address", "tags")
        if getattr(new, f) != getattr(old, f)
    ]
    return ImportAction("update", inst.id, old.name, new, reason="changed: " + ", ".join(changed))


def check_key(path: str) -> tuple[str, str | None]:
    """The key's absolute path and a warning (passphrase-protected) or None; raises UsageError
    for a key SSH would refuse (missing, public, readable by others ...)."""
    from megafleet.ssh.errors import IdentityProblem
    from megafleet.ssh.keys import load_identity

    absolute = str(Path(path).expanduser().absolute())
    try:
        load_identity(absolute, "ec2 import")
    except IdentityProblem as exc:
        if exc.problem == "passphrase":
            return absolute, f"{exc.reason}; before connecting, run: {exc.hint}"
        raise UsageError(f"--key: {exc.reason}", hint=exc.hint) from None
    return absolute, None


def apply_plan(plan: list[ImportAction], inventory: Inventory) -> None:
    """Add / replace the planned hosts in `inventory` (validated; not saved)."""
    for a in plan:
        if a.action in ("add", "update"):
            inventory.add(a.host, replace=a.action == "update")


def import_instances(
    instances: list[Instance],
    user: str,
    key: str,
    inventory: Inventory | None = None,
    update: bool = False,
    dry_run: bool = False,
    connect_via: str = "public",
) -> ImportResult:
    """Plan, validate and (unless `dry_run`) save the import of `instances`."""
    key_path, _warning = check_key(key)
    inv = inventory if inventory is not None else Inventory.load()
    plan = plan_import(instances, inv, user, key_path, update, connect_via)
    staged = Inventory(list(inv), path=inv.path)
    apply_plan(plan, staged)  # validates every host before anything is written
    written = False
    if not dry_run and any(a.action != "skip" for a in plan):
        apply_plan(plan, inv)
        inv.save()
        written = True
    return ImportResult(plan, str(inv.path), written)
