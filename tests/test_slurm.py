"""The Slurm launch scripts on a real Slurm on this machine: the set-up installs slurm-wlm and munge
when missing, starts private munged, slurmctld and two slurmd (own config, ports, sockets and state
under a temp dir), and stops them after. The two slurmd are two Slurm nodes on one host, each in
its own network namespace with its own address (tests/netns.py; slurmctld, munged and the test's
Slurm commands stay in the machine's namespace, joined to the nodes' bridge at 198.18.0.254), so
the sbatch script's multi-node path (Ray workers started by srun, the driver on the head's
address) runs across addresses for real. The hostname resolves to an address neither node holds,
so the head's address comes from OEL_RAY_HEAD_IP, as the sbatch script documents. Skips only where
root or apt-get are missing, saying which."""

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from netns import HOST_IP, enter, namespaces

from oel_ray.netif import free_port

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm" / "oel_ray.sbatch"
DAEMONS = ("sbatch", "slurmctld", "slurmd", "munged")

pytestmark = pytest.mark.e2e


def install_slurm() -> None:
    if all(shutil.which(tool) for tool in DAEMONS):
        return
    if os.geteuid() != 0:
        pytest.skip("needs root to install slurm-wlm and munge")
    if not shutil.which("apt-get"):
        pytest.skip("needs apt-get to install slurm-wlm and munge")
    install = ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, capture_output=True, env=env, timeout=600).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        subprocess.run(install, check=True, capture_output=True, env=env, timeout=600)


NODES = ("oel1", "oel2")


def slurm_conf(root: Path, host: str, addrs: list[str]) -> str:
    # The smallest Slurm the scripts can meet: no cgroups, no accounting (platform notes). One CPU
    # per node: both nodes share this machine's cores. Job ids start at random, so this run's
    # /tmp/oel_ray_<job id> dirs and Ray ports are its own even beside an earlier run's leftovers.
    nodes = "".join(f"NodeName={name} NodeHostname={host} NodeAddr={addr} Port={free_port()} CPUs=1\n"
                    for name, addr in zip(NODES, addrs))
    return f"""\
ClusterName=oeltest
FirstJobId={random.randint(100_000, 900_000)}
SlurmctldHost={host}({HOST_IP})
SlurmUser=root
SlurmctldPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.sock
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool_%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd_%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd_%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
{nodes}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def stop(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 15)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return
    for _ in range(50):  # let it exit before its files go away
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


@pytest.fixture(scope="module")
def slurm():
    """Environment for sbatch/squeue/scontrol aimed at a private, running two-node Slurm."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run slurmctld and slurmd (SlurmUser=root)")
    install_slurm()
    with namespaces(len(NODES), host_link=True) as spaces:
        yield from _slurm(spaces)


def _slurm(spaces: list[tuple[str, str]]):
    # Under /tmp, not pytest's 0700 tmp: munged runs as user munge and must reach its socket dir.
    root = Path(tempfile.mkdtemp(prefix="oel_slurm_"))
    root.chmod(0o755)
    munge = root / "munge"
    munge.mkdir(mode=0o755)
    key = munge / "munge.key"
    key.write_bytes(os.urandom(128))  # a private key: nothing here depends on /etc/munge
    key.chmod(0o600)
    shutil.chown(munge, "munge", "munge")
    shutil.chown(key, "munge", "munge")
    (root / "state").mkdir()
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, host, [ip for _, ip in spaces]))
    # The sbatch script's Ray head runs on the job's first node, oel1.
    env = {**os.environ, "SLURM_CONF": str(conf), "OEL_RAY_HEAD_IP": spaces[0][1]}
    try:
        subprocess.run(["runuser", "-u", "munge", "--", "munged", f"--socket={munge}/munge.sock",
                        f"--key-file={key}", f"--pid-file={munge}/munged.pid",
                        f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"],
                       check=True, timeout=30)
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env, timeout=30)
        for name, (namespace, _) in zip(NODES, spaces):
            subprocess.run([*enter(namespace), "slurmd", "-f", str(conf), "-N", name],
                           check=True, env=env, timeout=30)
        deadline = time.time() + 60
        while subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                             env=env).stdout.split() != ["idle"] * len(NODES):
            assert time.time() < deadline, (root / "slurmctld.log").read_text()[-2000:]
            time.sleep(0.5)
        yield env
    finally:
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True)
        for name in NODES:
            stop(root / f"slurmd_{name}.pid")
        stop(root / "slurmctld.pid")
        stop(munge / "munged.pid")
        shutil.rmtree(root, ignore_errors=True)


def job_state(job_id: str, env: dict, wait_s: float = 60) -> str:
    """The job's final state (a job can still be exiting once its results are on disk)."""
    deadline = time.time() + wait_s
    while True:
        shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, env=env)
        state = re.search(r"JobState=(\S+)", shown.stdout).group(1)
        if state not in ("PENDING", "RUNNING", "COMPLETING") or time.time() > deadline:
            return state
        time.sleep(1)


def ray_processes_of(job_id: str) -> list[str]:
    """Processes still running from the job's Ray (their command lines name its temp dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if re.search(rf"/tmp/oel_ray_{job_id}(/|_|\s|$)", cmdline) and proc.name.isdigit():
            found.append(cmdline)
    return found


def test_sbatch_runs_the_tiny_experiment_on_a_two_node_ray_cluster_and_tears_it_down(slurm, smallest_tiny,
                                                                                     tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--wait", f"--nodes={len(NODES)}", f"--output={log}", str(SBATCH),
         *smallest_tiny, f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env={**slurm, "OEL_RAY_PYTHON": sys.executable},
    )
    output = log.read_text() if log.exists() else ""
    assert submitted.returncode == 0, submitted.stderr + output[-4000:]
    job_id = submitted.stdout.strip().split(";")[0]
    assert job_state(job_id, slurm) == "COMPLETED", output[-4000:]
    assert f"oel_ray: {len(NODES)} Ray nodes up" in output  # the srun'd worker joined the head
    assert all(f"'node:{ip}'" in output for ip in ("198.18.0.1", "198.18.0.2"))  # each on its own address
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["steps"] == 1
    # Teardown: no Ray process of the job left, head's and worker's temp dirs gone.
    assert ray_processes_of(job_id) == []
    assert [*Path("/tmp").glob(f"oel_ray_{job_id}"), *Path("/tmp").glob(f"oel_ray_{job_id}_*")] == []


def test_submitit_launcher_sends_a_sweep_to_slurm(slurm, smallest_tiny, tmp_path):
    """`-m hydra/launcher=submitit_slurm`: the jobs become a Slurm array job, one result dir each.
    One job at a time: two Ray clusters at once would only fight over this machine's 2 cores."""
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "oel_ray.main", "-m", "hydra/launcher=submitit_slurm", *smallest_tiny,
         "learner.grad_accum=1,2", "hydra.launcher.array_parallelism=1", "hydra.launcher.timeout_min=10",
         f"hydra.sweep.dir={sweep_dir}"],
        capture_output=True, text=True, cwd=REPO, timeout=600, env=slurm,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for job in ("0", "1"):
        summary = json.loads((sweep_dir / job / "summary.json").read_text())
        assert summary["steps"] == 1
    tasks = sorted(p.name for p in (sweep_dir / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(tasks) == 2 and len({t.split("_")[0] for t in tasks}) == 1  # one array job, two tasks
    assert [job_state(task, slurm) for task in tasks] == ["COMPLETED", "COMPLETED"]
