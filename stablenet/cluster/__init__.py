"""One registry across Docker hosts, kept in etcd: each host publishes its local endpoints under
a lease of its own and merges the others' into its registry. ``etcd`` is the store's client,
``layout`` the keys, ``view`` the merge and failure rules, ``node`` the loops."""

from stablenet.cluster.node import Cluster

__all__ = ["Cluster"]
