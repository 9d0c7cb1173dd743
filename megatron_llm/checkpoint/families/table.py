"""The vocabulary a family table is written in: config keys, tensor names, and the named transforms.

A `Family` is data: which Hugging Face config keys set which ModelConfig fields (`Key`), what the family
always is (`Fixed`), the odd keys that need a small function each way (`Derived`), and a tensor table
from Hugging Face name templates to ours (`{i}` is the layer), where an entry may fuse several of our
tensors into one of theirs (`Fused`: q/k/v in one of three layouts, gate/up) or store a weight
transposed (GPT-2's Conv1D) or with each head's halves swapped (NanoChat's q/k); names that follow the
config are the family's variants (`When`); multi-token prediction depths stored as extra layers, `MTPLayers`;
a field that follows whether the files hold a tensor, `Stored`.
One engine below reads every table in both directions, so no family has a conversion loop of its own, and
export is proven by reading the written config back.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Optional, Union

import torch

from megatron_llm.errors import UsageError
from megatron_llm.model_config import ModelConfig

REQUIRED = object()  # a Key without a default: the config.json must have it
SCORE_SUFFIX, SCORE_HEAD = "ForSequenceClassification", "score.weight"  # model.head score (a reward model)


@dataclass(frozen=True)
class Key:
    """One Hugging Face config key <-> one ModelConfig field; `read`/`write` convert the value."""

    hf: str
    ours: str
    default: Any = REQUIRED
    read: Callable[[Any], Any] = lambda v: v
    write: Callable[[Any], Any] = lambda v: v
    also: tuple[str, ...] = ()  # older names of the key, read where `hf` is absent (BLOOM's n_embed)


@dataclass(frozen=True)
class Fixed:
    """A value the family always has (its config has no key for it); export refuses any other value."""

    ours: str
    value: Any


@dataclass(frozen=True)
class Derived:
    """Keys that need a function each way: read(hf config) -> our fields, write(ModelConfig) -> HF keys."""

    read: Callable[[dict], dict]
    write: Callable[[ModelConfig], dict]


@dataclass(frozen=True)
class Stored:
    """A field true where the checkpoint's files hold the tensor `hf` (a name template, `{i}` any layer) and false
    where they lack it, as transformers then fills it (its _keys_to_ignore_on_load_missing: A.X-K1's released files
    have no router expert bias, transformers' save writes it); true where the names are unknown (config.json alone)."""

    hf: str
    ours: str


ConfigEntry = Union[Key, Fixed, Derived, Stored]


@dataclass(frozen=True)
class Fused:
    """One Hugging Face tensor holding several of ours, split along the output rows (of each expert, for stacked
    experts [E, rows, in]):
    concat: [part0; part1; ...] (Phi-3's qkv_proj and gate_up_proj, GPT-2's c_attn, Baichuan's W_pack, Granite-MoE's
    input_linear);
    heads: per query head [q_h; k_h; v_h] (GPT-NeoX, BLOOM; equal head counts only);
    groups: per key/value group [q of the group; k; v] (Falcon's new decoder, InternLM2, Megatron)."""

    parts: tuple[str, ...]
    layout: str = "concat"
    transpose: bool = False


@dataclass(frozen=True)
class Transposed:
    """A weight stored [in, out] (GPT-2's Conv1D)."""

    ours: str


@dataclass(frozen=True)
class HalvesSwapped:
    """q or k rows stored with the two halves of each head swapped (NanoChat, whose rotation turns the other
    way: R(-t) = P R(t) P for P the swap, so the swapped rows under our rotation give its scores)."""

    ours: str


@dataclass(frozen=True)
class Stacked:
    """One of our tensors [E, ...] stored as E tensors, one per expert; the name template has `{e}`
    (Mixtral's experts.{e}.w1.weight for our experts.w1 [E, ffn, hidden])."""

    ours: str


@dataclass(frozen=True)
class Mapped:
    """One Hugging Face tensor holding several of ours in a layout of its own, written by `to_hf(parts) -> tensor`
    and read by `from_hf(tensor) -> parts` (gpt-oss's experts: gate and up interleaved on the last dim, stored
    [E, in, out]), or by `from_hf(tensor, cfg)` with `config` where the tensor's shape leaves the layout open
    (DBRX's experts flattened to [E ffn, hidden]), and written by `to_hf(parts, cfg)` with `config_to_hf` where the
    parts' shapes do too (Qwen3-Next's q, k, v, z grouped per key head); named functions of the family's module,
    each the other's inverse."""

    parts: tuple[str, ...]
    to_hf: Callable[..., torch.Tensor]
    from_hf: Callable[..., list[torch.Tensor]]
    config: bool = False
    config_to_hf: bool = False


TensorEntry = Union[str, Fused, Transposed, HalvesSwapped, Stacked, Mapped]

MTP_PREFIX = "mtp.layers."  # our multi-token prediction depths: mtp.layers.{k}.{enorm,hnorm,eh_proj,norm,block.*}


@dataclass(frozen=True)
class MTPLayers:
    """Multi-token prediction depths stored as extra decoder layers (DeepSeek-V3's published checkpoints, GLM-4.5):
    depth k (0-based) is layer num_layers + k, holding a decoder layer's tensors under the family's own names for
    our block (mtp.layers.{k}.block.*), `tensors` (their name template -> ours, `{i}` that layer, ours under the
    virtual `layers.{i}.mtp.`), and `copies` of the model's own tensors (their template -> our name) that every
    depth stores again: written from ours, and on read checked equal to ours. `key` counts the depths in config.json;
    a directory whose files lack depth 1's eh_proj has none (transformers' save_pretrained drops them)."""

    key: str
    tensors: dict[str, str]
    copies: dict[str, str]


@dataclass(frozen=True)
class When:
    """Tensor names that hold where the model has the given field values, in place of the family's own
    names for the same tensors of ours (Falcon names its norms by its decoder architecture)."""

    fields: dict[str, Any]
    tensors: dict[str, TensorEntry]


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # the class transformers builds for config.json's "architectures"
    config: tuple[ConfigEntry, ...]
    tensors: dict[str, TensorEntry]
    # Hugging Face config keys written on export besides the mapped ones (constants transformers reads).
    extra: dict = field(default_factory=dict)
    variants: tuple[When, ...] = ()  # tensor names that follow the config
    mtp: Optional[MTPLayers] = None  # where the family stores multi-token prediction; None: it does not
    # Name templates of tensors published files may hold that the model does not use (transformers'
    # _keys_to_ignore_on_load_unexpected: A.X-K1's post_mlp_layernorm on its dense layers): skipped on read, not written.
    unused: tuple[str, ...] = ()

    # ---------------------------------------------------------------------------------------------
    # config.json <-> ModelConfig

    def read_config(self, hf: dict, tensors: Optional[Collection[str]] = None) -> ModelConfig:
        """`tensors`: the names the files hold, where known: multi-token prediction depths are read only when they
        hold depth 1's eh_proj (config.json alone says nothing: transformers writes its default 1 without them)."""
        values: dict[str, Any] = {}
        for entry in self.config:
            if isinstance(entry, Fixed):
                values[entry.ours] = entry.value
            elif isinstance(entry, Derived):
                values.update(entry.read(hf))
            elif isinstance(entry, Stored):
                values[entry.ours] = tensors is None or any(_holds(entry.hf, name) for name in tensors)
            else:
                raw = get_family_value(hf, entry.hf, *entry.also)
                if raw is None:
                    if entry.default is REQUIRED:
                        raise UsageError(
                            f"config.json lacks {entry.hf!r}, which model_type {self.model_type} needs; "
                            "is this checkpoint of another family?"
                        )
                    raw = entry.default
                values[entry.ours] = entry.read(raw)
        values.setdefault("init_std", hf.get("initializer_range", 0.02))
        depth_1 = self._mtp_hf(0, "eh_proj.weight", values["num_layers"]) if self.mtp is not None else None
        if depth_1 is not None and tensors is not None and depth_1 in tensors:
            values["mtp_layers"] = get_family_value(hf, self.mtp.key, default=1)  # the config classes' default
        if any(a.endswith(SCORE_SUFFIX) for a in hf.get("architectures") or []):
            labels = hf.get("num_labels", len(hf.get("id2label") or {0: 0, 1: 1}))  # transformers' default: 2
            if labels != 1:
                raise UsageError(f"a sequence classifier with {labels} labels is not a reward model: only one label loads")
            values["head"] = "score"
        return ModelConfig(**values)

    def write_config(self, cfg: ModelConfig) -> dict:
        """config.json for `cfg`, refused with the first field this family cannot express: the result is
        read back and every field must survive (init-only fields excepted)."""
        if cfg.mtp_layers and self.mtp is None:  # named first: no other field would make this family fit
            from megatron_llm.checkpoint.families import FAMILIES  # the registry, which imports this module

            carriers = ", ".join(name for name, f in FAMILIES.items() if f.mtp is not None)
            raise UsageError(f"{self.model_type} stores no multi-token prediction (model.mtp_layers={cfg.mtp_layers}); "
                             f"the families that do: {carriers}; choose one as --output-family, or export native or "
                             "megatron")
        out = {"architectures": [self.architecture], "model_type": self.model_type, **self.extra}
        if cfg.head == "score":  # the family's sequence classifier with one label (a reward model)
            out.update(architectures=[self.architecture.replace("ForCausalLM", SCORE_SUFFIX)], num_labels=1)
        for entry in self.config:
            if isinstance(entry, Key):
                out[entry.hf] = entry.write(getattr(cfg, entry.ours))
            elif isinstance(entry, Derived):
                out.update(entry.write(cfg))
        out["initializer_range"] = cfg.init_std
        if self.mtp is not None:
            out[self.mtp.key] = cfg.mtp_layers
        try:  # as a directory holding every tensor of `out` reads it
            stored = {self._mtp_hf(0, "eh_proj.weight", cfg.num_layers)} if self.mtp and cfg.mtp_layers else set()
            stored |= {e.hf.format(i=0) for e in self.config if isinstance(e, Stored) and getattr(cfg, e.ours)}
            back = dataclasses.asdict(self.read_config(out, stored))
        except UsageError as e:
            raise UsageError(f"{self.model_type} cannot express this model: {e}") from None
        back["scaled_init"] = cfg.scaled_init  # an init choice Hugging Face does not record
        back["moe_aux_loss_scope"] = cfg.moe_aux_loss_scope  # a training choice it does not record either
        back["mtp_loss_coeff"] = cfg.mtp_loss_coeff  # and another
        for key in ("dsa_indexer_frozen", "dsa_indexer_loss_coeff"):  # how the sparse attention's indexer trained
            back[key] = getattr(cfg, key)
        for key, value in dataclasses.asdict(cfg).items():
            if back[key] != value:
                raise UsageError(
                    f"{self.model_type} cannot express model.{key}={value!r} (it would read back as {back[key]!r}); "
                    "choose another --output-family"
                )
        return out

    # ---------------------------------------------------------------------------------------------
    # tensors

    def hf_names(self, native: dict[str, torch.Size], cfg: ModelConfig) -> dict[str, torch.Size]:
        """Hugging Face name -> shape for our tensors `native` (name -> shape), in our order."""
        out: dict[str, torch.Size] = {}
        native = {_virtual(name, cfg): shape for name, shape in native.items()}
        for name, shape in native.items():
            hf, entry, _ = self._entry_of(name, cfg)
            if hf in out:
                continue
            if isinstance(entry, Stacked):
                out.update({hf.format(e=e): shape[1:] for e in range(shape[0])})
                continue
            if isinstance(entry, Mapped):  # the shape its function gives, computed on the meta device
                out[hf] = _mapped_to_hf(entry, [torch.empty(native[_layer(p, name)], device="meta") for p in entry.parts],
                                        cfg).shape
                continue
            if isinstance(entry, Fused):
                shapes = [native[_layer(part, name)] for part in entry.parts]
                dim = _rows_dim(shapes[0])
                shape = torch.Size((*shapes[0][:dim], sum(s[dim] for s in shapes), *shapes[0][dim + 1:]))
            out[hf] = shape.__class__(reversed(shape)) if _transposed(entry, shape) else shape
        out.update({copy: native[ours] for copy, ours in self._mtp_copies(native, cfg)})
        return out

    def to_hf(self, tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """One group of our tensors -> theirs; every part of a fused tensor is in the same group (a layer)."""
        out = {}
        tensors = {_virtual(name, cfg): tensor for name, tensor in tensors.items()}
        for name, tensor in tensors.items():
            hf, entry, _ = self._entry_of(name, cfg)
            if isinstance(entry, Stacked):
                out.update({hf.format(e=e): expert for e, expert in enumerate(tensor.unbind(0))})
                continue
            if hf in out:
                continue
            if isinstance(entry, Mapped):
                out[hf] = _mapped_to_hf(entry, [tensors[_layer(part, name)] for part in entry.parts], cfg)
                continue
            if isinstance(entry, Fused):
                tensor = _fuse([tensors[_layer(part, name)] for part in entry.parts], entry.layout, cfg)
            out[hf] = tensor.t() if _transposed(entry, tensor.shape) else _unswapped(entry, tensor, cfg)
        out.update({copy: tensors[ours] for copy, ours in self._mtp_copies(tensors, cfg)})
        return out

    def from_hf(self, names: list[str], get: Callable[[str], torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """Our tensors `names`, reading theirs with `get(hf_name)` once each."""
        cache: dict[str, list[torch.Tensor]] = {}
        out = {}
        for name in names:
            hf, entry, index = self._entry_of(_virtual(name, cfg), cfg)
            if isinstance(entry, Stacked):
                out[name] = torch.stack([get(hf.format(e=e)) for e in range(cfg.moe_experts)])  # [E, ...]
                continue
            if hf not in cache:
                tensor = get(hf)
                tensor = tensor.t() if _transposed(entry, tensor.shape) else _unswapped(entry, tensor, cfg)
                cache[hf] = (_split(tensor, entry, name, cfg) if isinstance(entry, Fused) else
                             _mapped_from_hf(entry, tensor, cfg) if isinstance(entry, Mapped) else [tensor])
            out[name] = cache[hf][index]
        for copy, ours in self._mtp_copies(out, cfg):
            if not torch.equal(get(copy), get(self.hf_name(ours, cfg))):
                raise UsageError(f"{copy} differs from {self.hf_name(ours, cfg)}: multi-token prediction shares the "
                                 "model's own tensor, so its copy must be equal; copy the model's into it or drop the "
                                 f"depths ({self.mtp.key} 0 and no layer {cfg.num_layers} on)")
        return out

    def hf_name(self, name: str, cfg: ModelConfig) -> str:
        return self.hf_keys(name, cfg)[0]

    def hf_keys(self, name: str, cfg: ModelConfig) -> list[str]:
        """The Hugging Face tensors holding our `name`: one, or one per expert for a stacked tensor."""
        hf, entry, _ = self._entry_of(_virtual(name, cfg), cfg)
        keys = [hf.format(e=e) for e in range(cfg.moe_experts)] if isinstance(entry, Stacked) else [hf]
        return keys + [copy for copy, _ in self._mtp_copies((name,), cfg)]  # read with it, to be compared

    def is_unused(self, hf_name: str) -> bool:
        """Whether `hf_name` is one of the tensors the family's published files may hold without use (`unused`)."""
        return any(_holds(template, hf_name) for template in self.unused)

    def _mtp_copies(self, ours: Collection[str], cfg: ModelConfig) -> list[tuple[str, str]]:
        """(their copy, our tensor) for each multi-token prediction depth's copy of one of `ours`."""
        if self.mtp is None:
            return []
        return [(copy.format(i=cfg.num_layers + k), source) for copy, source in self.mtp.copies.items()
                if source in ours for k in range(cfg.mtp_layers)]

    def _mtp_hf(self, depth: int, ours: str, num_layers: int) -> str:
        """Their name of depth `depth`'s (0-based) own tensor `ours` (eh_proj.weight, ...)."""
        theirs = {v: k for k, v in self.mtp.tensors.items()}[f"layers.{{i}}.mtp.{ours}"]
        return theirs.format(i=num_layers + depth)

    def _entry_of(self, name: str, cfg: ModelConfig) -> tuple[str, TensorEntry, int]:
        """(Hugging Face name, its entry, our tensor's index among the entry's parts) for our `name`."""
        template, layer = _template(name)
        found = _reverse(self, cfg).get(template)
        if found is None:
            raise UsageError(f"model_type {self.model_type} has no tensor for our {name!r}: the model uses a choice "
                             "this family cannot store; choose another --output-family")
        hf, entry, index = found
        if name.startswith("output.") and cfg.head == "score":  # every *ForSequenceClassification names it so
            hf = SCORE_HEAD
        return hf.replace("{i}", layer), entry, index  # a stacked entry's {e} stays for the caller


_LAYER = re.compile(r"\.(\d+)\.")


def _template(name: str) -> tuple[str, str]:
    """'layers.3.attention.wq.weight' -> ('layers.{i}.attention.wq.weight', '3'); no layer: (name, '')."""
    match = _LAYER.search(name)
    if match is None:
        return name, ""
    return name[: match.start()] + ".{i}." + name[match.end() :], match.group(1)


def _virtual(name: str, cfg: ModelConfig) -> str:
    """Our multi-token prediction depth k's tensors as the extra decoder layer num_layers + k that Hugging Face
    tables name: mtp.layers.{k}.block.X -> layers.{L+k}.X (a decoder layer's name), mtp.layers.{k}.Y ->
    layers.{L+k}.mtp.Y (MTPLayers.tensors); any other name as it is."""
    if not name.startswith(MTP_PREFIX):
        return name
    depth, rest = name[len(MTP_PREFIX):].split(".", 1)
    layer = f"layers.{cfg.num_layers + int(depth)}."
    return layer + rest.removeprefix("block.") if rest.startswith("block.") else f"{layer}mtp.{rest}"


def _holds(template: str, name: str) -> bool:
    """Whether `name` is `template` at some layer ({i})."""
    return re.fullmatch(re.escape(template).replace(re.escape("{i}"), r"\d+"), name) is not None


def _layer(template: str, like: str) -> str:
    return template.format(i=_template(like)[1])


_REVERSE: dict[tuple, dict] = {}


def _reverse(family: Family, cfg: ModelConfig) -> dict[str, tuple[str, TensorEntry, int]]:
    """Our template -> (their template, entry, part index), built once per family and set of variants that
    hold for `cfg`; a variant's names replace the family's own."""
    chosen = [i for i, v in enumerate(family.variants) if all(getattr(cfg, k) == x for k, x in v.fields.items())]
    key = (family.model_type, *chosen)
    if key not in _REVERSE:
        table = {}
        mtp = (family.mtp.tensors,) if family.mtp is not None else ()
        for tensors in (family.tensors, *mtp, *(family.variants[i].tensors for i in chosen)):
            for hf, entry in tensors.items():
                parts = entry.parts if isinstance(entry, (Fused, Mapped)) else (entry.ours if isinstance(entry, (Transposed, HalvesSwapped, Stacked)) else entry,)
                for index, ours in enumerate(parts):
                    table[ours] = (hf, entry, index)
        _REVERSE[key] = table
    return _REVERSE[key]


def _mapped_from_hf(entry: Mapped, tensor: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    return entry.from_hf(tensor, cfg) if entry.config else entry.from_hf(tensor)


def _mapped_to_hf(entry: Mapped, parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    return entry.to_hf(parts, cfg) if entry.config_to_hf else entry.to_hf(parts)


def _transposed(entry: TensorEntry, shape) -> bool:
    """Conv1D weights are transposed, their biases (1-D) are not."""
    return len(shape) == 2 and (isinstance(entry, Transposed) or (isinstance(entry, Fused) and entry.transpose))


def _unswapped(entry: TensorEntry, tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """A HalvesSwapped tensor's halves of each head swapped (its own inverse); any other tensor as it is."""
    if not isinstance(entry, HalvesSwapped):
        return tensor
    return tensor.view(-1, 2, cfg.head_dim // 2, *tensor.shape[1:]).flip(1).reshape(tensor.shape)  # [heads, 2, d/2, ...]


def _rows_dim(shape) -> int:
    """The output rows of a weight or bias: dim 0, or dim 1 of stacked experts [E, rows, in]."""
    return 1 if len(shape) == 3 else 0


def _fuse(parts: list[torch.Tensor], layout: str, cfg: ModelConfig) -> torch.Tensor:
    if layout == "concat":
        return torch.cat(parts, dim=_rows_dim(parts[0].shape))
    rest = parts[0].shape[1:]
    d, kv = cfg.head_dim, cfg.num_kv_heads
    if layout == "heads":  # [heads, 3, d, ...]
        return torch.stack([p.view(-1, d, *rest) for p in parts], dim=1).reshape(-1, *rest)
    q, k, v = (p.view(kv, -1, d, *rest) for p in parts)  # groups: [kv, q/kv + 2, d, ...]
    return torch.cat((q, k, v), dim=1).reshape(-1, *rest)


def _split(fused: torch.Tensor, entry: Fused, name: str, cfg: ModelConfig) -> list[torch.Tensor]:
    rest = fused.shape[1:]
    d, kv = cfg.head_dim, cfg.num_kv_heads
    if entry.layout == "heads":
        return [t.reshape(-1, *rest) for t in fused.view(-1, len(entry.parts), d, *rest).unbind(1)]
    if entry.layout == "groups":
        grouped = fused.view(kv, -1, d, *rest)  # [kv, q/kv + 2, d, ...]
        q, k, v = grouped[:, :-2], grouped[:, -2], grouped[:, -1]
        return [t.reshape(-1, *rest) for t in (q, k, v)]
    sizes, dim = [_concat_rows(part, name, cfg) for part in entry.parts], _rows_dim(fused.shape)
    if sum(sizes) != fused.shape[dim]:
        raise UsageError(f"a fused tensor for {name} has {fused.shape[dim]} rows, the config implies {sum(sizes)}")
    return [t.contiguous() for t in fused.split(sizes, dim=dim)]  # an expert's rows are not (safetensors needs it)


def _concat_rows(part: str, like: str, cfg: ModelConfig) -> int:
    """Rows of one part of a concat fusion, from the config: q, k/v or the inner width of the MLP, of each routed
    expert or of the shared experts."""
    if ".wq." in part:
        return cfg.num_heads * cfg.head_dim
    if ".wk." in part or ".wv." in part:
        return cfg.num_kv_heads * cfg.head_dim
    if ".shared_experts." in part:
        return cfg.moe_shared_ffn_hidden_size
    return cfg.moe_ffn_hidden_size if ".experts." in part else cfg.ffn_hidden_size


def get_family_value(hf: dict, *keys: str, default: Optional[Any] = None) -> Any:
    """The first of `keys` the config has (families renamed keys across transformers versions)."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    return default
