"""Flower on localhost for the tests: the deployment engine (one SuperLink, one SuperNode per oracle, `flwr run`)
and the simulation engine (`flwr run APP local`, which starts a local SuperLink in simulation mode).

Every process is started in its own session and stopped by its pid. TLS material and SuperNode keys are
generated here with `cryptography` (what `openssl` and `ssh-keygen -t ecdsa -b 384` make in the README).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from dgpt.config import AGGREGATOR, Config, dump_config
from dgpt.rundir import RunDir
from dgpt.runtimes.flower.app import write_flower_app
from dgpt.runtimes.identity import keygen

BIN = Path(sys.executable).parent
POLL_S = "0.1"  # FLWR_SUPEREXEC_TASK_POLL_INTERVAL


def split_roles(config: Config, root: Path) -> tuple[Config, Path, Path]:
    """A prepared config as the server sees it (its own run_dir holding the tokenizer and the aggregator's key, no
    shards), the oracles' config file, and the Flower App. Each oracle's organisation has its own run directory
    (`node_dir`) holding the tokenizer, that oracle's shards and its key only. The config names every party's public
    key."""
    oracles = root / "oracles.toml"
    publics = {n: keygen(RunDir(node_dir(oracles, n)).keys, n)[1] for n in config.oracle_names()}
    config = dataclasses.replace(
        config, oracles=[dataclasses.replace(o, public_key=str(publics[o.name])) for o in config.oracles],
        ledger=dataclasses.replace(config.ledger, public_key=str(keygen(root / "server" / "keys", AGGREGATOR)[1])))
    oracles.write_text(dump_config(config))
    server = dataclasses.replace(config, run_dir=str(root / "server"))
    prepared = RunDir(config.run_dir)
    for name, run in (("server", RunDir(root / "server")), *((n, RunDir(node_dir(oracles, n))) for n in config.oracle_names())):
        run.tokenizer.write_bytes(prepared.tokenizer.read_bytes())
        if name != "server":
            shutil.copytree(prepared.oracle_data(name), run.oracle_data(name))
    return server, oracles, write_flower_app(server)


def node_dir(oracles: Path, name: str) -> Path:
    """The run directory of the organisation that holds oracle `name`."""
    return oracles.parent / f"org_{name}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Hosts:
    """Two network namespaces joined by a veth pair: org A's host (the SuperLink) and the SuperNodes' host."""

    server_ns: str
    node_ns: str
    server_ip: str
    node_ip: str


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@contextlib.contextmanager
def two_hosts():
    """The SuperLink's host and the SuperNodes' host as two network namespaces with private addresses on a veth pair,
    removed on exit; yields (None, why) where namespaces cannot be made (no `ip`, no CAP_NET_ADMIN)."""
    tag = f"{os.getpid() % 100000}"
    server, node = f"dgpt_a{tag}", f"dgpt_b{tag}"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    made: list[str] = []
    try:
        if shutil.which("ip") is None:
            yield None, "no `ip` command (iproute2)"
            return
        steps = [("netns", "add", server), ("netns", "add", node),
                 ("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}"),
                 ("link", "set", f"va{tag}", "netns", server), ("link", "set", f"vb{tag}", "netns", node),
                 ("-n", server, "addr", "add", f"{subnet}.1/24", "dev", f"va{tag}"),
                 ("-n", node, "addr", "add", f"{subnet}.2/24", "dev", f"vb{tag}"),
                 *(("-n", ns, "link", "set", dev, "up") for ns in (server, node) for dev in ("lo", f"va{tag}" if ns == server else f"vb{tag}"))]
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                yield None, f"`ip {' '.join(step)}` failed: {done.stderr.strip()}"
                return
            if step[0] == "netns":
                made.append(step[2])
        yield Hosts(server, node, f"{subnet}.1", f"{subnet}.2"), ""
    finally:
        for ns in made:  # deleting a namespace deletes its end of the veth pair, and with it the other
            _ip("netns", "del", ns)


def write_tls(folder: Path, ips: tuple[str, ...] = ("127.0.0.1",)) -> dict[str, Path]:
    """A CA, and a certificate it signed for `ips` and localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, key, issuer, issuer_key, ca):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips)]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dgpt test CA")])
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    ca_cert = cert(ca_name, ca_key, ca_name, ca_key, True)
    server_cert = cert(server_name, server_key, ca_name, ca_key, False)
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    return paths


def write_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's P-384 key pair in OpenSSH format (private, public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public


class Deployment:
    def __init__(self, root: Path, tls: dict[str, Path] | None = None, auth: bool = False, hosts: Hosts | None = None):
        """`hosts`: the SuperLink (and the flwr CLI) in one network namespace, the SuperNodes in the other."""
        self.root, self.tls, self.auth, self.hosts = root, tls, auth, hosts
        self.port = free_port()
        self.address = f"{hosts.server_ip if hosts else '127.0.0.1'}:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        # no telemetry or update check: nothing outside localhost is reached (or waited for); each SuperNode's
        # SuperExec looks for a message to start a ClientApp for every 0.1 s, not every 1 s (README)
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
                    "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1", "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(self.port),
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": POLL_S}
        self.cli_home = root / "flwr_cli"
        self.cli_home.mkdir(parents=True, exist_ok=True)
        security = f'root-certificates = "{tls["ca"]}"' if tls else "insecure = true"
        # "local" is the connection Flower's own default config names: the simulation engine's local SuperLink
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "{self.address}"\n{security}\n\n'
            '[superlink.local]\naddress = ":local:"\n')

    def _on(self, host: str, cmd: list[str]) -> list[str]:
        """`cmd` run on `host` ("server" or "node"): in its network namespace when there are two hosts."""
        if self.hosts is None:
            return cmd
        return ["ip", "netns", "exec", self.hosts.server_ns if host == "server" else self.hosts.node_ns, *cmd]

    def _start(self, name: str, cmd: list[str], home: Path) -> None:
        """`home` is also how close() finds what Flower starts detached from this process (see _kill_detached)."""
        home.mkdir(parents=True, exist_ok=True)
        log = open(self.root / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**self.env, "FLWR_HOME": str(home)})
        log.close()

    def start_superlink(self) -> None:
        security = ["--ssl-ca-certfile", str(self.tls["ca"]), "--ssl-certfile", str(self.tls["cert"]),
                    "--ssl-keyfile", str(self.tls["key"])] if self.tls else ["--insecure"]
        host = ["--host", self.hosts.server_ip] if self.hosts else []
        self._start("superlink", self._on("server", [
            str(BIN / "flower-superlink"), *security, *(["--enable-supernode-auth"] if self.auth else []), *host,
            "--port", str(self.port), "--disable-runtime-dependency-installation",
            "--database", str(self.root / "superlink.db")]), self.root / "superlink_home")
        probe = f"import socket, sys; sys.exit(socket.socket().connect_ex(('{self.address.split(':')[0]}', {self.port})))"
        self.wait_for(lambda: subprocess.run(self._on("server", [sys.executable, "-c", probe])).returncode == 0, 60,
                      "the SuperLink to listen")

    def start_supernode(self, label: str, config: Path, oracle: str, key: Path | None = None) -> None:
        security = ["--root-certificates", str(self.tls["ca"])] if self.tls else ["--insecure"]
        self._start(label, self._on("node", [
                            str(BIN / "flower-supernode"), *security, *(["--auth-supernode-private-key", str(key)] if key else []),
                            "--superlink", self.address, "--port", str(free_port()),
                            "--node-config", f'config="{config}" oracle="{oracle}" run-dir="{node_dir(config, oracle)}"']),
                    self.root / f"{label}_home")

    def launch(self, app: Path, oracles: Path, names: list[str], keys: dict[str, tuple[Path, Path]] | None = None) -> None:
        """The SuperLink, one SuperNode per oracle (every key registered first when `keys`), then `flwr run`."""
        self.start_superlink()
        if keys:
            self.register([keys[name][1] for name in names])
        for name in names:
            self.start_supernode(name, oracles, name, keys[name][0] if keys else None)
        self.run_app(app)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self._on("server", [str(BIN / "flwr"), *args]), capture_output=True, text=True, timeout=timeout,
                              env={**self.env, "FLWR_HOME": str(self.cli_home)})

    def register(self, public_keys: list[Path]) -> None:
        """`flwr supernode register` for every key, all at once, once `flwr supernode list` answers (README)."""
        self.wait_for(lambda: self.flwr("supernode", "list", "test").returncode == 0, 60, "`flwr supernode list`")
        with contextlib.ExitStack() as stack:
            procs = [stack.enter_context(subprocess.Popen(
                self._on("server", [str(BIN / "flwr"), "supernode", "register", str(key), "test"]), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, env={**self.env, "FLWR_HOME": str(self.cli_home)})) for key in public_keys]
            for proc in procs:
                output = proc.communicate(timeout=120)[0]
                assert proc.returncode == 0, output

    def run_app(self, app: Path) -> None:
        result = self.flwr("run", str(app), "test")
        assert result.returncode == 0, result.stdout + result.stderr

    def stop_runs(self) -> None:
        """`flwr stop` every run the SuperLink's database still lists as unfinished (after a restart: the killed one,
        or the SuperNodes keep fetching its last message until the SuperLink gives it up after two missed heartbeats)."""
        listed = self.flwr("ls", "test", "--format", "json")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        for run in json.loads(listed.stdout)["runs"]:
            if not run["status"].startswith("finished"):
                stopped = self.flwr("stop", run["run-id"], "test")
                assert stopped.returncode == 0, stopped.stdout + stopped.stderr

    def simulate(self, app: Path, supernodes: int) -> None:
        """`flwr run APP local` on the simulation engine: the local SuperLink it starts is stopped by close()."""
        result = self.flwr("run", str(app), "local", "--federation-config", f"num-supernodes={supernodes} init-args-num-cpus=2")
        assert result.returncode == 0, result.stdout + result.stderr

    def stop(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Stop a process and what it started (SIGTERM: a SuperNode leaves the federation on its way out)."""
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self._kill_detached(self.root / f"{name}_home")

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        self._kill_detached(self.cli_home)  # the simulation engine's local SuperLink, started by `flwr run`

    def _kill_detached(self, home: Path) -> None:
        """Kill what Flower started in sessions of its own (SuperExec, the ServerApp, the local SuperLink) for a
        process given FLWR_HOME=`home`: they carry it in their environment."""
        wanted = f"FLWR_HOME={home}".encode()
        for proc in Path("/proc").iterdir():
            try:
                environ = set((proc / "environ").read_bytes().split(b"\0"))
            except OSError:  # not a process, gone, or not ours to read
                continue
            if proc.name.isdigit() and wanted in environ:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(proc.name), signal.SIGKILL)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def wait_for(self, done, timeout: float, what: str, watch: tuple[str, ...] = ("superlink",)) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            dead = {n: p.returncode for n, p in self.procs.items() if n in watch and p.poll() is not None}
            assert not dead, f"exited while waiting for {what}: {dead}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.5)


def finished(run_dir: str, runs: int = 1) -> bool:
    """Whether the ServerApp finished `runs` times in this run directory (training, an extension or an evaluation):
    its last act is the model's delivery."""
    log = RunDir(run_dir).server_log
    return log.is_file() and log.read_text().count("model delivered to") >= runs


def round_done(run_dir: str, rnd: int) -> bool:
    return RunDir(run_dir).checkpoint("round", rnd).is_dir()
