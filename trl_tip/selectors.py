"""Old import path, kept so user code keeps working: this module is `trl_tip.core.selectors` under its former name."""

import sys

from .core import selectors as _moved


sys.modules[__name__] = _moved
