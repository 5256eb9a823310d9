"""Any other transformers causal LM: its architecture from the meta-device model, its step from a trace.

A `model_type` without an explicit family (peftplan/arch*.py) is estimated from what transformers itself
builds (never remote code, `trust_remote_code=False`):

- `generic_arch(cfg)`: the model class transformers registers for the config's `model_type`
  (`AutoModelForCausalLM.from_config` on the meta device) is read into a `ModelArch` (family "generic"):
  every decoder layer's nn.Linear / Conv1D with its path, shape and bias, the layers' other parameters
  (norms, extra tensors), embeddings, final norms and the head. The parameter count is checked against
  the meta model's, to the element.
- `derive_schedule(...)`: the real training step (harness/trace.py: transformers + peft under
  FakeTensorMode, at the real width) traced at depth 4 and 5 at the requested micro-batch and sequence
  length; every storage event is tagged with the decoder layer it belongs to (the module running it in the
  forward; in the backward the autograd node, whose layer is stamped into `Node.metadata` by the layer's
  forward hooks; outside both, the layer of the tensors the op reads, e.g. an optimizer state created from
  its parameter). The depth-4 timeline is the schedule: engine/derived.py repeats its middle layer to any
  depth, and the depth-5 trace must equal that expansion event for event, else the derivation is refused.

The schedule is cached (peftplan cache dir, `derived/`) keyed by the config, the transformers / peft /
torch versions, the method, its options and the training settings.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict
from typing import Any, Mapping

import torch
from torch import nn

from ..arch import ArchError, Block, Linear, ModelArch, Norm
from ..training import Training
from . import HarnessError
from . import trace as T
from torch.utils._pytree import tree_leaves

TRACE_DEPTH = 4  # layers 0 (first), 1 and 2 (middle), 3 (last): engine/derived.py's templates
CHECK_DEPTH = 5  # the expansion of the depth-4 schedule must reproduce this trace exactly

# Roles (peftplan/arch.py Linear.role) by the linear's last name, for the presets (attn, qv) and adapters;
# anything else is "proj".
_ROLES = {"q_proj": "q", "query": "q", "k_proj": "k", "key": "k", "v_proj": "v", "value": "v",
          "o_proj": "o", "out_proj": "o", "dense": "o", "c_attn": "qkv", "qkv_proj": "qkv",
          "query_key_value": "qkv", "Wqkv": "qkv", "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
          "c_fc": "up", "fc1": "up", "fc2": "down", "gate_up_proj": "gate_up", "dense_h_to_4h": "up",
          "dense_4h_to_h": "down"}


def transformers_version() -> str:
    import transformers

    return transformers.__version__


# ---- the architecture ----------------------------------------------------------------------------------


def _hf_config(cfg: Mapping[str, Any], name: str):  # type: ignore[no-untyped-def]
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if cfg.get("auto_map") or cfg.get("trust_remote_code"):
        raise ArchError(f"{name}: config.json has auto_map (remote modelling code); peftplan never runs remote code")
    model_type = str(cfg.get("model_type"))
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ArchError(f"{name}: unsupported model_type {model_type!r}: no peftplan family and no causal-LM class in transformers "
                        f"{transformers_version()} (AutoModelForCausalLM)")
    kw = {k: v for k, v in cfg.items()
          if k not in ("model_type", "_name_or_path", "transformers_version", "torch_dtype", "dtype")}
    try:
        return AutoConfig.for_model(model_type, **kw)
    except Exception as exc:  # noqa: BLE001  (transformers' config validation: one line for the user)
        raise ArchError(f"{name}: transformers rejects this {model_type} config ({str(exc).splitlines()[0]})") from None


def meta_model(cfg: Mapping[str, Any], name: str = "model") -> nn.Module:
    """AutoModelForCausalLM.from_config on the meta device (no weights, no remote code)."""
    import warnings

    import transformers
    from accelerate import init_empty_weights

    config = _hf_config(cfg, name)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with init_empty_weights(include_buffers=False):
                model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except ArchError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ArchError(f"{name}: transformers cannot build {cfg.get('model_type')!r} from this config "
                        f"({str(exc).splitlines()[0]})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    model.tie_weights()
    return model


def _linear_shape(mod: nn.Module) -> tuple[int, int, bool] | None:
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features, mod.bias is not None
    if type(mod).__name__ == "Conv1D":  # GPT-2 style: weight (in, out)
        i, o = mod.weight.shape
        return int(i), int(o), getattr(mod, "bias", None) is not None
    return None


def _block_list(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    best = None
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n_layers and n_layers > 0:
            if any(_linear_shape(m) for m in mod[0].modules()):
                best = (mname, mod)
                break
    if best is None:
        raise ArchError(f"no list of {n_layers} decoder layers with linear layers in the transformers model")
    return best


def _params_of(mod: nn.Module, skip: set[int]) -> list[tuple[str, nn.Module, str, nn.Parameter]]:
    out = []
    for mname, sub in mod.named_modules():
        for pname, p in sub.named_parameters(recurse=False):
            if id(p) not in skip:
                skip.add(id(p))
                out.append((mname, sub, pname, p))
    return out


def _norm_or_extra(mname: str, sub: nn.Module, params: list[tuple[str, nn.Parameter]]
                   ) -> tuple[Norm | None, list[tuple[str, int]]]:
    names = {p: t for p, t in params}
    w, b = names.get("weight"), names.get("bias")
    if w is not None and w.dim() == 1 and set(names) <= {"weight", "bias"} and (b is None or b.shape == w.shape):
        return Norm(mname.rsplit(".", 1)[-1] or mname, int(w.shape[0]), b is not None), []
    return None, [(f"{mname}.{p}" if mname else p, int(t.numel())) for p, t in params]


def generic_arch(cfg: Mapping[str, Any], name: str = "model") -> ModelArch:
    """The ModelArch of a causal LM transformers can build but peftplan has no explicit family for."""
    model = meta_model(cfg, name)
    config = model.config
    n_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    try:
        prefix, layers = _block_list(model, n_layers)
    except ArchError as exc:
        raise ArchError(f"{name}: {exc}") from None
    seen: set[int] = set()
    blocks = []
    for layer in layers:
        linears, norms, extras = [], [], []
        lin_params: set[int] = set()
        for mname, sub in layer.named_modules():
            shape = _linear_shape(sub)
            if shape is not None:
                i, o, bias = shape
                last = mname.rsplit(".", 1)[-1]
                linears.append(Linear(mname, i, o, bias, _ROLES.get(last, "proj")))
                lin_params.update(id(p) for p in sub.parameters(recurse=False))
        seen.update(lin_params)
        grouped: dict[str, tuple[nn.Module, list]] = {}
        for mname, sub, pname, p in _params_of(layer, seen):
            grouped.setdefault(mname, (sub, []))[1].append((pname, p))
        for mname, (sub, params) in grouped.items():
            norm, extra = _norm_or_extra(mname, sub, params)
            if norm is not None:
                norms.append(norm)
            extras += extra
        blocks.append(Block("decoder", tuple(linears), tuple(norms), tuple(extras)))
    emb_in = model.get_input_embeddings()
    out_emb = model.get_output_embeddings()
    tied = out_emb is not None and emb_in is not None and out_emb.weight is emb_in.weight
    embeddings = [("embed_tokens" if emb_in is not None else "", int(emb_in.weight.shape[0]), int(emb_in.weight.shape[1]))]
    seen.add(id(emb_in.weight))
    final_norms, head_linears, head_extra = [], [], []
    head_ids = {id(p) for p in out_emb.parameters()} if out_emb is not None else set()
    out_bias = 0
    for mname, sub in model.named_modules():
        if mname == prefix or mname.startswith(prefix + "."):
            continue
        own = [(pn, p) for pn, p in sub.named_parameters(recurse=False) if id(p) not in seen]
        if not own:
            continue
        seen.update(id(p) for _, p in own)
        if sub is out_emb:
            out_bias += sum(int(p.numel()) for pn, p in own if pn != "weight")
            continue
        if isinstance(sub, nn.Embedding):
            embeddings.append((mname, int(sub.weight.shape[0]), int(sub.weight.shape[1])))
            continue
        shape = _linear_shape(sub)
        if shape is not None:
            head_linears.append(Linear(mname, shape[0], shape[1], shape[2], "proj"))
            continue
        norm, extra = _norm_or_extra(mname, sub, own)
        if norm is not None:
            final_norms.append(norm)
        head_extra += extra
    if out_bias:
        head_extra.append(("lm_head.bias", out_bias))
    del head_ids
    H = int(getattr(config, "num_attention_heads", 1) or 1)
    D = int(getattr(config, "hidden_size", embeddings[0][2]) or embeddings[0][2])
    K = int(getattr(config, "num_key_value_heads", None) or H)
    hd = int(getattr(config, "head_dim", None) or D // H)
    arch = ModelArch(
        name=name, model_type=str(cfg.get("model_type")), family="generic", task="causal-lm",
        vocab_size=int(embeddings[0][1]), hidden_size=D, num_heads=H, num_kv_heads=K, head_dim=hd,
        intermediate_size=int(getattr(config, "intermediate_size", 0) or 0), gated_mlp=False,
        activation=str(getattr(config, "hidden_act", "") or ""), norm_kind="layernorm",
        blocks=tuple(blocks), embeddings=tuple(embeddings), final_norms=tuple(final_norms),
        head_linears=tuple(head_linears), head_extra=tuple(head_extra), tie_word_embeddings=tied,
        max_position_embeddings=getattr(config, "max_position_embeddings", None),
        config=dict(cfg),
    )
    if out_emb is None:
        raise ArchError(f"{name}: the transformers model has no output embeddings (lm_head)")
    if not tied and tuple(out_emb.weight.shape) != (arch.vocab_size, arch.head_in_features):
        raise ArchError(f"{name}: lm_head {tuple(out_emb.weight.shape)} is not vocabulary x embedding width")
    total = sum(p.numel() for p in model.parameters())
    if arch.total_params != total:
        raise ArchError(f"{name}: read {arch.total_params:,} parameters from the {type(model).__name__} "
                        f"model, transformers has {total:,}: not modelled")
    return arch


# ---- the tagged trace ----------------------------------------------------------------------------------

_KEY = "peftplan_layer"
_FREE = "free"  # an event outside every module and autograd node
_INSIDE = "inside"  # an event inside a module or autograd node that belongs to no layer
_LAST: list[Any] = [None]


class _TaggingTracker(T.MemoryTracker):
    """MemoryTracker that also records, for each event, the decoder layer it belongs to (or None)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.tags: list[Any] = []
        self.layer_of_module: dict[str, int] = {}
        self.param_layer: dict[int, int] = {}  # storage id -> layer
        self.op_tag: int | None = None
        self.owner: dict[int, int | None] = {}  # id(_Rec) -> layer (the _Recs live in self.events)
        _LAST[0] = self

    def _ctx(self) -> tuple[bool, int | None]:
        """(inside a module or an autograd node, the layer it belongs to)."""
        if self.module_stack:
            return True, self.layer_of_module.get(self.module_stack[-1])
        node = torch._C._current_autograd_node()
        if node is not None:
            return True, node.metadata.get(_KEY)
        return False, None

    def _sync(self) -> None:
        if len(self.events) <= len(self.tags):
            return
        inside, tag = self._ctx()
        for rec, sign, _ in self.events[len(self.tags):]:
            if sign > 0:
                self.owner[id(rec)] = tag if inside else self.param_layer.get(rec.key, self.op_tag)
            # outside modules and nodes (optimizer step, zero_grad, teardown) an event belongs to its tensor's
            # layer: resolved when the schedule is read, after the optimizer states are known
            self.tags.append(tag if tag is not None else _INSIDE if inside else _FREE)

    def _alloc(self, st, op, shape, dtype, fixed=None):  # type: ignore[no-untyped-def]
        rec = super()._alloc(st, op, shape, dtype, fixed)
        self._sync()
        return rec

    def _on_free(self, key: int) -> None:
        super()._on_free(key)
        self._sync()

    def _hidden(self, nbytes, op, shape, dtype):  # type: ignore[no-untyped-def]
        rec = super()._hidden(nbytes, op, shape, dtype)
        self._sync()
        return rec

    def _hidden_free(self, rec) -> None:  # type: ignore[no-untyped-def]
        super()._hidden_free(rec)
        self._sync()

    def track(self, t, op, fixed=None):  # type: ignore[no-untyped-def]
        out = super().track(t, op, fixed)
        self._sync()
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # outside any layer's module or autograd node, an op belongs to the layer of the tensors it reads
        # (optimizer states from their parameter); foreach ops are not split per tensor: one layer or none
        tags = {self.owner.get(id(self.rec_of(t))) for t in tree_leaves((args, kwargs or {}))
                if isinstance(t, torch.Tensor)}
        tags.discard(None)
        self.op_tag = tags.pop() if len(tags) == 1 else None
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        finally:
            self.op_tag = None


def _stamp(tensors, tag: int | None, ckpt: int | None = None) -> None:
    """Write `tag` into the metadata of every autograd node reachable from `tensors` not stamped yet; a
    reentrant checkpoint's node (made after its layer's hooks ran, under no_grad) gets `ckpt`, the layer that
    ran last."""
    stack = [t.grad_fn for t in tree_leaves(tensors) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or _KEY in node.metadata:
            continue
        node.metadata[_KEY] = ckpt if "CheckpointFunction" in type(node).__name__ else tag
        stack.extend(n for n, _ in node.next_functions if n is not None)


def _tagging_hooks(original):  # type: ignore[no-untyped-def]
    import contextlib

    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    @contextlib.contextmanager
    def hooks(tracker, model):  # type: ignore[no-untyped-def]
        layers: dict[int, int] = {}
        names = dict(model.named_modules())
        for lname, mod in names.items():
            if isinstance(mod, nn.ModuleList) and len(mod) and any(_linear_shape(m) for m in mod[0].modules()):
                for i, layer in enumerate(mod):
                    layers[id(layer)] = i
                    for sub in layer.modules():
                        for p in sub.parameters(recurse=False):
                            tracker.param_layer[id(p.untyped_storage())] = i
                break
        for mname, mod in names.items():
            for lname, lmod in names.items():
                if id(lmod) in layers and (mname == lname or mname.startswith(lname + ".")):
                    tracker.layer_of_module[mname] = layers[id(lmod)]
                    break

        module_name = {id(m): n for n, m in names.items()}
        last: list[int | None] = [None]

        def pre(mod, args):  # nodes made before a layer (or a module outside the layers) ran: not that layer's
            if id(mod) in layers or tracker.layer_of_module.get(module_name.get(id(mod), "")) is None:
                _stamp(args, None, last[0])

        def post(mod, args, out):
            if id(mod) in layers:
                _stamp(out, layers[id(mod)])
                last[0] = layers[id(mod)]

        rescan = T._rescan_params

        def states_owner(tr, built):  # type: ignore[no-untyped-def]
            rescan(tr, built)
            if built.optimizer is not None:  # an optimizer state belongs to its parameter's layer
                for p, state in built.optimizer.state.items():
                    layer = tr.param_layer.get(id(p.untyped_storage()))
                    for v in state.values():
                        rec = tr.rec_of(v) if isinstance(v, torch.Tensor) else None
                        if rec is not None and layer is not None:
                            tr.owner[id(rec)] = layer

        T._rescan_params = states_owner
        h1 = register_module_forward_pre_hook(pre)
        h2 = register_module_forward_hook(post)
        try:
            with original(tracker, model):
                yield
        finally:
            T._rescan_params = rescan
            h1.remove()
            h2.remove()

    return hooks


def tagged_trace(arch: ModelArch, method: str, options: Any, training: Training) -> tuple[T.TraceResult, dict]:
    """`trace()` of the step, and its timeline as a schedule (engine/derived.py's format)."""
    saved = T.MemoryTracker, T._module_hooks
    T.MemoryTracker = _TaggingTracker  # type: ignore[misc]
    T._module_hooks = _tagging_hooks(saved[1])  # type: ignore[assignment]
    try:
        res = T.trace(arch, method, options, training, model_name=arch.name)
    finally:
        T.MemoryTracker, T._module_hooks = saved  # type: ignore[misc]
    tr: _TaggingTracker = _LAST[0]
    _LAST[0] = None
    recs: list[list[Any]] = []
    index: dict[int, int] = {}
    events: list[list[Any]] = []
    last: Any = None  # the tag of the previous event when a layer's module or node ran it
    for (rec, sign, ph), tag in zip(tr.events, tr.tags):
        if rec.role == "host" or not rec.nbytes:
            continue
        owner = tr.owner.get(id(rec))
        layer_ctx = isinstance(tag, int)
        if tag == _INSIDE and sign < 0 and owner is not None and last is not None and abs(owner - last) <= 1:
            tag = last  # freed as the layer returns (a residual stream dropped after the next layer): that layer's
        elif tag == _INSIDE:
            tag = owner if sign < 0 else None
        elif tag == _FREE:
            tag = owner
        last = tag if layer_ctx else None
        if sign > 0:
            index[id(rec)] = len(recs)
            recs.append([rec.nbytes, rec.category(), tr.owner.get(id(rec)), rec.op, rec.module])
            events.append([1, index[id(rec)], tag, ph])
        elif id(rec) in index:
            events.append([-1, index[id(rec)], tag, ph])
    schedule = {"layers": arch.num_layers, "recs": recs, "events": events,
                "phases": [list(p) for p in tr.phases],
                "flops": [res.flops_forward or 0, res.flops_backward or 0, res.flops_recompute or 0],
                "peak": res.peak_allocated_bytes}
    return res, schedule


# ---- the derivation, cached -----------------------------------------------------------------------------


def _at_depth(arch: ModelArch, n: int) -> ModelArch:
    from dataclasses import replace

    cfg = dict(arch.config)
    cfg["num_hidden_layers"] = n
    for key in ("layer_types",):  # per-layer lists follow the depth
        if isinstance(cfg.get(key), list):
            cfg[key] = cfg[key][:n]
    return replace(arch, blocks=arch.blocks[:n], config=cfg)


def versions() -> dict[str, str]:
    import peft
    import transformers

    return {"transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__.split("+")[0]}


def cache_key(arch: ModelArch, method: str, options: Mapping[str, Any], training: Training) -> str:
    from ..cachedir import code_fingerprint

    blob = json.dumps({"config": arch.config, "versions": versions(), "method": method, "options": dict(options),
                       "training": asdict(training), "code": code_fingerprint()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _cache_file(key: str):  # type: ignore[no-untyped-def]
    from ..cachedir import cache_dir

    where = cache_dir()
    return None if where is None else where / "derived" / f"{key[:32]}.json"


def derive_schedule(arch: ModelArch, method: str, options: Mapping[str, Any], training: Training) -> dict:
    """The step's schedule for `arch` (family generic): traced at depth 4 (and checked at 5), or the whole
    model when it is no deeper than that. Cached on disk; `schedule["cached"]` says whether it came from there."""
    from ..engine.derived import DeriveError, expand

    key = cache_key(arch, method, options, training)
    path = _cache_file(key)
    if path is not None and path.is_file():
        try:
            sched = json.loads(path.read_text(encoding="utf-8"))
            if sched.get("key") == key:
                sched["cached"] = True
                return sched
        except (OSError, ValueError):
            pass
    depth = min(arch.num_layers, TRACE_DEPTH)
    try:
        _, sched = tagged_trace(_at_depth(arch, depth), method, dict(options), training)
        sched["check"] = None
        if arch.num_layers > TRACE_DEPTH:
            _, check = tagged_trace(_at_depth(arch, CHECK_DEPTH), method, dict(options), training)
            got, want = expand(sched, CHECK_DEPTH), expand(check, CHECK_DEPTH)
            # the free order inside one op can differ between runs (finalizers): compare the peaks per phase
            if got.peak != check["peak"] or got.phase_peaks != want.phase_peaks:
                raise DeriveError(f"{arch.name}: the step at depth {CHECK_DEPTH} is not the depth-{TRACE_DEPTH} "
                                  "step with one more middle layer; peftplan cannot extrapolate it over depth")
            sched["check"] = {"depth": CHECK_DEPTH, "peak": check["peak"], "flops": check["flops"]}
    except DeriveError as exc:
        raise HarnessError(str(exc)) from None
    sched.update({"key": key, "versions": versions(), "model_type": arch.model_type})
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(sched), encoding="utf-8")
            tmp.replace(path)
        except OSError:
            pass
    sched["cached"] = False
    return sched


def layer_index(name: str) -> int | None:
    m = re.search(r"\.(\d+)(\.|$)", name)
    return int(m.group(1)) if m else None
