"""A real single-node SLURM on localhost for tests: munged, slurmctld and slurmd with two fake GPUs.

Nothing global is changed: every file (munge key and socket, slurm.conf, gres.conf, spool, state, logs, pid
files) lives in one private directory, the daemons listen on free ports, and clients find the cluster through
the ``SLURM_CONF`` variable of :attr:`LocalSlurm.env` (set only in the environment of the subprocesses a test
starts). Needs root and Debian's ``slurm-wlm`` and ``munge`` packages (SLURM 22.05).

The configuration is the usual single-node recipe: ``select/cons_tres``, ``proctrack/linuxproc``, ``task/none``,
an explicit socket/core layout, ``GresTypes=gpu`` and a ``gres.conf`` whose GPUs are two empty files. Two additions:
``SlurmdParameters=config_overrides`` lets the node advertise more CPUs and memory than the test machine has
(so that the production profile's requests fit unchanged), and ``MinJobAge=3600`` keeps finished jobs in
``scontrol show job``/``squeue`` for an hour (there is no accounting database, so that is where the Snakemake
plugin's status checks and the tests read them).

Usage::

    with LocalSlurm(ClusterSpec(gpu_type="a100")) as cluster:
        subprocess.run(["sbatch", ...], env=cluster.env)
        cluster.jobs()  # parsed `scontrol show job`
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

#: Executables the cluster and the Snakemake SLURM plugin call.
REQUIRED_PROGRAMS = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo",
                     "scontrol", "scancel")
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
INSTALL_HINT = "apt-get install -y slurm-wlm munge"


def which(program: str) -> str | None:
    """Path of ``program`` on PATH or in the sbin folders (root daemons are often outside a user's PATH)."""
    found = shutil.which(program)
    if found:
        return found
    for d in SBIN_DIRS:
        p = Path(d) / program
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def missing_prerequisites() -> str | None:
    """Why a local SLURM cannot be started on this machine, or None when it can.

    Returns a sentence for ``pytest.skip``: not root (munged, slurmctld and slurmd run as root here), or the
    programs that are missing and the apt line that installs them.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return ("a local SLURM needs root (munged, slurmctld and slurmd are started as root); "
                "run the test as root, e.g. in CI through .ci/run")
    missing = [p for p in REQUIRED_PROGRAMS if which(p) is None]
    if missing:
        return f"SLURM/munge programs not installed ({', '.join(missing)}); install them with `{INSTALL_HINT}`"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ClusterSpec:
    """Shape of the fake cluster: one node, CPU partitions (the first is the default) and GPU partitions.

    ``cpus`` and ``real_memory_mb`` are what the node advertises (not what the machine has); ``gpu_type`` is the
    GRES type of the fake GPUs, i.e. what ``--gpus=<type>:<n>`` must name.
    """

    cpu_partitions: tuple[str, ...] = ("cpu",)
    gpu_partitions: tuple[str, ...] = ("gpu",)
    gpu_type: str = "fake"
    n_gpus: int = 2
    cpus: int = 16
    real_memory_mb: int = 128000
    node: str = "localhost"


class LocalSlurm:
    """Start (:meth:`start`) and stop (:meth:`stop`) a private single-node SLURM; a context manager.

    :meth:`stop` is safe to call at any point (also after a failed or partial start) and more than once: it
    cancels the cluster's jobs, then ends slurmd, slurmctld and munged by the pids in their pid files.
    Raises RuntimeError from :meth:`start` with the daemons' log tails when the cluster does not come up.
    """

    def __init__(self, spec: ClusterSpec | None = None, root: str | Path | None = None):
        self.spec = spec or ClusterSpec()
        # A short private path: the munge socket path must stay under the 108-byte limit of unix sockets.
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="cellsynergy-slurm-", dir="/tmp"))
        self._own_root = root is None
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # munged insists that everyone can traverse to its socket
        self.conf = self.root / "etc" / "slurm.conf"
        self.log_dir = self.root / "log"
        self.munge_socket = self.root / "msock" / "munge.socket"
        self.pid_files = {
            "slurmd": self.root / "run" / "slurmd.pid",
            "slurmctld": self.root / "run" / "slurmctld.pid",
            "munged": self.root / "munge" / "munged.pid",
        }
        self.shim_dir = self.root / "bin"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        sbin = [d for d in SBIN_DIRS if Path(d).is_dir()]
        self.env["PATH"] = os.pathsep.join([str(self.shim_dir), self.env.get("PATH", ""), *sbin])
        self.started = False

    # ------------------------------------------------------------------ configuration
    def slurm_conf_text(self, ctld_port: int, slurmd_port: int) -> str:
        """The slurm.conf of the cluster (SLURM 22.05 syntax)."""
        s, r = self.spec, self.root
        lines = [
            "ClusterName=cellsynergytest",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "SlurmdParameters=config_overrides",
            "MpiDefault=none",
            "DefMemPerCPU=1000",
            # jobs stay visible to `scontrol show job`/`squeue` for an hour after they end (the plugin's squeue
            # status check and the test's assertions read them there; there is no accounting database)
            "MinJobAge=3600",
            "ReturnToService=2",
            "InactiveLimit=0",
            "KillWait=5",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}",
            f"SlurmdPidFile={self.pid_files['slurmd']}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.log_dir / 'slurmd.log'}",
            "GresTypes=gpu",
            f"NodeName={s.node} NodeAddr=127.0.0.1 CPUs={s.cpus} Boards=1 SocketsPerBoard=1 "
            f"CoresPerSocket={s.cpus} ThreadsPerCore=1 RealMemory={s.real_memory_mb} "
            f"Gres=gpu:{s.gpu_type}:{s.n_gpus} State=UNKNOWN",
        ]
        for i, p in enumerate(s.cpu_partitions + s.gpu_partitions):
            default = " Default=YES" if i == 0 else ""
            lines.append(f"PartitionName={p} Nodes={s.node}{default} MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def gres_conf_text(self) -> str:
        s = self.spec
        files = f"{self.root / 'gpu'}/fake[0-{s.n_gpus - 1}]"
        return f"AutoDetect=off\nNodeName={s.node} Name=gpu Type={s.gpu_type} File={files}\n"

    # ------------------------------------------------------------------ life cycle
    def start(self, timeout: float = 60.0) -> "LocalSlurm":
        """Write the configuration, start munged, slurmctld and slurmd, and wait until the node is idle."""
        for d in ("etc", "log", "spool", "state", "run", "gpu", "msock", "munge", "bin"):
            (self.root / d).mkdir(exist_ok=True)
        self._write_srun_shim()
        os.chmod(self.root / "munge", 0o700)
        os.chmod(self.root / "msock", 0o755)
        for i in range(self.spec.n_gpus):
            (self.root / "gpu" / f"fake{i}").touch()
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        self.started = True  # from here on, stop() has something to clean up

        self._daemon([which("munged"), f"--socket={self.munge_socket}", f"--key-file={key}",
                      f"--pid-file={self.pid_files['munged']}", f"--log-file={self.log_dir / 'munged.log'}",
                      f"--seed-file={self.root / 'munge' / 'munged.seed'}"], "munged")
        cred = subprocess.run([which("munge"), "-n", "-S", str(self.munge_socket)], capture_output=True,
                              text=True, timeout=30)
        check = subprocess.run([which("unmunge"), "-S", str(self.munge_socket)], input=cred.stdout,
                               capture_output=True, text=True, timeout=30)
        if "Success" not in check.stdout:
            self._fail("munge does not round-trip a credential", check.stdout + check.stderr)

        self.conf.write_text(self.slurm_conf_text(_free_port(), _free_port()))
        (self.conf.parent / "gres.conf").write_text(self.gres_conf_text())
        self._daemon([which("slurmctld"), "-f", str(self.conf)], "slurmctld")
        self._daemon([which("slurmd"), "-f", str(self.conf), "-N", self.spec.node], "slurmd")

        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            dead = [d for d in ("munged", "slurmctld", "slurmd") if not self._alive(d)]
            if dead:
                self._fail(f"{', '.join(dead)} exited during start-up")
            r = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
            state = r.stdout.strip()
            if r.returncode == 0 and state and all(s.startswith("idle") for s in state.split()):
                logger.info("local SLURM up in %s (node %s idle)", self.root, self.spec.node)
                return self
            time.sleep(0.5)
        self._fail(f"node did not become idle within {timeout:.0f} s (sinfo state {state!r})")
        raise AssertionError("unreachable")

    def _write_srun_shim(self) -> None:
        """An ``srun`` first on the jobs' PATH that restores ``SLURM_CONF`` and runs the real srun.

        Inside a job, snakemake-executor-plugin-slurm-jobstep (0.6.1) removes every ``SLURM_*`` variable except
        the job's identity before it calls ``srun`` for the job step, ``SLURM_CONF`` included; a real cluster keeps
        its configuration at the compiled-in path (/etc/slurm) or runs configless, so it does not notice. This
        private cluster lives elsewhere, so without the shim the nested srun fails with "Could not establish a
        configuration source". Nothing else is changed: the real srun runs with all its arguments.
        """
        real = which("srun")
        shim = self.shim_dir / "srun"
        shim.write_text(f'#!/bin/sh\nSLURM_CONF="{self.conf}" exec "{real}" "$@"\n')
        os.chmod(shim, 0o755)

    def _daemon(self, argv: list[str | None], name: str) -> None:
        r = subprocess.run([a for a in argv if a], env=self.env, capture_output=True, text=True, timeout=60)
        pid_file = self.pid_files[name]
        for _ in range(100):
            if pid_file.exists() and pid_file.read_text().strip():
                break
            time.sleep(0.1)
        if r.returncode != 0 or not pid_file.exists():
            self._fail(f"{name} did not start (exit {r.returncode})", r.stdout + r.stderr)

    def _fail(self, what: str, output: str = "") -> None:
        tails = []
        for log in sorted(self.log_dir.glob("*.log")):
            last = log.read_text(errors="replace").splitlines()[-15:]
            tails.append(f"--- {log.name} (last lines)\n" + "\n".join(last))
        raise RuntimeError(f"local SLURM in {self.root}: {what}\n{output}\n" + "\n".join(tails))

    def stop(self, keep_logs_in: str | Path | None = None) -> None:
        """Cancel all jobs, end slurmd, slurmctld and munged (pid files), copy logs, remove the directory."""
        if not self.started:
            if self._own_root:
                shutil.rmtree(self.root, ignore_errors=True)
            return
        try:
            if self._alive("slurmctld"):
                self.run("scancel", "--user", str(os.getuid()), check=False, timeout=20)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    r = self.run("squeue", "-h", "-t", "PD,R,CG,S", check=False, timeout=10)
                    if r.returncode != 0 or not r.stdout.strip():
                        break
                    time.sleep(0.5)
        except (subprocess.SubprocessError, OSError) as e:  # never let cleanup stop the daemons' shutdown
            logger.warning("could not cancel the local SLURM's jobs: %s", e)
        for name in ("slurmd", "slurmctld", "munged"):
            try:
                self._kill(name)
            except OSError as e:  # go on with the other daemons
                logger.warning("could not stop %s: %s", name, e)
        if keep_logs_in is not None:
            try:
                dest = Path(keep_logs_in)
                dest.mkdir(parents=True, exist_ok=True)
                for f in list(self.log_dir.glob("*.log")) + [self.conf, self.conf.parent / "gres.conf"]:
                    if f.exists():
                        shutil.copy(f, dest / f.name)
            except OSError as e:
                logger.warning("could not keep the local SLURM's logs: %s", e)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
        self.started = False

    def _pid(self, name: str) -> int | None:
        try:
            return int(self.pid_files[name].read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    @staticmethod
    def _running(pid: int, name: str) -> bool:
        """Whether ``pid`` is a live (not zombie) process of program ``name`` (guards against pid reuse)."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return Path(cmdline).name == name and state != "Z"

    def _alive(self, name: str) -> bool:
        pid = self._pid(name)
        return pid is not None and self._running(pid, name)

    def _kill(self, name: str) -> None:
        """SIGTERM the daemon in ``name``'s pid file, SIGKILL it after 15 s.

        The pid is read once: slurmd removes its pid file as soon as it gets SIGTERM, before it has exited.
        """
        pid = self._pid(name)
        if pid is None or not self._running(pid, name):
            logger.debug("%s not running (pid file %s)", name, self.pid_files[name])
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self._running(pid, name):
            time.sleep(0.2)
        if self._running(pid, name):
            logger.warning("%s (pid %d) ignored SIGTERM for 15 s; sending SIGKILL", name, pid)
            os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> "LocalSlurm":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ queries
    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster; returns the completed process (text output)."""
        return subprocess.run([which(argv[0]) or argv[0], *argv[1:]], env=self.env, capture_output=True,
                              text=True, check=check, timeout=timeout)

    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld still knows (``scontrol -o show job``), one dict of ``Key -> value`` per job."""
        out = self.run("scontrol", "-o", "show", "job").stdout
        return [parse_scontrol_line(line) for line in out.splitlines() if line.startswith("JobId=")]


def parse_scontrol_line(line: str) -> dict[str, str]:
    """Parse one ``scontrol -o show ...`` line (``Key=value`` tokens) into a dict.

    A token without ``=`` continues the previous value (values such as ``Reason`` may contain spaces).
    """
    out: dict[str, str] = {}
    last = None
    for tok in line.split():
        key, sep, val = tok.partition("=")
        if sep and key and (key[0].isalpha()):
            out[key] = val
            last = key
        elif last is not None:
            out[last] += " " + tok
    return out
