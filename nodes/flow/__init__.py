"""The embedded engine: optical-flow propagation of a first-frame edit (OpenCV DIS, CPU, no weights)."""
