"""Finds and loads the compiled CUDA extension (in progress)."""


def backend_status() -> tuple[bool, str]:
    return False, "the CUDA extension is not built yet"
