"""The saga cluster around the Saga Log and the coordinator, by role.

* `cluster.runtime`: the node process (`sagalog-node`) and its gRPC services.
* `cluster.client`: `SagaClient`, `AsyncSagaClient` and `sagactl`.
* `cluster.participant`: the SDK for writing saga participants.
* `cluster.testkit`: local clusters, the travel participants, faults, chaos, the
  checker and the demo; only tests, benches and `sagactl`'s test-kit commands use it.

Shared by every role: TLS files (`tls`), gRPC channels (`grpcutil`), tokens and
roles (`auth`), and the local cluster's address file (`localstate`).
"""
