"""The server strategy as composed layers: each wrapper alone, stacked, and refused in an
order that would be wrong; and no private Flower API anywhere in the server-side code.

The rounds run through Flower's own ``Strategy.start``. The transport is a loopback grid that
hands each Message to the real client-side code in this process (the SecAgg+ client stages with
real keys and masks); only the local training is replaced by a fixed delta per node.
"""

import ast
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord,
                      RecordDict)

from fedllm import protocol
from fedllm.config import to_yaml
from fedllm.clients.secagg import secagg_stage
from fedllm.server.secagg import SecAggPlus
from fedllm.server.strategy import (AdapterFedAvg, ServerOptimization, UserDP, UserLevelDP,
                                    cohort_sampler)
from fedllm.server.server_opt import ServerOptimizer

ROOT = Path(__file__).resolve().parent.parent
NODES = [11, 22, 33]
SHAPE = (4, 6)


@pytest.fixture(autouse=True)
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


def delta_of(node):
    return np.full(SHAPE, node / 1000, np.float32)


def local_update(msg, context):
    """A client's released update: a fixed delta (what fedllm.train would return)."""
    node = context.node_id
    metrics = MetricRecord({"train_loss": 1.0, "steps": 1, "sample_rate": 0.1,
                            "noise_multiplier": 0.0, "dp": 0, "declined": 0})
    return {"w": delta_of(node)}, metrics, ConfigRecord({"client_id": f"c{node}"})


class LoopbackGrid:
    """Delivers each Message to the client code of its node, in this process."""

    def __init__(self, nodes):
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(),
                                    run_config={}) for n in nodes}
        self.configs: list[dict] = []  # every config the server sent, in order

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        return [self.deliver(m) for m in messages]

    def deliver(self, msg):
        config = msg.content[protocol.CONFIG_RECORD]
        self.configs.append(dict(config))
        context = self.contexts[msg.metadata.dst_node_id]
        if protocol.STAGE_KEY in config:
            return secagg_stage(str(config[protocol.STAGE_KEY]), msg, context, local_update)
        update, metrics, client = local_update(msg, context)
        arrays = ArrayRecord(OrderedDict((k, Array(v)) for k, v in update.items()))
        return Message(content=RecordDict({protocol.ARRAYS_RECORD: arrays,
                                           protocol.METRICS_RECORD: metrics,
                                           protocol.CLIENT_RECORD: client}), reply_to=msg)


def core(cfg, user_level=False):
    sampler = cohort_sampler(len(NODES), "fixed", user_level=user_level, seed=0)
    return AdapterFedAvg(cfg_text=to_yaml(cfg), sampler=sampler, min_clients=2, run_id="r")


def secagg(strategy):
    return SecAggPlus(strategy, num_shares="auto", threshold="auto", bits=24, clip_range=1.0,
                      timeout=5.0)


def run(strategy, grid, rounds=2):
    start = ArrayRecord(OrderedDict(w=Array(np.zeros(SHAPE, np.float32))))
    result = strategy.start(grid=grid, initial_arrays=start, num_rounds=rounds, timeout=5.0)
    return result.arrays["w"].numpy()


def central(expected_cohort):
    return UserDP(noise_multiplier=0.0, clip_norm=1.0, noise="central",
                  expected_cohort=expected_cohort, min_survivors=2)


SUM = sum(delta_of(n) for n in NODES)


def test_plain_core_alone_averages(tiny_cfg):
    grid = LoopbackGrid(NODES)
    strategy = core(tiny_cfg)
    np.testing.assert_allclose(run(strategy, grid), 2 * SUM / 3, rtol=1e-6)
    assert [sorted(r.accepted) for r in strategy.rounds] == [["c11", "c22", "c33"]] * 2
    assert strategy.user_releases == []


def test_secagg_without_user_dp_sums_through_the_real_client_stages(tiny_cfg):
    grid = LoopbackGrid(NODES)
    strategy = secagg(core(tiny_cfg))
    out = run(strategy, grid)
    np.testing.assert_allclose(out, 2 * SUM / 3, atol=1e-5)  # 24-bit quantization error only
    stages = [c.get(protocol.STAGE_KEY) for c in grid.configs]
    assert stages == (["setup"] * 3 + ["share"] * 3 + ["masked"] * 3 + ["unmask"] * 3) * 2
    assert not any(protocol.USER_NOISE_KEY in c for c in grid.configs)
    assert strategy.core.rounds[-1].discarded == "" and strategy.core.user_releases == []


def test_user_dp_without_secagg_under_a_server_optimizer(tiny_cfg):
    grid = LoopbackGrid(NODES)
    released = []
    dp = UserLevelDP(core(tiny_cfg, user_level=True), central(expected_cohort=4),
                     on_release=lambda rnd, survivors: released.append((rnd, survivors)))
    strategy = ServerOptimization(dp, ServerOptimizer("fedavg", lr=0.5))
    # z = 0: the update is the sum over the *expected* cohort (4), not the 3 that replied.
    np.testing.assert_allclose(run(strategy, grid), 2 * 0.5 * SUM / 4, rtol=1e-6)
    assert released == [(1, 3), (2, 3)] and strategy.core.user_releases == [1, 2]
    assert all(c[protocol.USER_NOISE_KEY] == 0.0 and c[protocol.MIN_SURVIVORS_KEY] == 2
               for c in grid.configs)


def test_the_full_stack_user_dp_over_secagg(tiny_cfg):
    grid = LoopbackGrid(NODES)
    released = []
    dp = UserLevelDP(secagg(core(tiny_cfg, user_level=True)), central(expected_cohort=3),
                     on_release=lambda rnd, survivors: released.append((rnd, survivors)))
    strategy = ServerOptimization(dp, ServerOptimizer("fedavgm", lr=1.0, beta1=0.5))
    # FedAvgM: m1 = u, m2 = 0.5 u + u; x = m1 + m2 = 2.5 u with u = SUM / 3.
    np.testing.assert_allclose(run(strategy, grid), 2.5 * SUM / 3, atol=1e-5)
    assert released == [(1, 3), (2, 3)]
    masked = [c for c in grid.configs if c.get(protocol.STAGE_KEY) == "masked"]
    assert len(masked) == 6 and all(protocol.USER_NOISE_KEY in c for c in masked)


def test_a_checkpointed_stack_resumes_where_it_stopped(tiny_cfg, tmp_path):
    """Checkpoints read the bookkeeping from the core and the moments from the optimizer
    layer: a fresh stack restored from round 2 goes on with round 3 and the same state."""
    from types import SimpleNamespace

    from fedllm.server import checkpoint

    def stack(released):
        dp = UserLevelDP(secagg(core(tiny_cfg, user_level=True)), central(expected_cohort=3),
                         on_release=lambda rnd, survivors: released.append(rnd))
        return ServerOptimization(dp, ServerOptimizer("fedadam", lr=0.01))

    recorder = SimpleNamespace(history=[], base=None, epsilons={})
    first_released, resumed_released = [], []
    first = stack(first_released)
    arrays = run(first, LoopbackGrid(NODES))
    checkpoint.save(tmp_path, 2, OrderedDict(w=arrays), first, recorder)
    state, saved = checkpoint.load(tmp_path)
    resumed = stack(resumed_released)
    checkpoint.restore(state, resumed, recorder)
    assert resumed.core.round_offset == 2 and resumed.core.user_releases == [1, 2]
    for key in ("m", "v"):
        np.testing.assert_array_equal(getattr(resumed.optimizer, key)["w"],
                                      getattr(first.optimizer, key)["w"])
    start = ArrayRecord(OrderedDict(w=Array(saved["w"])))
    resumed.start(grid=LoopbackGrid(NODES), initial_arrays=start, num_rounds=1, timeout=5.0)
    assert resumed_released == [3] and [r.round for r in resumed.core.rounds] == [1, 2, 3]
    assert resumed.core.user_releases == [1, 2, 3]


def test_layers_in_a_wrong_order_are_refused(tiny_cfg):
    with pytest.raises(ValueError, match="wraps the AdapterFedAvg core directly"):
        secagg(UserLevelDP(core(tiny_cfg, user_level=True), central(3)))
    with pytest.raises(ValueError, match="aggregate_sum"):
        UserLevelDP(ServerOptimization(core(tiny_cfg, True), ServerOptimizer()), central(3))
    with pytest.raises(ValueError, match="outermost"):
        ServerOptimization(ServerOptimization(core(tiny_cfg), ServerOptimizer()),
                           ServerOptimizer())
    with pytest.raises(ValueError, match="sampler over every client"):
        UserLevelDP(core(tiny_cfg, user_level=False), central(3))


# ------------------------------------------------------------------ no private Flower API

SERVER_SIDE = [*sorted((ROOT / "server").glob("*.py")), *sorted((ROOT / "clients").glob("*.py")),
               *sorted((ROOT / "fedllm" / "secagg").glob("*.py"))]


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def names_defined_here() -> set[str]:
    """Every private name our own code defines (functions, classes, attributes it assigns)."""
    defined = set()
    for path in [*ROOT.glob("fedllm/**/*.py"), *ROOT.glob("server/*.py"),
                 *ROOT.glob("clients/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                defined.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
    return defined


def test_server_side_code_uses_no_private_flower_api():
    import flwr.app
    import flwr.serverapp
    import flwr.serverapp.strategy as flower_strategies

    ours = names_defined_here()
    flower_private = {name for cls in (flower_strategies.Strategy, flower_strategies.FedAvg,
                                       flwr.serverapp.Grid, flwr.app.Message, flwr.app.Context)
                      for name in dir(cls) if private(name)}
    assert "_construct_messages" in flower_private  # the check can see what it looks for
    for path in SERVER_SIDE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flwr"):
                assert not any(private(part) for part in node.module.split(".")), path
                assert not any(private(alias.name) for alias in node.names), path
            if isinstance(node, ast.Attribute) and private(node.attr):
                where = f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}"
                assert node.attr in ours, f"{where} is not ours (Flower internal?)"
                assert node.attr not in flower_private, f"{where} is a Flower private name"


class SilentNodeGrid(LoopbackGrid):
    """Node ``silent`` never answers from the SecAgg+ ``share`` stage on (it died)."""

    def __init__(self, nodes, silent):
        super().__init__(nodes)
        self.silent = silent

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            stage = m.content[protocol.CONFIG_RECORD].get(protocol.STAGE_KEY)
            if m.metadata.dst_node_id == self.silent and stage != "setup":
                continue
            out.append(self.deliver(m))
        return out


def test_a_node_that_dies_under_secagg_is_counted_once(tiny_cfg):
    """A node that answers the key exchange and then nothing: dropped from the round, the
    survivors' sum is unmasked, and it is one rejected node (not zero, not two)."""
    grid = SilentNodeGrid(NODES, silent=33)
    strategy = secagg(core(tiny_cfg))
    run(strategy, grid, rounds=1)
    info = strategy.core.rounds[-1]
    assert sorted(info.accepted) == ["c11", "c22"]
    assert list(info.rejected) == ["node 33"] and "share" in info.rejected["node 33"]


def test_server_side_classes_live_in_server():
    """One answer to "where is X": no strategy, grid or Flower app class is defined in the
    library (fedllm/), which both sides import; they live in server/ (or clients/)."""
    server_bases = {"Strategy", "StrategyWrapper", "FedAvg", "Grid", "ServerApp", "ClientApp"}
    found = []
    for path in ROOT.glob("fedllm/**/*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if bases & server_bases:
                    found.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert not found, found
    defined = {node.name for path in ROOT.glob("server/*.py")
               for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)}
    assert {"StrategyWrapper", "SecAggPlus", "ServerOptimizer", "AdapterFedAvg"} <= defined
