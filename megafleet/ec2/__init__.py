"""EC2: find GPU instances by tag or id, check the network multi-node training needs, turn them
into inventory hosts, start and stop them.

boto3 is imported only inside the functions that call AWS, so importing this package is cheap.
The API the CLI and the wizard use:

    find_instances(region=None, tags=None, ids=None, profile=None) -> list[Instance]
    check_instances(region=None, tags=None, ids=None, profile=None, inventory=None, ssh=True,
                    ssh_timeout=5.0, probe=ssh_banner_probe) -> CheckReport (.findings, .to_dict())
    judge(snapshot, hosts=None, reach=None) -> list[Finding]     # pure: no AWS, no network
    plan_import(instances, inventory, user, key, update=False) -> list[ImportAction]   # pure
    import_instances(instances, user, key, inventory=None, update=False, dry_run=False)
        -> ImportResult
    change_state("start" | "stop", ids, region=None, profile=None, wait=True) -> list[Instance]
    catalog.lookup(instance_type) -> TypeInfo | None; catalog.gpu_summary(type) -> str

Errors (no region, no credentials, a missing profile, AWS refusals) are MegafleetErrors with a
fix; see megafleet.ec2.aws.
"""

from megafleet.ec2 import catalog
from megafleet.ec2.checks import Finding, Reach, judge
from megafleet.ec2.discover import ClusterSnapshot, Instance, describe_cluster, find_instances
from megafleet.ec2.importer import ImportAction, ImportResult, import_instances, plan_import
from megafleet.ec2.power import change_state, power_plan
from megafleet.ec2.reach import ssh_banner_probe
from megafleet.ec2.report import CheckReport, check_instances

__all__ = [
    "catalog",
    "Finding",
    "Reach",
    "judge",
    "ClusterSnapshot",
    "Instance",
    "describe_cluster",
    "find_instances",
    "ImportAction",
    "ImportResult",
    "import_instances",
    "plan_import",
    "change_state",
    "power_plan",
    "ssh_banner_probe",
    "CheckReport",
    "check_instances",
]
