#!/usr/bin/env python3
"""Cluster agent benchmark: the DockerContainer agent's monitor, the watcher's detection of a dead container,
failover under Pacemaker beside the stock docker agent, and offline migration.

Prints one JSON object per figure on stdout (progress on stderr), in the format of bench/common.py.
The monitor and detect figures run on one private engine (dockerd in its own mount and network namespaces, never the
host's) with ``veritas plugin serve``, both under a fresh /tmp root (tests/integration/dockerstack.py).
The managed container ``bench-web`` (busybox ``sleep``, a veritas volume at /data) is brought online by
the OCF agent's ``start``, as Pacemaker would, and registered for the watcher under the root.

  monitor_p95_50_containers  one ``monitor`` of bench-web by ``agents/ocf/DockerContainer`` executed as
                             Pacemaker executes it (a new process with OCF_RESKEY_* in its environment;
                             interpreter start-up and imports included; PATH as AGENT_PATH says) while the
                             engine runs 50 containers (bench-web and 49 idle ones); p95 over 100 calls (10
                             with --quick), in ms. Target: value < 50 ms. Baseline: the stock
                             ``ocf:heartbeat:docker`` monitor (resource-agents,
                             /usr/lib/ocf/resource.d/heartbeat/docker) of the same container, run the same
                             way (DOCKER_HOST names the private engine). The calls rotate with a ``docker
                             inspect`` of it by the CLI, one in-process call of the agent core
                             (agents.container.DockerContainer.monitor) and a bare ``python3 -S -c pass``:
                             their p50/p95 go to stderr only, to tell the agent's own cost from the
                             process start-up's.
  detect_container_death     from ``kill -9`` of bench-web's process (the container's PID 1, from the host)
                             to the watcher's notifier being called: the watcher core (agents.watch.Watcher,
                             the same code ``python3 -m agents.watch`` runs) in this process with a notifier
                             that records the time of the call; the Pacemaker notifier would run
                             ``crm_resource --fail`` at that moment, whose own run time is not included.
                             p50 over 20 kills (3 with --quick), in ms; target value < 1000 ms.
                             Baseline: detection by polling at a 10 s monitor interval, from the same kill:
                             the kill falls at a uniformly distributed point of the poller's interval, so
                             the next monitor starts a phase U(0, 10 s) after it. Each run draws its phase
                             from its own stratum of [0, 10 s) (stratified, in shuffled order: the phases of
                             the runs cover the interval evenly), waits that long after the kill, and then
                             executes the OCF monitor for real; detection is when that monitor returns
                             "not running" (7). Were it still "running", the next poll 10 s later would
                             count (never seen). So the baseline is the phase plus a real monitor's time,
                             not an assumed 5 s. The agent restarts the container (OCF start) between runs.
  detect_container_death_p95 the p95 of the same runs, and of the same polls (information: no target).

The figures below run in one three-node Pacemaker lab (``scripts/lab up --pacemaker --app``, leases
5 s / 0.5 s as in tests/cluster/test_pacemaker_failover.py; bench/pcmk_figures.py), brought up at the
first of their groups, beside the engine above. To web's group (ocf:veritas:DockerContainer ``web``, the
lab's busybox with a veritas volume webdata:/data, on the DockerDaemon clone, with the watcher) the bench
adds through cibadmin the baseline ``stockweb``: the stock ocf:heartbeat:docker agent (resource-agents;
it drives the docker CLI on /run/docker.sock, the node's engine) running the same image with no volume
(``--init sleep``: the stock agent word-splits run_cmd without quotes, so web's ``sh -c '...'`` cannot
be passed; both end at once on SIGTERM), with web's stickiness, migration-threshold 3, failure timeout
and 10 s monitor, on the DockerDaemon clone, and colocated with web's group at score 200 (above the
stickiness 100): one event moves both, yet it can move alone when its own fail count bars it from
web's node. Each run starts with the cluster idle (``crm_resource --wait``, every dockerd adopted, the
resources started). The scenarios are bench/pcmk_failover.py's, the code the test asserts on. "Running
on another node": crm_mon shows the resource Started on a node other than the one of the event, and its
container runs there; for web, the container also reads from its volume the token written into it
before the event (docker exec). Polled every 0.1-0.2 s (crm_mon inside a node by nsenter, docker CLI on
the node's socket). value: p50 of web, baseline: p50 of stockweb, ratio: the median per-run ratio,
spread its [min, max]; a ``*_p95`` line follows each with the p95 of both. 10 runs each (1 with
--quick). No target: issue 11 names none (target and met null). MountSampler (tests/cluster/
test_failover.py) reads every node's mount table ten times a second from lab up to down; ``overlaps``
counts samples with a volume mounted on two nodes at once, and any overlap fails the bench (it exits
with an error after printing the line).

  failover_standby           ``crm_attribute --node N --name standby --update on`` of the node both run
                             on (one event, both timed); the node is taken out of standby after.
  failover_container_kill    ``kill -9`` (from the host) of the resource's container's PID 1 until its
                             fail count reaches migration-threshold 3; each kill below it waits for the
                             restart in place (Started again in Pacemaker, a new container running) and
                             the cluster to settle; timed from the kill that crossed the threshold to
                             running on another node. Web's kills are seen by the watcher at once (one
                             is sometimes counted twice by Pacemaker 2.1.5, so web may move after 2
                             kills: stderr shows the kills), stockweb's by its 10 s monitor. A kill right
                             after the cluster settled would fall at the same point of that monitor's
                             interval in every run (the next monitor came ~8 s after the settle here), so
                             the kill at fail count 2 first waits a phase drawn one per stratum of
                             [0, 10 s) over the runs (shuffled, as detect's polling baseline; the same
                             phase for both in a run): the wait until the next monitor, (offset - phase)
                             mod 10 s, then samples the interval evenly whatever the offset. Separate
                             events: in each run web and stockweb take turns (order alternating), the
                             other one stopped (target-role Stopped) meanwhile, so neither move loads
                             the other's; fail counts are cleared after.
  failover_dockerd_kill      ``scripts/lab kill N --only dockerd`` of the node the resource runs on;
                             separate events as above. The stock agent's stop on a dead engine fails
                             (``docker version`` fails: OCF_ERR_GENERIC), so Pacemaker fences that node
                             before starting stockweb elsewhere: its figure includes the fencing (stderr
                             counts the runs). After each run: the fenced node started again, fail counts
                             cleared, the clone restarts the node's dockerd.
  failover_node_kill         ``scripts/lab kill N`` (every process of the node) of the node both run on
                             (one event, both timed): Pacemaker fences it (fence_lab), then recovers both.
                             The node is started again (``scripts/lab start``, rejoined, its dockerd
                             adopted) before the next run.
  migrate_container          ``veritas migrate container mig --to B --to-host URL`` run inside node A
                             (nsenter, its config) of a container (busybox, trap on SIGTERM, stop timeout
                             5 s) on veritas volume migdata, from the command's start until the container
                             runs on B and reads back (docker exec) the token written before; baseline: a
                             bare ``docker stop``, ``docker rm`` on A and ``docker run`` of the same
                             container with a local-driver volume on B, then one ``docker exec`` of it
                             (ls /data): the data is NOT carried (a local volume stays on its node).
                             Nodes node2 and node3, direction alternating; p50 over 10 interleaved pairs
                             (1 with --quick) after one warm-up of each. No target: issue 11 names none,
                             and nothing justifies the "<=2" once written here (target null).

Runs as root. Everything it makes (containers, engine, plugin, disk group, mounts, loop devices, the
lab by ``scripts/lab down``) is removed at the end, processes by PID and loop devices by their backing
file's identity, also on error or SIGTERM. ``--quick`` runs a few repetitions of each (smoke test).
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# this file is named agents.py: keep its directory off the path so `agents` is the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from bench.common import Pairs, emit, log, pct, strata_phases  # noqa: E402
from bench.pcmk_figures import LabFigures  # noqa: E402

OCF_AGENT = REPO / "agents" / "ocf" / "DockerContainer"
STOCK_AGENT = Path("/usr/lib/ocf/resource.d/heartbeat/docker")
OCF_ROOT = "/usr/lib/ocf"
RESOURCE = "benchweb"
CONTAINER = "bench-web"
VOLUME = "benchvol"
LOAD_CONTAINERS = 49  # with bench-web: the engine runs 50
# the agents' PATH, as on a node where the package installs into the system's Python: `python3` (the
# agent scripts' `#!/usr/bin/env -S python3 -S`) is this interpreter, found directly, not through a
# version manager's shim (pyenv's is a shell script costing ~90 ms a start on this development machine)
AGENT_PATH = os.pathsep.join([str(Path(sys.executable).parent), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
POLL_INTERVAL = 10.0  # seconds: the monitor interval the watcher is compared against
OCF_NOT_RUNNING = 7
PCMK_GROUPS = ["standby", "container_kill", "dockerd_kill", "node_kill"]  # failover_*, in the Pacemaker lab


def poll_detection(kill_at: float, phase: float, interval: float, monitor: Callable[[], int],
                   clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep, max_polls: int = 3) -> float:
    """Seconds from ``kill_at`` until a poller whose next monitor is due ``phase`` after the kill (then
    every ``interval``) sees the resource not running: the end of the first monitor that returns 7."""
    for k in range(max_polls):
        due = kill_at + phase + k * interval
        left = due - clock()
        if left > 0:
            sleep(left)
        rc = monitor()
        if rc == OCF_NOT_RUNNING:
            return clock() - kill_at
        if rc != 0:
            raise RuntimeError(f"the polling monitor returned {rc}, neither running (0) nor not running (7)")
    raise RuntimeError(f"{max_polls} polls {interval:g} s apart never saw the killed container stopped")


class Stamps:
    """A watcher notifier that records when it is called (time.monotonic()), in a queue read per run."""

    def __init__(self) -> None:
        self.q: queue.Queue[tuple[str, str, float]] = queue.Queue()

    def fail(self, resource: str, reason: str) -> None:
        self.q.put((resource, reason, time.monotonic()))

    def drain(self) -> list[tuple[str, str, float]]:
        out = []
        while True:
            try:
                out.append(self.q.get_nowait())
            except queue.Empty:
                return out

    def next_for(self, resource: str, timeout: float) -> tuple[str, str, float] | None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                hit = self.q.get(timeout=left)
            except queue.Empty:
                return None
            if hit[0] == resource:
                return hit
        return None


def emit_monitor(ocf_ms: list[float], stock_ms: list[float]) -> None:
    """The monitor figure: p95 of the agent against p95 of the stock agent (no pairs: p95 of each side)."""
    emit("monitor_p95_50_containers", pct(ocf_ms, 0.95), "ms", pct(stock_ms, 0.95), "value<50",
         fields={"runs": len(ocf_ms)})


def emit_detect(watch_ms: list[float], poll_ms: list[float]) -> None:
    """The detection figures: p50 of the watcher against polling (pairs: the same kill), then their p95."""
    Pairs(list(watch_ms), list(poll_ms)).emit("detect_container_death", "ms", "value<1000",
                                               fields={"runs": len(watch_ms)})
    emit("detect_container_death_p95", pct(watch_ms, 0.95), "ms", pct(poll_ms, 0.95), None,
         fields={"runs": len(watch_ms)})


def _ms(xs: list[float]) -> str:
    return f"p50 {pct(xs, 0.5):.1f} ms, p95 {pct(xs, 0.95):.1f} ms, max {max(xs):.1f} ms"


class Bench:
    def __init__(self, root: Path, quick: bool) -> None:
        from tests.integration.dockerstack import DockerNode

        self.root = root
        self.quick = quick
        self.node = DockerNode(root / "node1")
        self.plugin: Any = None
        self.config: Any = None
        self.state = root / "agents"  # the agents' registrations (VERITAS_AGENT_STATE)
        self.shared = False
        self.loaded = False
        self.params: dict[str, str] = {}
        self.images: set[tuple[int, int, int]] = set()  # what loop devices of ours can be backed by
        self.pcmk = LabFigures(root / "pcmk", quick)  # the Pacemaker lab's figures (brought up when first needed)

    # ------------------------------------------------------------ set-up / clean-up

    def setup(self) -> None:
        from lab.image import IMAGE
        from storage.config import load_config
        from tests.integration.dockerstack import PluginProcess, share_mount_root, write_plugin_config

        share_mount_root(self.root / "mnt")  # before dockerd's namespace exists, so it sees volume mounts
        self.shared = True
        log("starting dockerd")
        self.node.start()
        path = write_plugin_config(self.root, self.node)
        self.config = load_config(path)
        self.plugin = PluginProcess(path, self.node.plugins / "veritas.sock", self.root / "plugin.log")
        log("starting the plugin")
        self.plugin.start()
        self.state.mkdir()
        # the bench's root in every container's environment: a process left behind names it (the smoke test)
        self.params = {"name": CONTAINER, "image": IMAGE, "command": "sleep 1000000",
                       "run_options": f"-e VBENCH_ROOT={self.root}", "volumes": f"{VOLUME}:/data",
                       "docker_host": self.node.url, "stop_timeout": "1"}
        self.start_managed()
        self.images |= self.image_ids()  # the volume's image too, while it exists
        log(f"{CONTAINER} online (OCF start), on veritas volume {VOLUME}")

    def cleanup(self) -> None:
        log("cleaning up")
        try:
            self.pcmk.cleanup()
        except Exception as exc:  # go on with the rest
            log(f"taking the Pacemaker lab down: {exc!r}")
        try:
            self.node.stop()  # removes containers and volumes through Docker (and so through the plugin)
        except Exception as exc:  # go on with the rest
            log(f"stopping dockerd: {exc!r}")
        if self.plugin is not None:
            try:
                self.plugin.stop()
            except Exception as exc:  # go on with the rest
                log(f"stopping the plugin: {exc!r}")
        self.images |= self.image_ids()
        if self.config is not None:
            from storage import diskgroup

            for name in diskgroup.list_names(self.config):
                common.destroy_dg(self.config, name)
        if self.shared:
            from tests.integration.dockerstack import unshare_mount_root

            unshare_mount_root(self.root / "mnt")
        self.force_clean(self.images)
        shutil.rmtree(self.root, ignore_errors=True)

    def image_ids(self) -> set[tuple[int, int, int]]:
        """Identities (device, inode) of every file under the storage state root: the disk group's disks
        and volumes, whatever a loop device of ours is backed by."""
        from storage.kernel import loop

        out = set()
        if self.config is None:
            return out
        for dirpath, _dirs, files in os.walk(self.config.state_root):
            for f in files:
                ident = loop.identity(Path(dirpath) / f)
                if ident is not None:
                    out.add(ident)
        return out

    def force_clean(self, images: set[tuple[int, int, int]]) -> None:
        from storage.kernel import loop, mounts

        prefix = str(self.root) + "/"
        left = []
        for e in sorted(mounts.table(), key=lambda e: -len(e.target)):
            if e.target.startswith(prefix):
                left.append(f"mount {e.target}")
                subprocess.run(["umount", "-l", e.target], capture_output=True, check=False)
        for _ in range(2):  # loops on files inside our disks first, then the disks' own
            for dev in loop.attached():
                if loop.backing_id(dev) in images:
                    left.append(f"loop {dev}")
                    subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
        if left:
            log(f"forced clean-up of leftovers: {', '.join(left)}")
        log(f"loop identities: {sorted(images)}")

    # ------------------------------------------------------------ the agents, as Pacemaker runs them

    def ocf_env(self, params: Mapping[str, str], **extra: str) -> dict[str, str]:
        return {**os.environ, "PATH": AGENT_PATH, "OCF_ROOT": OCF_ROOT, "OCF_RESOURCE_INSTANCE": RESOURCE,
                "VERITAS_AGENT_STATE": str(self.state),
                **{f"OCF_RESKEY_{k}": v for k, v in params.items()}, **extra}

    def ocf(self, action: str, timeout: float = 120) -> int:
        return subprocess.run([str(OCF_AGENT), action], env=self.ocf_env(self.params), capture_output=True,
                              timeout=timeout, check=False).returncode

    def start_managed(self) -> None:
        r = subprocess.run([str(OCF_AGENT), "start"], env=self.ocf_env(self.params), capture_output=True, text=True,
                           timeout=120, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"OCF start of {CONTAINER} failed ({r.returncode}): {r.stderr.strip()}")

    def managed_pid(self) -> int:
        with contextlib.closing(self.node.client()) as c:
            st = c.api.inspect_container(CONTAINER)["State"]
        if st["Status"] != "running" or not st["Pid"]:
            raise RuntimeError(f"{CONTAINER} is not running: {st}")
        return int(st["Pid"])

    # ------------------------------------------------------------ monitor with 50 containers

    def load(self) -> None:
        """49 idle containers beside bench-web, started four at a time."""
        from lab.image import IMAGE

        if self.loaded:
            return
        t0 = time.perf_counter()
        with contextlib.closing(self.node.client()) as c:
            def one(i: int) -> None:
                c.containers.run(IMAGE, ["sleep", "1000000"], name=f"bench-load-{i}", detach=True,
                                 environment=[f"VBENCH_ROOT={self.root}"])

            with ThreadPoolExecutor(4) as pool:
                list(pool.map(one, range(LOAD_CONTAINERS)))
            running = len(c.containers.list(filters={"status": "running"}))
        if running != LOAD_CONTAINERS + 1:
            raise RuntimeError(f"{running} containers run, not {LOAD_CONTAINERS + 1}")
        self.loaded = True
        log(f"{running} containers running ({time.perf_counter() - t0:.1f} s to start {LOAD_CONTAINERS})")

    def monitor(self) -> None:
        from agents.container import from_attributes
        from lab.image import IMAGE

        self.load()
        ours_env = self.ocf_env(self.params)
        stock_env = self.ocf_env({"name": CONTAINER, "image": IMAGE}, DOCKER_HOST=self.node.url)
        core = from_attributes(RESOURCE, self.params)

        def execute(argv: list[str], env: dict[str, str], what: str) -> Callable[[int], float]:
            def run(_i: int) -> float:
                t0 = time.perf_counter()
                r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
                dt = (time.perf_counter() - t0) * 1000
                if r.returncode != 0:
                    raise RuntimeError(f"{what} returned {r.returncode} for a running container: {r.stderr[-500:]}")
                return dt
            return run

        def in_process(_i: int) -> float:
            t0 = time.perf_counter()
            res = core.monitor()
            dt = (time.perf_counter() - t0) * 1000
            if res.state.value != "online" or res.confidence != 100:
                raise RuntimeError(f"core monitor of a running container: {res}")
            return dt

        sides = [execute([str(OCF_AGENT), "monitor"], ours_env, "ocf:veritas:DockerContainer monitor"),
                 execute([str(STOCK_AGENT), "monitor"], stock_env, "ocf:heartbeat:docker monitor"),
                 execute(["docker", "-H", self.node.url, "inspect", "--type=container", CONTAINER], dict(os.environ),
                         "docker inspect"),
                 in_process,
                 execute([sys.executable, "-S", "-c", "pass"], ours_env, "python3 -S -c pass")]
        for side in sides:
            side(-1)  # warm-up: page cache, the engine's first inspect
        calls = 10 if self.quick else 100
        ours, stock, cli, inproc, bare = common.rotated(calls, *sides)
        log(f"monitor, 50 containers, {calls} calls each: ocf:veritas:DockerContainer exec {_ms(ours)}; "
            f"ocf:heartbeat:docker exec {_ms(stock)}; docker inspect CLI {_ms(cli)}; "
            f"agent core in-process {_ms(inproc)}; interpreter start-up alone {_ms(bare)}")
        emit_monitor(ours, stock)

    # ------------------------------------------------------------ detection of a killed container

    def detect(self) -> None:
        from agents.watch import Watcher

        runs = 3 if self.quick else 20
        phases = strata_phases(runs, POLL_INTERVAL, random.Random(11))
        stamps = Stamps()
        watch_ms: list[float] = []
        poll_ms: list[float] = []
        with Watcher(stamps, self.state) as w:
            if not w.ready.wait(15):
                raise RuntimeError("the watcher did not open the engine's event stream")
            time.sleep(0.3)  # the stream is open; let the engine register the subscription
            for i in range(-1, runs):  # run -1: warm-up, not recorded
                phase = phases[i] if i >= 0 else 1.0
                stamps.drain()
                pid = self.managed_pid()
                t0 = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                poll_s = poll_detection(t0, phase, POLL_INTERVAL, lambda: self.ocf("monitor", timeout=60))
                hit = stamps.next_for(RESOURCE, 10)
                if hit is None:
                    raise RuntimeError(f"run {i}: the watcher did not report the killed {CONTAINER}")
                if "exit code 137" not in hit[1]:
                    raise RuntimeError(f"run {i}: the watcher reported {hit[1]!r}, not a kill -9")
                watch = (hit[2] - t0) * 1000
                log(f"kill -9 run {i}: watcher {watch:.1f} ms; poll (phase {phase:.2f} s) {poll_s * 1000:.0f} ms")
                if i >= 0:
                    watch_ms.append(watch)
                    poll_ms.append(poll_s * 1000)
                self.start_managed()  # recovery, as the cluster would: the agent's start, a new registration
        log(f"detect, {runs} kills: watcher {_ms(watch_ms)}; polling at {POLL_INTERVAL:g} s {_ms(poll_ms)}")
        emit_detect(watch_ms, poll_ms)

    def run_group(self, group: str) -> None:
        if group == "monitor":
            self.monitor()
        elif group == "detect":
            self.detect()
        elif group == "migrate":
            self.pcmk.migrate()
        elif group in PCMK_GROUPS:
            self.pcmk.figure(group)


def main(argv: list[str] | None = None) -> int:
    return common.main("bench-agents", __doc__, argv,
                       tools=("dockerd", "docker", "unshare", "ip", "losetup", "nsenter", "corosync", "pacemakerd",
                              str(STOCK_AGENT)),
                       groups=["monitor", "detect", "migrate", *PCMK_GROUPS], make=Bench,
                       run_group=lambda bench, group: bench.run_group(group))  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
