"""The ways to start the operator: `kopf run -m tokenmill.operator` and the CLI commands."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from tests.operator.conftest import RAYJOBS, apply, commit_dataset, corpus, phase_is, rayjobs
from tokenmill.cli import build_parser


async def test_kopf_run_module_registers_the_handlers(kube, standin, store_root, tmp_path):
    commit_dataset(f"{store_root}/raw")
    env = {**os.environ, "TOKENMILL_STORE": store_root, "TOKENMILL_METRICS_PORT": "0",
           "TOKENMILL_RESYNC_SECONDS": "1", "TOKENMILL_RETRY_BACKOFF_SECONDS": "0"}
    log = open(tmp_path / "kopf.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "kopf", "run", "-m", "tokenmill.operator", "--standalone",
                                "--all-namespaces"], env=env, stdout=log, stderr=log)
    try:
        await standin()
        await apply(kube, corpus("web", inputs=[{"name": "raw", "uri": f"{store_root}/raw"}]))
        done = await phase_is(kube, "CorpusFilter", "web", "Succeeded", timeout=90)
        assert done["attempts"] == 1 and [job["metadata"]["name"] for job in rayjobs(kube)] == ["cf-web-1"]
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 30)
        log.close()
    assert process.returncode == 0, (tmp_path / "kopf.log").read_text()[-3000:]


def test_importing_the_package_registers_nothing_without_kopf():
    code = "import sys, tokenmill.operator, tokenmill.operator.render; print('kopf' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"  # the tokenmill CLI and render stay light


def test_the_cli_has_operator_and_render_commands(capsys):
    parser = build_parser()
    args = parser.parse_args(["operator", "--standalone", "-n", "ml", "-n", "research", "--metrics-port", "9100"])
    assert args.namespaces == ["ml", "research"] and args.standalone and args.metrics_port == 9100
    assert args.func.__name__ == "cmd_operator"
    assert parser.parse_args(["render", "recipe/"]).func.__name__ == "cmd_render"


async def test_the_operator_refuses_to_start_without_kuberay(kube, start_operator, caplog):
    del kube.resources[RAYJOBS.key]
    kube.specs.pop(RAYJOBS.key)
    with pytest.raises(RuntimeError, match="the operator exited: ActivityError"):
        await start_operator()
    assert "the API server does not serve ray.io/v1 RayJobs: install KubeRay" in caplog.text
