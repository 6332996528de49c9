"""The GPU instance-type table agrees with AWS's own DescribeInstanceTypes data (the copy moto
ships) and says "unknown" for everything else."""

import gzip
import json
from pathlib import Path

import pytest

from megafleet.ec2 import catalog

ISSUE_FAMILIES = ["p4d", "p4de", "p5", "p5e", "p5en", "p6-b200", "g5", "g6", "g6e"]


@pytest.fixture(scope="module")
def aws_types():
    import moto.ec2

    path = Path(moto.ec2.__file__).parent / "resources" / "instance_types.json.gz"
    with gzip.open(path) as f:
        return json.load(f)


def test_every_row_matches_aws_describe_instance_types(aws_types):
    for name, info in catalog.CATALOG.items():
        aws = aws_types[name]
        (gpu,) = aws["GpuInfo"]["Gpus"]
        assert (info.gpus, info.gpu_model, info.gpu_memory_mib) == (
            gpu["Count"],
            gpu["Name"],
            gpu["MemoryInfo"]["SizeInMiB"],
        ), name
        efa = (
            aws["NetworkInfo"]["EfaInfo"]["MaximumEfaInterfaces"]
            if aws["NetworkInfo"].get("EfaSupported")
            else 0
        )
        assert info.max_efa_interfaces == efa, name
        assert info.network == aws["NetworkInfo"]["NetworkPerformance"], name


def test_every_size_of_the_families_is_covered(aws_types):
    for family in ISSUE_FAMILIES:
        sizes = {t for t in aws_types if t.split(".")[0] == family}
        assert sizes and sizes <= set(catalog.CATALOG), (family, sizes - set(catalog.CATALOG))


def test_summary_and_unknown_types():
    assert catalog.gpu_summary("p5.48xlarge") == "8x H100 80 GiB"
    assert catalog.gpu_summary("p5en.48xlarge") == "8x H200 141 GiB"
    assert catalog.gpu_summary("g6e.12xlarge") == "4x L40S 45 GiB"
    assert catalog.gpu_summary("p6-b200.48xlarge") == "8x B200 179 GiB"
    for t in ("t3.micro", "p3.16xlarge", "g5.96xlarge", "", None):
        assert catalog.lookup(t) is None and catalog.gpu_summary(t) == "unknown"
    p4d = catalog.lookup("p4d.24xlarge")
    assert p4d.cluster_class and p4d.efa_supported and p4d.max_efa_interfaces == 4
    g5 = catalog.lookup("g5.xlarge")
    assert not g5.cluster_class and not g5.efa_supported
    assert catalog.lookup("g5.48xlarge").to_dict()["efa_supported"] is True
