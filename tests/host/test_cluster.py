"""Many edge nodes on Ray Serve (relaydiff.host.cluster): config validation, routing scores, node load in the
policy's conditions, and, on one local Ray instance shared by the module, two replicas serving a device stream
while one of them is killed: every request gets exactly one answer.

Ray is slow to start (tens of seconds on a loaded machine), so the instance and the deployment are module-scoped.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from relaydiff.core.errors import RelaydiffError
from relaydiff.host import cluster as cl
from relaydiff.host.cluster import ClusterConfig, ClusterHost, RouteTable, expected_wait, least_loaded
from relaydiff.host.policy import Conditions, FixedPolicy

TOKEN = "cluster-test-token-0123"


# -- config ------------------------------------------------------------------------------------------


def test_config_reads_json_and_yaml(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"min_replicas": 1, "max_replicas": 4, "routing": "round_robin"}))
    (tmp_path / "c.yaml").write_text("min_replicas: 2\nmax_replicas: 3\nstats_period_s: 0.25\n")
    a = ClusterConfig.from_file(tmp_path / "c.json")
    b = ClusterConfig.from_file(tmp_path / "c.yaml")
    assert (a.min_replicas, a.max_replicas, a.routing) == (1, 4, "round_robin")
    assert (b.min_replicas, b.max_replicas, b.stats_period_s, b.routing) == (2, 3, 0.25, "least_loaded")
    assert a.with_replicas(3) is a  # within the autoscaling bounds: they stay
    fixed = ClusterConfig().with_replicas(3)
    assert (fixed.min_replicas, fixed.max_replicas) == (3, 3)


@pytest.mark.parametrize(("text", "needle"), [
    ('{"min_replicas": 0}', "min_replicas"),
    ('{"max_replica": 2}', "max_replica"),
    ('{"routing": "random"}', "random"),
    ('{"min_replicas": 3, "max_replicas": 2}', "exceeds max_replicas"),
    ('{"stats_period_s": true}', "stats_period_s"),
    ('[1, 2]', "mapping"),
    ('{"min_replicas": ', "does not parse"),
])
def test_config_refuses_bad_values_naming_them(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(RelaydiffError, match=needle):
        ClusterConfig.from_file(path)


def test_replicas_outside_the_bounds_are_refused() -> None:
    with pytest.raises(RelaydiffError, match=r"outside the config's bounds \[1, 4\]"):
        ClusterConfig(min_replicas=1, max_replicas=4).with_replicas(5)


# -- routing score and the policy's conditions ---------------------------------------------------------


def test_least_loaded_weighs_queue_by_service_time() -> None:
    fast = {"replica": "fast", "ongoing": 2, "queue": 1, "service_s": 0.1, "busy_fraction": 0.9}
    slow = {"replica": "slow", "ongoing": 1, "queue": 1, "service_s": 0.4, "busy_fraction": 0.5}
    assert expected_wait(fast, 1.0) < expected_wait(slow, 1.0)  # 3 x 0.1 < 2 x 0.4
    assert least_loaded({"a": fast, "b": slow}) is fast
    idle_slow = {**slow, "ongoing": 0, "queue": 0}
    assert least_loaded({"a": fast, "b": idle_slow}) is fast  # 3 x 0.1 < 1 x 0.4: an idle slow node can still lose
    busier = {**fast, "ongoing": 4}
    assert least_loaded({"a": busier, "b": idle_slow}) is idle_slow  # 5 x 0.1 > 1 x 0.4
    assert expected_wait({"queue": 0}, 0.7) == pytest.approx(0.7)  # no report yet: the mean service time of the others


def test_round_robin_is_strict_even_for_a_burst_decided_before_any_routed_report() -> None:
    # Serve asks about many pending requests before the first accept comes back: every choice must still alternate
    table = RouteTable()
    stats = {"a": {"service_s": 1.0}, "b": {"service_s": 2.0}}
    firsts = [table.choose(f"r{i}", ["a", "b"], stats, "round_robin")[0] for i in range(16)]
    assert firsts == ["a", "b"] * 8
    assert table.choose("r3", ["a", "b"], stats, "round_robin") == ["b"]  # asked again (full, no answer): same replica
    assert table.held == {"a": 8, "b": 8}
    for i, rid in enumerate(firsts):
        table.routed(f"r{i}", rid)
        table.completed(f"r{i}", rid)
    assert +table.held == {} and not table.assigned


def test_least_loaded_counts_a_request_when_it_is_chosen_not_when_serve_reports_it() -> None:
    table = RouteTable()
    stats = {"fast": {"service_s": 1.0}, "slow": {"service_s": 2.0}}
    burst = [table.choose(f"r{i}", ["fast", "slow"], stats, "least_loaded")[0] for i in range(9)]
    # shortest expected wait, (held + 1) x service: 6 on the fast replica, 3 on the slow one (both then wait 7 s / 8 s)
    assert burst.count("fast") == 6 and burst.count("slow") == 3
    assert table.loads(["fast", "slow"], stats)["fast"]["ongoing"] == 6
    table.routed("r0", "slow")  # Serve sent it elsewhere (its first choice was full): counted where it went
    assert table.held == {"fast": 5, "slow": 4} and +table.sent == {"slow": 1}
    table.completed("r0", "fast")  # a completion reported for another replica than the one counted changes nothing
    assert table.held == {"fast": 5, "slow": 4}
    table.completed("r0", "slow")
    assert table.held == {"fast": 5, "slow": 3} and +table.sent == {}
    table.replica_gone("fast")
    assert +table.held == {"slow": 3} and set(table.assigned.values()) == {"slow"}


def test_a_request_cancelled_before_it_is_sent_is_no_longer_counted() -> None:
    table = RouteTable()
    cancelled = {"r0": False}
    table.choose("r0", ["a", "b"], {}, "least_loaded", cancelled=lambda: cancelled["r0"])
    assert table.held["a"] == 1
    cancelled["r0"] = True
    assert table.choose("r1", ["a", "b"], {}, "least_loaded") == ["a", "b"]  # r0's count is gone: a is free again
    assert +table.held == {"a": 1}


def test_bench_phases_only_scale_up_and_reuse_the_replicas_for_the_slowed_pair() -> None:
    from relaydiff.host.cluster_bench import ClusterBenchConfig, _plan

    assert _plan(ClusterBenchConfig(replica_counts=(4, 1, 2), slow_replicas=2)) == [
        (1, "least_loaded", False), (2, "least_loaded", False), (2, "least_loaded", True), (2, "round_robin", True),
        (4, "least_loaded", False)]
    assert _plan(ClusterBenchConfig(replica_counts=(1,), slow_replicas=3)) == [
        (1, "least_loaded", False), (3, "least_loaded", True), (3, "round_robin", True)]


def test_node_load_goes_into_the_conditions() -> None:
    host = ClusterHost(None, ClusterConfig(app_name="unit"), auth_token=TOKEN, policy=FixedPolicy(0.5))
    assert host.conditions() == Conditions(host_queue=0, host_utilisation=0.0)
    cl.NODE_LOADS["unit"] = {"a": {"ongoing": 3, "queue": 2, "service_s": 0.2, "busy_fraction": 0.75, "batch_fill": 0.5},
                             "b": {"ongoing": 0, "queue": 0, "service_s": 0.3, "busy_fraction": 0.25, "batch_fill": 0.25}}
    try:
        assert host.conditions() == Conditions(host_queue=0, host_utilisation=0.25)  # b: 1 x 0.3 < 4 x 0.2
        rr = ClusterHost(None, ClusterConfig(app_name="unit", routing="round_robin"), auth_token=TOKEN)
        assert rr.conditions() == Conditions(host_queue=2, host_utilisation=0.5)  # the mean over replicas (1.5 rounds to 2)
        load = host.node_load()
        assert (load.queue, load.busy_fraction, load.batch_fill) == (3, 0.5, 0.375)
    finally:
        del cl.NODE_LOADS["unit"]


def test_single_host_reports_its_node_load(make_host: Any, make_client: Any) -> None:
    host = make_host(fraction=1.0, steps=3)

    async def run() -> Any:
        async with host:
            before = host.node_load()
            await make_client(host.url, steps=3).generate("a red circle")
            return before, host.node_load()

    before, after = asyncio.run(run())
    assert before.queue == 0 and before.batch_fill == 0.0 and before.service_s == 0.0
    assert after.queue == 0 and after.batch_fill == pytest.approx(1 / host.config.max_batch) and after.service_s > 0
    assert 0.0 < after.busy_fraction <= 1.0


# -- two replicas on a local Ray instance ----------------------------------------------------------------


@pytest.fixture(scope="module")
def replicas(ray_instance: None, tiny_family: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Two replicas deployed as `relaydiff cluster up` would deploy them (same flags, same spec, same code version),
    so that the cluster-up test below finds them running and reuses them: (ClusterConfig, handle, argv)."""
    from relaydiff.cli import build_parser
    from relaydiff.cli.cluster import cluster_config, replica_spec
    from relaydiff.host.cluster import deploy, undeploy

    path = tmp_path_factory.mktemp("cluster") / "cluster.json"
    path.write_text(json.dumps({"min_replicas": 2, "max_replicas": 2, "replica_num_cpus": 0.5, "stats_period_s": 0.25, "app_name": "test"}))
    argv = ["cluster", "up", "--config", str(path), "--family", str(tiny_family), "--steps", "4"]
    args = build_parser().parse_args(argv)
    config = cluster_config(args)
    handle = deploy(config, replica_spec(args, config)[1])
    yield config, handle, argv
    try:
        undeploy(config)
    except Exception:  # already deleted by `cluster up` on its way out
        pass


def test_cluster_up_serves_a_device_through_its_ingress(replicas: Any, make_client: Any, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`relaydiff cluster up --replicas 2` end to end, on the session's Ray instance: it finds the fixture's two
    replicas running (same code version: updated in place, no restart), serves the link, a device relays one
    request through it; SIGINT stops it; it leaves Ray and the application it did not create running."""
    import socket
    import threading
    import time

    import ray

    from relaydiff.cli import main

    _, _, argv = replicas
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = "cluster-up-test-token-0123456789"  # the command wants at least 16 characters
    (tmp_path / "token").write_text(token)
    got: dict[str, Any] = {}
    running = threading.Event()
    running.set()

    def device() -> None:
        deadline = time.monotonic() + 150.0
        while running.is_set() and time.monotonic() < deadline:  # until the ingress listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            return
        try:
            client = make_client(f"ws://127.0.0.1:{port}", token=token, steps=4, deadline_s=60.0)
            got["outcome"] = asyncio.run(client.generate("a red circle"))
        except BaseException as exc:  # reported by the assertions below
            got["error"] = exc
        finally:
            if running.is_set():
                os.kill(os.getpid(), signal.SIGINT)  # the command's own handler: it stops serving and cleans up

    thread = threading.Thread(target=device, daemon=True)
    thread.start()
    try:
        code = main([*argv, "--replicas", "2", "--listen", f"127.0.0.1:{port}", "--token-file", str(tmp_path / "token"),
                     "--policy", "fixed", "--fraction", "0.5", "--duration", "180", "--json", "--log-file", str(tmp_path / "log.txt")])
    finally:
        running.clear()
        thread.join(30)
    out, err = capsys.readouterr()
    assert code == 0 and "error" not in got, (got, err[-2000:])
    assert got["outcome"].mode == "relay"
    summary = json.loads(out)
    assert summary["requests"] == 1 and summary["by_source"] == {"device": 1} and summary["replicas"] == 2
    assert sum(summary["cluster_stats"]["calls"].values()) == 1  # one host run, on one replica
    assert ray.is_initialized()  # it joined the session's Ray instance, so it left it running
    from relaydiff.host.cluster import app_exists

    assert app_exists(replicas[0])  # and the application was there before it: still deployed, for the next test


def test_a_replica_killed_mid_stream_loses_no_request(replicas: Any, make_client: Any, link_config: Any, token: str) -> None:
    from relaydiff.host.controller import HostConfig
    from relaydiff.runtime.settings import GenerationSettings

    config, handle, _ = replicas
    host = ClusterHost(handle, config, auth_token=token, policy=FixedPolicy(0.5),
                       config=HostConfig(settings=GenerationSettings(steps=4), link=link_config))
    killed: list[dict[str, Any]] = []

    async def kill_one_busy_replica() -> None:
        while True:
            await asyncio.sleep(0.02)
            busy = [v for v in host.node_loads().values() if v.get("sent") and v.get("pid")]  # holds an accepted request
            if busy:
                killed.append(busy[0])
                os.kill(int(busy[0]["pid"]), signal.SIGKILL)
                return

    async def run() -> list[Any]:
        async with host:
            killer = asyncio.create_task(kill_one_busy_replica())
            clients = [make_client(host.url, steps=4, deadline_s=60.0) for _ in range(3)]
            outs = await asyncio.gather(*[c.generate_many([f"a red circle {d} {i}" for i in range(4)]) for d, c in enumerate(clients)])
            killer.cancel()
            return [o for device in outs for o in device]

    outcomes = asyncio.run(run())
    assert killed, "no replica was ever seen busy, so none was killed"
    assert len(outcomes) == 12 and len({o.request_id for o in outcomes}) == 12
    assert all(o.mode in ("relay", "device-only") for o in outcomes)
    entries = host.ledger.entries()
    assert len(entries) == host.stats.accepted == len({e.key for e in entries})  # one ledger entry per accepted request
    assert all(e.source is not None and e.source.value in ("device", "host-fallback", "failed") for e in entries)
    relayed = {o.request_id for o in outcomes if o.mode == "relay"}
    assert len(relayed) == sum(e.source.value == "device" for e in entries)  # each relayed request's result recorded once
    s = host.cluster_stats
    assert s.replica_lost >= 1 and s.retried + s.exhausted >= 1  # the killed replica's calls went elsewhere, or failed
    assert host.stats.failed == s.exhausted  # a request no replica finished: request_failed, and the device went alone
    fallbacks = sum(e.source.value == "host-fallback" for e in entries)
    assert sum(s.calls.values()) == len(relayed) + 2 * fallbacks  # host steps each, plus the fallback's own call


@pytest.mark.parametrize(("argv", "needle"), [
    (["cluster", "up", "--config", "missing.yaml"], "cannot be read"),
    (["cluster", "up", "--replicas", "0"], "--replicas must be a positive integer"),
    (["cluster", "up", "--address", " "], "--address must name a Ray cluster"),
    (["bench", "cluster", "--replicas", "1,x"], "--replicas must be comma-separated"),
    (["bench", "cluster", "--slow-replicas", "1"], "slow_replicas must be at least 2"),
])
def test_cluster_commands_refuse_bad_input_before_starting_ray(argv: list[str], needle: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    from relaydiff.cli import main

    monkeypatch.chdir(tmp_path)
    code = main([*argv, "--log-file", str(tmp_path / "log.txt")])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err
