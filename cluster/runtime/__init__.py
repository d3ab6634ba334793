"""The node runtime: the `sagalog-node` process.

A node runs Raft over the Saga Log (`sagalog`), hosts the coordinator (`coordinator`)
while it leads, and serves the gRPC services: `Sagas` for clients
(`sagas_service`), `Cluster` and `Log` for operators (`service`), with their
configuration (`config`), the push of applied records to Watch and Run (`push`),
retention of ended sagas (`retention`) and the node's identity on disk (`identity`).
"""
