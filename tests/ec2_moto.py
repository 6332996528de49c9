"""EC2 test helpers on moto (in-process AWS): a credentials-only environment, a cluster builder,
and a launcher that runs the `megafleet` CLI in a separate process under moto.

moto models instances, VPCs, subnets, security groups and state changes, but not placement
groups or EFA interfaces (it records neither); those are covered by the pure-function tests.

Launcher (for pseudo-terminal tests such as the wizard's EC2 branch):

    python -m tests.ec2_moto SEED.json -- ec2 list --json      # `--` then megafleet's argv

SEED.json: {"region": "us-east-1", "self_rule": true, "instances": [{"name": "gpu-a",
"type": "p5.48xlarge", "az": "us-east-1a", "tags": {"team": "ml"}, "spot": false,
"state": "running"}]}. Fake credentials are set by the launcher; no real AWS is reachable.
The moto state lives as long as that one process: each launch starts from the seed again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
UNSET = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_EC2",
    "AWS_SECURITY_TOKEN",
)
AMI = "ami-12c6146b"  # one of moto's built-in images


def isolate_aws_env(environ, tmp_dir: str, credentials: bool = True, region: bool = True) -> None:
    """Point boto3 at empty config files and (optionally) fake keys and a default region."""
    for k in UNSET + tuple(FAKE_ENV):
        environ.pop(k, None)
    environ["AWS_CONFIG_FILE"] = os.path.join(tmp_dir, "aws-config")
    environ["AWS_SHARED_CREDENTIALS_FILE"] = os.path.join(tmp_dir, "aws-credentials")
    environ["AWS_EC2_METADATA_DISABLED"] = "true"  # never wait for an instance role
    environ["MOTO_EC2_LOAD_DEFAULT_AMIS"] = "false"  # seconds of JSON per region otherwise
    for k, v in FAKE_ENV.items():
        if (k != "AWS_DEFAULT_REGION" and credentials) or (k == "AWS_DEFAULT_REGION" and region):
            environ[k] = v


@dataclass
class Cluster:
    """A VPC with one subnet per AZ and one security group `nodes`, in moto."""

    client: object
    region: str
    vpc_id: str = ""
    subnets: dict[str, str] = field(default_factory=dict)  # az -> subnet id
    group_id: str = ""

    @classmethod
    def create(
        cls, region: str = "us-east-1", azs=("a", "b"), self_rule: bool = False
    ) -> "Cluster":
        import boto3

        c = cls(boto3.client("ec2", region_name=region), region)
        c.vpc_id = c.client.create_vpc(CidrBlock="10.7.0.0/16")["Vpc"]["VpcId"]
        for n, az in enumerate(azs):
            c.subnets[region + az] = c.client.create_subnet(
                VpcId=c.vpc_id, CidrBlock=f"10.7.{n}.0/24", AvailabilityZone=region + az
            )["Subnet"]["SubnetId"]
        c.group_id = c.new_group("nodes", self_rule)
        return c

    def new_group(self, name: str, self_rule: bool = False) -> str:
        gid = self.client.create_security_group(
            GroupName=name, Description=name, VpcId=self.vpc_id
        )["GroupId"]
        if self_rule:
            perm = [{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": gid}]}]
            self.client.authorize_security_group_ingress(GroupId=gid, IpPermissions=perm)
            self.client.authorize_security_group_egress(GroupId=gid, IpPermissions=perm)
        return gid

    def launch(
        self,
        name: str | None,
        type: str = "p5.48xlarge",
        az: str = "a",
        tags: dict | None = None,
        spot: bool = False,
        groups=None,
        public: bool = True,
    ) -> str:
        all_tags = dict(tags or {}, **({"Name": name} if name else {}))
        kwargs = {}
        if all_tags:
            kwargs["TagSpecifications"] = [
                {
                    "ResourceType": "instance",
                    "Tags": [{"Key": k, "Value": v} for k, v in all_tags.items()],
                }
            ]
        if spot:
            kwargs["InstanceMarketOptions"] = {"MarketType": "spot"}
        res = self.client.run_instances(
            ImageId=AMI,
            MinCount=1,
            MaxCount=1,
            InstanceType=type,
            NetworkInterfaces=[
                {
                    "DeviceIndex": 0,
                    "SubnetId": self.subnets[self.region + az],
                    "Groups": list(groups or [self.group_id]),
                    "AssociatePublicIpAddress": public,
                }
            ],
            **kwargs,
        )
        return res["Instances"][0]["InstanceId"]

    def state(self, iid: str) -> str:
        r = self.client.describe_instances(InstanceIds=[iid])
        return r["Reservations"][0]["Instances"][0]["State"]["Name"]


@pytest.fixture
def aws(monkeypatch, tmp_path):
    """moto in this process, fake credentials, region us-east-1, and an empty Cluster."""
    env: dict = {}
    isolate_aws_env(env, str(tmp_path))
    for k in UNSET + tuple(FAKE_ENV):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from moto import mock_aws

    with mock_aws():
        yield Cluster.create()


def make_key(tmp_path):
    key = tmp_path / "node.pem"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def seed(spec: dict) -> Cluster:
    cluster = Cluster.create(
        spec.get("region", "us-east-1"), self_rule=spec.get("self_rule", False)
    )
    for i in spec.get("instances", []):
        iid = cluster.launch(
            i.get("name"),
            i.get("type", "p5.48xlarge"),
            i.get("az", "a"),
            i.get("tags"),
            i.get("spot", False),
        )
        if i.get("state") == "stopped":
            cluster.client.stop_instances(InstanceIds=[iid])
    return cluster


def main(argv: list[str]) -> None:
    from moto import mock_aws

    seed_file, rest = argv[0], argv[2:] if argv[1:2] == ["--"] else argv[1:]
    with open(seed_file) as f:
        spec = json.load(f)
    isolate_aws_env(os.environ, os.path.dirname(os.path.abspath(seed_file)))
    with mock_aws():
        seed(spec)
        from megafleet.cli import main as megafleet_main

        megafleet_main(rest)


if __name__ == "__main__":
    main(sys.argv[1:])
