"""Structured pruning that really shrinks a model: attention heads, FFN neurons or whole layers.

`shrink(model, what, ...)` slices the weight matrices in place and updates `model.config`, so
`save_pretrained` writes a smaller model that plain transformers loads and runs. The shrunk model
computes exactly what the original computes with the removed units zeroed (heads, neurons) or
skipped (layers), which is what the tests check.
"""

from __future__ import annotations

import torch
from torch import nn

from tunelab.arch import SHRINKS as WHAT
from tunelab.arch import Arch, arch_of, is_conv1d
from tunelab.errors import ConfigError, ModelError

CRITERIA = ("magnitude", "loss")
# Config lists with one entry per layer, sliced when layers are removed (sliding/full attention; smollm3's
# layers without RoPE).
PER_LAYER_FIELDS = ("layer_types", "no_rope_layers")


def shrink(model, what: str, *, fraction: float | None = None, count: int | None = None,
           criterion: str = "magnitude", batches: list[dict] | None = None) -> dict:
    """Remove attention heads ("heads"), FFN neurons ("ffn") or whole layers ("layers") from `model` in place.

    `model.config` is updated so that `model.save_pretrained(dir)` writes a smaller HF model that
    AutoModelForCausalLM / AutoModelForMaskedLM `.from_pretrained` loads and runs with the same outputs as
    the big model with those parts removed (heads and neurons zeroed, layers replaced by the identity).

    How much: exactly one of
      fraction  the share removed, in [0, 1): of the heads per layer, of the FFN neurons per layer, or of
                the layers; rounded half up to a whole count.
      count     how many removed: per layer for heads and ffn, in all for layers.
    HF configs hold one `num_attention_heads` and one `intermediate_size` for every layer, so heads and ffn
    remove the same number of units in each layer, each layer keeping its own best-scoring units.

    Units and criteria (the lowest scores are removed; ties go to the lower index):
      ffn     one neuron: its rows of gate_proj and up_proj (fc1; both halves of a fused gate_up) and its
              column of down_proj (fc2); GPT-2's Conv1D stores these transposed.
      heads   one KV head with the query heads that share it (with multi-head attention, one head): its rows
              of q/k/v_proj (and biases) and its columns of o_proj. With grouped-query attention whole groups
              go, so the grouping stays valid: a count is in query heads and must be a multiple of the group
              size; a fraction is taken of the KV groups.
      layers  one decoder / encoder layer.
      criterion "magnitude" (data-free):
              heads, ffn: (L2 norm of the unit's input weights and biases) x (L2 norm of its output weights),
                so a unit that writes nothing scores 0;
              layers: the L2 norm of the layer's output projections (o_proj and down_proj; BERT:
                attention.output.dense and output.dense), what it adds to the residual stream.
      criterion "loss" (calibration on `batches`, dicts with input_ids, optional attention_mask, labels,
              already on the model's device):
              heads, ffn: per batch b, |dL_b/dm| for a gate m = 1 multiplying the unit's output (Michel et al.,
                "Are Sixteen Heads Really Better than One?"), which equals |sum of w * dL_b/dw| over the
                unit's output weights (its o_proj / down_proj columns): the first-order estimate of the loss
                change when the unit is removed; summed over the batches;
              layers: the mean loss increase over the batches when that one layer alone is skipped (exact,
                one forward pass per layer and batch; layers are scored independently, not greedily).
      Scoring runs in eval mode (no dropout); the model's mode is restored afterwards.

    Families: where the architecture table (tunelab/arch.py) finds the parts; what a family cannot do
    (`Arch.refuses`: heads of fused-qkv or BERT-style attention, modernbert's layers...) is a ModelError.
    Limits:
      - llama heads: LlamaConfig requires hidden_size divisible by num_attention_heads, so only counts that
        leave such a number of heads are accepted (the error lists them); mistral and qwen2 have no such rule.
        `head_dim` is written explicitly into the config.
      - layers: `num_hidden_layers` and per-layer config lists (`layer_types`) are updated, and the kept
        attention modules' `layer_idx` are renumbered so the KV cache (generate) works.
      - BERT/RoBERTa layers are post-norm: even a layer whose projections are zero is no identity (its
        LayerNorms still act), so removing encoder layers changes the function more than removing decoder ones.

    Returns a JSON-able report:
      {"what", "criterion", "unit": "head" | "kv_group" | "neuron" | "layer",
       "removed_per_layer" (heads: query heads; ffn: neurons) or "removed" (layers: how many),
       "layers": heads/ffn: [{"layer": i, "kept": [...], "removed": [...]} ...] (heads add "kept_kv" and
                 "removed_kv": the KV head indices);
                 layers: {"kept": [...], "removed": [...], "scores": [one per original layer]},
       "params_before", "params_after",
       "config_changes": {field: [old, new]}}
    Errors: bad options raise a one-line ConfigError, an unsupported model or shape a one-line ModelError;
    nothing is changed in the model when an error is raised.
    """
    family = arch_of(model, f"structured pruning ({what})")
    _check_options(what, fraction, count, criterion, batches)
    family.check(what)
    params_before = _count_params(model)
    if what == "layers":
        report = _shrink_layers(model, family, fraction, count, criterion, batches)
    elif what == "ffn":
        report = _shrink_ffn(model, family, fraction, count, criterion, batches)
    else:
        report = _shrink_heads(model, family, fraction, count, criterion, batches)
    return {"what": what, "criterion": criterion, **report, "params_before": params_before,
            "params_after": _count_params(model)}


# ---------------------------------------------------------------- checks


def _check_options(what, fraction, count, criterion, batches) -> None:
    if what not in WHAT:
        raise ConfigError(f"what: {what!r} is not a prunable part; choose one of {', '.join(WHAT)}")
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion: {criterion!r} is unknown; choose one of {', '.join(CRITERIA)}")
    if (fraction is None) == (count is None):
        raise ConfigError("fraction / count: give exactly one of them (fraction: the share to remove, "
                          "count: how many to remove)")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not 0 <= fraction < 1):
        raise ConfigError(f"fraction: {fraction!r} is outside [0, 1); give the share to remove, e.g. 0.25")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise ConfigError(f"count: {count!r} is not a whole number >= 0; give how many to remove, e.g. 1")
    if criterion == "loss":
        if not batches:
            raise ConfigError("criterion: loss needs calibration batches (dicts with input_ids and labels); "
                              "give batches or use criterion magnitude")
        if any("labels" not in b for b in batches):
            raise ConfigError("batches: every calibration batch needs labels for criterion loss")


def _round_half_up(x: float) -> int:
    return int(x + 0.5)  # round() rounds halves to even: 0.5 of 5 layers would remove 2, not 3


def _how_many(n: int, fraction, count, noun: str, scope: str = "", step: int = 1) -> int:
    """The number of units (out of n) to remove; removing all n is refused. `step`: units go `step` at a time."""
    if count is not None:
        if count >= n:
            raise ConfigError(f"count: cannot remove {count} {noun} from a model with {n} {noun}{scope}; "
                              f"give at most {n - step}")
        return count
    k = _round_half_up(fraction * n)
    if k >= n:
        raise ConfigError(f"fraction: {fraction:g} of {n} {noun}{scope} rounds to {k}, removing them all; "
                          f"give a fraction below {1 - 0.5 / n:g}")
    return k


# ---------------------------------------------------------------- model structure


def _layers(model, family: Arch) -> nn.ModuleList:
    return family.block_list(model)


def _set_layers(model, family: Arch, layers: nn.ModuleList) -> None:
    parent, _, name = family.blocks.rpartition(".")
    setattr(model.get_submodule(parent), name, layers)


def _ffn_linears(layer, family: Arch):
    """(linears whose outputs are the neurons, linear whose inputs are the neurons)."""
    return [layer.get_submodule(n) for n in family.ffn_in], layer.get_submodule(family.ffn_out)


def _output_linears(layer, family: Arch):
    """What a layer writes into the residual stream."""
    return [layer.get_submodule(family.attn_out), layer.get_submodule(family.ffn_out)]


def _out_dim(module) -> int:
    """The weight dimension that indexes the layer's outputs."""
    return 1 if is_conv1d(module) else 0


def _n_inputs(module) -> int:
    return module.weight.shape[1 - _out_dim(module)]


def _count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def _replace(param: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data.contiguous(), requires_grad=param.requires_grad)


def _keep_outputs(linear, index: torch.Tensor) -> None:
    index = index.to(linear.weight.device)
    linear.weight = _replace(linear.weight, linear.weight.data.index_select(_out_dim(linear), index))
    if linear.bias is not None:
        linear.bias = _replace(linear.bias, linear.bias.data.index_select(0, index))
    if is_conv1d(linear):
        linear.nf = len(index)
    else:
        linear.out_features = len(index)


def _keep_inputs(linear, index: torch.Tensor) -> None:
    index = index.to(linear.weight.device)
    linear.weight = _replace(linear.weight, linear.weight.data.index_select(1 - _out_dim(linear), index))
    if is_conv1d(linear):
        linear.nx = len(index)
    else:
        linear.in_features = len(index)  # the bias belongs to the outputs: unchanged


def _pick(scores: torch.Tensor, n_remove: int) -> tuple[list[int], list[int]]:
    """(kept, removed) unit indices, each sorted: the n_remove lowest scores go, ties to the lower index."""
    order = torch.sort(scores.double().cpu(), stable=True).indices.tolist()
    removed = sorted(order[:n_remove])
    kept = sorted(order[n_remove:])
    return kept, removed


def _row_norms_sq(linear) -> torch.Tensor:
    """Per output: the squared norm of its weights and bias."""
    sq = linear.weight.detach().double().pow(2).sum(1 - _out_dim(linear))
    if linear.bias is not None:
        sq = sq + linear.bias.detach().double().pow(2)
    return sq.cpu()


def _column_norms_sq(linear) -> torch.Tensor:
    """Per input: the squared norm of its weights."""
    return linear.weight.detach().double().pow(2).sum(_out_dim(linear)).cpu()


def _apply_config(model, changes: dict) -> dict:
    """Check that the changed config still validates (transformers refuses to save or load it otherwise),
    then set it on the model's own config object, which its modules share. Returns {field: [old, new]}."""
    config = model.config
    try:
        type(config).from_dict({**config.to_dict(), **changes})
    except Exception as err:  # transformers' strict config validators raise their own error types
        reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip())[:300]
        raise ModelError(f"the pruned {config.model_type} config would not load ({reason})") from None
    report = {}
    for field, new in changes.items():
        old = getattr(config, field, None)
        setattr(config, field, new)
        if old != new:
            report[field] = [old, new]
    return report


# ---------------------------------------------------------------- calibration


class _EvalMode:
    """Scoring without dropout; the caller's train/eval mode is restored afterwards."""

    def __init__(self, model):
        self.model, self.training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.training)


def _loss(model, family: Arch, batch) -> torch.Tensor:
    extra = {"use_cache": False} if family.kind == "causal" else {}
    return model(**batch, **extra).loss


def _output_gate_scores(model, family, batches, linears: list, group: int) -> list[torch.Tensor]:
    """Per linear: sum over batches of |sum over each unit's input columns of w * dL_b/dw|, a unit being
    `group` consecutive columns. That sum is dL_b/dm for a gate m multiplying the unit's output."""
    weights = [lin.weight for lin in linears]
    flags = [w.requires_grad for w in weights]
    scores = [torch.zeros(_n_inputs(lin) // group, dtype=torch.float64) for lin in linears]
    try:
        for w in weights:
            w.requires_grad_(True)  # frozen weights too: we need their gradients, never their updates
        with _EvalMode(model), torch.enable_grad():
            for batch in batches:
                grads = torch.autograd.grad(_loss(model, family, batch), weights)
                for i, (lin, w, g) in enumerate(zip(linears, weights, grads)):
                    per_column = (w.detach().double() * g.double()).sum(_out_dim(lin))
                    scores[i] += per_column.view(-1, group).sum(1).abs().cpu()
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    return scores


def _skip_hook(module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _skip_loss_scores(model, family, batches) -> torch.Tensor:
    """Per layer: the mean loss increase over the batches when that layer returns its input unchanged."""
    layers = _layers(model, family)
    increase = torch.zeros(len(layers), dtype=torch.float64)
    with _EvalMode(model), torch.no_grad():
        for batch in batches:
            full = float(_loss(model, family, batch))
            for i, layer in enumerate(layers):
                handle = layer.register_forward_hook(_skip_hook, with_kwargs=True)
                try:
                    increase[i] += float(_loss(model, family, batch)) - full
                finally:
                    handle.remove()
    return increase / len(batches)


# ---------------------------------------------------------------- ffn


def _shrink_ffn(model, family, fraction, count, criterion, batches) -> dict:
    layers = _layers(model, family)
    n = _n_inputs(_ffn_linears(layers[0], family)[1])  # gpt2's n_inner may be None (4 x hidden)
    n_remove = _how_many(n, fraction, count, "neurons", " per layer")
    if criterion == "loss":
        scores = _output_gate_scores(model, family, batches, [_ffn_linears(layer, family)[1] for layer in layers], 1)
    else:
        scores = []
        for layer in layers:
            inputs, output = _ffn_linears(layer, family)
            reads = sum(_row_norms_sq(lin).view(-1, n).sum(0) for lin in inputs).sqrt()  # fused: [gate; up]
            scores.append(reads * _column_norms_sq(output).sqrt())
    picks = [_pick(s, n_remove) for s in scores]
    changes = {}
    if n_remove:
        changes = _apply_config(model, {family.ffn_size: n - n_remove})
        for layer, (kept, _) in zip(layers, picks):
            index = torch.tensor(kept, dtype=torch.long)
            inputs, output = _ffn_linears(layer, family)
            rows = torch.cat([index, index + n]) if family.fused_gate_up else index
            for lin in inputs:
                _keep_outputs(lin, rows)
            _keep_inputs(output, index)
    return {"unit": "neuron", "removed_per_layer": n_remove,
            "layers": [{"layer": i, "kept": kept, "removed": removed} for i, (kept, removed) in enumerate(picks)],
            "config_changes": changes}


# ---------------------------------------------------------------- heads (decoders)


def _shrink_heads(model, family: Arch, fraction, count, criterion, batches) -> dict:
    config = model.config
    layers = _layers(model, family)
    n_heads = getattr(config, family.n_heads)
    n_kv = getattr(config, family.n_kv_heads, None) or n_heads
    group = n_heads // n_kv  # query heads per KV head: the unit removed together
    head_dim = layers[0].get_submodule(family.attention).head_dim

    def attention(layer):  # (module, q, k, v, o)
        return (layer.get_submodule(family.attention),
                *(layer.get_submodule(n) for n in (*family.qkv, family.attn_out)))

    if count is not None:
        _how_many(n_heads, None, count, "heads", " per layer", step=group)  # counted in heads, not groups
        if count % group:
            raise ConfigError(f"count: {count} heads per layer is not a whole number of KV groups: this model has "
                              f"{n_kv} KV heads shared by {group} query heads each, so give a multiple of {group}")
        n_groups = count // group
    else:
        n_groups = _how_many(n_kv, fraction, None, "KV groups" if group > 1 else "heads", " per layer")
    new_heads = n_heads - n_groups * group
    if n_groups and config.model_type == "llama" and config.hidden_size % new_heads:
        fits = [g * group for g in range(1, n_kv) if config.hidden_size % (n_heads - g * group) == 0]
        hint = f"counts that fit: {', '.join(map(str, fits))}" if fits else "no head count fits this model"
        raise ModelError(f"heads: LlamaConfig needs hidden_size ({config.hidden_size}) divisible by "
                         f"num_attention_heads, and removing {n_groups * group} of {n_heads} heads per layer "
                         f"leaves {new_heads}; {hint}")

    rows = group * head_dim  # o_proj columns per unit
    if criterion == "loss":
        scores = _output_gate_scores(model, family, batches, [attention(layer)[4] for layer in layers], rows)
    else:
        scores = []
        for layer in layers:
            _, q, k, v, o = attention(layer)
            reads = (_row_norms_sq(q).view(n_kv, rows).sum(1) + _row_norms_sq(k).view(n_kv, head_dim).sum(1)
                     + _row_norms_sq(v).view(n_kv, head_dim).sum(1)).sqrt()
            scores.append(reads * _column_norms_sq(o).view(n_kv, rows).sum(1).sqrt())
    picks = [_pick(s, n_groups) for s in scores]

    def query_heads(groups):
        return [g * group + j for g in groups for j in range(group)]

    changes = {}
    if n_groups:
        # head_dim explicit: hidden_size no longer equals num_attention_heads * head_dim.
        changes = _apply_config(model, {family.n_heads: new_heads, family.n_kv_heads: n_kv - n_groups,
                                        "head_dim": head_dim})
        for layer, (kept, _) in zip(layers, picks):
            attn, q, k, v, o = attention(layer)
            kv_index = torch.tensor([g * head_dim + d for g in kept for d in range(head_dim)], dtype=torch.long)
            q_index = torch.tensor([h * head_dim + d for h in query_heads(kept) for d in range(head_dim)],
                                   dtype=torch.long)
            _keep_outputs(q, q_index)
            _keep_outputs(k, kv_index)
            _keep_outputs(v, kv_index)
            _keep_inputs(o, q_index)
            # Older or other attention classes cache head counts on the module; keep them true.
            for attr, value in (("num_heads", new_heads), ("num_key_value_heads", n_kv - n_groups)):
                if isinstance(getattr(attn, attr, None), int):
                    setattr(attn, attr, value)
    return {"unit": "kv_group" if group > 1 else "head", "removed_per_layer": n_groups * group,
            "layers": [{"layer": i, "kept": query_heads(kept), "removed": query_heads(removed),
                        "kept_kv": kept, "removed_kv": removed} for i, (kept, removed) in enumerate(picks)],
            "config_changes": changes}


# ---------------------------------------------------------------- layers


def _shrink_layers(model, family, fraction, count, criterion, batches) -> dict:
    layers = _layers(model, family)
    n = len(layers)
    n_remove = _how_many(n, fraction, count, "layers")
    if n_remove and getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        raise ModelError("layers: this gpt2 scales attention by 1 / (layer index + 1), so the kept layers would "
                         "compute something else at their new index; prune ffn instead")
    if criterion == "loss":
        scores = _skip_loss_scores(model, family, batches)
    else:
        scores = torch.stack([sum(_column_norms_sq(lin).sum() for lin in _output_linears(layer, family)).sqrt()
                              for layer in layers])
    kept, removed = _pick(scores, n_remove)
    changes = {}
    if n_remove:
        update = {family.n_layers: n - n_remove}
        for field in PER_LAYER_FIELDS:
            value = getattr(model.config, field, None)
            if isinstance(value, list) and len(value) == n:
                update[field] = [value[i] for i in kept]
        changes = _apply_config(model, update)
        _set_layers(model, family, nn.ModuleList([layers[i] for i in kept]))
        for new_index, layer in enumerate(_layers(model, family)):
            for module in layer.modules():  # the KV cache is indexed by layer_idx: renumber 0..n-1
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new_index
        base = model.base_model
        if hasattr(base, "has_sliding_layers") and "layer_types" in update:  # qwen2 builds that mask only if used
            base.has_sliding_layers = "sliding_attention" in update["layer_types"]
    return {"unit": "layer", "removed": n_remove,
            "layers": {"kept": kept, "removed": removed, "scores": [round(float(s), 8) for s in scores]},
            "config_changes": changes}
