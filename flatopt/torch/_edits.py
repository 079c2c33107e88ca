"""``opt.state`` and the groups' ``params`` lists as containers that note edits made from
outside, so that a step finds them at O(1) cost."""
from collections import defaultdict

from flatopt.optimizers.base import DICT_EDITS, LIST_EDITS, note_edits


class Edits:
    """A flag, set when ``opt.state``, one of its dicts or a group's ``params`` list is edited
    from outside, so that the next step sees the edit at O(1) cost and takes it in (the
    optimizer itself writes through ``dict``'s own methods, which leave it alone).  Also the
    ``default_factory`` of ``opt.state``: a parameter's new dict notes edits too."""
    __slots__ = ("edited",)

    def __init__(self):
        self.edited = False

    def __call__(self):
        return ParamState(self)

    def __reduce__(self):
        return Edits, ()


class ParamState(dict):
    """``opt.state[p]``: a dict that notes edits."""

    def __init__(self, edits, entries=()):
        dict.__init__(self, entries)
        self._edits = edits

    def __reduce__(self):  # pickle restores a dict's items before its attributes: pass both at once
        return type(self), (self._edits, dict(self))


class State(defaultdict):
    """``opt.state``: torch's ``defaultdict(dict)``, noting edits."""

    def __init__(self, edits, entries=()):
        defaultdict.__init__(self, edits, entries)

    @property
    def _edits(self):
        return self.default_factory

    def __reduce__(self):
        return type(self), (self.default_factory, dict(self))


class ParamList(list):
    """A group's ``params``: a list that notes edits (torch reads the list at every step)."""

    def __init__(self, edits, params=()):
        list.__init__(self, params)
        self._edits = edits

    def __reduce__(self):
        return type(self), (self._edits, list(self))


def _flag_edit(container):
    container._edits.edited = True


note_edits(ParamState, dict, DICT_EDITS, _flag_edit)
note_edits(State, dict, DICT_EDITS, _flag_edit)
note_edits(ParamList, list, LIST_EDITS, _flag_edit)

_MISSING = object()


def unchanged(entries, installed, names):
    """Whether a state dict still holds exactly what the optimizer installed under ``names``
    (its own keys; others a user put there are left alone, as torch leaves them)."""
    return all(dict.get(entries, k, _MISSING) is installed.get(k, _MISSING) for k in names)
