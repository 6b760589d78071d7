"""Two replicas with kopf peering: one is active; when it leaves, the other takes over."""

from __future__ import annotations

from tests.operator.conftest import PEERINGS, apply, commit_dataset, corpus, eventually, phase_is, rayjobs


async def test_only_the_highest_priority_replica_reconciles(kube, start_operator, standin, store_root):
    commit_dataset(f"{store_root}/raw")
    await kube.create(PEERINGS, {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                                 "metadata": {"name": "tokenmill"}})
    standby = await start_operator(standalone=False, priority=100)
    active = await start_operator(standalone=False, priority=200)
    await eventually(lambda: active.controller.active and not standby.controller.active, timeout=20)
    await standin()

    await apply(kube, corpus("first", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}]))
    await phase_is(kube, "CorpusFilter", "first", "Succeeded")
    created = lambda handle: handle.controller.metrics.rayjobs_created.labels("CorpusFilter")._value.get()  # noqa: E731
    assert created(active) == 1 and created(standby) == 0
    assert not standby.controller.active

    await active.stop()  # leaves the peering on the way out
    await eventually(lambda: standby.controller.active, timeout=20)
    await apply(kube, corpus("second", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}]))
    await phase_is(kube, "CorpusFilter", "second", "Succeeded")
    assert created(standby) == 1
    assert [job["metadata"]["name"] for job in rayjobs(kube)] == ["cf-first-1", "cf-second-1"]
