"""The check script's reusable functions, imported the way node setup imports them
(`envcheck.load_check_script()`): header discovery and export lines on fake venv layouts, the
driver/CUDA table, versions, arch coverage, and parsers fed with real nvidia-smi/nvcc output
from a 2×H200 machine (tests/fixtures/h200x2)."""

from __future__ import annotations

import os
import re

import pytest

from megafleet import envcheck
from tests.unit.envcheck_fakes import REPO_ROOT, make_venv, site_packages, write_nvidia_headers

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "h200x2"


@pytest.fixture(scope="module")
def cme():
    return envcheck.load_check_script()


# ------------------------------------------------------------------ headers and exports


def test_venv_headers_found_with_versions_and_exports(cme, tmp_path):
    venv = make_venv(tmp_path / "venv")
    sp = site_packages(venv)
    made = write_nvidia_headers(sp, cudnn="9.10.2", nccl="2.27.7")
    site_dirs = cme.venv_site_packages(str(venv))
    assert site_dirs == [str(sp)]
    cudnn = cme.find_library_headers("cudnn", site_dirs, environ={}, system_prefixes=())
    nccl = cme.find_library_headers("nccl", site_dirs, environ={}, system_prefixes=())
    assert (cudnn.source, cudnn.version, cudnn.root) == ("venv", "9.10.2", str(made["cudnn"]))
    assert cudnn.header == str(made["cudnn"] / "include" / "cudnn.h")
    assert cudnn.lib_dir == str(made["cudnn"] / "lib") and cudnn.libraries == ["libcudnn.so.9"]
    assert (nccl.source, nccl.version) == ("venv", "2.27.7")
    env = cme.te_build_env(
        cudnn,
        nccl,
        "/usr/local/cuda-13.0",
        max_jobs=6,
        base_env={"CPLUS_INCLUDE_PATH": "~/inc:/opt/x", "LIBRARY_PATH": ""},
    )
    home = os.path.expanduser("~")
    assert env == {
        "CUDA_HOME": "/usr/local/cuda-13.0",
        "CUDNN_PATH": str(made["cudnn"]),
        "CUDNN_HOME": str(made["cudnn"]),
        "CPLUS_INCLUDE_PATH": f"{made['cudnn']}/include:{made['nccl']}/include:{home}/inc:/opt/x",
        "LIBRARY_PATH": f"{made['cudnn']}/lib:{made['nccl']}/lib",
        "NVTE_FRAMEWORK": "pytorch",
        "MAX_JOBS": "6",
    }
    lines = cme.export_lines(env)
    assert lines[1] == f"export CUDNN_PATH={made['cudnn']}"
    assert all(re.match(r"^export [A-Z_]+=", ln) and "~" not in ln for ln in lines)


def test_cu13_style_layout_and_preference_order(cme, tmp_path):
    sp = tmp_path / "site-packages"
    # cuDNN only in an nvidia/cu13 style folder, NCCL in both the own and the cu13 folder
    write_nvidia_headers(sp, cudnn="9.13.0", nccl=None, cudnn_dir="cu13")
    write_nvidia_headers(sp, cudnn=None, nccl="2.28.3", nccl_dir="nccl")
    write_nvidia_headers(sp, cudnn=None, nccl="2.20.0", nccl_dir="cu13")
    cudnn = cme.find_library_headers("cudnn", [str(sp)], environ={}, system_prefixes=())
    nccl = cme.find_library_headers("nccl", [str(sp)], environ={}, system_prefixes=())
    assert cudnn.root == str(sp / "nvidia" / "cu13") and cudnn.version == "9.13.0"
    assert nccl.root == str(sp / "nvidia" / "nccl") and nccl.version == "2.28.3"


def test_env_var_and_system_fallbacks(cme, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_nvidia_headers(tmp_path / "lib", cudnn="8.9.7", nccl=None)  # ~/lib/nvidia/cudnn
    env = {"CUDNN_PATH": "~/lib/nvidia/cudnn"}
    found = cme.find_library_headers("cudnn", [], environ=env, system_prefixes=())
    assert found.source == "$CUDNN_PATH" and found.version == "8.9.7"
    assert found.root == str(tmp_path / "lib" / "nvidia" / "cudnn") and "~" not in found.root
    # a Debian-style system install: /usr/include/nccl.h, /usr/lib/<multiarch>/libnccl.so.2
    usr = tmp_path / "usr"
    (usr / "include").mkdir(parents=True)
    (usr / "include" / "nccl.h").write_text(
        "#define NCCL_MAJOR 2\n#define NCCL_MINOR 21\n#define NCCL_PATCH 5\n"
    )
    libdir = usr / "lib" / "x86_64-linux-gnu"
    libdir.mkdir(parents=True)
    (libdir / "libnccl.so.2").write_bytes(b"")
    nccl = cme.find_library_headers(
        "nccl",
        [str(tmp_path / "nothing")],
        environ={},
        cuda_home=str(tmp_path / "no-cuda"),
        system_prefixes=[str(usr)],
    )
    assert (nccl.source, nccl.version, nccl.root) == ("system", "2.21.5", str(usr))
    if cme.sysconfig.get_config_var("MULTIARCH") in (None, "x86_64-linux-gnu"):
        assert nccl.lib_dir == str(libdir)
    nothing = cme.find_library_headers(
        "nccl",
        [],
        environ={},
        cuda_home=str(tmp_path / "x"),
        system_prefixes=[str(tmp_path / "empty")],
    )
    if not os.path.exists("/usr/local/cuda/include/nccl.h"):  # always searched
        assert nothing is None


def test_cuda_home_ignores_a_wrapper_nvcc(cme, tmp_path):
    cuda = tmp_path / "cuda-13.0"
    (cuda / "bin").mkdir(parents=True)
    (cuda / "include").mkdir()
    (cuda / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (cuda / "include" / "cuda_runtime.h").write_text("")
    wrapper = tmp_path / "usr-local" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nexec {cuda}/bin/nvcc "$@"\n')
    home, nvcc, how = cme.find_cuda_home({"CUDA_HOME": str(cuda)}, which=lambda _: str(wrapper))
    assert (home, nvcc, how) == (str(cuda), str(cuda / "bin" / "nvcc"), "$CUDA_HOME")
    home, _, how = cme.find_cuda_home({}, which=lambda _: str(wrapper))
    assert home != str(wrapper.parent.parent)  # the wrapper's parent is no CUDA root
    os.symlink(cuda / "bin" / "nvcc", tmp_path / "nvcc-link")
    home, _, how = cme.find_cuda_home({}, which=lambda _: str(tmp_path / "nvcc-link"))
    assert (home, how) == (str(cuda), "nvcc on PATH")


def test_max_jobs_is_bounded_by_memory(cme):
    gib = 1024**3
    assert cme.recommended_max_jobs(32, 250 * gib) == 32
    assert cme.recommended_max_jobs(32, 20 * gib) == 20 // cme.BUILD_JOB_MEMORY_GIB
    assert cme.recommended_max_jobs(8, 1 * gib) == 1
    assert cme.recommended_max_jobs(None, None) == 1


# ------------------------------------------------------------------- driver and versions


@pytest.mark.parametrize(
    "driver, expected",
    [
        ("580.159.04", "13.0"),
        ("580.65.06", "13.0"),
        ("580.65.05", "12.9"),
        ("590.48.01", "13.1"),
        ("570.86.15", "12.8"),
        ("535.183.01", "12.2"),
        ("525.60.13", "12.0"),
        ("450.36.06", "11.0"),
        ("418.67", None),
        ("garbage", None),
        (None, None),
    ],
)
def test_driver_max_cuda(cme, driver, expected):
    assert cme.driver_max_cuda(driver) == expected


@pytest.mark.parametrize(
    "driver, cuda, smi_cuda, status",
    [
        ("580.159.04", "13.0", "13.0", "pass"),
        ("580.159.04", "12.8", None, "pass"),  # an older CUDA always runs on a newer driver
        ("570.86.15", "12.9", None, "warn"),  # same major: minor-version compatibility
        ("535.183.01", "13.0", None, "fail"),  # CUDA 13 needs a 580+ driver
        ("520.61.05", "12.1", None, "fail"),  # below CUDA 12's compatibility floor
        ("999.1", "13.9", "13.9", "pass"),  # newer than the table: nvidia-smi's answer wins
        (None, "13.0", None, "fail"),
        ("580.159.04", None, None, "skip"),
    ],
)
def test_cuda_driver_compat(cme, driver, cuda, smi_cuda, status):
    assert cme.cuda_driver_compat(driver, cuda, smi_cuda)[0] == status


def test_driver_table_is_ordered_and_torch_indexes(cme):
    rows = [(cme.major_minor(c), cme.release_tuple(d)) for c, d in cme.DRIVER_TABLE]
    assert rows == sorted(rows, reverse=True)  # newer CUDA needs a newer driver
    assert cme.torch_index_for_cuda("13.0") == "cu130"
    assert cme.torch_index_for_cuda("12.7") == "cu126"
    assert cme.torch_index_for_cuda("11.4") is None
    assert cme.min_driver_for_cuda("12.7") == "570.26"


@pytest.mark.parametrize(
    "version, spec, ok",
    [
        ("0.16.1", ">=0.16,<0.17", True),
        ("0.16.0", ">=0.16,<0.17", True),
        ("0.17.0", ">=0.16,<0.17", False),
        ("0.15.3", ">=0.16,<0.17", False),
        ("0.16.0rc0", ">=0.16,<0.17", False),
        ("0.16.1.dev0", ">=0.16,<0.17", True),
        ("2.8.3", "<=2.8.3", True),
        ("2.8.3.post1", "<=2.8.3", False),
        ("2.7.4.post1", "<=2.8.3", True),
        ("2.11.0+cu130", ">=2.6", True),
        ("not-a-version", ">=1", False),
    ],
)
def test_version_satisfies(cme, version, spec, ok):
    assert cme.version_satisfies(version, spec) is ok


def test_supported_versions_match_pyproject(cme):
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert re.findall(r'"megatron-core([^"]*)"', pyproject) == [cme.SUPPORTED_MEGATRON_CORE]
    runtime = re.search(r"^runtime = \[(.*?)^\]", pyproject, re.S | re.M).group(1)
    for name, spec in cme.RUNTIME_REQUIREMENTS.items():
        assert f'"{name}{spec}"' in runtime, name


@pytest.mark.parametrize(
    "arch, cap, status",
    [
        (["sm_80", "sm_90", "sm_100"], (9, 0), "pass"),
        (["sm_80"], (8, 6), "pass"),  # sm_80 cubins run on 8.6
        (["sm_90a"], (9, 0), "pass"),
        (["sm_80", "compute_80"], (9, 0), "warn"),  # PTX only: JIT
        (["sm_80", "sm_86"], (9, 0), "fail"),
        (["sm_90", "sm_100"], (12, 0), "fail"),
        ([], (9, 0), "fail"),
    ],
)
def test_arch_coverage(cme, arch, cap, status):
    assert cme.arch_coverage(arch, cap)[0] == status


def test_runtime_version_decoding(cme):
    assert cme.decode_cudnn_version(91002) == "9.10.2"
    assert cme.decode_cudnn_version(8907) == "8.9.7"
    assert cme.decode_cudnn_version(None) is None
    assert cme.decode_nccl_version((2, 27, 7)) == "2.27.7"
    assert cme.decode_nccl_version(21805) == "2.18.5"
    assert cme.decode_nccl_version(2708) == "2.7.8"


# ----------------------------------------------------------- parsers on real H200 output


def test_check_script_and_operator_parse_nvidia_smi_alike(cme):
    """The stdlib-only node script keeps its own nvidia-smi parsers; they must read the real
    captures exactly as megafleet.hostinfo does (the operator's, used by nodectl and hosts
    check)."""
    from megafleet import hostinfo

    fields = (
        "index",
        "name",
        "uuid",
        "memory.total",
        "memory.used",
        "driver_version",
        "compute_cap",
        "pci.bus_id",
        "temperature.gpu",
        "utilization.gpu",
    )
    text = (FIXTURES / "nvidia-smi-query.csv").read_text()
    ours = hostinfo.parse_gpus(text, fields)
    theirs = cme.parse_smi_csv(text, fields)
    assert len(ours) == len(theirs) == 2
    assert [{k: str(v) for k, v in row.items()} for row in ours] == theirs
    smi = (FIXTURES / "nvidia-smi.txt").read_text()
    assert hostinfo.parse_cuda_version(smi) == cme.parse_smi_header(smi)["cuda"] == "13.0"


def test_nvidia_smi_parsers_on_h200_fixtures(cme):
    fields = (
        "index",
        "name",
        "uuid",
        "memory.total",
        "memory.used",
        "driver_version",
        "compute_cap",
        "pci.bus_id",
        "temperature.gpu",
        "utilization.gpu",
    )
    rows = cme.parse_smi_csv((FIXTURES / "nvidia-smi-query.csv").read_text(), fields)
    assert [(r["index"], r["name"], r["compute_cap"], r["memory.total"]) for r in rows] == [
        ("0", "NVIDIA H200", "9.0", "143771"),
        ("1", "NVIDIA H200", "9.0", "143771"),
    ]
    with_header = cme.parse_smi_csv((FIXTURES / "nvidia-smi-query-header.csv").read_text())
    assert with_header == [
        {
            "index": str(i),
            "name": "NVIDIA H200",
            "memory.total": "143771",
            "driver_version": "580.159.04",
        }
        for i in (0, 1)
    ]
    header = cme.parse_smi_header((FIXTURES / "nvidia-smi.txt").read_text())
    assert header == {"driver": "580.159.04", "cuda": "13.0"}
    assert cme.driver_max_cuda(header["driver"]) == header["cuda"]  # table agrees with the driver
    assert cme._smi_gpu(rows[0]) == {
        "index": 0,
        "name": "NVIDIA H200",
        "capability": "9.0",
        "memory_mib": 143771,
    }
    assert cme.parse_nvcc_version((FIXTURES / "nvcc-version.txt").read_text()) == "13.0"


def test_proc_driver_version(cme):
    assert (
        cme.parse_proc_driver_version(
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  "
            "(dvs-builder@U22)  Thu Oct 2 2026\nGCC version:  gcc version 13.3.0\n"
        )
        == "580.159.04"
    )
    assert (
        cme.parse_proc_driver_version(
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 2024\n"
        )
        == "535.183.01"
    )


# ------------------------------------------------------------ TE, EFA, env, megatron path


def test_te_flash_attn_limits_from_source(cme, tmp_path):
    new = tmp_path / "te2" / "pytorch" / "attention" / "dot_product_attention"
    new.mkdir(parents=True)
    (new / "utils.py").write_text(
        'class FlashAttentionUtils:\n    version = PkgVersion("0")\n'
        '    version_required = PkgVersion("2.1.1")\n'
        '    version_required_blackwell = PkgVersion("2.7.3")\n'
        '    max_version = PkgVersion("2.8.3")\n    fa3_version = PkgVersion("0")\n'
    )
    limits = cme.te_flash_attn_limits(str(tmp_path / "te2"))
    assert (limits["min"], limits["max"], limits["min_blackwell"]) == ("2.1.1", "2.8.3", "2.7.3")
    old = tmp_path / "te1" / "pytorch"
    old.mkdir(parents=True)
    (old / "attention.py").write_text(
        '_flash_attn_version_required = PkgVersion("2.0.6")\n'
        '_flash_attn_max_version = PkgVersion("2.5.8")\n'
    )
    limits = cme.te_flash_attn_limits(str(tmp_path / "te1"))
    assert (limits["min"], limits["max"], limits["min_blackwell"]) == ("2.0.6", "2.5.8", None)
    assert cme.te_flash_attn_limits(str(tmp_path / "none"))["max"] is None


def test_efa_devices_from_sysfs(cme, tmp_path):
    sysfs = tmp_path / "infiniband"
    drivers = tmp_path / "drivers"
    for dev, driver in (("rdmap0s6", "efa"), ("mlx5_0", "mlx5_core")):
        (drivers / driver).mkdir(parents=True, exist_ok=True)
        (sysfs / dev / "device").mkdir(parents=True)
        os.symlink(drivers / driver, sysfs / dev / "device" / "driver")
    assert cme.efa_devices(str(sysfs)) == ["rdmap0s6"]
    assert cme.efa_devices(str(tmp_path / "missing")) == []


def test_reported_env_redacts_secret_names(cme):
    env = {
        "NCCL_DEBUG": "INFO",
        "NCCL_IB_AUTH_TOKEN": "s3cret",
        "FI_PROVIDER": "efa",
        "FI_EFA_API_KEY": "k",
        "PATH": "/bin",
        "AWS_SECRET_ACCESS_KEY": "nope",
    }
    assert cme.reported_env(env) == {
        "FI_EFA_API_KEY": "<redacted>",
        "FI_PROVIDER": "efa",
        "NCCL_DEBUG": "INFO",
        "NCCL_IB_AUTH_TOKEN": "<redacted>",
    }


def test_megatron_checkout_version(cme, tmp_path):
    info = tmp_path / "megatron" / "core" / "package_info.py"
    info.parent.mkdir(parents=True)
    info.write_text('MAJOR = 0\nMINOR = 16\nPATCH = 2\nPRE_RELEASE = "rc1"\n')
    assert cme.megatron_checkout_version(str(tmp_path)) == "0.16.2rc1"
    assert cme.megatron_checkout_version(str(tmp_path / "nope")) is None


def test_probe_protocol_survives_noise_and_crashes(cme):
    mark = cme.PROBE_MARK
    out = "\n".join(
        [
            "some package printed this",
            mark + '{"k": "stage", "v": "import"}',
            mark + '{"k": "done", "v": {"stage": "import", "value": null}}',
            mark + '{"k": "stage", "v": "version"}',
            mark + '{"k": "error", "v": {"stage": "version", "type": "E", "message": "m"}}',
            mark + '{"k": "stage", "v": "ext:amp_C"}',
            mark + "{broken",
        ]
    )
    result = cme.parse_probe_output(out)
    assert result.ok("import") and result.errors == {"version": "E: m"}
    assert result.crashed_in == "ext:amp_C"
    assert cme.describe_returncode(-11) == "killed by SIGSEGV"
    assert cme.describe_returncode(3) == "exited with status 3"


def test_absent_means_the_package_itself_is_missing(cme):
    def result(message, crash=None):
        return cme.ProbeResult(errors={"import": message}, crash=crash)

    assert result("ModuleNotFoundError: No module named 'megatron'").absent("megatron.core")
    assert result("ModuleNotFoundError: No module named 'megatron.core'").absent("megatron.core")
    assert not result("ModuleNotFoundError: No module named 'einops'").absent("megatron.core")
    assert not result("ImportError: libcudnn.so.9: cannot open").absent("transformer_engine")
    assert not result("", crash="killed by SIGSEGV").absent("apex")
