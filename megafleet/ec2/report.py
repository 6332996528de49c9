"""`check_instances`: fetch a cluster's description, probe SSH, judge it, in one call.

report = check_instances(region="us-east-1", tags=["team=ml"])
report.findings          # list[checks.Finding]
report.to_dict()         # the `megafleet ec2 check --json` document
report.exit_code()       # 1 when a finding is an error, else 0
"""

from __future__ import annotations

from dataclasses import dataclass

from megafleet.ec2 import checks, reach
from megafleet.ec2.discover import ClusterSnapshot, describe_cluster
from megafleet.ec2.importer import match_hosts
from megafleet.errors import EXIT_FAILED, EXIT_OK
from megafleet.inventory import Inventory


@dataclass
class CheckReport:
    snapshot: ClusterSnapshot
    findings: list[checks.Finding]
    inventory: str | None  # path of the inventory consulted, or None
    reach: dict[str, checks.Reach]

    @property
    def instances(self):
        return self.snapshot.instances

    def status(self) -> dict[str, str]:
        """check name -> "pass" | "error" | "warning" | "info" | "skip"."""

        def skipped(name):
            return (name != "instances" and not self.instances) or (
                name == "master_address" and self.inventory is None
            )

        return {
            name: checks.check_status(self.findings, name, skipped(name)) for name in checks.CHECKS
        }

    def counts(self) -> dict[str, int]:
        return {s: sum(1 for f in self.findings if f.severity == s) for s in checks.SEVERITIES}

    def exit_code(self) -> int:
        return EXIT_FAILED if self.counts()["error"] else EXIT_OK

    def to_dict(self) -> dict:
        return {
            "region": self.snapshot.region,
            "inventory": self.inventory,
            "instances": [
                dict(i.to_dict(), ssh=vars(self.reach[i.id]) if i.id in self.reach else None)
                for i in self.instances
            ],
            "checks": self.status(),
            "findings": [f.to_dict() for f in self.findings],
            "summary": {
                "instances": len(self.instances),
                **self.counts(),
                "ok": not self.counts()["error"],
            },
        }


def check_instances(
    region: str | None = None,
    tags=None,
    ids=None,
    profile: str | None = None,
    inventory: Inventory | bool | None = None,
    ssh: bool = True,
    ssh_timeout: float = 5.0,
    probe: reach.Probe = reach.ssh_banner_probe,
    client=None,
) -> CheckReport:
    """Check the instances matching `tags`/`ids`. `inventory` (default: the current one; pass
    False to skip) supplies the SSH targets and private addresses; `ssh=False` skips the
    reachability probe (reported as "not checked")."""
    snap = describe_cluster(region, tags, ids, profile, client=client)
    snap.profile = profile
    inv = Inventory.load() if inventory is None else (inventory or None)
    hosts = match_hosts(snap.instances, inv) if inv is not None else None
    if ssh:
        reached = reach.probe_instances(snap.instances, hosts, ssh_timeout, probe)
    else:
        reached = reach.not_checked(snap.instances, "skipped with --no-ssh")
    findings = checks.judge(snap, hosts, reached)
    return CheckReport(snap, findings, str(inv.path) if inv is not None else None, reached)
