"""A real two-node SLURM cluster on this machine (slurmctld + two slurmd as nodes n1, n2, munge authentication),
running `slurm/pretrain.sbatch` as a user would: 2 nodes x 1 task, requeue, cancel, resume.

The cluster lives in a temporary directory with its own slurm.conf (SLURM_CONF) and is shut down by a finalizer.
The daemons need root and Debian's slurmctld, slurmd, slurm-client and munge packages (`.ci/run` installs them);
without them the tests skip and say so.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 64
BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "munged", "munge")

SLURM_CONF = """\
ClusterName=local
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MinJobAge=600
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={port1} CPUs=1 RealMemory=4000
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={port2} CPUs=1 RealMemory=4000
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _munge_works() -> bool:
    munge = subprocess.run(["munge", "-n"], capture_output=True)
    if munge.returncode != 0:
        return False
    return subprocess.run(["unmunge"], input=munge.stdout, capture_output=True).returncode == 0


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}

    def run(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}\n{self.logs()}")
        return result.stdout

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*.log")))

    def submit(self, *args: str, env: dict[str, str] | None = None) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {self.job(job_id)}\n{self.logs()}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(f"SLURM test cluster unavailable: {', '.join(missing)} not installed (Debian packages slurmctld "
                    "slurmd slurm-client munge; `.ci/run` installs them)")
    if os.geteuid() != 0:
        pytest.skip("SLURM test cluster unavailable: starting slurmctld/slurmd/munged needs root")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    host = socket.gethostname()
    (root / "slurm.conf").write_text(SLURM_CONF.format(host=host, d=root, ctld_port=_free_port(),
                                                       port1=_free_port(), port2=_free_port()))
    c = Cluster(root)
    started_munged = None
    if not _munge_works():
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        started_munged = Path("/run/munge/munged.pid")

    def stop():
        subprocess.run(["scontrol", "shutdown"], env=c.env, capture_output=True, timeout=60)
        for pid_file in [root / "slurmctld.pid", root / "slurmd-n1.pid", root / "slurmd-n2.pid"]:
            deadline = time.time() + 20
            while pid_file.exists() and time.time() < deadline and _alive(pid_file):
                time.sleep(0.2)
        if started_munged is not None and started_munged.exists():
            os.kill(int(started_munged.read_text().strip()), 15)

    request.addfinalizer(stop)
    c.run("slurmctld")
    c.run("slurmd", "-N", "n1")
    c.run("slurmd", "-N", "n2")
    deadline = time.time() + 60
    while "idle 2" not in c.run("sinfo", "-h", "-o", "%T %D", check=False):
        assert time.time() < deadline, f"the nodes did not come up\n{c.logs()}"
        time.sleep(0.2)
    return c


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


def job_args(run_dir: Path, shards: Path, strategy: str, steps: int) -> list[str]:
    return ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=30",
            f"--output={run_dir}.slurm.out", str(REPO / "slurm" / "pretrain.sbatch"),
            "+experiment=quickstart", f"strategy={strategy}", f"data.path={shards}", f"output_dir={run_dir}",
            f"trainer.max_steps={steps}", "trainer.accelerator=cpu", "trainer.log_every_n_steps=1",
            "checkpoint_every_n_steps=5", "data.batch_size=8", "data.num_workers=0", "model.vocab_size=1024",
            f"model.max_position_embeddings={SEQ_LEN}", "model.position_buckets=16", "optim.warmup_steps=5"]


JOB_ENV = {"MASTER_ADDR": "127.0.0.1", "PYTHON": sys.executable, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def job_log(run_dir: Path) -> str:
    """A job's output file. A task killed by scancel/requeue can stop in the middle of a progress-bar character, so
    the file need not be valid UTF-8 where a killed run ends; the lines the test looks for are whole."""
    return Path(f"{run_dir}.slurm.out").read_text(encoding="utf-8", errors="replace")


def wait_for(path: Path, job_id: str, cluster: Cluster, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        state = cluster.job(job_id).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job_id} is {state} before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.1)


def logged_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_requeue_resumes_and_cancel_leaves_a_resumable_run(cluster, shards, tmp_path):
    # 1. a 2-node DeepSpeed ZeRO-2 job trains and checkpoints; requeue it
    requeued = tmp_path / "requeued"
    job = cluster.submit(*job_args(requeued, shards, "deepspeed_zero2", 60), env=JOB_ENV)
    info = cluster.wait_state(job, {"RUNNING"}, timeout=120)
    assert info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]"
    wait_for(requeued / "checkpoints" / "last.ckpt", job, cluster)
    cluster.run("scontrol", "requeue", job)
    assert cluster.wait_state(job, {"PENDING"}, timeout=60)["Restarts"] == "1"

    # 2. meanwhile (a requeued job waits ~120 s before it may start again) a DDP job is cancelled mid-run ...
    cancelled = tmp_path / "cancelled"
    args = job_args(cancelled, shards, "ddp", 30)
    second = cluster.submit(*args, env=JOB_ENV)
    wait_for(cancelled / "checkpoints" / "step-00000005.ckpt", second, cluster)
    cluster.run("scancel", second)
    cluster.wait_state(second, {"CANCELLED"}, timeout=60)
    # ... and a new job with the same output_dir continues it to the end
    third = cluster.submit(*args, env=JOB_ENV)
    assert cluster.wait_state(third, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=300)["JobState"] == "COMPLETED", \
        (job_log(cancelled)[-5000:])
    log = job_log(cancelled)
    # last.ckpt, or the step-N file beside it when the cancel came between the two writes
    assert re.search(rf"resuming from {re.escape(str(cancelled))}/checkpoints/(last|step-\d+)\.ckpt", log)
    assert sorted(set(logged_steps(cancelled))) == list(range(1, 31)) and len(logged_steps(cancelled)) == 30
    assert (cancelled / "hf" / "config.json").is_file()

    # 3. the requeued job starts again through the scheduler, resumes from its checkpoint and finishes. SLURM holds
    # a requeued job back (BeginTime about 120 s after the requeue); moving its begin time to now skips only that
    # wait: the job still runs as restart 1 of the same job id, with the same script and output_dir.
    if cluster.job(job).get("JobState") == "PENDING":  # (on a slow machine it may have started already)
        cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
    info = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=400)
    log = job_log(requeued)  # --open-mode=append: both runs in one file
    assert info["JobState"] == "COMPLETED", log[-5000:]
    assert "(restart 1)" in log
    assert re.search(rf"resuming from {re.escape(str(requeued))}/checkpoints/(last|step-\d+)\.ckpt", log)
    steps = logged_steps(requeued)
    assert sorted(set(steps)) == list(range(1, 61)) and len(steps) == 60  # each step once: rows past the checkpoint
    assert (requeued / "hf" / "config.json").is_file() and (requeued / "hf_generator").is_dir() is False
