"""From united slots to channel groups: which channels are removed together, and which are kept and why.

After the trace, every set of united slots is a *unit* (removed as a whole, from every attached
parameter); units whose slots share a space (one layer's outputs) form a *group*, pruned with one ratio.
A group is kept whole when all its units are frozen, when no parameter depends on it, or when its units
would leave a layer ragged (unequal slot counts in one space).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .tracer import ChannelTrace

__all__ = ["ChannelGroup", "Grouping", "group_channels"]


@dataclass
class ChannelGroup:
    """A set of coupled channel dimensions, pruned together with one ratio.

    Attributes:
        index: position in ``DependencyGraph.groups``.
        units: root slot of every unit (a unit is removed as a whole), in a stable order.
        unit_channels: channels of the group's first space per unit (1 for plain channels, the head size for
            attention heads, the group width for grouped convs).
        spaces: names of the layers whose outputs belong to the group (``module:op``).
        params: names of the parameters attached to the group.
        frozen_reason: why the group cannot be pruned, or ``None``.
        frozen_units: units that must be kept (with the group still prunable otherwise).
        partial_spaces: for a group joined by a concatenation, the units of each space that holds only some
            of the group's units (at least one of them is kept so no layer is left with zero channels).
        keep_counts: the numbers of units the group may keep (ascending), or ``None`` for any number; e.g. the
            head counts a Hugging Face config can state (:meth:`DependencyGraph.limit_keep_counts`).
    """

    index: int
    units: list
    unit_channels: int
    spaces: list
    params: list
    frozen_reason: str | None = None
    frozen_units: set = field(default_factory=set)
    partial_spaces: list = field(default_factory=list)
    keep_counts: tuple | None = None

    @property
    def prunable(self) -> bool:
        return self.frozen_reason is None and len(self.units) - len(self.frozen_units) > 0 and len(self.units) > 1

    @property
    def channels(self) -> int:
        return len(self.units) * self.unit_channels


@dataclass
class Grouping:
    """The result of :func:`group_channels`.

    Attributes:
        groups: the :class:`ChannelGroup` list.
        roots: ``roots[s]`` is the unit (root slot) of slot ``s``.
        root_group: unit -> index of its group.
        frozen_roots: frozen unit -> the reason.
    """

    groups: list[ChannelGroup]
    roots: np.ndarray
    root_group: dict[int, int]
    frozen_roots: dict[int, str]


def _freeze_unsafe_parameters(trace: ChannelTrace) -> None:
    """Keep the channels of parameters used where the trace cannot follow them."""
    for (pname, dim), reason in trace.fixed_parameter_dims.items():
        for a in trace.attachments.get(pname, []):
            if a.dim == dim:  # a tied parameter, also used where its input channels are fixed
                trace.freeze(a.labels, f"{reason} (tied parameter {pname})", False)
    for pname, reason in trace.kept_parameters.items():
        for a in trace.attachments.get(pname, []):
            trace.freeze(a.labels, f"{reason} (parameter {pname})")


def _group_roots(trace: ChannelTrace, roots: np.ndarray) -> dict[int, list[int]]:
    """Group key -> the units of that group: units sharing a slot space are in one group."""
    n = trace.num_slots
    gparent = list(range(n))

    def gfind(a):
        while gparent[a] != a:
            gparent[a] = gparent[gparent[a]]
            a = gparent[a]
        return a

    first_root_of_space: dict[int, int] = {}
    for s in range(n):
        sp = trace.slot_space[s]
        r = int(roots[s])
        if sp in first_root_of_space:
            a, b = gfind(first_root_of_space[sp]), gfind(r)
            if a != b:
                gparent[max(a, b)] = min(a, b)
        else:
            first_root_of_space[sp] = r
    by_group: dict[int, list[int]] = {}
    for s in range(n):
        if int(roots[s]) == s:
            by_group.setdefault(gfind(s), []).append(s)
    return by_group


def group_channels(trace: ChannelTrace) -> Grouping:
    """Freeze what the trace says must be kept, then build the groups of units (see the module docstring)."""
    _freeze_unsafe_parameters(trace)
    n = trace.num_slots
    roots = np.array([trace.find(s) for s in range(n)], dtype=np.int64)
    frozen_roots: dict[int, str] = {}
    for s, why in trace.frozen_slots.items():
        frozen_roots.setdefault(int(roots[s]), why)
    groups: list[ChannelGroup] = []
    root_group: dict[int, int] = {}
    for _, units in sorted(_group_roots(trace, roots).items()):
        for u in units:
            root_group[u] = len(groups)
        groups.append(ChannelGroup(len(groups), units, 1, [], []))
    params_by_root: dict[int, set] = {}
    for pname, lst in trace.attachments.items():
        for a in lst:
            for r in set(roots[a.labels].tolist()):
                params_by_root.setdefault(r, set()).add(pname)
    # spaces and the unit width (channels of one unit in the group's first space)
    space_slots: dict[int, list[int]] = {}
    for s in range(n):
        space_slots.setdefault(trace.slot_space[s], []).append(s)
    for sp, slots in space_slots.items():
        grp = groups[root_group[int(roots[slots[0]])]]
        grp.spaces.append(trace.spaces[sp])
        if len(grp.spaces) == 1:
            present = len({int(r) for r in roots[slots]})
            grp.unit_channels = max(1, len(slots) * trace.space_width[sp] // present)
    for grp in groups:
        grp.params = sorted(set().union(*(params_by_root.get(u, set()) for u in grp.units)))
        grp.frozen_units = {u for u in grp.units if u in frozen_roots}
        if len(grp.frozen_units) == len(grp.units):
            grp.frozen_reason = frozen_roots[next(iter(grp.frozen_units))]
        elif not grp.params:
            grp.frozen_reason = "no parameters depend on these channels"
        else:
            _check_spaces(grp, space_slots, roots, root_group)
    return Grouping(groups, roots, root_group, frozen_roots)


def _check_spaces(grp: ChannelGroup, space_slots: dict, roots: np.ndarray, root_group: dict) -> None:
    """The units present in a space must all have the same number of slots there, else a removal could leave
    a layer with a ragged shape. A unit may be absent from a space: a concatenation couples parts that are
    otherwise separate (e.g. ``cat([a, b])`` scaled by an SE gate), and removing a unit then shrinks only the
    spaces it appears in."""
    for slots in space_slots.values():
        if root_group[int(roots[slots[0]])] != grp.index:
            continue
        count: dict[int, int] = {}
        for s in slots:
            count[int(roots[s])] = count.get(int(roots[s]), 0) + 1
        if len(set(count.values())) > 1:
            grp.frozen_reason = "its channels are coupled in units of unequal sizes"
            return
        if len(count) < len(grp.units):
            grp.partial_spaces.append(frozenset(count))
