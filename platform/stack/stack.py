"""`make stack` / `make stack-down`: the compose stack's services on this machine, on loopback, no Docker.

    python platform/stack/stack.py up   [--dir .stack] [--ray-nodes 2] [--free-ports]
    python platform/stack/stack.py node [--dir .stack]      # one more Ray node joins the running stack
    python platform/stack/stack.py down [--dir .stack]

`up` starts, each in a process group of its own, and records every group in DIR/stack.json:
- S3: moto's server, standing in for MinIO, with the bucket `hovle`;
- PostgreSQL (Debian's package): a cluster of its own in DIR/postgres, run as the `postgres` user when
  started by root (initdb refuses root), with the databases `mlflow` and `mlflow_auth`;
- MLflow: platform/mlflow/start.sh, what the compose service runs (PostgreSQL store, artifacts in
  s3://hovle/mlflow served by the server, basic auth);
- Ray: `ray start --head` and `--ray-nodes - 1` more nodes joined to it, token authentication on. The nodes
  carry the S3 endpoint and keys and the MLflow credentials in their environment, as a cluster's nodes get
  them from their image or Kubernetes Secrets: a submitted job reads them there, never from its run config.
`node` starts one more Ray node joined to the head (`ray-node-<N>`, recorded like the others, with the same
CPUs and environment), e.g. to replace a node that died: a training run waiting for its workers' resources
resumes on it.
Then DIR/env.sh holds what a client exports (`source .stack/env.sh`): the tracking URI and MLflow user, the
S3 endpoint and keys, the Jobs API address. Credentials come from the environment when set
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD), else are
generated; env.sh is readable by its owner only.
`down` stops exactly the recorded process groups (never `ray stop`, which would stop every Ray on the
machine) and keeps DIR's data; `down --purge` removes it too.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # this virtualenv's ray, mlflow, moto_server
BUCKET = "hovle"
DEFAULT_PORTS = {"s3": 9000, "postgres": 5433, "mlflow": 5000, "gcs": 6379, "dashboard": 8265}
# a node's own ports: two raylets on one machine must not share them
NODE_PORTS = (
    "node-manager-port", "object-manager-port", "metrics-export-port", "runtime-env-agent-port",
    "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
)  # fmt: skip


class StackError(RuntimeError):
    """A service did not come up; the message names it and where its log is."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_bin(name: str) -> str:
    """Debian keeps the server binaries out of PATH, under /usr/lib/postgresql/<version>/bin."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    if found:
        return str(found[-1])
    if shutil.which(name):
        return shutil.which(name)
    raise StackError(f"PostgreSQL's {name} not found: apt-get install postgresql")


def as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


class Stack:
    def __init__(self, folder: Path):
        self.folder = folder.resolve()
        self.state_file = self.folder / "stack.json"
        self.state: dict = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(self.state, indent=2) + "\n")

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        """`command` in a new process group, output in DIR/logs/NAME.log; recorded before anything waits."""
        logs = self.folder / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.folder,
            )  # fmt: skip
        self.state.setdefault("groups", {})[name] = process.pid
        self.save()
        return process

    def wait_until(self, name: str, process: subprocess.Popen, ready, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if process.poll() is not None:
                raise StackError(f"{name} exited ({process.returncode}): see {self.folder}/logs/{name}.log")
            if time.monotonic() > deadline:
                raise StackError(f"{name} not ready in {timeout_s:.0f} s: see {self.folder}/logs/{name}.log")
            time.sleep(0.5)

    def stop(self, grace_s: float = 15) -> list[str]:
        """SIGTERM each recorded group, SIGKILL what outlives `grace_s`; returns once every group is gone
        (the names stopped). A Ray node drains its work on SIGTERM for up to 30 s: the grace cuts that."""
        groups = self.state.get("groups", {})
        alive = signal_groups(groups, signal.SIGTERM)
        alive = wait_gone(alive, grace_s)
        alive = wait_gone(signal_groups(alive, signal.SIGKILL), 30)
        if alive:
            raise StackError(f"still running after SIGKILL: {', '.join(alive)}")
        if self.state.get("ray_temp"):
            shutil.rmtree(self.state["ray_temp"], ignore_errors=True)
        self.state = {}
        self.state_file.unlink(missing_ok=True)
        return list(groups)


def signal_groups(groups: dict[str, int], signum: int) -> dict[str, int]:
    """Send `signum` to each process group; returns those that existed."""
    sent = {}
    for name, pgid in groups.items():
        try:
            os.killpg(pgid, signum)
            sent[name] = pgid
        except ProcessLookupError:
            pass
    return sent


def wait_gone(groups: dict[str, int], timeout_s: float) -> dict[str, int]:
    """Wait until the groups have no process left; returns those still alive at `timeout_s`."""
    alive = dict(groups)
    deadline = time.monotonic() + timeout_s
    while alive and time.monotonic() < deadline:
        for name, pgid in list(alive.items()):
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                del alive[name]
        if alive:
            time.sleep(0.2)
    return alive


def http_up(url: str):
    def ready() -> bool:
        try:
            urllib.request.urlopen(url, timeout=3)
        except urllib.error.HTTPError:  # it answers (401 without credentials, 404): it is up
            return True
        except OSError:
            return False
        return True

    return ready


def credentials() -> dict[str, str]:
    """The stack's secrets: from the environment where set, else new random ones."""
    return {
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID") or f"hovle-{secrets.token_hex(6)}",
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY") or secrets.token_urlsafe(24),
        "MLFLOW_TRACKING_USERNAME": os.environ.get("MLFLOW_TRACKING_USERNAME") or "admin",
        "MLFLOW_TRACKING_PASSWORD": os.environ.get("MLFLOW_TRACKING_PASSWORD") or secrets.token_urlsafe(18),
        "PGPASSWORD": secrets.token_urlsafe(18),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(32),
    }


def base_env() -> dict[str, str]:
    """This environment without its cloud, MLflow, Ray-address and PostgreSQL settings, this virtualenv's
    binaries first: what every service and node starts from (each gets only the secrets it needs)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS", "PG"))}
    base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"
    return base


def up(folder: Path, ray_nodes: int, use_free_ports: bool, cpus_per_node: float = 2) -> Path:
    stack = Stack(folder)
    if stack.state.get("groups"):
        raise StackError(f"a stack is already recorded in {stack.state_file}: `make stack-down` first")
    ports = {name: free_port() if use_free_ports else port for name, port in DEFAULT_PORTS.items()}
    secret = credentials()
    stack.state = {"ports": ports}
    stack.save()
    base = base_env()
    s3 = f"http://127.0.0.1:{ports['s3']}"
    aws = {
        "AWS_ENDPOINT_URL": s3, "AWS_DEFAULT_REGION": "us-east-1",
        **{name: secret[name] for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
    }  # fmt: skip
    try:
        # S3, then its bucket
        moto = stack.start("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(ports["s3"])], base)
        stack.wait_until("s3", moto, http_up(s3))
        request = urllib.request.Request(f"{s3}/{BUCKET}", method="PUT")
        urllib.request.urlopen(request, timeout=10)  # moto's server signs nothing: any key is accepted

        # PostgreSQL: a cluster in DIR/postgres owned by the user it runs as
        data = stack.folder / "postgres"
        password_file = stack.folder / "pg-password"
        password_file.write_text(secret["PGPASSWORD"] + "\n")
        if os.geteuid() == 0:
            shutil.chown(stack.folder, "postgres")
            shutil.chown(password_file, "postgres")
        password_file.chmod(0o600)
        if not (data / "PG_VERSION").exists():
            subprocess.run(
                as_postgres([postgres_bin("initdb"), "-D", str(data), "-U", "mlflow", "-A", "scram-sha-256",
                             f"--pwfile={password_file}", "--no-instructions"]),
                check=True, capture_output=True, timeout=120,
            )  # fmt: skip
        password_file.unlink()
        postgres = stack.start(
            "postgres",
            as_postgres([postgres_bin("postgres"), "-D", str(data), "-p", str(ports["postgres"]),
                         "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={data}"]),
            base,
        )  # fmt: skip
        pg_env = {**base, "PGPASSWORD": secret["PGPASSWORD"]}
        psql = [postgres_bin("psql"), "-h", "127.0.0.1", "-p", str(ports["postgres"]), "-U", "mlflow"]

        def pg_ready() -> bool:
            probe = [*psql, "-d", "postgres", "-c", "select 1"]
            return subprocess.run(probe, env=pg_env, capture_output=True).returncode == 0

        stack.wait_until("postgres", postgres, pg_ready)
        for database in ("mlflow", "mlflow_auth"):
            exists = subprocess.run(
                [*psql, "-d", "postgres", "-tAc", f"select 1 from pg_database where datname = '{database}'"],
                env=pg_env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            if not exists.stdout.strip():
                subprocess.run([*psql, "-d", "postgres", "-c", f"create database {database}"],
                               env=pg_env, capture_output=True, check=True)  # fmt: skip

        # MLflow's server, started as the compose service starts it
        database = f"postgresql://mlflow@127.0.0.1:{ports['postgres']}"
        mlflow_env = {
            **base, **aws, "PGPASSWORD": secret["PGPASSWORD"],
            "MLFLOW_BACKEND_STORE_URI": f"{database}/mlflow",
            "MLFLOW_AUTH_DATABASE_URI": f"{database}/mlflow_auth",
            "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow",
            "MLFLOW_S3_ENDPOINT_URL": s3,
            "MLFLOW_AUTH_ADMIN_USERNAME": secret["MLFLOW_TRACKING_USERNAME"],
            "MLFLOW_AUTH_ADMIN_PASSWORD": secret["MLFLOW_TRACKING_PASSWORD"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secret["MLFLOW_FLASK_SERVER_SECRET_KEY"],
            "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(ports["mlflow"]),
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }  # fmt: skip
        tracking = f"http://127.0.0.1:{ports['mlflow']}"
        start_sh = str(REPO / "platform" / "mlflow" / "start.sh")
        server = stack.start("mlflow", ["sh", start_sh, "--workers", "1"], mlflow_env)
        stack.wait_until("mlflow", server, http_up(f"{tracking}/health"), timeout_s=180)

        # Ray: a head and the nodes that join it, each with ports of its own
        mlflow_client = {k: secret[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
        # token authentication: the head makes the token (~/.ray/auth_token), joining nodes present it
        node_env = {**base, **aws, **mlflow_client, "MLFLOW_TRACKING_URI": tracking, "RAY_AUTH_MODE": "token"}
        temp = tempfile.mkdtemp(prefix="hovle-ray-", dir="/tmp")  # short: Ray's socket paths are limited
        stack.state["ray_temp"] = temp
        stack.save()
        stack.state["cpus_per_node"] = cpus_per_node
        gcs, dashboard = f"127.0.0.1:{ports['gcs']}", f"http://127.0.0.1:{ports['dashboard']}"
        nodes = {}
        for node in range(ray_nodes):
            if node == 0:
                where = ["--head", "--port", str(ports["gcs"]), "--include-dashboard",
                         "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports["dashboard"]),
                         "--ray-client-server-port",
                         str(free_port() if use_free_ports else 10001)]  # fmt: skip
            else:
                where = ["--address", gcs]
            name = "ray-head" if node == 0 else f"ray-node-{node}"
            # the head's own ports are the defaults unless --free-ports; other nodes' are always free ones
            process = start_ray_node(stack, name, where, node_env, own_ports=use_free_ports or node > 0)
            nodes[name] = process
            if node == 0:
                stack.wait_until(name, process, http_up(f"{dashboard}/api/version"))
        wait_for_nodes(stack, dashboard, nodes)
    except BaseException:
        stack.stop()
        raise

    client = {**aws, **mlflow_client, "MLFLOW_TRACKING_URI": tracking, "RAY_ADDRESS": dashboard,
              "RAY_AUTH_MODE": "token"}  # fmt: skip
    env_file = write_private(stack.folder / "env.sh", client)
    # the operator's way into MLflow's database (`source .stack/postgres.env; psql mlflow`)
    database = {"PGHOST": "127.0.0.1", "PGPORT": str(ports["postgres"]), "PGUSER": "mlflow",
                "PGPASSWORD": secret["PGPASSWORD"]}  # fmt: skip
    write_private(stack.folder / "postgres.env", database)
    stack.state["env_file"] = str(env_file)
    stack.state["bucket"] = f"s3://{BUCKET}"
    stack.save()
    return env_file


def start_ray_node(stack: Stack, name: str, where: list[str], env: dict[str, str], own_ports: bool):
    """`ray start --block` for the node `name` (the head, or joining with `--address`), in its own group."""
    own = [f"--{port}={free_port()}" for port in NODE_PORTS] if own_ports else []
    # a temp folder per node: nodes sharing one would share its runtime_env cache, and one node dropping a
    # job's working_dir deletes it under the driver running on another
    own.append(f"--temp-dir={stack.state['ray_temp']}/{name}")
    return stack.start(
        name,
        [str(BIN / "ray"), "start", "--block", *where, "--node-ip-address", "127.0.0.1",
         "--num-cpus", str(stack.state["cpus_per_node"]), "--disable-usage-stats", *own],
        env,
    )  # fmt: skip


def add_node(folder: Path) -> str:
    """One more Ray node joined to the running stack's head; returns its name once the head lists it alive."""
    stack = Stack(folder)
    groups = stack.state.get("groups", {})
    if "ray-head" not in groups:
        raise StackError(f"no stack is recorded in {stack.state_file}: `make stack` first")
    client = read_env(Path(stack.state["env_file"]))
    base = base_env()
    env = {**base, **{k: v for k, v in client.items() if k != "RAY_ADDRESS"}}
    index = 1
    while f"ray-node-{index}" in groups:
        index += 1
    name = f"ray-node-{index}"
    dashboard = client["RAY_ADDRESS"]
    alive = alive_nodes(dashboard)
    if alive is None:
        raise StackError(f"the Ray head does not answer at {dashboard}: see {stack.folder}/logs/ray-head.log")
    head = f"127.0.0.1:{stack.state['ports']['gcs']}"
    process = start_ray_node(stack, name, ["--address", head], env, own_ports=True)
    wait_for_nodes(stack, dashboard, {name: process}, count=alive + 1)
    return name


def read_env(path: Path) -> dict[str, str]:
    """The `export NAME=value` lines `write_private` wrote."""
    values = {}
    for line in path.read_text().splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        values[name] = shlex.split(value)[0] if value else ""
    return values


def write_private(path: Path, values: dict[str, str]) -> Path:
    """`export NAME=value` lines in a file only its owner reads (created so, never world-readable)."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write("".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items()))
    return path


def alive_nodes(dashboard: str) -> int | None:
    """How many Ray nodes the head lists alive (the State API), None if it does not answer."""
    command = [str(BIN / "ray"), "list", "nodes", "--address", dashboard, "--format", "json", "--filter",
               "state=ALIVE"]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    listed = subprocess.run(command, capture_output=True, text=True, env=env)
    if listed.returncode != 0:
        return None
    try:
        return len(json.loads(listed.stdout))
    except json.JSONDecodeError:
        return None


def wait_for_nodes(
    stack: Stack, dashboard: str, nodes: dict[str, subprocess.Popen], count: int | None = None, timeout_s=120
) -> None:
    """Until the head lists `count` nodes (default: those started) alive; a node that exits fails at once."""
    count = len(nodes) if count is None else count
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, process in nodes.items():
            if process.poll() is not None:
                raise StackError(f"{name} exited ({process.returncode}): see {stack.folder}/logs/{name}.log")
        if (alive_nodes(dashboard) or 0) >= count:
            return
        time.sleep(1)
    raise StackError(f"fewer than {count} Ray nodes alive after {timeout_s:.0f} s: see {stack.folder}/logs/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "node", "down"))
    parser.add_argument("--dir", type=Path, default=REPO / ".stack", help="state, data, logs (.stack)")
    parser.add_argument("--ray-nodes", type=int, default=2, help="Ray nodes including the head (default 2)")
    parser.add_argument("--free-ports", action="store_true", help="any free ports instead of the defaults")
    # Ray's CPUs are scheduling slots, not cores. Each node needs a whole free CPU beside prepare's actor
    # pool (its fractional actors leave one per node): Ray Data's repartition tasks ask for 1 CPU, and two
    # 1-CPU nodes each holding a 0.5-CPU actor deadlock.
    parser.add_argument("--cpus-per-node", type=float, default=2, help="logical CPUs per Ray node (2)")
    parser.add_argument("--purge", action="store_true", help="down: also delete DIR (databases, logs)")
    args = parser.parse_args(argv)
    if args.command == "down":
        try:
            stopped = Stack(args.dir).stop()
        except StackError as err:
            print(f"stack: {err}", file=sys.stderr)
            return 1
        if args.purge:
            shutil.rmtree(args.dir, ignore_errors=True)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        return 0
    if args.command == "node":
        try:
            name = add_node(args.dir)
        except (StackError, OSError) as err:
            print(f"stack: {err}", file=sys.stderr)
            return 1
        print(f"{name} joined the stack's Ray cluster")
        return 0
    try:
        env_file = up(args.dir, args.ray_nodes, args.free_ports, args.cpus_per_node)
    except (StackError, subprocess.CalledProcessError, OSError) as err:
        print(f"stack: {err}", file=sys.stderr)
        return 1
    ports = json.loads((args.dir / "stack.json").read_text())["ports"]
    print(
        f"stack up: MLflow http://127.0.0.1:{ports['mlflow']}, "
        f"Ray jobs http://127.0.0.1:{ports['dashboard']}, "
        f"S3 http://127.0.0.1:{ports['s3']} (bucket {BUCKET}), PostgreSQL 127.0.0.1:{ports['postgres']}\n"
        f"use it: source {env_file}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
