"""A multi-node engine reports as one engine with no hand-set id.

The SGLang and vLLM adapters run inside the engines, which need GPUs: here their
schedulers are stand-ins carrying the configuration attributes the adapters read
(``server_args`` / ``vllm_config.parallel_config``), one per node, and the test checks
that the recorders every node would open name the same engine, while single-node engines
keep their per-instance ids and an explicit ENGINETIME_ENGINE_ID still wins.
"""

from __future__ import annotations

import types

import pytest
from helpers import IngestConnection, hello

from enginetime.engine_hooks.adapter_common import AdapterSettings
from enginetime.engine_hooks.recorder import Recorder
from enginetime.engine_hooks.sglang import hooks as sg_hooks
from enginetime.engine_hooks.vllm import recording as vrec
from enginetime.sidecar.ingest.server import group_summary

UNREACHABLE = "unix:/nonexistent/enginetime-test.sock"  # recorders never wait on the sidecar


@pytest.fixture(autouse=True)
def _no_env_id(monkeypatch):
    monkeypatch.delenv("ENGINETIME_ENGINE_ID", raising=False)
    monkeypatch.setenv("ENGINETIME_INGEST", UNREACHABLE)
    monkeypatch.setenv("ENGINETIME_TIMER", "cpu")


def _sglang_ids(nnodes: int, node_rank: int, port: int, dist: str | None = "10.1.0.7:5000") -> str:
    class Sched:
        server_args = types.SimpleNamespace(
            tokenizer_worker_num=1,
            dp_size=1,
            enable_dp_attention=False,
            nnodes=nnodes,
            node_rank=node_rank,
            dist_init_addr=dist,
            port=port,
        )

    ad = sg_hooks.SGLangAdapter(Sched(), recorder=Recorder("unused", address=UNREACHABLE, timer="cpu"))
    return ad.settings.engine_id


def test_sglang_nodes_of_one_engine_share_an_id_from_dist_init_addr():
    ids = {_sglang_ids(2, rank, port) for rank, port in ((0, 30000), (1, 30001))}
    assert ids == {"sglang-10.1.0.7:5000"}
    # Another multi-node engine has another rendezvous address.
    assert _sglang_ids(2, 0, 30000, "10.1.0.9:5000") == "sglang-10.1.0.9:5000"
    # One node: the per-instance id as before (host plus server port).
    single = _sglang_ids(1, 0, 30000)
    assert single.startswith("sglang-") and single.endswith(":30000") and "10.1.0.7" not in single


def _vllm_id(rank: int, size: int, local: int, **pc) -> str:
    class Sched:  # a class instance: the adapter keeps a weak reference to its scheduler
        pass

    sched = Sched()
    sched.__dict__.update(
        vllm_config=types.SimpleNamespace(
            parallel_config=types.SimpleNamespace(
                data_parallel_rank=rank, data_parallel_size=size, data_parallel_size_local=local, **pc
            ),
            model_config=types.SimpleNamespace(is_moe=True),
            device_config=types.SimpleNamespace(device_type="cuda"),
            instance_id=f"random-{rank // max(local, 1)}",  # vLLM's per-process-group random id
        ),
        requests={},
    )
    rec = Recorder("unused", address=UNREACHABLE, timer="cpu")
    return vrec.VllmRecording(sched, recorder=rec).settings.engine_id


def test_vllm_dp_ranks_on_several_nodes_share_an_id_from_the_dp_address():
    dp = dict(
        data_parallel_master_ip="10.2.0.3", data_parallel_rpc_port=13345, data_parallel_master_port=29500
    )
    ids = {_vllm_id(rank, 4, 2, **dp) for rank in range(4)}  # two nodes, two ranks each
    assert ids == {"vllm-10.2.0.3:13345"}
    # Without an RPC port the master port names it.
    no_rpc = dict(data_parallel_master_ip="10.2.0.3", data_parallel_master_port=29500)
    assert _vllm_id(3, 4, 2, **no_rpc) == "vllm-10.2.0.3:29500"
    # All ranks on one node: the per-instance id as before.
    single = _vllm_id(1, 2, 2, **dp)
    assert single.endswith(":random-0") and "10.2.0.3" not in single


def test_an_explicit_engine_id_wins(monkeypatch):
    monkeypatch.setenv("ENGINETIME_ENGINE_ID", "prod-moe")
    assert _sglang_ids(2, 1, 30000) == "prod-moe"
    dp = dict(data_parallel_master_ip="10.2.0.3", data_parallel_rpc_port=13345)
    assert _vllm_id(2, 4, 2, **dp) == "prod-moe"
    assert AdapterSettings.from_env("vllm", {}).for_group(None).engine_id.startswith("vllm-")


def test_group_summary_names_nodes_and_missing_shards():
    peers = {0: "tcp:10.0.0.1:40001", 1: "tcp:10.0.0.1:40002", 4: "tcp:10.0.0.2:40001", 5: "tcp:10.0.0.2:7"}
    line = group_summary("moe", 8, peers)
    assert line == (
        "engine 'moe': 4/8 shards joined from 2 nodes: 10.0.0.1 shards 0-1; 10.0.0.2 shards 4-5; "
        "waiting for shards 2-3,6-7"
    )
    assert group_summary("moe", 2, {0: "pid 1 (uid 0) on unix:/s", 1: "unix:/s"}).endswith(
        "from 1 node: local shards 0-1; all joined"
    )


@pytest.mark.e2e
def test_the_sidecar_logs_which_shards_and_nodes_have_joined(sidecar_factory):
    sc = sidecar_factory()
    with IngestConnection(sc.ingest) as a, IngestConnection(sc.ingest) as b:
        a.send(hello("joined", shard=0, num_shards=4, coupling=2))
        sc.wait_for_log(
            "engine 'joined': 1/4 shards joined from 1 node: local shards 0; waiting for shards 1-3"
        )
        b.send(hello("joined", shard=2, num_shards=4, coupling=2))
        sc.wait_for_log(
            "engine 'joined': 2/4 shards joined from 1 node: local shards 0,2; waiting for shards 1,3"
        )


def test_k8s_multinode_layout_ships_every_node_to_one_sidecar_with_the_token():
    """deploy/k8s/multinode.yaml: the nodes' hooks reach the sidecar's ingest Service with the token."""
    from pathlib import Path

    import yaml

    from enginetime.cli import build_parser

    path = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "multinode.yaml"
    objs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(path.read_text()) if d}
    sts = objs[("StatefulSet", "enginetime-moe")]["spec"]["template"]["spec"]
    (engine,) = sts["containers"]
    env = {e["name"]: e["value"] for e in engine["env"]}
    assert "ENGINETIME_ENGINE_ID" not in env  # derived from --dist-init-addr on every node
    assert "--nnodes 2" in engine["args"][0] and "--dist-init-addr" in engine["args"][0]
    host, port = env["ENGINETIME_INGEST"].removeprefix("tcp:").rsplit(":", 1)
    svc = objs[("Service", "enginetime-moe-sidecar")]
    assert host.split(".")[0] == "enginetime-moe-sidecar"
    (ingest_port,) = [p for p in svc["spec"]["ports"] if p["name"] == "ingest"]
    assert ingest_port["port"] == int(port)
    side_pod = objs[("Deployment", "enginetime-moe-sidecar")]["spec"]["template"]["spec"]
    (sidecar,) = side_pod["containers"]
    args = build_parser().parse_args(["sidecar", *sidecar["args"]])
    assert args.ingest == f"tcp:0.0.0.0:{port}" and args.ingest_token_file
    token_dir = str(Path(env["ENGINETIME_TOKEN_FILE"]).parent)
    assert token_dir == str(Path(args.ingest_token_file).parent)
    for pod, c in ((sts, engine), (side_pod, sidecar)):
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in pod["volumes"]}
        assert vols[mounts[token_dir]]["secret"]["secretName"] == "enginetime-ingest-token"
