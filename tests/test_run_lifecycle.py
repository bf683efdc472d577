"""A run directory is a run's identity; a run that ends says truthfully whether it completed.

Resume works on the directory it is given; a directory holding a run is never overwritten;
`fedllm launch` writes nothing for an unknown connection; a server whose nodes are gone or
that is told to stop raises RunStopped (resumable, nothing finalized) instead of recording
empty rounds.
"""

import shutil
import threading
import time

import pytest
from flwr.serverapp import Grid

from fedllm import api
from fedllm.cli import main
from fedllm.config import compose, ledger_dir, to_yaml
from fedllm.run_status import RunStopped
from fedllm.server.wire import MeteredGrid


@pytest.fixture(autouse=True)
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


def saved_run(path, *overrides):
    cfg = compose(["model=tiny", f"run.dir={path}", "run.id=run-1", *overrides])
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(to_yaml(cfg))
    (path / "metrics.jsonl").write_text("")
    return cfg


def test_resume_works_on_the_directory_it_is_given(tmp_path):
    original = tmp_path / "original"
    saved_run(original)
    moved = tmp_path / "moved"
    shutil.copytree(original, moved)
    resumed = api.resumed_config(compose(["model=tiny", f"run.dir={moved}", "run.resume=true"]))
    assert resumed.run.dir == str(moved.resolve()) and resumed.run.id == "run-1"
    assert ledger_dir(resumed) == moved.resolve() / "ledger"  # its own ledgers, not the original's


def test_a_complete_run_is_not_resumed(tmp_path):
    saved_run(tmp_path / "run")
    (tmp_path / "run" / "summary.json").write_text("{}")
    with pytest.raises(api.ConfigError, match="is complete"):
        api.resumed_config(compose([f"run.dir={tmp_path / 'run'}", "run.resume=true"]))


def test_a_directory_holding_a_run_is_never_overwritten(tmp_path, capsys):
    run_dir = tmp_path / "run"
    saved_run(run_dir)
    before = (run_dir / "config.yaml").read_text()
    assert main(["simulate", "model=tiny", f"run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "fedllm resume" in err and "Traceback" not in err
    assert (run_dir / "config.yaml").read_text() == before


def test_overwrite_replaces_the_run_and_its_own_ledger_only(tmp_path):
    run_dir, shared = tmp_path / "run", tmp_path / "shared-ledgers"
    saved_run(run_dir)
    (run_dir / "ledger").mkdir()
    (run_dir / "ledger" / "c.json").write_text("{}")
    shared.mkdir()
    (shared / "c.json").write_text("{}")
    api.check_run_dir_free(compose([f"run.dir={run_dir}", "run.overwrite=true"]))
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "ledger").exists()
    saved_run(run_dir)
    api.check_run_dir_free(compose([f"run.dir={run_dir}", "run.overwrite=true",
                                    f"privacy.ledger_dir={shared}"]))
    assert (shared / "c.json").exists()


def test_launch_with_an_unknown_connection_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    run_dir = tmp_path / "run"
    assert main(["launch", "nowhere", "model=tiny", f"run.dir={run_dir}"]) == 2
    assert "connection 'nowhere' is not defined" in capsys.readouterr().err
    assert not run_dir.exists()
    saved_run(run_dir)  # an existing run's config is never rewritten either
    before = (run_dir / "config.yaml").read_text()
    assert main(["launch", "nowhere", "run.resume=true", f"run.dir={run_dir}"]) == 2
    assert (run_dir / "config.yaml").read_text() == before


class SilentGrid(Grid):
    """A network partition: nodes are listed, messages are accepted, nothing comes back."""

    def __init__(self, nodes=(1, 2, 3)):
        self.nodes = list(nodes)

    def set_run(self, run):
        pass

    @property
    def run(self):
        return None

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        return []

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("MeteredGrid must not delegate the wait")


def test_a_round_nobody_answers_stops_the_run_instead_of_recording_it():
    grid = MeteredGrid(SilentGrid(), pull_interval=0.05)
    from flwr.app import Message, RecordDict

    msgs = [Message(content=RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2)]
    with pytest.raises(RunStopped, match="none of the 2 node"):
        grid.send_and_receive(msgs, timeout=0.3)


def test_a_stop_request_ends_the_wait_within_a_second():
    stop = threading.Event()
    grid = MeteredGrid(SilentGrid(), stop=stop, pull_interval=0.05)
    from flwr.app import Message, RecordDict

    msgs = [Message(content=RecordDict(), dst_node_id=1, message_type="train")]
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    with pytest.raises(RunStopped, match="stop requested"):
        grid.send_and_receive(msgs, timeout=3600)
    assert time.monotonic() - started < 1.5


class LossyGrid(SilentGrid):
    """A SuperLink that loses replies the way Flower's does under connection resets: the first
    ``lose`` replies to each node come back as the error Flower's grid makes up when a reply's
    upload did not complete (MESSAGE_UNAVAILABLE); later ones are the node's answer."""

    def __init__(self, nodes=(1, 2), lose=1, offline=()):
        super().__init__(nodes)
        self.lose, self.offline = lose, set(offline)
        self.inbox, self.pushed = {}, []

    def get_node_ids(self):
        return [n for n in self.nodes if n not in self.offline]

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            ids.append(f"m{len(self.pushed)}")
            self.pushed.append(msg)
            self.inbox[ids[-1]] = msg
        return ids

    def pull_messages(self, message_ids):
        from flwr.app import Error, Message, RecordDict
        from flwr.common.constant import ErrorCode

        replies = []
        for mid in list(message_ids):
            msg = self.inbox.pop(mid)
            node = msg.metadata.dst_node_id
            times_asked = sum(m.metadata.dst_node_id == node for m in self.pushed)
            if times_asked <= self.lose:
                reply = Message(Error(code=ErrorCode.MESSAGE_UNAVAILABLE,
                                      reason="Reply message objects are unavailable."),
                                reply_to=msg)
            else:
                reply = Message(RecordDict(), reply_to=msg)
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            replies.append(reply)
        return replies


def requests(kind="train", config=None, nodes=(1, 2)):
    from flwr.app import ConfigRecord, Message, RecordDict

    content = RecordDict({"config": ConfigRecord(config or {})})
    return [Message(content=content, dst_node_id=n, message_type=kind) for n in nodes]


def test_a_reply_lost_on_the_way_is_asked_for_again():
    """A connection reset while a node uploads its reply: Flower's grid answers with an error
    in the node's place. The round asks that node again (it resends its recorded copy; see
    test_malicious_server for the client's side) instead of recording it as failed."""
    lossy = LossyGrid(lose=1)
    replies = MeteredGrid(lossy, pull_interval=0.01).send_and_receive(requests(), timeout=5)
    assert sorted(r.metadata.dst_node_id for r in lossy.pushed) == [1, 1, 2, 2]
    assert len(replies) == 2 and not any(r.has_error() for r in replies)


def test_a_secagg_stage_is_not_asked_again():
    """SecAgg+ handles a dropped node itself; its stages are never sent twice."""
    lossy = LossyGrid(lose=1)
    msgs = requests(config={"secagg-stage": "masked"})
    with pytest.raises(RunStopped, match=r"2 reply\(ies\) lost on the way"):
        MeteredGrid(lossy, pull_interval=0.01).send_and_receive(msgs, timeout=5)
    assert len(lossy.pushed) == 2


def test_asking_again_waits_for_the_node_and_stops_when_every_reply_stays_lost():
    """A node offline (missed heartbeats) is asked again once it is back; if every reply of a
    round stays lost, the round is not recorded: RunStopped, and the run resumes later."""
    lossy = LossyGrid(nodes=(1,), lose=1, offline=[1])
    threading.Timer(0.3, lambda: lossy.offline.clear()).start()
    replies = MeteredGrid(lossy, pull_interval=0.02).send_and_receive(requests(nodes=(1,)),
                                                                      timeout=5)
    assert len(lossy.pushed) == 2 and not replies[0].has_error()
    never = LossyGrid(nodes=(1, 2), lose=100)
    with pytest.raises(RunStopped, match="none of the 2 node.*lost on the way"):
        MeteredGrid(never, pull_interval=0.01).send_and_receive(requests(), timeout=5)
    assert len(never.pushed) == 2 * 4  # asked, then asked again ASK_AGAIN_LIMIT times
    # An evaluation nobody answered: that round's held-out loss is unknown, the run goes on.
    evaluation = LossyGrid(nodes=(1, 2), lose=100)
    assert MeteredGrid(evaluation, pull_interval=0.01).send_and_receive(
        requests("evaluate"), timeout=5) == []


def test_the_server_waits_a_bounded_time_for_nodes_then_stops(tiny_cfg):
    from fedllm.server.strategy import AdapterFedAvg, cohort_sampler

    core = AdapterFedAvg(cfg_text=to_yaml(tiny_cfg), sampler=cohort_sampler(2, "fixed",
                         user_level=False, seed=0), min_clients=2, reconnect_timeout=1.5)
    grid = MeteredGrid(SilentGrid(nodes=[7]))
    started = time.monotonic()
    with pytest.raises(RunStopped, match="federation.reconnect_timeout"):
        core.connected_nodes(grid, 3)
    assert 1.4 <= time.monotonic() - started < 4
    grid._grid.nodes = [7, 8]
    assert core.connected_nodes(grid, 3) == [7, 8]


def test_privacy_and_participation_records_are_private_files(tmp_path):
    """0600 files in 0700 directories: ledgers, release copies, JSON-lines records, atomic
    writes; an existing directory keeps its owner's permissions."""
    import os
    import stat

    from fedllm.io import append_jsonl, atomic_write_text, private_dir
    from fedllm.privacy.accounting import PrivacyEvent
    from fedllm.privacy.ledger import Ledger, save_release

    run = private_dir(tmp_path / "run")
    append_jsonl(run / "privacy_events.jsonl", {"kind": "release"})
    atomic_write_text(run / "config.yaml", "x: 1\n")
    ledger = Ledger.open(run / "ledger", "alice")
    ledger.record("r", 1, PrivacyEvent(noise_multiplier=1.0, steps=1, sample_rate=0.5))
    save_release(run / "ledger", "alice", "r", 1, {}, {})
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(run) == 0o700 and mode(run / "ledger") == 0o700
    for path in [run / "privacy_events.jsonl", run / "config.yaml", *(run / "ledger").iterdir()]:
        assert mode(path) & 0o077 == 0, path
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    private_dir(shared)
    assert mode(shared) == 0o755


def test_an_interrupt_that_ray_drops_still_stops_the_run():
    """Ray defers a SIGINT that arrives inside some of its calls and drops it when the call
    fails (as it does when the same Ctrl-C kills its workers): the run must stop anyway."""
    import os
    import signal

    from ray._private.utils import DeferSigint

    from fedllm.server.simulation import _interrupts_stop

    stop, interrupted = threading.Event(), threading.Event()
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs in the background
    with _interrupts_stop(stop, interrupted):
        with pytest.raises(RuntimeError):
            with DeferSigint():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)  # the C-level handler has run; Ray's deferred it
                raise RuntimeError("the actor died")  # Ray now drops the deferred SIGINT
        assert interrupted.wait(2) and stop.is_set()
    assert signal.getsignal(signal.SIGINT) == before  # the handler was given back
    assert signal.set_wakeup_fd(-1) == -1  # and the wakeup fd


def test_a_first_signal_stops_the_server_app_and_a_second_raises_at_once():
    import os
    import signal

    from fedllm.server.simulation import _interrupts_stop

    stop, interrupted = threading.Event(), threading.Event()
    with pytest.raises(KeyboardInterrupt):
        with _interrupts_stop(stop, interrupted):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # the first: no exception; the run winds down in order
            assert interrupted.wait(2) and stop.is_set()
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)


class DroppingGrid(LossyGrid):
    """A SuperNode whose upload fails drops its reply without a word: the first ask of each
    node in ``silent`` is never answered."""

    def __init__(self, silent=(2,), **kwargs):
        super().__init__(lose=0, **kwargs)
        self.silent = set(silent)

    def pull_messages(self, message_ids):
        def first_ask_of_a_silent_node(m):
            node = self.inbox[m].metadata.dst_node_id
            return node in self.silent and sum(p.metadata.dst_node_id == node
                                               for p in self.pushed) == 1

        return super().pull_messages([m for m in message_ids
                                      if not first_ask_of_a_silent_node(m)])


def test_a_silent_node_is_asked_again_and_its_first_answer_counts(monkeypatch):
    from fedllm.server import wire

    monkeypatch.setattr(wire, "MIN_SILENCE", 0.3)
    grid = DroppingGrid(silent=(2,))
    started = time.monotonic()
    replies = MeteredGrid(grid, pull_interval=0.02, asks_again=True).send_and_receive(
        requests(), timeout=1.0)  # silence: max(0.3, 1.0 / 4) = 0.3 s
    assert sorted(r.metadata.dst_node_id for r in grid.pushed) == [1, 2, 2]
    assert len(replies) == 2 and 0.3 <= time.monotonic() - started < 0.9
    # A simulation's in-memory transport loses nothing: nobody is asked again there.
    quiet = DroppingGrid(silent=(2,))
    replies = MeteredGrid(quiet, pull_interval=0.02, asks_again=False).send_and_receive(
        requests(), timeout=1.0)
    assert len(quiet.pushed) == 2 and len(replies) == 1


def test_a_request_asked_again_while_the_first_trains_waits_for_its_release(tmp_path):
    """The client's side of asking again: a duplicate that arrives while the first request
    holds the round's release lock waits for it (and then finds its copy) instead of
    declining, which would drop the node from the run."""
    from fedllm.privacy.ledger import release_lock

    got = []
    with release_lock(tmp_path, "c", "run-1", 2) as first:
        assert first

        def second():
            with release_lock(tmp_path, "c", "run-1", 2, wait=5) as mine:
                got.append((mine, time.monotonic()))

        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.4)
        released = time.monotonic()
    t.join(5)
    assert got and got[0][0] and got[0][1] >= released
    with release_lock(tmp_path, "c", "run-1", 2) as first:
        with release_lock(tmp_path, "c", "run-1", 2, wait=0.2) as mine:
            assert first and not mine  # still held after the wait: False
