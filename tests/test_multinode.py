"""Several nodes: two torchrun agents (--nnodes=2, one process each, c10d rendezvous on 127.0.0.1), both
writing one run directory as two nodes on a shared filesystem would (rank 0 writes). A node that dies
mid-run, then both agents relaunched with the same command, and a worker killed under --max-restarts=1,
each end with the weights of an uninterrupted two-agent run, tensor for tensor."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SMALL_DISTILL
from conftest import subprocess_env as env
from safetensors.torch import load_file

from tinymim.train.distributed import restart_store_warning

slow = pytest.mark.slow  # torchrun agents as subprocesses

# 24 steps (256 images, batch 32, 3 epochs), a checkpoint every 4: a kill after the first leaves 20 to go
RUN = ["distill", *SMALL_DISTILL, "student.drop_path_rate=0.1", "data.synthetic_size=256", "data.num_workers=0",
       "train.batch_size=32", "train.epochs=3", "train.checkpoint_every=4"]
STEPS = 24
TIMEOUT = 420  # seconds for one launch of both agents on a busy 2-core machine; past it the test fails


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_command(out: Path, port: int, rdzv_id: str, max_restarts: int = 0) -> list[str]:
    """One node's launch: the command a user runs on each of the two machines."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={rdzv_id}",
            f"--max-restarts={max_restarts}", "-m", "tinymim", *RUN, "--output", str(out)]


class Nodes:
    """Two agents started with one command; each in its own session (its own process group), so a
    test can kill one node whole and, whatever happens, kills every process it started."""

    def __init__(self, cmd: list[str], logs: Path, tag: str, **extra_env: str):
        self.procs, self.logs = [], []
        for node in range(2):
            log = logs / f"{tag}-node{node}.log"
            self.logs.append(log)
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen(cmd, env=env(**extra_env), stdout=f, stderr=subprocess.STDOUT,
                                                   start_new_session=True))

    def output(self, node: int) -> str:
        return self.logs[node].read_text(errors="replace")

    def wait(self, timeout: float = TIMEOUT) -> list[int]:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"the agents did not end within {timeout} s:\n" + self.output(0)[-3000:]
                            + "\n" + self.output(1)[-3000:])
        return [proc.returncode for proc in self.procs]

    def workers(self, node: int) -> list[int]:
        return children(self.procs[node].pid)

    def kill_node(self, node: int) -> None:
        """The node dies: its agent and its worker (torchrun starts each worker in a session of its own)."""
        workers = self.workers(node)
        self.procs[node].kill()
        for pid in workers:
            kill_group(pid)
        self.procs[node].wait()

    def kill(self) -> None:
        for proc in self.procs:
            workers = children(proc.pid) if proc.poll() is None else []
            kill_group(proc.pid)
            for pid in workers:
                kill_group(pid)
        for proc in self.procs:
            proc.wait()


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def rank_of(pid: int) -> int | None:
    """The RANK torchrun gave a worker (its environment), or None once it has gone."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [v.split(b"=", 1)[1] for v in environ if v.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


def wait_for(condition, what: str, nodes: Nodes, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if any(proc.poll() is not None for proc in nodes.procs):
            break
        time.sleep(0.02)
    nodes.kill()
    pytest.fail(f"never saw {what}:\n" + nodes.output(0)[-3000:] + "\n" + nodes.output(1)[-3000:])


def checkpoint_step(out: Path) -> int:
    """The step of RUN/checkpoints/last.pt (0 if none yet; it is replaced by a rename, never half-written)."""
    try:
        return torch.load(out / "checkpoints" / "last.pt", weights_only=True)["global_step"]
    except (FileNotFoundError, EOFError, RuntimeError):
        return 0


def last_logged_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().split("\n")[:-1]  # a line being written is not complete
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if '"loss"' in line]
    return steps[-1] if steps else 0


def node_of_rank(nodes: Nodes, rank: int) -> int:
    def find():
        for node in range(2):
            for pid in nodes.workers(node):
                if rank_of(pid) == rank:
                    return node + 1  # 1-based, so that node 0 is a truthy answer
        return 0
    return wait_for(find, f"the worker of rank {rank}", nodes) - 1


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "student.safetensors"), load_file(b / "student.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The same two-agent run, never interrupted."""
    tmp = tmp_path_factory.mktemp("multinode")
    out = tmp / "straight"
    nodes = Nodes(agent_command(out, free_port(), "straight"), tmp, "straight")
    try:
        codes = nodes.wait()
    finally:
        nodes.kill()
    assert codes == [0, 0], nodes.output(0)[-3000:] + nodes.output(1)[-3000:]
    assert last_logged_step(out) == STEPS
    return out


def kill_mid_run(nodes: Nodes, out: Path) -> int:
    """Wait (for conditions, not seconds) until a checkpoint exists and a step after it was logged;
    returns that checkpoint's step."""
    step = wait_for(lambda: checkpoint_step(out), "a checkpoint", nodes)
    wait_for(lambda: last_logged_step(out) > step, "a step after the checkpoint", nodes)
    return step


@slow
@pytest.mark.parametrize("dying_rank", [1, 0])
def test_a_node_that_dies_then_both_relaunched_resume_to_the_same_weights(tmp_path, uninterrupted, dying_rank):
    """One node dies (its agent and worker SIGKILLed) after a checkpoint; the other agent's worker loses
    its peer and that agent ends (--max-restarts=0) in bounded time; the user relaunches both agents with
    the same command, and the run resumes from its last checkpoint to the uninterrupted run's weights."""
    out = tmp_path / "run"
    port = free_port()
    nodes = Nodes(agent_command(out, port, "killed"), tmp_path, "first")
    try:
        dying = node_of_rank(nodes, dying_rank)
        kill_mid_run(nodes, out)
        nodes.kill_node(dying)
        survivor = 1 - dying
        codes = nodes.wait()
        assert codes[survivor] != 0, nodes.output(survivor)[-3000:]
    finally:
        nodes.kill()
    saved = checkpoint_step(out)
    assert 4 <= saved < STEPS and not (out / "student.safetensors").exists(), "the run was not killed part-way"

    again = Nodes(agent_command(out, free_port(), "killed"), tmp_path, "again")
    try:
        codes = again.wait()
    finally:
        again.kill()
    logs = again.output(0) + again.output(1)
    assert codes == [0, 0], logs[-4000:]
    assert f"resuming {out} from step {saved}" in logs, logs[-4000:]
    assert_same_weights(uninterrupted, out)
    assert last_logged_step(out) == STEPS


@slow
def test_a_worker_killed_under_max_restarts_is_restarted_and_resumes_to_the_same_weights(tmp_path, uninterrupted):
    """--max-restarts=1: one worker SIGKILLed after a checkpoint; both agents restart their workers
    (a new rendezvous), which resume from the last checkpoint to the uninterrupted run's weights.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 is part of the command: by default the workers of every round
    share one store kept by the agents, the agent whose worker died counts a restart and the other
    (restarted for the membership change) does not, and the new workers find the dead round's gloo
    addresses: one fails to connect, the other waits in init_process_group for its 30-minute timeout
    (pytorch/pytorch#135712)."""
    out = tmp_path / "run"
    nodes = Nodes(agent_command(out, free_port(), "restarted", max_restarts=1), tmp_path, "restart",
                  TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    try:
        node = node_of_rank(nodes, 1)
        (worker,) = nodes.workers(node)
        saved = kill_mid_run(nodes, out)
        kill_group(worker)
        codes = nodes.wait()
    finally:
        nodes.kill()
    logs = nodes.output(0) + nodes.output(1)
    assert codes == [0, 0], logs[-4000:]
    assert f"resuming {out} from step " in logs, logs[-4000:]
    assert "--max-restarts with the agents' shared store" not in logs  # the store is not shared here
    assert saved >= 4
    assert_same_weights(uninterrupted, out)
    assert last_logged_step(out) == STEPS


def test_workers_that_torchrun_may_restart_on_a_shared_store_are_warned():
    """What torchrun puts in a worker's environment: restarts allowed and the agents' store shared
    (its default) is the case that hangs on restart; either one alone is not."""
    shared = {"TORCHELASTIC_MAX_RESTARTS": "1", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in restart_store_warning(shared)
    assert restart_store_warning({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert restart_store_warning({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
    assert restart_store_warning({}) is None  # not under torchrun
