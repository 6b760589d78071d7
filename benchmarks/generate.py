"""Generation throughput: the torch engine against transformers' `generate`, and the openai
engine against `tokenmill serve`, in one run.

- ``batch``: 32 prompts x 64 new tokens, sampled (temperature 0.8, top-p 0.95), both with a KV
  cache; transformers gets the prompts as one left-padded batch.
- ``pts``: the Pivotal Token Search shape: one 128-token prefix, 64 samples of 32 tokens, then
  the same at 8 successive prefixes of one solution (the prefix grown by 8 tokens each time).
  transformers expands the prompt 64 times (`num_return_sequences`); the torch engine prefills
  it once and reuses the cached prefix for each longer one.
- ``openai``: rounds of 640 one-token requests from the openai engine (64 in flight) to
  `tokenmill serve`, which answers a batch's requests 50 ms after the batch started
  (`--delay-ms`; the engine goes on with the next batch meanwhile), in requests per second
  against the bound 64 / 50 ms = 1,280/s of a server that answers each request in exactly
  50 ms; with each side's CPU time per request, since client and server share the cores.

Both sides of ``batch`` and ``pts`` run on the same random tiny model (the transformers side
loads our Hugging Face export of it, KV cache on), with the same prompts, sampling settings
and torch thread count, in alternating order for `--rounds` rounds. The headline figures are
tokens per CPU second (all threads of this process), which other processes on a shared
machine do not distort: each side's median and range, and the per-round ratio's median and
range; the same per wall second follows. The torch engine starts every round with an empty
prefix cache.

    python benchmarks/generate.py [--rounds 5] [--skip-openai | --only-openai]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch

from tokenmill.model_configs import get_model_config
from tokenmill.trainer.generate import GenerationRequest, SamplingParams, TorchEngine
from tokenmill.trainer.model import build_model
from tokenmill.trainer.model.hf import export_hf
from tokenmill.trainer.tokenizer import get_tokenizer

TARGETS = {"batch": 1.5, "pts": 4.0}
TOKENIZER = get_tokenizer("byte")
STOPS = [TOKENIZER.eos_id, TOKENIZER.eot_id]


def _generated(ids: list[int]) -> int:
    for position, token in enumerate(ids):
        if token in STOPS:
            return position + 1
    return len(ids)


def hf_batch(model, prompts: list[list[int]], new: int, samples: int = 1) -> int:
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), TOKENIZER.pad_id)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=True, temperature=0.8,
                             top_p=0.95, top_k=0, num_return_sequences=samples, eos_token_id=STOPS,
                             pad_token_id=TOKENIZER.pad_id)
    return sum(_generated(row[longest:].tolist()) for row in out)


def ours_batch(engine: TorchEngine, prompts: list[list[int]], new: int, samples: int = 1, seed: int = 0) -> int:
    sampling = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=new, seed=seed)
    outputs = engine.generate([GenerationRequest(prompt_token_ids=tuple(p), n=samples, sampling=sampling)
                               for p in prompts])
    return sum(c.completion_tokens for o in outputs for c in o.completions)


def measure(run: Callable[[], int]) -> tuple[float, float]:
    """(tokens per CPU second, tokens per wall second) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = run()
    return tokens / max(1e-9, time.process_time() - cpu), tokens / (time.perf_counter() - wall)


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.2f} (range {min(values):,.2f}-{max(values):,.2f})"


def compare(name: str, ours: Callable[[], int], theirs: Callable[[], int], rounds: int) -> None:
    """Both sides in alternating order, `rounds` times; per-round ratios of tokens per CPU
    second (the figure other processes on a shared machine do not distort), and of wall time."""
    ours(), theirs()  # warm up
    figures: dict[str, list[tuple[float, float]]] = {"ours": [], "theirs": []}
    for round_index in range(rounds):
        order = [("ours", ours), ("theirs", theirs)]
        for label, run in order if round_index % 2 == 0 else order[::-1]:
            figures[label].append(measure(run))
    cpu = {k: [v[0] for v in figures[k]] for k in figures}
    wall = {k: [v[1] for v in figures[k]] for k in figures}
    cpu_ratios = [o / t for o, t in zip(cpu["ours"], cpu["theirs"], strict=True)]
    wall_ratios = [o / t for o, t in zip(wall["ours"], wall["theirs"], strict=True)]
    print(f"{name}: tokens per CPU second, torch engine {statistics.median(cpu['ours']):,.0f} "
          f"(range {min(cpu['ours']):,.0f}-{max(cpu['ours']):,.0f}), transformers generate "
          f"{statistics.median(cpu['theirs']):,.0f} (range {min(cpu['theirs']):,.0f}-{max(cpu['theirs']):,.0f}); "
          f"ratio {_spread(cpu_ratios)}x over {rounds} rounds, target >= {TARGETS[name]}x; "
          f"per wall second {statistics.median(wall['ours']):,.0f} vs {statistics.median(wall['theirs']):,.0f}, "
          f"ratio {_spread(wall_ratios)}x", flush=True)


def _cpu_seconds(pid: int) -> float | None:
    """User and system CPU time of another process so far (Linux), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_openai(export_dir: Path, rounds: int, requests: int = 640, concurrency: int = 64,
                 delay_ms: float = 50.0) -> None:
    from tokenmill.trainer.generate.openai_engine import OpenAIEngine

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "serve", f"file://{export_dir}", "--port",
                               str(port), "--served-model-name", "tiny", "--device", "cpu", "--delay-ms", str(delay_ms)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    rates, client_ms, server_ms, failed = [], [], [], 0
    try:
        for _ in range(600):
            with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                break
            if server.poll() is not None:
                raise RuntimeError(f"tokenmill serve exited with {server.returncode}")
            time.sleep(0.5)
        engine = OpenAIEngine(f"http://127.0.0.1:{port}/v1", "tiny", api_key="unused", max_concurrency=concurrency)
        engine.check()
        sampling = SamplingParams(temperature=0.8, max_tokens=1, seed=1)
        engine.generate([GenerationRequest(prompt_token_ids=tuple(TOKENIZER.encode(f"warm up {i}")),
                                           sampling=sampling) for i in range(concurrency)])
        for round_index in range(rounds):
            batch = [GenerationRequest(prompt_token_ids=tuple(TOKENIZER.encode(f"round {round_index} request {i}")),
                                       sampling=sampling) for i in range(requests)]
            server_cpu, client_cpu, started = _cpu_seconds(server.pid), time.process_time(), time.perf_counter()
            outputs = engine.generate(batch)
            seconds = time.perf_counter() - started
            done = sum(len(o.completions) for o in outputs)
            failed += requests - done
            rates.append(done / seconds)
            client_ms.append((time.process_time() - client_cpu) * 1000 / requests)
            if server_cpu is not None:
                server_ms.append((_cpu_seconds(server.pid) - server_cpu) * 1000 / requests)
    finally:
        server.terminate()
        server.wait()
    bound = concurrency / (delay_ms / 1000)
    server_cpu_text = f", server {_spread(server_ms)} ms" if server_ms else ""
    print(f"openai: openai engine {_spread(rates)} requests/s over {rounds} rounds of {requests} against "
          f"tokenmill serve (answers {delay_ms:g} ms after each batch starts, concurrency {concurrency}); "
          f"bound {bound:,.0f}/s, "
          f"ratio {_spread([rate / bound for rate in rates])}; CPU per request: client {_spread(client_ms)} ms"
          f"{server_cpu_text}; {failed} failed", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--skip-openai", action="store_true")
    parser.add_argument("--only-openai", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both sides (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import Phi3ForCausalLM

    config = get_model_config(args.config)
    model = build_model(config, seed=0).eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = export_hf(model, config, Path(tmp) / "hf", dtype="float32")
        theirs = Phi3ForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
        print(f"model {config.name}: {model.num_parameters():,} parameters, torch threads {torch.get_num_threads()}")
        generator = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 256, (int(length),), generator=generator).tolist()
                   for length in torch.randint(16, 48, (32,), generator=generator)]
        if args.only_openai:
            bench_openai(export_dir, args.rounds)
            return
        engine = TorchEngine(model, TOKENIZER)

        def ours_batched() -> int:
            engine.prefix_cache.clear()  # no reuse across rounds: transformers prefills every round too
            return ours_batch(engine, prompts, 64)

        compare("batch", ours_batched, lambda: hf_batch(theirs, prompts, 64), args.rounds)

        prefix = torch.randint(0, 256, (128,), generator=generator).tolist()
        solution = prefix + ours_batch_solution(engine, prefix)
        prefixes = [solution[:128 + 8 * k] for k in range(8)]
        counter = iter(range(10**9))

        def ours_pts() -> int:
            # One search per round: an empty prefix cache and new seeds, so only the reuse within
            # the search (each prefix extends the one before) pays, never a result from an earlier round.
            engine.prefix_cache.clear()
            fresh = next(counter)
            return sum(ours_batch(engine, [p], 32, samples=64, seed=fresh) for p in prefixes)

        def theirs_pts() -> int:
            return sum(hf_batch(theirs, [p], 32, samples=64) for p in prefixes)

        compare("pts", ours_pts, theirs_pts, args.rounds)
        if not args.skip_openai:
            bench_openai(export_dir, args.rounds)


def ours_batch_solution(engine: TorchEngine, prefix: list[int]) -> list[int]:
    """A 64-token greedy continuation: the 'solution' whose successive prefixes are searched."""
    request = GenerationRequest(prompt_token_ids=tuple(prefix), sampling=SamplingParams(temperature=0, max_tokens=64))
    tokens = engine.generate([request])[0].completions[0].token_ids
    return [t for t in tokens if t not in STOPS] or [65] * 64


if __name__ == "__main__":
    main()
