"""The Ray cluster `tokenmill run` starts for its workloads: their actors reach this cluster's state
API even when other Ray clusters run on the machine. Ray Train's placement-group cleaner (an actor)
asks it whether its controller still lives; asked without an address, Ray looks for the machine's
clusters and, finding several, the cleaner's thread dies with a traceback the runner relays."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tokenmill.runner.console import local_ray

pytestmark = pytest.mark.slow

OTHER_CLUSTER = """\
import sys
import ray
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
print("up", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def another_ray_cluster() -> Iterator[None]:
    """A Ray cluster of another program, running until the test ends."""
    process = subprocess.Popen([sys.executable, "-c", OTHER_CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        assert process.stdout is not None and process.stdout.readline() == "up\n"
        yield
    finally:
        process.communicate(timeout=300)  # its end of input: it shuts its cluster down
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_actors_of_the_runners_cluster_query_its_state_api_beside_another_cluster(another_ray_cluster: None) -> None:
    import ray
    from ray.util.state import list_actors

    @ray.remote(num_cpus=0)
    class Controller:
        def ready(self) -> bool:
            return True

    @ray.remote(num_cpus=0)
    def live_actor_classes() -> list[str]:
        return sorted(actor.class_name.rsplit(".", 1)[-1] for actor in list_actors(filters=[("state", "=", "ALIVE")]))

    with local_ray(None, start=True) as address:
        assert address
        controller = Controller.remote()
        assert ray.get(controller.ready.remote())
        assert "Controller" in ray.get(live_actor_classes.remote(), timeout=300)
