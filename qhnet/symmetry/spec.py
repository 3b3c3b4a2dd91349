"""The group spec: which group acts on which axis of which array of an inference form.

A stream is a set of channels on which one T acts as u -> u T (docs/design.md, 'Streams and
groups'); its group is the largest one its activations admit (`groups.ADMITTED`). Each of
its entries names an array axis of the form and the axis' role:

    'in'           the axis consumes the stream:  W -> T^-1 W along it
    'out'          the axis holds stream values:  W -> W T
    'per_channel'  a per-channel map on the stream (a depthwise kernel, a squeeze-excite
                   gate) follows T's permutation P only: T^-1 diag(w) T = diag(w P), T = P D

and `repeat` r > 1 says the axis is (n, r), stream channel outer, and T acts as T (x) I_r.

A block's hidden channels (`Hidden`) are permuted by `perm` (of `size` channels) and rescaled
by `scale` (`scale_size` nonzero factors): the map that writes them up (power +1), the map
that reads them down (power -1).

The spec of a model is built by its family (`qhnet_family`, `baseline_family`) through
`families.group_spec`; this module holds the format only.
"""

import dataclasses

from qhnet.symmetry.structure import BaselineStructure, Structure


@dataclasses.dataclass(frozen=True)
class Entry:
    """One axis of one array of the inference form on which a stream's T acts."""
    path: tuple[str, str]   # (block name, 'stem' or 'head', or a baseline's layer; array key)
    axis: int
    role: str               # 'in', 'out' or 'per_channel' (module docstring)
    repeat: int = 1


@dataclasses.dataclass(frozen=True)
class Stream:
    name: str               # 'stem', or the block that starts it
    width: int
    group: str              # the largest group its activations admit
    blocks: tuple[str, ...] # the blocks whose output lies on it
    entries: tuple[Entry, ...]


@dataclasses.dataclass(frozen=True)
class HiddenEntry:
    """An axis that a block's hidden permutation moves: channel (j, rest) -> (perm(j), rest),
    with the old channel's scale to the power `power` (0: permuted only)."""
    path: tuple[str, str]
    axis: int
    power: int


@dataclasses.dataclass(frozen=True)
class Hidden:
    block: str
    size: int               # len(perm)
    scale_size: int         # len(scale)
    entries: tuple[HiddenEntry, ...]


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """The model's structure, its streams and its blocks' hidden symmetries. Hashable."""
    structure: Structure | BaselineStructure
    streams: tuple[Stream, ...]
    hidden: tuple[Hidden, ...]

    def __str__(self) -> str:
        w = max([16] + [len(s.name) for s in self.streams])
        lines = [f'{"stream":<{w}} {"width":>5}  {"group":<19} blocks']
        for s in self.streams:
            blocks = (f'{s.blocks[0]} .. {s.blocks[-1]} ({len(s.blocks)})' if len(s.blocks) > 2
                      else ', '.join(s.blocks))
            lines.append(f'{s.name:<{w}} {s.width:>5}  {s.group:<19} {blocks}')
        return '\n'.join(lines)
