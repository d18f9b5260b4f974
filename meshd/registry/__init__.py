"""OCI Distribution read endpoint (a containerd mirror) over signed image releases."""
