"""Job templates: render, load back unchanged, --set handling, refusal of unsupported jobs."""

import shlex

import pytest

from megafleet import templates
from megafleet.errors import UsageError
from remote_runtime.spec.config import ConfigError, JobConfig
from remote_runtime.spec.flags import job_from_argv, load_job_file

SUPPORTED = [t.name for t in templates.list_templates() if t.supported]
UNSUPPORTED = [t.name for t in templates.list_templates() if not t.supported]
SETS = [
    "model=/data/Qwen3-1.7B",
    "dataset=a.jsonl,b.jsonl#50",
    "optim.lr=2e-5",
    "tensor_model_parallel_size=2",
    "sequence_parallel=true",
    "adam_beta2=0.98",
    "system=Be brief: answer in one line #1",
    "hosts=[gpu0, gpu1]",
    "nproc_per_node=8",
]


def round_trip(tmp_path, name, sets):
    t = templates.get_template(name)
    job = templates.job_from_template(t, sets)
    path = tmp_path / f"{name}.yaml"
    path.write_text(templates.render(t, job))
    return job, load_job_file(path), path.read_text()


def test_the_expected_templates_are_shipped():
    assert {"sft-full", "pt", "sft-lora", "dpo", "sft-moe"} <= set(SUPPORTED)


@pytest.mark.parametrize("name", SUPPORTED)
@pytest.mark.parametrize("sets", [[], SETS], ids=["defaults", "with-set"])
def test_template_renders_and_loads_back_unchanged(tmp_path, name, sets):
    job, loaded, text = round_trip(tmp_path, name, sets)
    assert loaded == job
    assert "# " in text and "{{" not in text and "{#" not in text  # comments kept, no jinja left


@pytest.mark.parametrize("name", SUPPORTED)
def test_template_defaults_are_valid_once_model_and_data_are_set(name):
    job = templates.job_from_template(templates.get_template(name), ["model=/m", "dataset=d.jsonl"])
    assert templates.check_job(job) == ([], [])
    missing, _ = templates.check_job(templates.job_from_template(templates.get_template(name)))
    assert set(missing) == {"model.model", "data.dataset"}


def test_the_dpo_template_offers_lora(tmp_path):
    sets = ["model=/m", "dataset=p.jsonl", "train_type=lora", "lora_rank=16", "merge_lora=true"]
    job, loaded, text = round_trip(tmp_path, "dpo", sets)
    assert loaded == job and (job.task, job.tuner.train_type) == ("rlhf", "lora")
    assert "\n  train_type: lora  #" in text and "\n  lora_rank: 16  #" in text
    assert templates.check_job(job) == ([], [])


def test_values_outside_the_template_are_appended_as_flat_keys(tmp_path):
    job, loaded, text = round_trip(tmp_path, "sft-full", ["model=/m", "adam_beta2=0.98"])
    assert "\nadam_beta2: 0.98\n" in text and loaded.optim.adam_beta2 == 0.98
    assert "adam_beta1" not in text  # unchanged fields are not repeated


def test_set_accepts_leaf_and_dotted_names_and_lists():
    t = templates.get_template("sft-full")
    job = templates.job_from_template(
        t, ["optim.lr=3e-5", "max_length=8192", "data.dataset=[x.jsonl, y.jsonl]", "task=pt"]
    )
    assert (job.optim.lr, job.data.max_length, job.task) == (3e-5, 8192, "pt")
    assert job.data.dataset == ["x.jsonl", "y.jsonl"]


@pytest.mark.parametrize(
    "item,field,needle",
    [
        (
            "tensor_parallel_size=2",
            "tensor_parallel_size",
            "did you mean --tensor_model_parallel_size",
        ),
        ("lora_rank=eight", "tuner.lora_rank", "not an integer"),
        ("optim.max_length=10", "optim.max_length", "data.max_length"),
        ("lr", "lr", "key=value"),
        ("lr=fast", "optim.lr", "not a number"),
        ("micro_batch_size=1.5", "train.micro_batch_size", "not an integer"),
    ],
)
def test_bad_set_items_name_the_field(item, field, needle):
    with pytest.raises(ConfigError) as e:
        templates.job_from_template(templates.get_template("sft-full"), [item])
    problems = {p.field: p.message for p in e.value.problems}
    assert field in problems and needle in problems[field]


def test_invalid_values_are_reported_by_check_job():
    job = templates.job_from_template(
        templates.get_template("sft-full"), ["model=/m", "dataset=d", "lr_decay_style=step"]
    )
    missing, invalid = templates.check_job(job)
    assert not missing and invalid[0][0] == "optim.lr_decay_style"


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_templates_are_refused_with_the_reason(name):
    t = templates.get_template(name)
    with pytest.raises(templates.TemplateNotSupported) as e:
        templates.job_from_template(t, ["model=/m"])
    assert "not supported yet" in e.value.message and t.reason in e.value.message


@pytest.mark.parametrize("name", SUPPORTED)
def test_flags_and_command_round_trip_through_job_from_argv(name):
    t = templates.get_template(name)
    job = templates.job_from_template(t, SETS)
    flags = shlex.split(templates.render(t, job, "flags"))
    again = job_from_argv(flags, task=job.task)
    again.launch = job.launch  # the runtime never sees the launch group
    assert again == job
    commands = templates.render(t, job, "command")
    lines = [line for line in commands.splitlines() if not line.startswith("#")]
    assert len(lines) == 2  # one per host
    for rank, line in enumerate(lines):
        argv = shlex.split(line)
        assert argv[0] == "megafleet/venv/bin/torchrun"
        assert argv[argv.index("--node_rank") + 1] == str(rank)
        assert argv[argv.index("--master_addr") + 1] == "gpu0"
        assert argv[argv.index("--nproc_per_node") + 1] == "8"
        m = argv.index("-m")
        assert argv[m + 1 : m + 3] == ["remote_runtime", job.task]
        from_cmd = job_from_argv(argv[m + 3 :], task=argv[m + 2])
        from_cmd.launch = job.launch
        assert from_cmd == job


def test_single_node_command_is_standalone():
    t = templates.get_template("pt")
    job = templates.job_from_template(t, ["model=/m", "dataset=c.jsonl"])
    (cmd,) = templates.torchrun_commands(job)
    assert cmd["argv"][1:6] == ["--standalone", "--nnodes", "1", "--nproc_per_node", "gpu"]
    assert cmd["argv"][6:9] == ["-m", "remote_runtime", "pt"]


def test_a_plain_job_file_renders_as_a_template(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("task: sft\nmodel: /m\ndataset: [d.jsonl]\ntrain_iters: 5\n")
    t = templates.get_template(str(path))
    assert t.is_job_file
    job = templates.job_from_template(t, ["lr=4e-5"])
    out = tmp_path / "out.yaml"
    out.write_text(templates.render(t, job))
    assert load_job_file(out) == job and job.optim.lr == 4e-5


def test_a_template_naming_a_missing_field_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "{#- template\nsummary: x\ndefaults: {}\n-#}\noptim:\n  lr: {{ optim.learning_rate | y }}\n"
    )
    t = templates.get_template(str(path))
    with pytest.raises(UsageError) as e:
        templates.render(t, JobConfig())
    assert "optim.learning_rate" in e.value.message


def test_unknown_template_lists_the_known_ones():
    with pytest.raises(UsageError) as e:
        templates.get_template("sft-ful")
    assert "sft-full" in e.value.message


@pytest.mark.parametrize(
    "value",
    [
        "x",
        "",
        None,
        True,
        1e-5,
        3,
        [],
        ["a#1", "b c"],
        "a: b",
        "1e3",
        "null",
        "line\nbreak",
        "ends...",
    ],
)
def test_yaml_value_loads_back(value):
    import yaml

    assert yaml.safe_load(f"k: {templates.yaml_value(value)}  # comment") == {"k": value}


@pytest.mark.parametrize("task", ["sft", "pt"])
def test_any_job_gets_a_commented_file_from_its_tasks_template(tmp_path, task):
    job = JobConfig(task=task)
    job.model.model, job.data.dataset, job.train.train_iters = "/m", ["d.jsonl"], 7
    job.optim.adam_eps = 1e-6  # not in the template: appended
    path = tmp_path / "job.yaml"
    path.write_text(templates.job_file_text(job))
    assert load_job_file(path) == job
    assert "# " in path.read_text() and "adam_eps: 1.0e-06" in path.read_text()
