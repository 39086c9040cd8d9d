"""A pause between registering a version and moving its alias, for the chaos test (tests/test_flow_chaos.py).

On PYTHONPATH with $CHAOS_PAUSE_AFTER_VERSION set to a file path, every Python process that imports
stages.tracking.registry gets a `create_version` that, once the version exists, writes its number to that file
and sleeps, so the test can kill the retrain exactly there. Without the variable it does nothing.
"""

import importlib.abc
import os
import sys
import time

MARKER = os.environ.get("CHAOS_PAUSE_AFTER_VERSION")
MODULE = "stages.tracking.registry"


def pausing(create_version):
    def create_then_pause(*args, **kwargs):
        version = create_version(*args, **kwargs)
        with open(MARKER, "w", encoding="utf-8") as marker:
            marker.write(str(version.version))
        time.sleep(600)
        return version

    return create_then_pause


class PauseAfterVersion(importlib.abc.MetaPathFinder):
    """Loads stages.tracking.registry as usual, then wraps its create_version."""

    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            module.create_version = pausing(module.create_version)

        spec.loader.exec_module = exec_module
        return spec


if MARKER:
    sys.meta_path.insert(0, PauseAfterVersion())
