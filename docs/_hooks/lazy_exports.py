"""mkdocs hook: makes `trl_tip`'s lazily loaded exports (`TIPConfig`, `TIPGKDTrainer`) ordinary module attributes
before the API reference is collected.

`trl_tip` loads its training glue on first attribute access (a module `__getattr__`), so `dir(trl_tip)` does not list
`TIPConfig` and griffe's inspector (`force_inspection`, needed because `TIPConfig`'s docstring is built at import
time) could not find `trl_tip.TIPConfig`. Reading every name of `trl_tip.__all__` once, through the public path,
fixes that without naming any internal module.
"""

import importlib


def on_config(config):
    package = importlib.import_module("trl_tip")
    for name in package.__all__:
        if name not in vars(package):
            setattr(package, name, getattr(package, name))
    return config
