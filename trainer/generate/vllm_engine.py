"""The `vllm` engine: vLLM's offline engine (`vllm.LLM`) on the Ray cluster's GPUs.

- One vLLM engine per Ray actor (`tensor_parallel_size` GPUs each), started once and reused by
  every batch; samples are spread over the actors by request, so a prompt's samples share
  its prefill. Without a running Ray (a laptop, a test) one engine runs in this process.
- Prompts go in as `TokensPrompt` token ids: chat messages are rendered with our tokenizer's
  Phi-4 template first, so every engine sees the same ids.
- Automatic prefix caching is on: the N rollouts of one prefix, and successive prefixes of
  one solution, reuse cached KV blocks.
- Each sample is its own `n=1` request seeded with `sample_seed(seed, i)`, like the other
  engines, so results are cached and reproduced per sample.
- Log-probabilities are vLLM's raw ones (before temperature and filtering), as ours.

The model must be a Hugging Face export (vLLM cannot read our distributed checkpoints): a
checkpoint URI `<output>/checkpoints/step-N` is served from `<output>/hf`. vLLM is an
optional extra (`pip install tokenmill[vllm]`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from typing import Any

from tokenmill.store import FileStore, StoreError, download_dir, open_store
from tokenmill.trainer.generate.interface import (
    Completion,
    Engine,
    GenerationInputError,
    GenerationRequest,
    RequestOutput,
    TopLogprob,
    sample_seed,
    stable_hash,
)

DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


def export_uri(model_uri: str, field: str = "model") -> str:
    """The Hugging Face export to serve for a model URI (an export, a checkpoint, an output)."""
    from tokenmill.trainer.generate.loading import _STEP_DIR, model_kind

    kind, uri = model_kind(model_uri, field)
    if kind == "hf":
        return uri
    match = _STEP_DIR.match(uri)
    base = match.group("base") if match else uri
    output = base.rsplit("/", 1)[0] if base.endswith("/checkpoints") else base
    candidate = f"{output}/hf"
    try:
        if open_store(candidate).exists("config.json"):
            return candidate
    except StoreError as error:
        raise GenerationInputError(f"{field}: cannot read {candidate}: {error}") from None
    raise GenerationInputError(
        f"{field}: {model_uri} is a checkpoint without a Hugging Face export at {candidate}; "
        "engine vllm loads exports only")


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


class VLLMRunner:
    """One vLLM engine (in a Ray actor, or in this process)."""

    def __init__(self, export: str, tensor_parallel_size: int, options: dict[str, Any]) -> None:
        from vllm import LLM

        store = open_store(export)
        if isinstance(store, FileStore):
            directory = store.local_path("")
        else:
            directory = str(download_dir(export, tempfile.mkdtemp(prefix="tokenmill-vllm-")))
        self.llm = LLM(model=directory, tensor_parallel_size=tensor_parallel_size,
                       enable_prefix_caching=True, **options)

    def generate(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """items: {prompt_token_ids, sampling (SamplingParams fields), index}; one result each."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        prompts, params = [], []
        for item in items:
            s = item["sampling"]
            wanted = s["top_logprobs"] if s["top_logprobs"] else (0 if s["logprobs"] else None)
            params.append(VSamplingParams(
                n=1, temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"] or -1,
                max_tokens=s["max_tokens"], stop=list(s["stop"]) or None,
                stop_token_ids=list(s["stop_token_ids"]) or None,
                seed=sample_seed(s["seed"], item["index"]), logprobs=wanted))
            prompts.append(TokensPrompt(prompt_token_ids=list(item["prompt_token_ids"])))
        results = []
        for item, output in zip(items, self.llm.generate(prompts, params, use_tqdm=False), strict=True):
            sample = output.outputs[0]
            s = item["sampling"]
            logprobs, tops = None, None
            if sample.logprobs is not None and (s["logprobs"] or s["top_logprobs"]):
                logprobs = [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids, strict=False)]
                if s["top_logprobs"]:
                    tops = [[{"token_id": t, "logprob": lp.logprob, "token": lp.decoded_token or ""}
                             for t, lp in sorted(step.items(), key=lambda kv: kv[1].rank or 0)
                             if lp.rank is not None and lp.rank <= s["top_logprobs"]][:s["top_logprobs"]]
                            for step in sample.logprobs]
            results.append({
                "index": item["index"], "token_ids": list(sample.token_ids), "text": sample.text,
                "finish_reason": "length" if sample.finish_reason == "length" else "stop",
                "prompt_tokens": len(item["prompt_token_ids"]), "logprobs": logprobs, "top_logprobs": tops,
            })
        return results


class VLLMEngine(Engine):
    engine_name = "vllm"

    def __init__(self, model_uri: str, *, tensor_parallel_size: int = 1, max_concurrency: int = 64,
                 replicas: int | None = None, use_ray: bool | None = None, field: str = "model",
                 **options: Any) -> None:
        self.model_uri = model_uri
        self.field = field
        self.tensor_parallel_size = tensor_parallel_size
        self.max_concurrency = max_concurrency
        self.replicas = replicas
        self.use_ray = use_ray
        self.options = {"gpu_memory_utilization": DEFAULT_GPU_MEMORY_UTILIZATION} | options
        self.export = export_uri(model_uri, field)
        self.config = self._read_config()
        from tokenmill.trainer.generate.loading import _tokenizer
        from tokenmill.trainer.model.hf import config_from_hf

        try:
            ours = config_from_hf(self.config)
        except (ValueError, KeyError) as error:
            raise GenerationInputError(f"{field}: {self.export} is not a usable Phi-3 export: {error}") from None
        self.tokenizer = _tokenizer(ours.tokenizer, ours, self.export, field)
        self.context_length = int(self.config.get("max_position_embeddings", 4096))
        self._identity = f"hf:{stable_hash({'config': self.config, 'uri': self.export})}"
        self._runners: list[Any] | None = None

    def _read_config(self) -> dict[str, Any]:
        try:
            return json.loads(open_store(self.export).read_bytes("config.json"))
        except (StoreError, ValueError) as error:
            raise GenerationInputError(f"{self.field}: cannot read {self.export}/config.json: {error}") from None

    @property
    def model_identity(self) -> str:
        return self._identity

    def check(self) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError as error:
            raise GenerationInputError(
                f"generator.engine: vllm is not installed here (pip install tokenmill[vllm]): {error}") from None

    def check_requests(self, requests: Sequence[GenerationRequest]) -> None:
        super().check_requests(requests)
        from tokenmill.trainer.generate.torch_engine import prompt_ids

        for index, request in enumerate(requests):
            length = len(prompt_ids(self.tokenizer, request))
            if length >= self.context_length:
                raise GenerationInputError(
                    f"requests[{index}]: the prompt has {length} tokens, the model's context is {self.context_length}")

    def _start(self) -> list[Any]:
        if self._runners is not None:
            return self._runners
        ray_ready = self.use_ray if self.use_ray is not None else _ray_running()
        if not ray_ready:
            self._runners = [VLLMRunner(self.export, self.tensor_parallel_size, self.options)]
            return self._runners
        import ray

        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = self.replicas or max(1, gpus // self.tensor_parallel_size)
        actor = ray.remote(num_gpus=self.tensor_parallel_size if gpus else 0)(VLLMRunner)
        self._runners = [actor.remote(self.export, self.tensor_parallel_size, self.options) for _ in range(count)]
        return self._runners

    def generate(self, requests: Sequence[GenerationRequest]) -> list[RequestOutput]:
        from tokenmill.trainer.generate.torch_engine import prompt_ids

        self.check_requests(requests)
        runners = self._start()
        shares: list[list[dict[str, Any]]] = [[] for _ in runners]
        owners: list[list[int]] = [[] for _ in runners]
        for position, request in enumerate(requests):
            ids = prompt_ids(self.tokenizer, request)
            sampling = request.sampling.to_dict()
            slot = position % len(runners)  # one prompt's samples stay together: one prefill
            for index in request.indices:
                shares[slot].append({"prompt_token_ids": ids, "sampling": sampling, "index": index})
                owners[slot].append(position)
        outputs = [RequestOutput(request) for request in requests]
        if isinstance(runners[0], VLLMRunner):
            results = [runner.generate(share) for runner, share in zip(runners, shares, strict=True)]
        else:
            import ray

            pending = [runner.generate.remote(share) for runner, share in zip(runners, shares, strict=True) if share]
            done = iter(ray.get(pending))
            results = [next(done) if share else [] for share in shares]
        for slot, slot_results in enumerate(results):
            for position, result in zip(owners[slot], slot_results, strict=True):
                tops = result.pop("top_logprobs")
                completion = Completion(**result)
                if tops is not None:
                    completion.top_logprobs = [[TopLogprob(**t) for t in step] for step in tops]
                outputs[position].completions.append(completion)
        for output in outputs:
            output.completions.sort(key=lambda c: c.index)
        return outputs

    def close(self) -> None:
        if self._runners and not isinstance(self._runners[0], VLLMRunner):
            import ray

            for runner in self._runners:
                ray.kill(runner)
        self._runners = None

