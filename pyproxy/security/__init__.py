"""Workload identity and mutual TLS (Istio ISTIO_MUTUAL, PeerAuthentication)."""
