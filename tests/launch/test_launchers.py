"""The launchers: the exact commands their dry runs print, the SLURM batch script, the
environment each process gets (and that the trainer reads it back as the same job), failure
handling of the local launcher with real processes, and real (non-dry) runs of the SLURM and
TPU launchers against stand-in ``sbatch`` / ``gcloud`` executables."""
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import time

import pytest

from launch import common, local, slurm, tpu
from medvl_jax.parallel import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = ["--config", "configs/medsynth_sft.py", "--workdir", "/shared/runs/sft 1",
         "--config.optim.lr=1e-4"]


def _launch(module, *args, env=None, timeout=60):
    """``python -m launch.<module> ARGS`` from the repository root."""
    return subprocess.run([sys.executable, "-m", f"launch.{module}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _lines(text):
    return [line for line in text.splitlines() if line]


# ---------------------------------------------------------------------------------------------
# Local
# ---------------------------------------------------------------------------------------------

def test_local_dry_run_prints_one_command_per_process():
    out = _launch("local", "--num_processes", "2", "--devices_per_process", "2", "--port",
                  "23456", "--dry_run", "--", *TRAIN, env={"XLA_FLAGS": ""})
    assert out.returncode == 0, out.stderr
    cmd = (f"{sys.executable} -m medvl_jax.train --config configs/medsynth_sft.py "
           f"--workdir '/shared/runs/sft 1' --config.optim.lr=1e-4")
    assert _lines(out.stdout) == [
        f"JAX_COORDINATOR_ADDRESS=127.0.0.1:23456 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID={i} "
        f"JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 "
        f"JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo {cmd}" for i in range(2)]


def test_local_process_env_replaces_the_device_count_and_splits_gpus():
    env = local.process_env(1, 2, 999, devices_per_process=2,
                            base_xla_flags="--xla_cpu_foo=1 --xla_force_host_platform_device_count=8")
    assert env["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=2"
    gpu = [local.process_env(i, 2, 999, platform="gpu", devices_per_process=4) for i in range(2)]
    assert [g["JAX_LOCAL_DEVICE_IDS"] for g in gpu] == ["0,1,2,3", "4,5,6,7"]
    assert all("JAX_PLATFORMS" not in g and "XLA_FLAGS" not in g for g in gpu)
    with pytest.raises(ValueError, match="process_id 2 is not in"):
        local.process_env(2, 2, 999)
    with pytest.raises(ValueError, match="platform"):
        local.process_env(0, 2, 999, platform="tpu")


def test_local_needs_train_args():
    out = _launch("local", "--num_processes", "2")
    assert out.returncode == 2 and "after '--'" in out.stderr


def test_local_streams_prefixed_output_and_passes_the_job_environment():
    out = _launch("local", "--num_processes", "3", "--devices_per_process", "2",
                  "--module", "tests.launch.rank_script", "--", "--sleep", "0")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = _lines(out.stdout)
    for rank in range(3):
        mine = [line for line in lines if line.startswith(f"[{rank}] ")]
        assert mine[-1] == f"[{rank}] done"
        assert f"JAX_PROCESS_ID={rank} " in mine[0]
        assert "JAX_NUM_PROCESSES=3 " in mine[0] and "JAX_PLATFORMS=cpu " in mine[0]
        assert "XLA_FLAGS=--xla_force_host_platform_device_count=2 " in mine[0]
        assert "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo" in mine[0]
    addresses = {line.split("JAX_COORDINATOR_ADDRESS=")[1].split()[0]
                 for line in lines if "JAX_COORDINATOR_ADDRESS=" in line}
    assert len(addresses) == 1 and addresses.pop().startswith("127.0.0.1:")


def test_local_failure_kills_the_other_processes_and_returns_its_code():
    start = time.monotonic()
    out = _launch("local", "--num_processes", "2", "--module", "tests.launch.rank_script",
                  "--", "--fail_rank", "1", "--code", "3", "--sleep", "120")
    assert out.returncode == 3, out.stdout + out.stderr
    assert time.monotonic() - start < 60  # Process 0 was killed, not waited for.
    assert "[1] failing" in out.stdout
    assert "[launch] process 1 exited with code 3; killing processes [0]" in out.stdout
    assert "[0] done" not in out.stdout


# ---------------------------------------------------------------------------------------------
# SLURM
# ---------------------------------------------------------------------------------------------

def test_slurm_dry_run_prints_the_script_and_the_sbatch_command(tmp_path):
    path = tmp_path / "sft.sbatch"
    out = _launch("slurm", "--nodes", "2", "--gpus_per_node", "8", "--partition", "gpu",
                  "--account", "proj1", "--time", "24:00:00", "--cpus_per_task", "12",
                  "--setup", "source ~/venvs/medvl/bin/activate", "--env",
                  "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "--sbatch_arg=--qos=high",
                  "--chdir", "/home/me/medvl_jax", "--script", str(path),
                  "--dry_run", "--", *TRAIN)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"""\
# sbatch script ({path}):
#!/bin/bash
#SBATCH --job-name=medvl_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --partition=gpu
#SBATCH --account=proj1
#SBATCH --requeue
#SBATCH --signal=TERM@120
#SBATCH --output=medvl_jax-%j.out
#SBATCH --qos=high

set -eo pipefail
cd /home/me/medvl_jax
source ~/venvs/medvl/bin/activate
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
export PYTHONUNBUFFERED=1

srun --kill-on-bad-exit=1 --cpus-per-task=12 python3 -m medvl_jax.train --config \
configs/medsynth_sft.py --workdir '/shared/runs/sft 1' --config.optim.lr=1e-4 && status=0 || \
status=$?
if [ "$status" -eq 75 ]; then  # Preempted: saved, start again.
  echo "exit status 75: requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
# submit:
sbatch {path}
"""
    assert not path.exists()  # A dry run writes nothing.


def test_slurm_one_process_per_node_sees_all_gpus_of_its_node():
    script = slurm.sbatch_script(nodes=4, gpus_per_node=4, processes="per_node",
                                 train_cmd=["python3", "-m", "medvl_jax.train", "--config", "c"],
                                 chdir="/repo", requeue=False)
    assert "#SBATCH --nodes=4\n#SBATCH --ntasks-per-node=1\n#SBATCH --gpus-per-node=4\n" \
        in script
    assert "\nexport JAX_LOCAL_DEVICE_IDS=0,1,2,3\n" in script
    assert script.endswith("\nsrun --kill-on-bad-exit=1 python3 -m medvl_jax.train --config c\n")
    assert "--requeue" not in script and "--signal" not in script


def test_slurm_script_requeues_a_preempted_run(tmp_path):
    """The script's requeue logic, run by bash with srun and scontrol stubbed: exit status 75
    requeues the job, any other status is passed on without requeueing."""
    script = slurm.sbatch_script(nodes=1, gpus_per_node=1, processes="per_gpu",
                                 train_cmd=["train"], chdir=str(tmp_path), time="10:00")
    assert "#SBATCH --requeue\n#SBATCH --signal=TERM@120\n" in script
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nexit "$SRUN_STATUS"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho "scontrol $*" >> "$LOG"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    (tmp_path / "job.sh").write_text(script)
    for status, requeued in ((75, True), (1, False), (0, False)):
        log = tmp_path / f"log{status}"
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42",
               "SRUN_STATUS": str(status), "LOG": str(log)}
        out = subprocess.run(["bash", str(tmp_path / "job.sh")], env=env, capture_output=True,
                             text=True)
        assert out.returncode == status
        assert (log.read_text() == "scontrol requeue 42\n") if requeued else not log.exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(processes="per_rank"), "processes must be"),
    (dict(time="one day"), "not a SLURM time limit"),
    (dict(env=["1X=2"]), "must be NAME=value"),
    (dict(sbatch_args=["qos=high"]), "must start with '--'"),
    (dict(nodes=0), "must be >= 1"),
])
def test_slurm_rejects_bad_options(kwargs, message):
    args = dict(nodes=1, gpus_per_node=8, processes="per_gpu", train_cmd=["x"], chdir="/r")
    with pytest.raises(ValueError, match=message):
        slurm.sbatch_script(**{**args, **kwargs})


def _stand_in(directory, name, body):
    """An executable ``name`` in ``directory`` that logs its arguments, then runs ``body``."""
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nprintf "%s\\n" "{name} $*" >> "{directory}/calls.log"\n{body}\n')
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def test_slurm_writes_the_script_and_submits_it(tmp_path):
    _stand_in(str(tmp_path), "sbatch", 'echo "Submitted batch job 42"')
    script = tmp_path / "job.sbatch"
    out = _launch("slurm", "--nodes", "2", "--gpus_per_node", "4", "--script", str(script),
                  "--", *TRAIN, env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert out.returncode == 0, out.stderr
    assert "Submitted batch job 42" in out.stdout
    assert (tmp_path / "calls.log").read_text() == f"sbatch {script}\n"
    text = script.read_text()
    assert text.startswith("#!/bin/bash\n#SBATCH --job-name=medvl_jax\n#SBATCH --nodes=2\n"
                           "#SBATCH --ntasks-per-node=4\n#SBATCH --gpus-per-node=4\n")
    assert f"\ncd {ROOT}\n" in text


# ---------------------------------------------------------------------------------------------
# TPU
# ---------------------------------------------------------------------------------------------

def test_tpu_dry_run_queued_resource_all_steps():
    out = _launch("tpu", "--name", "medvl-v4", "--zone", "us-central2-b", "--accelerator_type",
                  "v4-32", "--project", "my-proj", "--queued", "--spot", "--steps",
                  "create,copy,install,run,delete", "--dry_run", "--", *TRAIN)
    assert out.returncode == 0, out.stderr
    tail = "--zone=us-central2-b --project=my-proj"
    tarball = os.path.join(tempfile.gettempdir(), "medvl-v4-medvl_jax.tar.gz")
    assert _lines(out.stdout) == [
        "# create v4-32 (tpu-ubuntu2204-base)",
        f"gcloud compute tpus queued-resources create medvl-v4 {tail} --node-id=medvl-v4 "
        f"--accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base --spot",
        "# wait: polled every 30 s until the state is ACTIVE",
        f"gcloud compute tpus queued-resources describe medvl-v4 {tail} "
        f"--format 'value(state.state)'",
        f"# copy: pack the files git tracks or would track in {ROOT} into {tarball}",
        f"gcloud compute tpus tpu-vm scp {tarball} medvl-v4:medvl_jax.tar.gz {tail} "
        f"--worker=all",
        f"gcloud compute tpus tpu-vm ssh medvl-v4 {tail} --worker=all --command 'rm -rf "
        f"~/medvl_jax && mkdir -p ~/medvl_jax && tar -xzf ~/medvl_jax.tar.gz -C ~/medvl_jax'",
        "# install on every worker",
        f"gcloud compute tpus tpu-vm ssh medvl-v4 {tail} --worker=all --command 'cd "
        f"~/medvl_jax && python3 -m pip install -q -e \".[tpu]\"'",
        "# run on every worker",
        f"gcloud compute tpus tpu-vm ssh medvl-v4 {tail} --worker=all --command 'cd "
        f"~/medvl_jax && export MEDVL_JAX_DISTRIBUTED=1 && python3 -m medvl_jax.train "
        f"--config configs/medsynth_sft.py --workdir '\"'\"'/shared/runs/sft 1'\"'\"' "
        f"--config.optim.lr=1e-4'",
        "# delete",
        f"gcloud compute tpus queued-resources delete medvl-v4 {tail} --force --quiet",
    ]


def test_tpu_dry_run_tpu_vm_with_git_checkout_detached():
    out = _launch("tpu", "--name", "t1", "--zone", "europe-west4-b", "--accelerator_type",
                  "v5litepod-16", "--git_url", "https://example.org/medvl_jax.git", "--git_ref",
                  "abc123", "--detach", "--steps", "create,copy,run,delete", "--dry_run", "--",
                  "--config", "c.py", "--workdir", "/w")
    assert out.returncode == 0, out.stderr
    commands = [line for line in _lines(out.stdout) if not line.startswith("#")]
    assert commands == [
        "gcloud compute tpus tpu-vm create t1 --zone=europe-west4-b "
        "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite",
        "gcloud compute tpus tpu-vm ssh t1 --zone=europe-west4-b --worker=all --command 'rm -rf "
        "~/medvl_jax && git clone -q https://example.org/medvl_jax.git ~/medvl_jax && "
        "git -C ~/medvl_jax checkout -q abc123'",
        "gcloud compute tpus tpu-vm ssh t1 --zone=europe-west4-b --worker=all --command 'cd "
        "~/medvl_jax && export MEDVL_JAX_DISTRIBUTED=1 && nohup python3 -m medvl_jax.train "
        "--config c.py --workdir /w > ~/medvl_jax_train.log 2>&1 < /dev/null &'",
        "gcloud compute tpus tpu-vm delete t1 --zone=europe-west4-b --quiet",
    ]


def test_tpu_runtime_versions_and_bad_arguments():
    assert tpu.default_runtime_version("v4-32") == "tpu-ubuntu2204-base"
    assert tpu.default_runtime_version("v5litepod-16") == "v2-alpha-tpuv5-lite"
    assert tpu.default_runtime_version("v5p-128") == "v2-alpha-tpuv5"
    assert tpu.default_runtime_version("v6e-64") == "v2-alpha-tpuv6e"
    with pytest.raises(ValueError, match="pass --runtime_version"):
        tpu.default_runtime_version("v9x-8")
    out = _launch("tpu", "--name", "t", "--zone", "z", "--steps", "create,train", "--dry_run")
    assert out.returncode == 2 and "unknown step(s) ['train']" in out.stderr
    out = _launch("tpu", "--name", "t", "--zone", "z", "--dry_run")  # 'run' needs train args.
    assert out.returncode == 2 and "after '--'" in out.stderr
    out = _launch("tpu", "--name", "t", "--zone", "z", "--steps", "delete", "--dry_run")
    assert out.returncode == 0 and _lines(out.stdout)[-1] == \
        "gcloud compute tpus tpu-vm delete t --zone=z --quiet"


def test_tpu_real_run_packs_the_working_tree_and_calls_gcloud(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    for name, text in {"pyproject.toml": "x", "pkg/a.py": "a", "gone.py": "g",
                       ".gitignore": "*.log\n", "new.py": "n", "run.log": "ignored"}.items():
        (repo / name).write_text(text)
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "pyproject.toml", "pkg/a.py", "gone.py", ".gitignore"],
                   check=True)
    subprocess.run(git + ["commit", "-q", "-m", "x"], check=True)
    (repo / "gone.py").unlink()  # Deleted but still tracked: left out.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # describe says PROVISIONING once, then ACTIVE.
    _stand_in(str(bin_dir), "gcloud", f"""\
case "$*" in *describe*)
  if [ -f "{bin_dir}/seen" ]; then echo ACTIVE; else touch "{bin_dir}/seen"; echo PROVISIONING; fi;;
esac""")
    out = _launch("tpu", "--name", "qr1", "--zone", "z", "--accelerator_type", "v4-16",
                  "--queued", "--poll_s", "0.1", "--repo", str(repo), "--", "--config", "c.py",
                  "--workdir", "/w", env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "# queued resource qr1: PROVISIONING" in out.stdout
    assert "# queued resource qr1: ACTIVE" in out.stdout
    calls = (bin_dir / "calls.log").read_text().splitlines()
    tarball = os.path.join(tempfile.gettempdir(), "qr1-medvl_jax.tar.gz")
    assert [c.split()[3:5] for c in calls] == [
        ["queued-resources", "create"], ["queued-resources", "describe"],
        ["queued-resources", "describe"], ["tpu-vm", "scp"], ["tpu-vm", "ssh"],
        ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]
    assert calls[3] == f"gcloud compute tpus tpu-vm scp {tarball} qr1:medvl_jax.tar.gz --zone=z " \
                       f"--worker=all"
    assert calls[-1].endswith("--command cd ~/medvl_jax && export MEDVL_JAX_DISTRIBUTED=1 && "
                              "python3 -m medvl_jax.train --config c.py --workdir /w")
    with tarfile.open(tarball) as tar:
        assert sorted(tar.getnames()) == [".gitignore", "new.py", "pkg/a.py", "pyproject.toml"]
    os.remove(tarball)


def test_tpu_requeue_starts_a_preempted_run_again(tmp_path):
    # The run step exits 75 (preempted, saved) twice, then succeeds.
    _stand_in(str(tmp_path), "gcloud", f"""\
case "$*" in *ssh*)
  n=$(cat "{tmp_path}/n" 2>/dev/null || echo 0); echo $((n + 1)) > "{tmp_path}/n"
  if [ "$n" -lt 2 ]; then exit 75; fi;;
esac""")
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}"}
    args = ["tpu", "--name", "t", "--zone", "z", "--steps", "run", "--requeue", "2", "--",
            "--config", "c.py", "--workdir", "/w"]
    out = _launch(*args, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("starting the run again") == 2
    (tmp_path / "n").unlink()
    out = _launch(*[a if a != "2" else "1" for a in args], env=env)  # One requeue is too few.
    assert out.returncode == 75 and out.stdout.count("starting the run again") == 1


def test_tpu_stops_at_a_failing_step_and_says_how_to_delete(tmp_path):
    _stand_in(str(tmp_path), "gcloud", 'case "$*" in *ssh*) exit 5;; esac')
    out = _launch("tpu", "--name", "t", "--zone", "z", "--steps", "install,run,delete", "--",
                  "--config", "c.py", "--workdir", "/w",
                  env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert out.returncode == 5
    assert len((tmp_path / "calls.log").read_text().splitlines()) == 1  # Stopped at install.
    assert "the TPU is kept; delete it with: gcloud compute tpus tpu-vm delete t --zone=z " \
           "--quiet" in out.stderr


@pytest.mark.parametrize("accelerator,topology", [
    ("v5litepod-16", "v5e:4x4"), ("v5e-4", "v5e:2x2"), ("v6e-64", "v6e:8x8"),
    ("v4-32", "v4:2x2x4"), ("v5p-8", "v5p:2x2x1"), ("v5p-128", "v5p:4x4x4")])
def test_tpu_plan_topology_of_an_accelerator_type(accelerator, topology):
    from launch import tpu

    assert tpu.topology_for(accelerator) == topology


def test_tpu_plan_runs_first_and_a_failed_plan_creates_nothing(tmp_path):
    from launch import tpu

    assert tpu.plan_command("v5p-16", ["--config", "c.py", "--workdir", "/w",
                                       "--config.optim.lr=1e-4"])[1:] == [
        "-m", "medvl_jax.plan", "--topology", "v5p:2x2x2", "--config", "c.py",
        "--config.optim.lr=1e-4"]
    _stand_in(str(tmp_path), "gcloud", "")
    out = _launch("tpu", "--name", "t", "--zone", "z", "--accelerator_type", "v5p-16",
                  "--plan", "--", "--config", str(tmp_path / "missing.py"), "--workdir", "/w",
                  env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "# plan v5p-16 here before creating it" in out.stdout
    assert "missing.py" in out.stderr
    assert not (tmp_path / "calls.log").exists()  # No gcloud call: nothing created.


# ---------------------------------------------------------------------------------------------
# What the trainer makes of the environment (medvl_jax.parallel.mesh.distributed_init_args)
# ---------------------------------------------------------------------------------------------

def test_the_trainer_reads_the_local_launchers_environment_back():
    for i in range(2):
        env = local.process_env(i, 2, 4321, devices_per_process=2)
        assert mesh_lib.distributed_init_args(env) == {
            "coordinator_address": "127.0.0.1:4321", "num_processes": 2, "process_id": i}
    env = local.process_env(1, 2, 4321, platform="gpu", devices_per_process=2)
    assert mesh_lib.distributed_init_args(env)["local_device_ids"] == [2, 3]


SLURM_STEP = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_PROCID": "3",
              "SLURM_LOCALID": "3", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16"}


@pytest.mark.parametrize("env, want", [
    ({}, None),
    ({"JAX_NUM_PROCESSES": "2"}, None),  # No coordinator: nothing to join.
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}, None),
    # The batch script of a 16-task job (no srun step yet) is one process.
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "16", "SLURM_PROCID": "0"}, None),
    (SLURM_STEP, {"cluster_detection_method": "slurm"}),
    ({**SLURM_STEP, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}, None),
    ({**SLURM_STEP, "JAX_LOCAL_DEVICE_IDS": "0,1,2,3,4,5,6,7"},
     {"cluster_detection_method": "slurm", "local_device_ids": list(range(8))}),
    ({**SLURM_STEP, "MEDVL_JAX_DISTRIBUTED": "0"}, None),
    ({"MEDVL_JAX_DISTRIBUTED": "1"}, {}),  # TPU pod launcher: JAX detects the rest.
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, None),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"}, {}),
])
def test_distributed_init_args_from_the_environment(env, want):
    assert mesh_lib.distributed_init_args(env) == want


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES is not"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     r"JAX_PROCESS_ID=2 is not in \[0, JAX_NUM_PROCESSES=2\)"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two' is not an integer"),
    ({"MEDVL_JAX_DISTRIBUTED": "maybe"}, "use 1"),
    ({"MEDVL_JAX_DISTRIBUTED": "1", "JAX_LOCAL_DEVICE_IDS": "0;1"}, "JAX_LOCAL_DEVICE_IDS"),
])
def test_distributed_init_args_errors_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        mesh_lib.distributed_init_args(env)


def test_launchers_import_neither_jax_nor_medvl_jax():
    code = ("import sys, launch.local, launch.slurm, launch.tpu; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'medvl_jax')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert common.join(["a b", "c"]) == "'a b' c"
