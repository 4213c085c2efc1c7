"""Settings renamed since an earlier release: the old name keeps working for one release, with a warning."""

import functools
import warnings


def rename_setting(cls, old: str, new: str, meaning: str):
    """Let `cls(old=...)` set the field `new` and `obj.old` read it, each with a FutureWarning, and record the rename
    in `cls.RENAMED` (how settings saved under the old name, e.g. in an agent's provenance, are read). Apply it to
    the dataclass once built: `fields()`, `asdict()` and `dataclasses.replace` then know only the new name."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        value = kwargs.pop(old, None)
        if value is not None:
            warnings.warn(f"{cls.__name__}({old}=...) is now {new} ({meaning}); {old} goes in the next release.",
                          FutureWarning, stacklevel=2)
            kwargs.setdefault(new, value)
        init(self, *args, **kwargs)

    def read(self):
        warnings.warn(f"{cls.__name__}.{old} is now {new}; {old} goes in the next release.", FutureWarning,
                      stacklevel=2)
        return getattr(self, new)

    cls.__init__ = __init__
    setattr(cls, old, property(read))
    cls.RENAMED = {**getattr(cls, "RENAMED", {}), old: new}
