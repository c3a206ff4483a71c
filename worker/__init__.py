"""Celery workers that run a training run's stages and the vLLM controller.

`worker.celery_app` is the Celery app; `worker.tasks` the stage tasks (GPU
queue); `worker.controller` the vLLM start/stop tasks (vllm queue);
`worker.dispatch` sends the SQLite outbox to the broker; `worker.local` starts
the CPU-only local mode.
"""
