"""A two-node Ray cluster on this machine, one node killed mid-sweep: the sweep still ends, right.

Two `ray start` nodes on the loopback address (a head with 1 CPU; a second node with 2 CPUs and a
`node2` resource), a sweep run through `run_trials(backend="ray", address=...)` with each record
written to a results store by the driver, and the second node killed (SIGKILL to its process group,
raylet and agents, and to its workers, which Ray puts in groups of their own) as soon as a trial
runs there. The sweep must finish; the trials that were on the dead node are `crashed`, the others
`ok`, and each trial has one row; re-running what is not ok (what `suite run --resume
--retry-failed` does) runs only the crashed trials and replaces their rows.

Loopback only. Ray swaps a loopback node address (`--node-ip-address 127.0.0.1`, an `--address` or
`ray.init(address=...)` on 127.0.0.1) for the host's own address unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with that set `ray start --address` refuses to add a node.
So every Ray process here runs with the variable set (a node whose address is 127.0.0.1 binds its
servers to 127.0.0.1 only), the `ray` CLI runs through a wrapper (`RAY_CLI`) that lifts the refusal
and keeps 127.0.0.1 as this node's address, and the driver (this process) gets the setting through
`ray_constants`. The test checks that every socket of the cluster's processes and of the driver is
on a loopback address.

Only the processes started here are stopped (never `ray stop`, which stops every Ray of the
machine); the driver's connection is closed by `run_trials`, and the cluster uses the driver's
token-authentication mode (see `driver_auth_mode`): the module runs before or after
`test_ray_backend.py`. Every wait is bounded; a sweep past `SWEEP_S` is interrupted and fails.
"""
from __future__ import annotations

import _thread
import contextlib
import io
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

HERE = Path(__file__).resolve().parents[1]  # tests/: trialfns, factories
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from trialfns import fake_env  # noqa: E402

from suite.core.options import Trial  # noqa: E402
from suite.results.store import ResultStore  # noqa: E402
from suite.sweep.pool import run_trials  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one Ray cluster at a time

NAMES = [f"slow{i}" for i in range(6)]
SLOW_S = 2.5  # each trial's sleep: node 2 is killed while its trials sleep
START_S = 60.0  # bound on `ray start` and on the second node joining
KILL_WITHIN_S = 30.0  # bound on the first trial to start on node 2
GONE_S = 10.0  # bound on node 2's processes exiting after SIGKILL
SWEEP_S = 90.0  # bound on a sweep: past it, it is interrupted as by Ctrl-C (and the test fails)
STOP_GRACE_S = 1.0  # the head: SIGTERM, then SIGKILL what is left after this
# The `ray` CLI (what `.venv/bin/ray` runs) for a node on 127.0.0.1; see the module docstring.
RAY_CLI = (
    "import sys\n"
    "import ray._private.ray_constants as constants, ray._private.services as services\n"
    "constants.ENABLE_RAY_CLUSTER = True  # `ray start --address` refuses to run without it\n"
    "services.get_node_ip_address = lambda address=None: '127.0.0.1'  # this node's address\n"
    "from ray.scripts.scripts import main\n"
    "sys.exit(main())\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or bool(mapped and mapped.is_loopback)


def group(pgid: int) -> list:
    """The live processes of a process group and their descendants (Ray workers have their own group)."""
    import psutil

    out = {}
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                out.update({q.pid: q for q in [p, *p.children(recursive=True)]})
        except (ProcessLookupError, psutil.Error):
            pass
    return [p for p in out.values() if alive(p)]


def alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill(procs: list, sig: int, timeout: float) -> bool:
    """Signal the processes; True once all have exited within `timeout`."""
    import psutil

    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass
    deadline = time.time() + timeout
    while any(alive(p) for p in procs):
        if time.time() > deadline:
            return False
        time.sleep(0.05)
    return True


def node_of(pid: int) -> int | None:
    """The process group of a Ray worker's raylet (the node's group here), None once it is gone."""
    import psutil

    try:
        return os.getpgid(psutil.Process(pid).ppid())
    except (ProcessLookupError, psutil.Error):
        return None


def non_loopback_sockets(pids: list[int]) -> tuple[int, list[str]]:
    """(how many inet sockets the processes have, those not on a loopback address)."""
    import psutil

    count, bad = 0, []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in conns:
            count += 1
            if (c.laddr and not is_loopback(c.laddr.ip)) or (c.raddr and not is_loopback(c.raddr.ip)):
                bad.append(f"pid {pid}: {c.laddr} -> {c.raddr} {c.status}")
    return count, bad


def driver_auth_mode() -> str:
    """The token authentication mode of a driver in this process, for the cluster to match.

    A cluster and its driver must agree: a driver without a token is refused by a cluster that wants
    one, and the workers of a cluster without tokens cannot send results to a driver that wants one
    (the sweep hangs). A process that started a local Ray (`ray.init()`, as test_ray_backend.py does)
    is left in token mode (RAY_AUTH_MODE=token in its environment); a fresh one that connects to
    an address is not.
    """
    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode
    except ImportError:  # a Ray without token authentication
        return "disabled"
    return "token" if get_authentication_mode() == AuthenticationMode.TOKEN else "disabled"


class TwoNodes:
    """A head (1 CPU) and a second node (2 CPUs, resource node2), each in its own process group."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.head_pgid: int | None = None
        self.node2: subprocess.Popen | None = None
        self.start_s = 0.0
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE=driver_auth_mode(),
                   # the workers import `trialfns` (this folder) and `suite`
                   PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
        self.env = env

    def _cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-c", RAY_CLI, "start", "--node-ip-address", "127.0.0.1", "--temp-dir",
                str(self.root), "--object-store-memory", str(80 * 2**20), "--disable-usage-stats",
                "--dashboard-agent-listen-port", str(free_port()), *args]

    def _log(self, name: str):
        return open(self.root / name, "w")

    def log_tail(self, name: str) -> str:
        try:
            return (self.root / name).read_text()[-3000:]
        except OSError:
            return ""

    def start(self) -> None:
        t0 = time.time()
        with self._log("head.log") as log:
            head = subprocess.Popen(
                self._cmd("--head", "--port", str(self.port), "--num-cpus", "1", "--include-dashboard=false",
                          "--ray-client-server-port", str(free_port())),
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.head_pgid = head.pid  # the daemons keep the group of the CLI that started them
        assert head.wait(timeout=START_S) == 0, f"ray start --head failed:\n{self.log_tail('head.log')}"
        with self._log("node2.log") as log:
            self.node2 = subprocess.Popen(
                self._cmd("--address", self.address, "--num-cpus", "2", "--resources", json.dumps({"node2": 2}),
                          "--block"),
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_for_nodes(2)
        self.start_s = time.time() - t0

    def wait_for_nodes(self, n: int) -> None:
        from ray._raylet import GcsClient
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        gcs = GcsClient(address=self.address)
        deadline = time.time() + START_S
        while True:
            nodes = gcs.get_all_node_info(timeout=5).values()
            alive = [i for i in nodes if i.state == GcsNodeInfo.GcsNodeState.ALIVE]
            if len(alive) >= n:
                assert {i.node_manager_address for i in alive} == {"127.0.0.1"}
                return
            assert self.node2.poll() is None, f"the second node exited:\n{self.log_tail('node2.log')}"
            assert time.time() < deadline, f"{len(alive)} of {n} Ray nodes up after {START_S:g}s"
            time.sleep(0.2)

    def pids(self) -> list[int]:
        return [p.pid for pgid in (self.head_pgid, self.node2 and self.node2.pid) if pgid for p in group(pgid)]

    def kill_node2(self) -> bool:
        """SIGKILL node 2: its group (CLI, raylet, agents) and its workers; True once all are gone."""
        if self.node2 is None:
            return True
        gone = kill(group(self.node2.pid), signal.SIGKILL, GONE_S)
        self.node2.wait(timeout=GONE_S)
        return gone

    def stop(self) -> None:
        """Stop only what this cluster started: node 2, then the head (SIGTERM, then SIGKILL)."""
        self.kill_node2()
        if self.head_pgid is not None:
            procs = group(self.head_pgid)
            if not kill(procs, signal.SIGTERM, STOP_GRACE_S):
                kill(procs, signal.SIGKILL, GONE_S)
        leftovers = self.pids()
        shutil.rmtree(self.root, ignore_errors=True)
        assert not leftovers, f"Ray processes left running: {leftovers}"


class Killer(threading.Thread):
    """Watch the trials start (their marker files); kill node 2 when the first one starts there."""

    def __init__(self, cluster: TwoNodes, marker_dir: Path):
        super().__init__(daemon=True)
        self.cluster, self.marker_dir = cluster, marker_dir
        self.stop = threading.Event()
        self.started: dict[str, tuple[str, int, int | None]] = {}  # marker -> (model, worker pid, its node)
        self.killed_at: float | None = None
        self.node2_gone = False
        self.sockets: tuple[int, list[str]] = (0, [])
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            deadline = time.time() + KILL_WITHIN_S
            node2 = self.cluster.node2.pid
            while not self.stop.is_set():
                self.look()
                if self.killed_at is None and any(node == node2 for _, _, node in self.started.values()):
                    # a trial runs on each node: every kind of Ray process is up, sockets included
                    self.sockets = non_loopback_sockets(self.cluster.pids() + [os.getpid()])
                    self.killed_at = time.time()
                    self.node2_gone = self.cluster.kill_node2()
                if self.killed_at is None and time.time() > deadline:
                    return
                self.stop.wait(0.05)
            self.look()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def look(self) -> None:
        for f in self.marker_dir.iterdir():
            if f.name not in self.started:
                model, pid = f.name.rsplit(".", 1)
                self.started[f.name] = (model, int(pid), node_of(int(pid)))


@pytest.fixture
def two_nodes():
    pytest.importorskip("ray")
    pytest.importorskip("psutil")
    cluster = TwoNodes(Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp")))  # short: Unix socket paths
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def loopback_driver(monkeypatch):
    """This process as a driver of a loopback cluster (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 for it)."""
    import ray
    import ray._private.ray_constants as constants

    assert not ray.is_initialized(), "a Ray connection is already open; run_trials would use it, not --address"
    monkeypatch.setattr(constants, "ENABLE_RAY_CLUSTER", False)
    yield
    assert not ray.is_initialized(), "run_trials left its Ray connection open"


@contextlib.contextmanager
def deadline(seconds: float):
    """Interrupt the main thread after `seconds`, as Ctrl-C would: `run_trials` then returns with `interrupted`."""
    timer = threading.Timer(seconds, _thread.interrupt_main)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def stored_rows(db: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT trial_id, status, reason FROM trials ORDER BY trial_id").fetchall()


def sweep(trials: list, cluster: TwoNodes, store: ResultStore, **fn_kwargs) -> tuple[list, list]:
    seen = []

    def keep(record) -> None:  # the driver writes each record once, as in `suite run`
        store.write(record)
        seen.append(record)

    with deadline(SWEEP_S):
        records = run_trials(trials, fn="trialfns:behave", fn_kwargs=fn_kwargs, backend="ray",
                             address=cluster.address, env_fn="trialfns:fake_env", on_result=keep, progress=False,
                             console=Console(file=io.StringIO(), width=200))
    assert not records.interrupted, f"the sweep ran past {SWEEP_S:g}s; it finished {len(records)} trial(s)"
    return list(records), seen


def test_killed_node_trials_are_crashed_and_retried(two_nodes, loopback_driver, tmp_path):
    t0 = time.time()
    cluster = two_nodes
    trials = [Trial(model=n, device="cpu") for n in NAMES]
    ids = sorted(t.trial_id for t in trials)
    markers = tmp_path / "markers"
    markers.mkdir()
    killer = Killer(cluster, markers)
    killer.start()
    with ResultStore(tmp_path / "results.db") as store:
        try:
            records, seen = sweep(trials, cluster, store, slow_s=SLOW_S, marker_dir=str(markers))
        finally:
            killer.stop.set()
            killer.join(timeout=GONE_S + 5)
        swept = time.time()
        assert killer.error is None, repr(killer.error)
        assert killer.killed_at is not None, f"no trial started on node 2 within {KILL_WITHIN_S:g}s: {killer.started}"
        assert killer.node2_gone, "node 2's processes (raylet, workers) still run after SIGKILL"
        count, bad = killer.sockets
        assert count > 0 and not bad, f"sockets off the loopback address: {bad}"

        # every trial once, written by the driver: in the records and in the store
        assert sorted(r.trial.trial_id for r in records) == ids
        assert [r.trial.trial_id for r in seen] == [r.trial.trial_id for r in records]
        rows = stored_rows(store.path)
        assert [r[0] for r in rows] == ids
        assert sorted((r.trial.trial_id, r.status) for r in records) == [r[:2] for r in rows]

        # the trials on node 2 crashed, those on the head did not
        status = {r.trial.model: r.status for r in records}
        reason = {r.trial.model: r.reason for r in records}
        node2, head = cluster.node2.pid, cluster.head_pgid
        on_node2 = {m for m, _, node in killer.started.values() if node == node2}
        on_head = {m for m, _, node in killer.started.values() if node == head}
        crashed = {m for m, s in status.items() if s == "crashed"}
        assert set(status.values()) <= {"ok", "crashed"}, status
        assert on_node2 and on_node2 <= crashed, (status, killer.started)  # killed while they slept
        assert not crashed & on_head, (status, killer.started)
        for m in crashed:
            assert "died" in reason[m] and re.search(r"node|worker", reason[m], re.I), reason[m]
        ok_pids = {int(re.search(r"pid=(\d+)", reason[m])[1]) for m, s in status.items() if s == "ok"}
        assert ok_pids <= {pid for _, pid, node in killer.started.values() if node == head}, reason
        noticed = max(r.finished_at for r in records if r.status == "crashed") - killer.killed_at

        # --retry-failed: only ok (and skipped) rows count as done; the crashed trials run again, on the head
        done = store.done_ids(fake_env("cpu").key(), statuses=("ok", "skipped"))
        todo = [t for t in trials if t.trial_id not in done]
        assert {t.model for t in todo} == crashed
        retried, _ = sweep(todo, cluster, store, slow_s=0.1)
        assert sorted(r.trial.model for r in retried) == sorted(crashed)
        assert all(r.status == "ok" for r in retried), [(r.trial.model, r.status, r.reason) for r in retried]
        rows = stored_rows(store.path)
        assert [r[0] for r in rows] == ids and {r[1] for r in rows} == {"ok"}  # replaced, not added
    print(f"\ncluster up in {cluster.start_s:.1f}s; sweep {swept - t0:.1f}s, node 2 killed at "
          f"+{killer.killed_at - t0:.1f}s, "
          f"its trials recorded crashed {noticed:.1f}s later: {({m: reason[m] for m in sorted(crashed)})}; "
          f"retry {time.time() - swept:.1f}s")


def test_node_death_reason():
    ray = pytest.importorskip("ray")
    from suite.sweep.ray_pool import _failure

    exc = ray.exceptions.NodeDiedError("Task failed because the node it was running on is dead or unavailable. "
                                       "Node IP: 10.0.0.7, node ID: 46000ac0b8. This can happen if ...")
    assert _failure(ray, exc) == ("crashed", "the Ray node running the task died (Ray NodeDiedError, node 10.0.0.7)")
    assert _failure(ray, ray.exceptions.NodeDiedError("gone")) == (
        "crashed", "the Ray node running the task died (Ray NodeDiedError)")
