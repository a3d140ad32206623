"""The `genq` command and the process supervisor behind `genq up`: the top layer, above the API.

`stack.cli` is the command line (run the stack or one of its processes, migrate, manage keys,
submit and watch jobs); `stack.supervisor` starts the stack's processes and restarts the ones
that exit. Neither is HTTP code, so neither lives in `api/`; both may import every other layer.
"""
