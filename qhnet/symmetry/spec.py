"""`group_spec`: which group acts on which axis of which array, derived from the model.

Streams (docs/design.md, 'Streams and groups'). The stem's ReLU starts stream 'stem'; at
@ds it holds all of stage 1, which carries no activation. Every block that carries the
activation (and any block whose shortcut is a projection) starts a new stream, named after
it; other blocks read and write the stream they are on. A stream's group is the one its
starting activation admits (`groups.ADMITTED`). The last block carries the activation
(at @ds too), so the last stream starts there and ends at the head: global average pooling
commutes with T and the head, a linear map, absorbs T^-1. With T acting on a stream's channels as
u -> u T, an array axis is either

    'in'   the axis consumes the stream (C, E, S rows, the head):   W -> T^-1 W along it
    'out'  the axis holds stream values (A or E_out columns, biases, S columns, the stem):  W -> W T

and `repeat` r > 1 says the axis is (n, r), stream channel outer, and T acts as T (x) I_r:
in Eq. (4) with weight sharing there is no E, and K(u T) = K(u) (T (x) I_m) moves T
through K onto the rows of A and the derivative bias d.

Where a block reads one stream and writes another, its shortcut S becomes T_in^-1 S T_out:
the inference form keeps S explicit, so this is exact. The Flax model has no parameter
for an identity shortcut, so `tie_identity_shortcuts=True` merges the two streams across
every such block instead (one T for both, their groups' intersection); elements sampled
from that spec can be written back into the Flax model (`unfold`).

Hidden channels (per block, `Hidden`): the channels of the elementwise product can be
permuted and rescaled, by a permutation `perm` of the `size` channels that the
product is built from (with weight sharing a permutation must keep each derivative index
k: it moves channel (j, k) to (perm(j), k)) and nonzero scales `scale` of the
`scale_size` product channels, one factor up (power +1) and the next map down (power -1).
"""

import dataclasses

from qhnet.symmetry import groups
from qhnet.symmetry.inference import uses_mix_in
from qhnet.models import QHNet
from qhnet.symmetry.structure import Block, Structure, as_module, structure as trace_structure


@dataclasses.dataclass(frozen=True)
class Entry:
    """One axis of one array of the inference form on which a stream's T acts."""
    path: tuple[str, str]   # (block name, 'stem' or 'head', or a baseline's layer; array key)
    axis: int
    role: str               # 'in', 'out' (module docstring) or 'per_channel' (`action`)
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
    structure: Structure    # a baseline's: `qhnet.symmetry.baselines.BaselineStructure`
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


def _stream_entries(structure: Structure, block: Block) -> tuple[list[Entry], list[Entry]]:
    """(entries on the block's input stream, entries on its output stream), from its equation."""
    name, eq = block.name, structure.equation
    reads = [Entry((name, 'coef'), 0, 'in'), Entry((name, 'shortcut'), 0, 'in')]
    if uses_mix_in(structure):
        reads.append(Entry((name, 'mix_in'), 0, 'in'))
    else:  # Eq. (4) with weight sharing: K(u T) = K(u) (T (x) I_m)
        m = structure.multiplier
        reads += [Entry((name, 'combine'), 0, 'in', m),
                  Entry((name, 'derivative_bias'), 0, 'out', m)]
    last = 'mix_out' if eq in (4, 5) else 'combine'
    writes = [Entry((name, last), 1, 'out'), Entry((name, 'out_bias'), 0, 'out'),
              Entry((name, 'shortcut'), 1, 'out'), Entry((name, 'shortcut_bias'), 0, 'out')]
    return reads, writes


def _hidden(structure: Structure, block: Block) -> Hidden:
    """The permutations and scalings of one block's product channels (module docstring)."""
    name, eq, n, m = block.name, structure.equation, block.n_in, structure.multiplier
    if eq == 4:  # q = [ (C u) * ((K u + d) A) ] E_out: product channel i is column i of C and A
        return Hidden(name, block.n_out, block.n_out, (
            HiddenEntry((name, 'coef'), 1, 1), HiddenEntry((name, 'combine'), 1, -1),
            HiddenEntry((name, 'mix_out'), 0, 0)))
    # Eqs. 3, 5, 6, 7: perm acts on the n channels j fed to the product with the derivative.
    entries = [HiddenEntry((name, 'mix_in'), 1, 0), HiddenEntry((name, 'coef'), 1, 1)]
    if not structure.weight_sharing:
        entries.append(HiddenEntry((name, 'derivative'), 3, 0))
    if eq in (3, 5):
        entries.append(HiddenEntry((name, 'derivative_bias'), 0, 0))
    if eq == 7:
        entries.append(HiddenEntry((name, 'coef_bias'), 0, 1))
    entries.append(HiddenEntry((name, 'mix_out' if eq == 5 else 'combine'), 0, -1))
    scale_size = {3: m * n, 5: block.n_out, 6: n, 7: m * n}[eq]
    return Hidden(name, n, scale_size, tuple(entries))


def group_spec(model, tie_identity_shortcuts: bool = False) -> GroupSpec:
    """The `GroupSpec` of a QHNet module (or of the config `model` section that builds one).

    For the baselines it is `qhnet.symmetry.baselines.group_spec`, whose identity shortcuts
    have no parameter and always tie their streams (`tie_identity_shortcuts` changes nothing).
    """
    model = as_module(model)
    if not isinstance(model, QHNet):
        from qhnet.symmetry import baselines  # it builds on this module
        return baselines.group_spec(model)
    structure = trace_structure(model)
    width = structure.blocks[0].n_in
    streams = [dict(name='stem', width=width, group=groups.ADMITTED['relu'], blocks=[], entries=[
        Entry(('stem', 'kernel'), 3, 'out'), Entry(('stem', 'bias'), 0, 'out')])]
    for block in structure.blocks:
        reads, writes = _stream_entries(structure, block)
        streams[-1]['entries'] += reads
        if block.carries_activation or block.projection:
            admitted = groups.ADMITTED[block.activation]
            if tie_identity_shortcuts and not block.projection:
                streams[-1]['group'] = groups.meet(streams[-1]['group'], admitted)
            else:
                streams.append(dict(name=block.name, width=block.n_out, group=admitted, blocks=[],
                                    entries=[]))
        streams[-1]['blocks'].append(block.name)
        streams[-1]['entries'] += writes
    streams[-1]['entries'].append(Entry(('head', 'kernel'), 0, 'in'))
    return GroupSpec(
        structure=structure,
        streams=tuple(Stream(s['name'], s['width'], s['group'], tuple(s['blocks']),
                             tuple(s['entries'])) for s in streams),
        hidden=tuple(_hidden(structure, block) for block in structure.blocks))
