"""Hugging Face tensors <-> ours: declared per family, served in every direction by one mapper.

Declaring (class variables of a `Family` adapter, see `dropup/families/base.py`)
  `top_tensors` (full names), and per layer (names under "model.layers.{L}." / "layers.{L}."): `dense_layer` (the
  dense checkpoint), `moe_layer` (the MoE family's tensors beside its experts), `expert_layouts` ({"stacked": ...,
  "per-expert": ...}: the MoE family's experts and router in transformers 5's in-memory layout and as its
  checkpoints store them). Each is a tuple of `T(hf, ours)` entries. An entry relates tensors by *rows*: a tensor
  is seen as a matrix, leading dimensions flattened and the last one the row (a vector: one-element rows), and
  the one tensor on one side is the concatenation of the rows of the tensors on the other side, in order:

    T("input_layernorm.weight", "attn_norm.weight")                      a rename
    T("self_attn.qkv_proj.weight", ("attn.wq.weight", "attn.wk.weight", "attn.wv.weight"))
        fused: the HF rows are wq | wk | wv; the sizes are our tensors' shapes (from the ModelConfig)
    T(("block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w3.weight"), "ffn.w_gate_up")
        per expert: our (E, 2F, D) holds, for e = 0..E-1, the rows of w1_e then w3_e (E: as many as stored)
    T("block_sparse_moe.input_linear.weight", "ffn.w_gate_up")           stacked experts under another name
    T(..., transform=Transform(to_ours, to_hf))                          values changed on the way (elementwise)

  An entry applies where its tensors exist (biases, q/k norms, lm_head only where the config has them). An HF
  tensor that no entry names is an error (`Unplaced`), and so is one of ours given twice. HF tensors the MoE
  family needs that have no counterpart in ours are `Family.extra_moe_tensors` (written beside ours) and
  `Family.unused_on_read` (dropped when read back).

Mapping
  `Family.mapper(kind, layout)` builds a `Mapper`: kind "dense" or "moe" to write one checkpoint, "any" to read a
  checkpoint of either (the union of the dense table and the MoE table in every layout). It gives
  - `to_hf(state)`: ours -> HF; `hf_tensors(name, tensor)`: one of ours -> the HF tensors it alone makes (how the
    converter streams; a fused HF tensor needs all its parts, so only `to_hf` writes one);
  - `from_hf(hf_state, shapes)`: HF -> ours, in memory;
  - `sources(stored, shapes)`: stored HF tensors (`shards.Stored`) -> reader entries under our names: the stored
    tensor itself, or `shards.Assembled` rows (a part of a fused tensor is read by its rows with safetensors'
    `get_slice`, never as the whole fused tensor).
  `shapes` (our name -> shape, e.g. `dense_shapes(model)`) sizes the parts of a fused HF tensor; it is needed only
  where one is split.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from dropup.config import ConfigError
from dropup.shards import Assembled, Rows, Stored

LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
KINDS = ("dense", "moe", "any")
# the expert layouts: transformers 5's in-memory one (experts stacked, E x 2F x D), and what a family's checkpoints
# store (save_pretrained; per expert for Mixtral and the Qwen MoEs). "fused" is the stacked layout's former name.
LAYOUTS = ("stacked", "per-expert")
LAYOUT_ALIASES = {"fused": "stacked"}

Shape = tuple[int, ...]


def layout_of(layout: str) -> str:
    """The expert layout a name means (aliases resolved); anything else is one error."""
    layout = LAYOUT_ALIASES.get(layout, layout)
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r} is unknown; choose one of {LAYOUTS} ('fused' is 'stacked')")
    return layout


@dataclass(frozen=True)
class Transform:
    """An elementwise value change between HF and ours, both ways (they must be inverses)."""

    to_ours: Callable[[torch.Tensor], torch.Tensor]
    to_hf: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class T:
    """One entry of a family's tensor table (see the module docstring): `hf` and `ours` are a name or a tuple of
    names; at most one side is a tuple; "{e}" (per expert) appears only in HF names, beside one name of ours."""

    hf: str | tuple[str, ...]
    ours: str | tuple[str, ...]
    transform: Transform | None = None

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,) if isinstance(self.hf, str) else tuple(self.hf)

    @property
    def our_names(self) -> tuple[str, ...]:
        return (self.ours,) if isinstance(self.ours, str) else tuple(self.ours)

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.hf_names[0]

    @property
    def hf_whole(self) -> bool:
        """Whether the HF side is the one tensor (a rename or a fused tensor) rather than ours."""
        return len(self.hf_names) == 1 and not self.per_expert

    def check(self) -> None:
        """A declaration error is a bug in an adapter: raised when its mapper is built."""
        hf, ours = self.hf_names, self.our_names
        if not hf or not ours or (len(hf) > 1 and len(ours) > 1):
            raise ValueError(f"{self}: one side must be a single tensor")
        if any(("{e}" in h) != self.per_expert for h in hf) or any("{e}" in o for o in ours):
            raise ValueError(f"{self}: '{{e}}' must be in every HF name or none, and never in ours")
        if self.per_expert and len(ours) != 1:
            raise ValueError(f"{self}: per-expert HF tensors stack into one tensor of ours")


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of a named tensor as a matrix; start None: the whole tensor as it is."""

    name: str
    start: int | None = None
    stop: int | None = None


@dataclass(frozen=True)
class Recipe:
    """How one tensor is made: its pieces' rows concatenated, reshaped to `shape`, then `transform`."""

    shape: Shape
    pieces: tuple[Piece, ...]
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


class Unplaced(ConfigError):
    """A tensor no entry of the family's table names; `name` is it."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


def rows_of(shape: Shape) -> tuple[int, int]:
    """(rows, width) of a tensor of `shape` seen as a matrix."""
    if len(shape) <= 1:
        return (shape[0] if shape else 1), 1
    rows = 1
    for size in shape[:-1]:
        rows *= size
    return rows, shape[-1]


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(rows_of(tuple(tensor.shape)))


def _concat_shape(shapes: list[Shape]) -> Shape:
    """The shape of tensors concatenated along dim 0 (they must agree on the other dimensions)."""
    if len(shapes) == 1:
        return shapes[0]
    if any(s[1:] != shapes[0][1:] for s in shapes):
        raise ConfigError(f"tensors of shapes {shapes} cannot be concatenated by rows")
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def assemble(recipe: Recipe, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Build a tensor from its recipe, reading each piece with `get` (a whole tensor is passed on, not copied)."""
    if len(recipe.pieces) == 1 and recipe.pieces[0].start is None:
        tensor = get(recipe.pieces[0].name)
        if tuple(tensor.shape) != recipe.shape:
            tensor = tensor.reshape(recipe.shape)
    else:
        parts = [as_matrix(get(p.name))[p.start: p.stop] for p in recipe.pieces]
        tensor = (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(recipe.shape)
    return recipe.transform(tensor) if recipe.transform is not None else tensor


def _split(name: str, layer: re.Pattern) -> tuple[str, str | None, str]:
    """(scope, layer index, name in scope): per-layer names lose their prefix."""
    match = layer.match(name)
    return ("layer", match.group(1), match.group(2)) if match else ("top", None, name)


def _full(scope: str, layer: str | None, name: str, hf: bool) -> str:
    if scope == "top":
        return name
    return f"model.layers.{layer}.{name}" if hf else f"layers.{layer}.{name}"


class Mapper:
    """One family's tables (top level and per layer) for one kind of checkpoint (see the module docstring).

    `unused_on_read(shapes)` names tensors of ours read from a checkpoint that the model does not hold (a
    Qwen2-MoE's size-0 shared expert)."""

    def __init__(self, family: str, kind: str, top: tuple[T, ...], layer: tuple[T, ...],
                 unused_on_read: Callable[[dict[str, Shape]], set[str]] | None = None):
        self.family, self.kind = family, kind
        self.entries = {"top": tuple(dict.fromkeys(top)), "layer": tuple(dict.fromkeys(layer))}
        self.unused_on_read = unused_on_read
        self._hf: dict[tuple[str, str], tuple[T, int]] = {}
        self._hf_experts: list[tuple[re.Pattern, T, int]] = []
        self._ours: dict[tuple[str, str], tuple[T, int]] = {}
        for scope, entries in self.entries.items():
            for entry in entries:
                entry.check()
                for pos, name in enumerate(entry.hf_names):
                    if entry.per_expert:
                        if scope == "top":
                            raise ValueError(f"{entry}: experts live in layers")
                        pattern = re.compile("^" + re.escape(name).replace(re.escape("{e}"), r"(\d+)") + "$")
                        self._hf_experts.append((pattern, entry, pos))
                    else:
                        self._claim(self._hf, (scope, name), entry, pos)
                if kind != "any":  # a reading table may give one of ours two ways (Phi-3's qkv or Mixtral's q)
                    for pos, name in enumerate(entry.our_names):
                        self._claim(self._ours, (scope, name), entry, pos)

    def _claim(self, index: dict, key: tuple[str, str], entry: T, pos: int) -> None:
        if key in index and index[key][0] != entry:
            raise ValueError(f"{self.family} ({self.kind}): {key[1]} is in two entries, {index[key][0]} and {entry}")
        index[key] = (entry, pos)

    # --- HF -> ours ------------------------------------------------------------------------------------------
    def _find_hf(self, name: str) -> tuple[T, str | None, tuple[int, int]]:
        """(entry, layer, (position in the entry, expert)) of an HF name; Unplaced when none names it."""
        scope, layer, rest = _split(name, HF_LAYER)
        hit = self._hf.get((scope, rest))
        if hit is not None:
            return hit[0], layer, (hit[1], 0)
        if scope == "layer":
            for pattern, entry, pos in self._hf_experts:
                match = pattern.match(rest)
                if match:
                    return entry, layer, (pos, int(match.group(1)))
        raise Unplaced(f"Hugging Face tensor {name!r} is not part of a {self.family} model or its MoE", name)

    def recipes_from_hf(self, hf_shapes: Mapping[str, Shape], shapes: Mapping[str, Shape] | None = None
                        ) -> dict[str, Recipe]:
        """Our name -> how it is made of the HF tensors (given by shape); every HF tensor is placed or an error."""
        groups: dict[tuple[T, str | None], dict[tuple[int, int], str]] = {}
        for name in hf_shapes:
            entry, layer, key = self._find_hf(name)
            groups.setdefault((entry, layer), {})[key] = name
        out: dict[str, Recipe] = {}
        for (entry, layer), parts in groups.items():
            for ours, recipe in self._from_group(entry, layer, parts, hf_shapes, shapes or {}).items():
                if ours in out:
                    given = sorted({p.name for r in (out[ours], recipe) for p in r.pieces})
                    raise ConfigError(f"tensor {ours} of ours is given twice by this checkpoint ({', '.join(given)}): "
                                      f"it is not one {self.family} model; re-save it")
                out[ours] = recipe
        if self.unused_on_read is not None:
            for name in self.unused_on_read({k: r.shape for k, r in out.items()}):
                del out[name]
        return out

    def _from_group(self, entry: T, layer: str | None, parts: dict[tuple[int, int], str],
                    hf_shapes: Mapping[str, Shape], shapes: Mapping[str, Shape]) -> dict[str, Recipe]:
        scope = "top" if layer is None else "layer"
        ours = [_full(scope, layer, o, hf=False) for o in entry.our_names]
        to_ours = entry.transform.to_ours if entry.transform else None
        if entry.hf_whole:
            name = parts[(0, 0)]
            if len(ours) == 1:
                return {ours[0]: Recipe(tuple(hf_shapes[name]), (Piece(name),), to_ours)}
            missing = [o for o in ours if o not in shapes]
            if missing:
                raise ConfigError(f"splitting {name} into {', '.join(ours)} needs the model config (the sizes of "
                                  f"{', '.join(missing)}): pass the ModelConfig")
            total, width = rows_of(tuple(hf_shapes[name]))
            sizes = [rows_of(tuple(shapes[o])) for o in ours]
            if sum(r for r, _ in sizes) != total or any(w != width for _, w in sizes):
                raise ConfigError(f"{name} has shape {tuple(hf_shapes[name])}, but a model of this config has "
                                  f"{' + '.join(str(tuple(shapes[o])) for o in ours)} there: the config does not "
                                  "describe this checkpoint")
            out, start = {}, 0
            for o, (r, _) in zip(ours, sizes):
                out[o] = Recipe(tuple(shapes[o]), (Piece(name, start, start + r),), to_ours)
                start += r
            return out
        # ours is the one tensor: the HF tensors' rows (per expert: for each expert, each position) in order
        positions = len(entry.hf_names)
        experts = sorted({e for _, e in parts})
        count = len(experts)
        for pos in range(positions):
            have = sorted(e for p, e in parts if p == pos)
            if have != list(range(count)):
                names = ", ".join(_full(scope, layer, h, hf=True) for h in entry.hf_names)
                raise ConfigError(f"layer {layer}: the per-expert tensors {names} do not cover the same experts "
                                  f"0..{count - 1}: the checkpoint is incomplete")
        pieces = tuple(Piece(parts[(pos, e)]) for e in range(count) for pos in range(positions))
        one = _concat_shape([tuple(hf_shapes[parts[(pos, 0)]]) for pos in range(positions)])
        shape = (count, *one) if entry.per_expert else one
        want = tuple(shapes.get(ours[0], shape))
        if rows_of(want)[0] * rows_of(want)[1] != rows_of(shape)[0] * rows_of(shape)[1]:
            raise ConfigError(f"{ours[0]}: the stored tensors make shape {shape}, a model of this config has {want}")
        return {ours[0]: Recipe(want, pieces, to_ours)}

    def from_hf(self, hf_state: Mapping[str, torch.Tensor], shapes: Mapping[str, Shape] | None = None) -> dict:
        """An HF state dict -> ours (renamed tensors are passed on, not copied)."""
        recipes = self.recipes_from_hf({k: tuple(v.shape) for k, v in hf_state.items()}, shapes)
        return {name: assemble(recipe, hf_state.__getitem__) for name, recipe in recipes.items()}

    def sources(self, stored: Mapping[str, Stored], shapes: Mapping[str, Shape] | None = None
                ) -> dict[str, Stored | Assembled]:
        """Stored HF tensors -> reader entries under our names (`shards.CheckpointReader`): a renamed tensor is its
        `Stored`; anything else `Assembled` rows, so a fused tensor's part reads only its own rows."""
        out: dict[str, Stored | Assembled] = {}
        for name, recipe in self.recipes_from_hf({k: s.shape for k, s in stored.items()}, shapes).items():
            first = stored[recipe.pieces[0].name]
            if len(recipe.pieces) == 1 and recipe.pieces[0].start is None and recipe.transform is None \
                    and first.shape == recipe.shape:
                out[name] = first
                continue
            dtypes = {stored[p.name].dtype for p in recipe.pieces}
            if len(dtypes) > 1:
                raise ConfigError(f"tensor {name} is made of stored tensors of several dtypes ({sorted(map(str, dtypes))}):"
                                  " re-save the checkpoint in one dtype")
            rows = tuple(Rows(stored[p.name], 0 if p.start is None else p.start,
                              rows_of(stored[p.name].shape)[0] if p.stop is None else p.stop) for p in recipe.pieces)
            out[name] = Assembled(rows, recipe.shape, first.dtype, recipe.transform)
        return out

    # --- ours -> HF ------------------------------------------------------------------------------------------
    def recipes_to_hf(self, our_shapes: Mapping[str, Shape], partial: bool = False) -> dict[str, Recipe]:
        """HF name -> how it is made of ours (given by shape). `partial`: only the HF tensors these alone make."""
        if self.kind == "any":
            raise ValueError("a reading mapper (kind 'any') does not write: name the kind, dense or moe")
        groups: dict[tuple[T, str | None], dict[int, str]] = {}
        for name in our_shapes:
            scope, layer, rest = _split(name, LAYER)
            hit = self._ours.get((scope, rest))
            if hit is None:
                raise ConfigError(f"tensor {name!r} has no Hugging Face counterpart")
            groups.setdefault((hit[0], layer), {})[hit[1]] = name
        out: dict[str, Recipe] = {}
        for (entry, layer), parts in groups.items():
            out.update(self._to_group(entry, layer, parts, our_shapes, partial))
        return out

    def _to_group(self, entry: T, layer: str | None, parts: dict[int, str], our_shapes: Mapping[str, Shape],
                  partial: bool) -> dict[str, Recipe]:
        scope = "top" if layer is None else "layer"
        to_hf = entry.transform.to_hf if entry.transform else None
        if entry.hf_whole:
            hf = _full(scope, layer, entry.hf_names[0], hf=True)
            missing = [_full(scope, layer, o, hf=False) for i, o in enumerate(entry.our_names) if i not in parts]
            if missing:
                if partial:
                    raise ConfigError(f"{hf} is made of {', '.join(entry.our_names)} together: one of them alone "
                                      "cannot be written (write the whole state dict with to_hf)")
                raise ConfigError(f"{hf} is made of {', '.join(entry.our_names)}, but {', '.join(missing)} is missing")
            names = [parts[i] for i in range(len(entry.our_names))]
            if len(names) == 1:
                return {hf: Recipe(tuple(our_shapes[names[0]]), (Piece(names[0]),), to_hf)}
            matrices = [rows_of(tuple(our_shapes[n])) for n in names]
            if any(width != matrices[0][1] for _, width in matrices):
                raise ConfigError(f"{hf}: {', '.join(names)} of shapes {[tuple(our_shapes[n]) for n in names]} "
                                  "cannot be concatenated by rows")
            total = sum(r for r, _ in matrices)
            shape = (total,) if len(our_shapes[names[0]]) == 1 else (total, matrices[0][1])  # vectors stay vectors
            return {hf: Recipe(shape, tuple(Piece(n, 0, r) for n, (r, _) in zip(names, matrices)), to_hf)}
        name = parts[0]
        shape = tuple(our_shapes[name])
        positions = len(entry.hf_names)
        count = shape[0] if entry.per_expert else 1
        each = shape[1:] if entry.per_expert else shape  # one expert's rows (all of them without experts)
        if not each or each[0] % positions:
            raise ConfigError(f"{name} of shape {shape} does not split into {positions} equal parts "
                              f"{entry.hf_names}")
        rows = rows_of(each)[0]
        step = rows // positions
        out = {}
        for e in range(count):
            for pos, template in enumerate(entry.hf_names):
                hf = _full(scope, layer, template.replace("{e}", str(e)), hf=True)
                start = e * rows + pos * step
                out[hf] = Recipe((each[0] // positions, *each[1:]), (Piece(name, start, start + step),), to_hf)
        return out

    def to_hf(self, state: Mapping[str, torch.Tensor]) -> dict:
        """Our state dict -> HF (fused tensors concatenated, per-expert ones split)."""
        recipes = self.recipes_to_hf({k: tuple(v.shape) for k, v in state.items()})
        return {name: assemble(recipe, state.__getitem__) for name, recipe in recipes.items()}

    def hf_tensors(self, name: str, tensor: torch.Tensor) -> dict:
        """One of our tensors -> the HF tensors it alone makes (a part of a fused HF tensor is an error)."""
        recipes = self.recipes_to_hf({name: tuple(tensor.shape)}, partial=True)
        return {hf: assemble(recipe, {name: tensor}.__getitem__) for hf, recipe in recipes.items()}

