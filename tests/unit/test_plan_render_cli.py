"""`megafleet plan` and `megafleet render` as a user or an agent runs them (separate processes)."""

from megafleet import templates
from remote_runtime.spec.flags import job_from_argv, load_job_file
from tests.conftest import run_cli, run_cli_json


def test_plan_json_shape():
    proc, out = run_cli_json(
        "plan", "--model", "qwen3-1.7b", "--gpus", "1", "--gpu-mem", "80", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    assert out["feasible"] is True and out["reason"] is None
    assert out["model"]["family"] == "qwen3" and out["model"]["source"] == "qwen3-1.7b"
    chosen = out["chosen"]
    assert chosen["parallel"]["tp"] == 1 and chosen["recompute"]["granularity"] == "none"
    assert set(chosen["memory"]["components"]) >= {
        "weights",
        "gradients",
        "optimizer_states",
        "activations",
        "logits_and_loss",
    }
    assert out["job"]["parallel"]["tensor_model_parallel_size"] == 1
    assert out["flags"][:2] == ["--max_length", "4096"]
    assert out["candidates"][0] == chosen and "assumptions" in out


def test_plan_refusal_exits_1_with_the_reason():
    proc, out = run_cli_json(
        "plan", "--model", "qwen3-8b", "--gpus", "1", "--gpu-mem", "24", "--json"
    )
    assert proc.returncode == 1
    assert out["feasible"] is False and "does not fit" in out["reason"] and out["min_gpus"] > 1
    human = run_cli("plan", "--model", "qwen3-8b", "--gpus", "1", "--gpu-mem", "24")
    assert human.returncode == 1 and "does not fit" in human.stderr and "fix:" in human.stderr


def test_plan_for_lora_dpo_points_at_the_dpo_template():
    args = ["plan", "--model", "qwen3-8b", "--gpus", "1", "--gpu-mem", "40", "--task", "rlhf"]
    proc = run_cli(*args, "--seq-len", "2048", "--lora")
    assert proc.returncode == 0, proc.stderr
    hint = " ".join(proc.stdout.split())
    assert "megafleet render dpo " in hint and "--set train_type=lora" in hint


def test_plan_refines_a_job_file(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(
        "model: qwen3-8b\ndataset: [d.jsonl]\ntrain_iters: 10\nmax_length: 2048\n"
        "tensor_model_parallel_size: 4\nglobal_batch_size: 32\n"
    )
    out_file = tmp_path / "planned.yaml"
    proc, out = run_cli_json(
        "plan", str(job), "--gpus", "2", "--gpu-mem", "141", "--json", "-o", str(out_file)
    )
    assert proc.returncode == 0, proc.stderr
    assert out["request"]["seq_len"] == 2048 and out["request"]["global_batch_size"] == 32
    assert out["current"]["valid"] is False and "TP=4" in out["current"]["reason"]  # 4 > 2 GPUs
    planned = load_job_file(out_file)
    assert "# " in out_file.read_text()  # written from the task's template, with comments
    assert planned.data.dataset == ["d.jsonl"] and planned.train.train_iters == 10
    assert planned.parallel.tensor_model_parallel_size == out["chosen"]["parallel"]["tp"]
    again = run_cli("plan", str(job), "--gpus", "2", "--gpu-mem", "141", "-o", str(out_file))
    assert again.returncode == 2 and "--yes" in again.stderr  # never overwrites silently


def test_plan_usage_errors_exit_2():
    proc = run_cli("plan", "--model", "qwen3-8b", "--gpus", "8", "--gpu-mem", "80", "--nodes", "3")
    assert proc.returncode == 2 and "does not divide" in proc.stderr
    proc, out = run_cli_json(
        "plan", "--model", "/nonexistent", "--gpus", "1", "--gpu-mem", "80", "--json"
    )
    assert proc.returncode == 2 and "not found" in out["message"]
    proc = run_cli(
        "plan",
        "--model",
        "qwen3-8b",
        "--gpus",
        "2",
        "--gpu-mem",
        "80",
        "--assume",
        "optimizer_impl=sgd",
    )
    assert proc.returncode == 2 and "optimizer_impl" in proc.stderr


def test_render_list_json():
    proc, out = run_cli_json("render", "--list", "--json")
    assert proc.returncode == 0
    by_name = {t["name"]: t for t in out["templates"]}
    assert by_name["sft-full"]["supported"] and by_name["sft-lora"]["supported"]
    assert all(t["reason"] for t in out["templates"] if not t["supported"])


def test_render_json_formats_and_output_file(tmp_path):
    target = tmp_path / "job.yaml"
    proc, out = run_cli_json(
        "render",
        "sft-full",
        "--set",
        "model=/m",
        "--set",
        "dataset=d.jsonl",
        "--set",
        "lr=2e-5",
        "--json",
        "-o",
        str(target),
    )
    assert proc.returncode == 0, proc.stderr
    assert out["missing"] == [] and out["output"] == str(target)
    assert load_job_file(target).optim.lr == 2e-5 and "# " in target.read_text()
    assert job_from_argv(out["flags"], task=out["task"]).optim.lr == 2e-5
    assert out["commands"][0]["argv"][-len(out["flags"]) :] == out["flags"]
    text = run_cli("render", "pt", "--set", "model=/m", "--format", "flags").stdout
    assert text.startswith("--model /m ")


def test_render_warns_about_missing_fields_and_refuses_bad_input():
    proc = run_cli("render", "sft-full")
    assert proc.returncode == 0 and "model: ''" in proc.stdout
    assert "model.model" in proc.stderr and "data.dataset" in proc.stderr
    proc, out = run_cli_json("render", "sft-full", "--set", "tensor_parallel_size=2", "--json")
    assert proc.returncode == 2 and "did you mean --tensor_model_parallel_size" in out["message"]
    unsupported = [t.name for t in templates.list_templates() if not t.supported]
    if not unsupported:
        return
    proc, out = run_cli_json("render", unsupported[0], "--json")
    assert proc.returncode == 2 and out["error"] == "TemplateNotSupported"
    assert "not supported yet" in out["message"] and "text" not in out  # nothing was rendered
