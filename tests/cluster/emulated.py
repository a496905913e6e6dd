"""An emulated cluster on one machine: Linux network namespaces as hosts, each with its own sshd.

    python -m tests.cluster.emulated up --hosts=3 --rate=1gbit   # prints the state file; Ctrl-C or `down`
    python -m tests.cluster.emulated down                         # removes every cluster this machine has

Topology. A bridge lives in a namespace of its own (`<prefix>-br`), so nothing on it is routed
to or from the machine's real network. Each host `h1..hN` and the launcher are namespaces with
a veth into that bridge, an address from the benchmarking range 198.18.0.0/15, a hosts file
(`ip netns exec` bind-mounts /etc/netns/<ns>/hosts over /etc/hosts) and an ssh directory of
their own (likewise over /etc/ssh). Every process started in a host runs in a UTS namespace
with the host's name, so gethostname() differs per host, as Gloo expects. Each host runs
Debian's sshd on port 2222 with key-based root login; the launcher reaches them with `ssh hN`
through the worker image's own k8s/images/ssh_config, exactly as mpi-operator's launcher pod
reaches its workers. The filesystem is shared, so the checkout and
any scratch directory are at the same paths on every host, as the shared volume is.

Links: `tc tbf` on both ends of each host's veth shapes bandwidth in both directions. The
kernel here has no netem, so latency is not modelled (a veth round trip is ~30 us).

Teardown kills only processes this cluster started, found by PID in its own namespaces, then
deletes the namespaces and their /etc/netns directories. A cluster whose creator died
(SIGKILL, a crashed CI job) is swept by the next `Cluster.start()` or by `down`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

SUBNET = "198.18.0"  # 198.18.0.0/24 inside the bridge namespace; never routed anywhere
LAUNCHER_ADDR = f"{SUBNET}.2"
PREFIX = "tfllm"
NETNS_ETC = pathlib.Path("/etc/netns")
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
IMAGE_SSH_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "k8s" / "images" / "ssh_config"


class ClusterError(RuntimeError):
    """The cluster cannot be created here (no root, no iproute2, no sshd, no namespaces)."""


@dataclasses.dataclass
class Host:
    name: str  # host name (h1...) or "launcher"
    netns: str
    addr: str
    sshd: subprocess.Popen | None = None
    cpu: int | None = None  # the one core its sshd, and so everything started through ssh, runs on


def _sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(argv)}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def _netns_list() -> list[str]:
    out = _sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(netns: str) -> list[int]:
    out = _sh("ip", "netns", "pids", netns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def rate_bits(rate: str) -> int:
    """'1gbit' / '100mbit' / '500kbit' to bits per second."""
    units = {"gbit": 10**9, "mbit": 10**6, "kbit": 10**3, "bit": 1}
    for unit, scale in units.items():
        if rate.endswith(unit):
            return int(float(rate[: -len(unit)]) * scale)
    raise ValueError(f"rate {rate!r}: use e.g. 1gbit, 100mbit")


class Cluster:
    """N emulated hosts and a launcher namespace; a context manager that always tears down."""

    def __init__(self, hosts: int = 2, rate: str | None = None, workdir: str | os.PathLike | None = None,
                 prefix: str | None = None, pin: bool = False):
        """pin: each host gets one core of this machine's (h1 the first, h2 the next, round robin), as
        hosts of their own would, instead of every host's processes sharing all of them."""
        if not 1 <= hosts <= 200:
            raise ValueError("hosts must be between 1 and 200")
        self.prefix = prefix or f"{PREFIX}{os.getpid()}"
        self.rate = rate
        self.workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.bridge_ns = f"{self.prefix}-br"
        cores = sorted(os.sched_getaffinity(0))
        self.hosts = [Host(f"h{i}", f"{self.prefix}-h{i}", f"{SUBNET}.{10 + i}",
                           cpu=cores[(i - 1) % len(cores)] if pin else None) for i in range(1, hosts + 1)]
        self.launcher = Host("launcher", f"{self.prefix}-l", LAUNCHER_ADDR)
        self.key = self.workdir / "id_ed25519"
        self._started: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Cluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def namespaces(self) -> list[str]:
        return [self.bridge_ns, self.launcher.netns] + [h.netns for h in self.hosts]

    def start(self) -> "Cluster":
        check_prerequisites()
        sweep_stale()
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._keys()
            _sh("ip", "netns", "add", self.bridge_ns)
            _sh("ip", "-n", self.bridge_ns, "link", "set", "lo", "up")
            _sh("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _sh("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
            for host in [self.launcher] + self.hosts:
                self._add_host(host)
            if self.rate:
                self.set_rate(self.rate)
            for host in self.hosts:
                self._start_sshd(host)
            self._wait_for_ssh()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kills every process in this cluster's namespaces (all started by it), then removes them."""
        _remove(self.namespaces, self._started)
        self._started.clear()

    # ------------------------------------------------------------------ building
    def _keys(self) -> None:
        if not self.key.exists():
            _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))
        host_key = self.workdir / "host_key"
        if not host_key.exists():
            _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key))
        shutil.copy(f"{self.key}.pub", self.workdir / "authorized_keys")

    def _add_host(self, host: Host) -> None:
        ns, peer = host.netns, f"v-{host.name}"[:15]
        _sh("ip", "netns", "add", ns)
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "-n", self.bridge_ns, "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _sh("ip", "-n", self.bridge_ns, "link", "set", peer, "master", "br0", "up")
        _sh("ip", "-n", ns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
        _sh("ip", "-n", ns, "link", "set", "eth0", "up")
        etc = NETNS_ETC / ns
        (etc / "ssh").mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", "::1 localhost", f"{self.launcher.addr} {self.launcher.name}"]
        lines += [f"{h.addr} {h.name}" for h in self.hosts]
        (etc / "hosts").write_text("\n".join(lines) + "\n")
        (etc / "hostname").write_text(host.name + "\n")
        # The client side, for the launcher and for Open MPI's tree spawn from host to host: the
        # worker image's own ssh_config (port 2222, keepalives), plus this cluster's key.
        (etc / "ssh" / "ssh_config").write_text(f"IdentityFile {self.key}\n" + IMAGE_SSH_CONFIG.read_text())
        (etc / "ssh" / "sshd_config").write_text(
            f"ListenAddress {host.addr}\n"
            "Port 2222\n"
            f"HostKey {self.workdir / 'host_key'}\n"
            f"PidFile {self.workdir / (host.name + '.sshd.pid')}\n"
            f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}\n"
            "StrictModes no\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "MaxStartups 64\n"
            "MaxSessions 64\n"
            "ClientAliveInterval 5\n"
            "ClientAliveCountMax 3\n"
            "LogLevel ERROR\n")

    def start_sshd(self, name: str) -> None:
        host = self.host(name)
        if host.sshd is None or host.sshd.poll() is not None:
            self._start_sshd(host)
            self._wait_for_ssh()

    def _start_sshd(self, host: Host) -> None:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
        log = open(self.workdir / f"{host.name}.sshd.log", "ab")
        # Affinity is inherited through fork and exec: every session's processes stay on the host's core.
        pin = (lambda: os.sched_setaffinity(0, {host.cpu})) if host.cpu is not None else None
        host.sshd = self.popen(host, [SSHD, "-D", "-e", "-f", "/etc/ssh/sshd_config"], stdout=log, stderr=log,
                               preexec_fn=pin)

    def _wait_for_ssh(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        for host in self.hosts:
            while True:
                probe = self.run(["ssh", host.name, "hostname"], timeout=15)
                if probe.returncode == 0 and probe.stdout.strip() == host.name:
                    break
                if host.sshd.poll() is not None or time.monotonic() > deadline:
                    log = (self.workdir / f"{host.name}.sshd.log").read_text(errors="replace")[-2000:]
                    raise ClusterError(f"sshd on {host.name} did not answer: {probe.stderr.strip()} {log}")
                time.sleep(0.2)

    # ------------------------------------------------------------------ running things
    def host(self, name: str) -> Host:
        for h in [self.launcher] + self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def wrap(self, host: Host | str, argv: list[str]) -> list[str]:
        """argv run inside the host: its network, its /etc/hosts and /etc/ssh, its hostname."""
        host = self.host(host) if isinstance(host, str) else host
        return ["ip", "netns", "exec", host.netns, "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', host.name] + [str(a) for a in argv]

    def popen(self, host: Host | str, argv: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(self.wrap(host, argv), **kwargs)
        self._started.append(proc)
        return proc

    def run(self, argv: list[str], host: Host | str | None = None, timeout: float = 600, **kwargs):
        """Runs argv in a host (default: the launcher), capturing text output."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.wrap(host or self.launcher, argv), timeout=timeout, **kwargs)

    # ------------------------------------------------------------------ network events
    def set_rate(self, rate: str | None) -> None:
        """Shapes every host's link to `rate` in both directions (None removes shaping)."""
        self.rate = rate
        for host in self.hosts:
            for ns, dev in ((host.netns, "eth0"), (self.bridge_ns, f"v-{host.name}"[:15])):
                _sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
                if rate:
                    bits = rate_bits(rate)
                    # Burst of 1 ms at the rate, at least 128 KB so that a 64 KB GSO segment fits.
                    burst = max(128 * 1024, bits // 8 // 1000)
                    _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                        "burst", str(burst), "latency", "100ms")

    def link_down(self, name: str) -> None:
        _sh("ip", "-n", self.host(name).netns, "link", "set", "eth0", "down")

    def link_up(self, name: str) -> None:
        _sh("ip", "-n", self.host(name).netns, "link", "set", "eth0", "up")

    def stop_sshd(self, name: str) -> None:
        host = self.host(name)
        if host.sshd and host.sshd.poll() is None:
            host.sshd.kill()
            host.sshd.wait(10)

    def pids(self, name: str) -> list[int]:
        return _netns_pids(self.host(name).netns)

    def hostfile(self, slots: int = 1, hosts: list[str] | None = None) -> pathlib.Path:
        """A hostfile in mpi-operator's format (`<host> slots=N`)."""
        path = self.workdir / "hostfile"
        path.write_text("".join(f"{h} slots={slots}\n" for h in (hosts or [h.name for h in self.hosts])))
        return path

    def state(self) -> dict:
        return {"prefix": self.prefix, "workdir": str(self.workdir), "key": str(self.key), "rate": self.rate,
                "launcher": self.launcher.netns, "hosts": {h.name: {"netns": h.netns, "addr": h.addr} for h in self.hosts}}


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise ClusterError("the emulated cluster needs root (network namespaces); CI runs as root")
    for tool in ("ip", "tc", "unshare", "ssh", "ssh-keygen"):
        if not shutil.which(tool):
            raise ClusterError(f"the emulated cluster needs `{tool}` (apt-get install iproute2 util-linux "
                               "openssh-client openssh-server)")
    if not os.path.exists(SSHD):
        raise ClusterError("the emulated cluster needs sshd (apt-get install openssh-server)")
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = _sh("ip", "netns", "add", probe, check=False)
    _sh("ip", "netns", "del", probe, check=False)
    if made.returncode != 0:
        raise ClusterError(f"cannot create network namespaces here: {made.stderr.strip()}")


def _remove(namespaces: list[str], started: list[subprocess.Popen] = ()) -> None:
    pids = {pid for ns in namespaces for pid in _netns_pids(ns)}
    pids |= {p.pid for p in started if p.poll() is None}
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in started:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    existing = set(_netns_list())
    for ns in namespaces:
        if ns in existing:
            _sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def _owner(ns: str) -> int | None:
    head = ns.split("-", 1)[0]
    digits = head[len(PREFIX):]
    return int(digits) if head.startswith(PREFIX) and digits.isdigit() else None


def sweep_stale(everything: bool = False) -> list[str]:
    """Removes clusters whose creating process is gone (all of tfllm's with everything=True)."""
    # A namespace, or an /etc/netns entry whose namespace is already gone.
    names = set(_netns_list()) | {p.name for p in NETNS_ETC.glob(f"{PREFIX}*")}
    stale = sorted(n for n in names if _owner(n) is not None and (everything or not _alive(_owner(n))))
    if stale:
        _remove(stale)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="create a cluster and keep it until Ctrl-C, SIGTERM or `down`")
    up.add_argument("--hosts", type=int, default=2)
    up.add_argument("--rate", default=None, help="link bandwidth, e.g. 1gbit (default: unshaped)")
    up.add_argument("--pin", action="store_true", help="one core per host, round robin over this machine's")
    up.add_argument("--state", default="/tmp/tfllm-cluster.json")
    sub.add_parser("down", help="remove every emulated tfllm cluster on this machine")
    args = parser.parse_args(argv)
    try:
        if args.command == "down":
            print(f"removed {len(sweep_stale(everything=True))} namespaces")
            return 0
        cluster = Cluster(args.hosts, args.rate, pin=args.pin).start()
    except (ClusterError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    try:
        pathlib.Path(args.state).write_text(json.dumps(cluster.state(), indent=1))
        print(f"cluster up: {', '.join(h.name for h in cluster.hosts)} ({args.rate or 'unshaped'}); state "
              f"{args.state}; run commands with `ip netns exec {cluster.launcher.netns} ...`", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
