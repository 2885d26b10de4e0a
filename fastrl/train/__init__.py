"""Training: the loop (`trainer.py`) and atomic checkpoints (`checkpoint.py`).

Importing this subpackage binds it as `fastrl.train`, the name of the API function
`fastrl.api.train`; calling the subpackage calls that function, so `fastrl.train(...)` works
before and after any `fastrl.train.*` import.
"""

import sys
import types


class _CallableSubpackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from fastrl.api import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableSubpackage
