from hypothesis import settings

# First calls compile numba kernels (or load them from cache): per-example time is meaningless.
settings.register_profile("lvsdp", deadline=None)
settings.load_profile("lvsdp")
