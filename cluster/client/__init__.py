"""The client side: what an application links to talk to a saga cluster.

`SagaClient` (blocking) and `AsyncSagaClient` (asyncio) submit and run sagas, read
them and follow them, with the retry and leader-finding rules of `saga_client`;
`sagactl` is the command line over the same calls. Nothing here starts processes or
injects faults: those commands of `sagactl` (local clusters, chaos) are plugged in by
the test kit.
"""

from cluster.client.aio import AsyncSagaClient
from cluster.client.saga_client import SagaClient, client_tls

__all__ = ["AsyncSagaClient", "SagaClient", "client_tls"]
