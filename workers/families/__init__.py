"""Model families: one `<name>_spec.py` (pydantic parameters, resources; no torch) and one
`<name>.py` (the torch implementation, loaded lazily inside a Ray actor) per family."""
