"""What the EC2 GPU instance types people train on carry: GPUs, GPU memory, EFA.

The numbers are AWS's own (DescribeInstanceTypes: GpuInfo, NetworkInfo.EfaInfo), written down
here so `megafleet ec2 list` works without the extra API call and permission; a unit test
compares them with the copy of that data moto ships. A type that is not in the table is
"unknown": megafleet never guesses a GPU count from a type name.

    info = lookup("p5.48xlarge")      # TypeInfo(gpus=8, gpu_model="H100", ...) or None
    gpu_summary("p5.48xlarge")        # "8x H100 80 GiB"; "unknown" for other types
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TypeInfo:
    name: str  # "p5.48xlarge"
    family: str  # "p5"
    gpus: int
    gpu_model: str  # NVIDIA's name as AWS reports it: "H100", "A10G"
    gpu_memory_mib: int  # per GPU, as AWS reports it
    max_efa_interfaces: int  # 0: EFA not supported
    network: str  # AWS's network performance label

    @property
    def efa_supported(self) -> bool:
        return self.max_efa_interfaces > 0

    @property
    def gpu_memory_gib(self) -> int:
        return round(self.gpu_memory_mib / 1024)

    @property
    def cluster_class(self) -> bool:
        """The P families: built for multi-node training, where a cluster placement group and
        EFA decide whether NCCL runs at full speed."""
        return self.family.startswith("p")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(gpu_memory_gib=self.gpu_memory_gib, efa_supported=self.efa_supported)
        return d


# family -> (GPU model, MiB per GPU, {size: (GPUs, max EFA interfaces, network)})
_FAMILIES: dict[str, tuple[str, int, dict[str, tuple[int, int, str]]]] = {
    "p4d": ("A100", 40960, {"24xlarge": (8, 4, "4x 100 Gigabit")}),
    "p4de": ("A100", 81920, {"24xlarge": (8, 4, "4x 100 Gigabit")}),
    "p5": ("H100", 81920, {"4xlarge": (1, 1, "100 Gigabit"), "48xlarge": (8, 32, "3200 Gigabit")}),
    "p5e": ("H200", 144384, {"48xlarge": (8, 32, "3200 Gigabit")}),
    "p5en": ("H200", 144384, {"48xlarge": (8, 16, "3200 Gigabit")}),
    "p6-b200": ("B200", 183359, {"48xlarge": (8, 8, "3200 Gigabit")}),
    "p6-b300": ("B300", 275040, {"48xlarge": (8, 16, "6400 Gigabit")}),
    "g5": (
        "A10G",
        22888,
        {
            "xlarge": (1, 0, "Up to 10 Gigabit"),
            "2xlarge": (1, 0, "Up to 10 Gigabit"),
            "4xlarge": (1, 0, "Up to 25 Gigabit"),
            "8xlarge": (1, 1, "25 Gigabit"),
            "12xlarge": (4, 1, "40 Gigabit"),
            "16xlarge": (1, 1, "25 Gigabit"),
            "24xlarge": (4, 1, "50 Gigabit"),
            "48xlarge": (8, 1, "100 Gigabit"),
        },
    ),
    "g6": (
        "L4",
        22888,
        {
            "xlarge": (1, 0, "Up to 10 Gigabit"),
            "2xlarge": (1, 0, "Up to 10 Gigabit"),
            "4xlarge": (1, 0, "Up to 25 Gigabit"),
            "8xlarge": (1, 1, "25 Gigabit"),
            "12xlarge": (4, 1, "40 Gigabit"),
            "16xlarge": (1, 1, "25 Gigabit"),
            "24xlarge": (4, 1, "50 Gigabit"),
            "48xlarge": (8, 1, "100 Gigabit"),
        },
    ),
    "g6e": (
        "L40S",
        45776,
        {
            "xlarge": (1, 0, "Up to 20 Gigabit"),
            "2xlarge": (1, 0, "Up to 20 Gigabit"),
            "4xlarge": (1, 0, "20 Gigabit"),
            "8xlarge": (1, 1, "25 Gigabit"),
            "12xlarge": (4, 1, "100 Gigabit"),
            "16xlarge": (1, 1, "35 Gigabit"),
            "24xlarge": (4, 2, "200 Gigabit"),
            "48xlarge": (8, 4, "400 Gigabit"),
        },
    ),
}

CATALOG: dict[str, TypeInfo] = {
    f"{family}.{size}": TypeInfo(f"{family}.{size}", family, gpus, model, mib, efa, net)
    for family, (model, mib, sizes) in _FAMILIES.items()
    for size, (gpus, efa, net) in sizes.items()
}


def lookup(instance_type: str | None) -> TypeInfo | None:
    """The table row of `instance_type`, or None when megafleet does not know the type."""
    return CATALOG.get(instance_type or "")


def gpu_summary(instance_type: str | None) -> str:
    """`8x H100 80 GiB` (per-GPU memory), or `unknown`."""
    info = lookup(instance_type)
    if info is None:
        return "unknown"
    return f"{info.gpus}x {info.gpu_model} {info.gpu_memory_gib} GiB"


def families() -> list[str]:
    return list(_FAMILIES)
