"""The Celery app. Broker and result backend come from `SPEC_BROKER_URL` (Redis in compose;
the local mode falls back to a filesystem broker when no Redis answers).

Every Redis key carries the installation's namespace (`Settings.broker_namespace`, from the
home directory unless SPEC_BROKER_NAMESPACE says otherwise).

Queues: `gpu` for stage tasks (one job per worker: `--pool solo --concurrency 1`),
`gpu-x<n>` for the stages of a run asking for n > 1 GPUs (a worker started with `-Q gpu`
also takes `gpu-x2` .. `gpu-x<SPEC_MAX_GPUS>`: runs go to workers with the GPUs they ask
for), and `vllm` for the controller in the vLLM container.
"""

from __future__ import annotations

from celery import Celery, signals

from runstore.settings import Settings
from speculators.console import setup_logging

GPU_QUEUE = "gpu"
VLLM_QUEUE = "vllm"


def gpu_queue(gpus: int) -> str:
    """The queue of a run asking for `gpus` GPUs: `gpu` for the CPU and one GPU, `gpu-x<n>`
    for n > 1, which only a worker with at least n GPUs consumes."""
    return GPU_QUEUE if gpus <= 1 else f"{GPU_QUEUE}-x{gpus}"


def worker_gpu_queues(gpus: int) -> list[str]:
    """Every queue a worker with `gpus` GPUs (SPEC_MAX_GPUS) takes runs from: `gpu` and the
    `gpu-x<n>` of each n up to its count, so a run lands on a worker that has its GPUs."""
    return [GPU_QUEUE] + [gpu_queue(n) for n in range(2, gpus + 1)]


def make_celery(settings: Settings | None = None) -> Celery:
    s = settings or Settings.from_env()
    app = Celery("speculators", broker=s.broker_url, backend=s.result_backend,
                 include=["worker.tasks", "worker.controller"])
    transport: dict = {}
    if s.broker_url.startswith("filesystem://"):
        folder = s.home / "broker"
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        (s.home / "results").mkdir(parents=True, exist_ok=True)
        # control_folder holds kombu's exchange tables; unset, kombu writes ./control in the cwd.
        transport = {"data_folder_in": str(folder / "queue"), "data_folder_out": str(folder / "queue"),
                     "processed_folder": str(folder / "processed"), "store_processed": False,
                     "control_folder": str(folder / "control")}
    elif s.broker_url.startswith("redis"):
        # Fail fast when Redis is down: the caller keeps the message in the outbox.
        # Every key (queues, bindings, unacked messages, results) starts with the installation's
        # namespace, so two homes on one Redis DB never take each other's tasks.
        transport = {"socket_connect_timeout": 2, "socket_timeout": 5, "visibility_timeout": 7 * 24 * 3600,
                     "global_keyprefix": s.broker_namespace + ":"}
    app.conf.update(
        task_default_queue=GPU_QUEUE,
        task_routes={"worker.tasks.*": {"queue": GPU_QUEUE}, "worker.controller.*": {"queue": VLLM_QUEUE}},
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # A stage runs for hours: take one message at a time and ask for the ack on receipt.
        # A worker killed mid-stage is handled by recovery at its restart (see worker.tasks),
        # not by broker redelivery (visibility_timeout: a week). The solo pool blocks the
        # event loop that sends the ack, so the ack goes out when the stage ends: a broker
        # connection lost meanwhile puts the message back and another worker gets it again.
        # worker.runner.execute_stage drops such a copy (the stage is live elsewhere, already
        # succeeded, or its run has ended); tests/test_two_hosts_netns.py restarts Redis mid-stage.
        worker_prefetch_multiplier=1,
        task_acks_late=False,
        broker_transport_options=transport,
        result_backend_transport_options=transport if s.result_backend.startswith("redis") else {},
        broker_connection_retry_on_startup=True,
        result_expires=24 * 3600,
        # Run state lives in SQLite; the backend keeps only failures' tracebacks for inspection.
        task_ignore_result=True,
        task_store_errors_even_if_ignored=True,
        worker_hijack_root_logger=False,
    )
    return app


@signals.celeryd_after_setup.connect
def _consume_gpu_count_queues(sender=None, instance=None, **_):
    """A stage worker (`-Q gpu`) also takes the queues of runs asking for up to its GPU count."""
    queues = instance.app.amqp.queues
    if GPU_QUEUE not in queues.consume_from:
        return
    for name in worker_gpu_queues(Settings.from_env().max_gpus)[1:]:
        queues.select_add(name)


@signals.setup_logging.connect
def _one_log_format(loglevel=None, logfile=None, **_):
    """The worker logs in the format every `speculators` command uses (a receiver of this
    signal replaces Celery's own logging setup)."""
    stream = open(logfile, "a", encoding="utf-8", buffering=1) if logfile else None  # noqa: SIM115
    setup_logging(loglevel or "INFO", stream=stream)


app = make_celery()
