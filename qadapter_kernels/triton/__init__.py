"""Triton kernels (in progress)."""


def backend_status() -> tuple[bool, str]:
    return False, "the Triton backend is not built yet"
