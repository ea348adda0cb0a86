"""One pipeline run at a time per Prefect server: the global concurrency limit `dvc-repo`.

A retrain writes params.yaml, data/ and models/; validate-onnx reads them. Both flows hold the
one slot while they touch the workspace, so a second run queues behind the first instead of
failing on DVC's repository lock or validating a set of models that is half replaced.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

NAME = "dvc-repo"


def ensure_limit(name: str = NAME, slots: int = 1) -> None:
    """Create the global concurrency limit if missing (an absent limit would not limit at all)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
            except ObjectAlreadyExists:  # another run created it meanwhile
                pass


@contextlib.contextmanager
def hold(logger, name: str = NAME) -> Iterator[None]:
    """Wait for the slot (logged, so a queued run says why it waits), hold it for the block."""
    from prefect.concurrency.sync import concurrency

    ensure_limit(name)
    logger.info("waiting for the %r concurrency slot", name)
    with concurrency(name, occupy=1):
        logger.info("holding the %r concurrency slot", name)
        yield
