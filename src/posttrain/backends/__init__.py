"""Generation backends other than posttrain's own engine (engine.py), behind the same `generate` interface.

`vllm`: vLLM for rollouts (`generation.backend: vllm`, colocated with training on one GPU, the policy's weights
loaded into vLLM before every rollout) and for serving (`posttrain serve --backend vllm`, vLLM's own
OpenAI-compatible server). vLLM is an optional dependency (Linux + CUDA); without it both are a one-line error.
"""
