"""genq's workers: model families (a torch-free parameter spec and a torch implementation each),
the built-in data sets and the Ray actors that serve and train models.

Importing `workers`, `workers.registry` or any `*_spec` module loads neither torch nor ray: the
API validates parameters with the specs.
"""
