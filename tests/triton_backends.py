"""Which Triton backends this install has (for the ahead-of-time compile tests)."""


def nvidia_backend_available():
    try:
        import triton.backends

        return "nvidia" in triton.backends.backends
    except Exception:
        return False
