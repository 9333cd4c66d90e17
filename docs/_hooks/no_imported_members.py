"""griffe extension for the API reference: a module without `__all__` shows only what it defines.

The reference is built by inspecting the imported package (`force_inspection`, for `TIPConfig`'s generated
docstring), and griffe's inspector does not record imports, so every name a module merely imports
(`TokenStats` in `trl_tip.core.selectors`, `loss` and `quadrants`) would be rendered again under that module. This
drops such aliases from modules that have no `__all__`; a package that exports names with `__all__` (`trl_tip`,
`trl_tip.core`) keeps them, so `trl_tip.TIPConfig` still resolves.
"""

import griffe


class NoImportedMembers(griffe.Extension):
    def on_module_members(self, *, node, mod, agent, **kwargs):
        runtime = getattr(node, "obj", None)
        if runtime is None or hasattr(runtime, "__all__"):
            return
        for name, member in list(mod.members.items()):
            if member.is_alias:
                del mod.members[name]
