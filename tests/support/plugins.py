"""Broken plug-in families for the tests of plug-in discovery: an installed distribution,
`genq-test-plugins`, written into a folder to put on PYTHONPATH, whose `genq.families` entry
points each fail in their own way (an import error, an exit, a too-new API, a name taken, not a
family, torch imported at discovery); the root conftest.py's `plugin_site` makes one.
"""

from __future__ import annotations

from pathlib import Path

# Installed-package stand-ins for plug-in families that genq must report, not load: each module
# of the `genq_test_plugins` package below fails discovery in its own way.
BROKEN_PLUGIN_MODULES = {
    "__init__.py": "",
    "crashes.py": "raise ImportError('libfoo.so.1: cannot open shared object file')\n",
    "exits.py": "import sys\nsys.exit(3)\n",
    "heavy.py": "import torch  # noqa: F401\nfrom genq_test_plugins.future import FAMILY  # noqa\n",
    "future.py": (
        "from pydantic import BaseModel, ConfigDict\n"
        "from workers.families.base import Family\n"
        "class P(BaseModel):\n    model_config = ConfigDict(extra='forbid')\n"
        "FAMILY = Family(name='future', description='d', implementation='x.y',\n"
        "                generate_params=P, api_version=99)\n"
        "ECHO = Family(name='echo', description='d', implementation='x.y', generate_params=P)\n"
        "LOOSE = Family(name='loose', description='d', implementation='x.y',\n"
        "               train_params=BaseModel, max_batch_size=4)\n"
        "NOT_A_FAMILY = {'name': 'dict'}\n"
    ),
}
BROKEN_PLUGINS = {
    "crashes": "genq_test_plugins.crashes:FAMILY",
    "exits": "genq_test_plugins.exits:FAMILY",
    "future": "genq_test_plugins.future:FAMILY",
    "echo": "genq_test_plugins.future:ECHO",
    "loose": "genq_test_plugins.future:LOOSE",
    "dict": "genq_test_plugins.future:NOT_A_FAMILY",
    "renamed": "genq_test_plugins.future:ECHO",
    "heavy": "genq_test_plugins.heavy:FAMILY",
}


def write_plugin_site(root: Path, names: list[str]) -> Path:
    """A folder to put on PYTHONPATH that holds the `genq-test-plugins` distribution, whose
    `genq.families` entry points are `names` (keys of BROKEN_PLUGINS)."""
    package = root / "genq_test_plugins"
    package.mkdir(parents=True)
    for name, source in BROKEN_PLUGIN_MODULES.items():
        (package / name).write_text(source)
    info = root / "genq_test_plugins-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: genq-test-plugins\nVersion: 1.0\n")
    lines = "".join(f"{name} = {BROKEN_PLUGINS[name]}\n" for name in names)
    (info / "entry_points.txt").write_text(f"[genq.families]\n{lines}")
    return root
