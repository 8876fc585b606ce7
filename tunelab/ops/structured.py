"""Structured pruning that really shrinks a model: attention heads, FFN neurons or whole layers.

`shrink(model, what, ...)` slices the weight matrices in place and updates `model.config`, so
`save_pretrained` writes a smaller model that plain transformers loads and runs. The shrunk model
computes exactly what the original computes with the removed units zeroed (heads, neurons) or
skipped (layers), which is what the tests check.
"""

from __future__ import annotations

import torch
from torch import nn

from tunelab.errors import ConfigError, ModelError

# model_type -> layout. Decoders: model.model.layers[i].self_attn.{q,k,v,o}_proj, .mlp.{gate,up,down}_proj
# (pre-norm residual blocks). Encoders: model.<bert|roberta>.encoder.layer[i].attention.self.{query,key,value},
# .attention.output.dense, .intermediate.dense, .output.dense (post-norm blocks).
FAMILIES = {"llama": "decoder", "mistral": "decoder", "qwen2": "decoder", "bert": "encoder", "roberta": "encoder"}
WHAT = ("heads", "ffn", "layers")
CRITERIA = ("magnitude", "loss")
# Config lists with one entry per layer, sliced when layers are removed (qwen2's sliding/full attention).
PER_LAYER_FIELDS = ("layer_types",)


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
      ffn     one neuron: its rows of gate_proj and up_proj (intermediate.dense) and its column of
              down_proj (output.dense).
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

    Families: llama, mistral, qwen2 (q/k/v biases included) and bert, roberta for ffn and layers.
    Limits:
      - BERT/RoBERTa heads: their attention computes the head size as hidden_size / num_attention_heads,
        so fewer heads of the same size cannot be written in their config: a ModelError.
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
    family = _family(model)
    _check_options(what, fraction, count, criterion, batches)
    if what == "heads" and family == "encoder":
        raise ModelError(f"heads: cannot remove heads from {model.config.model_type}: its attention takes the head "
                         "size as hidden_size / num_attention_heads, so fewer heads cannot be saved in its config; "
                         "prune ffn or layers instead")
    params_before = _count_params(model)
    if what == "layers":
        report = _shrink_layers(model, family, fraction, count, criterion, batches)
    elif what == "ffn":
        report = _shrink_ffn(model, family, fraction, count, criterion, batches)
    else:
        report = _shrink_heads(model, fraction, count, criterion, batches)
    return {"what": what, "criterion": criterion, **report, "params_before": params_before,
            "params_after": _count_params(model)}


# ---------------------------------------------------------------- checks


def _family(model) -> str:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ModelError(f"structured pruning does not support model_type {model_type!r}; "
                         f"supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


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


def _layers(model, family) -> nn.ModuleList:
    base = model.base_model
    return base.layers if family == "decoder" else base.encoder.layer


def _set_layers(model, family, layers: nn.ModuleList) -> None:
    base = model.base_model
    if family == "decoder":
        base.layers = layers
    else:
        base.encoder.layer = layers


def _ffn_linears(layer, family):
    """(linears whose output rows are the neurons, linear whose input columns are the neurons)."""
    if family == "decoder":
        return [layer.mlp.gate_proj, layer.mlp.up_proj], layer.mlp.down_proj
    return [layer.intermediate.dense], layer.output.dense


def _output_linears(layer, family):
    """What a layer writes into the residual stream."""
    if family == "decoder":
        return [layer.self_attn.o_proj, layer.mlp.down_proj]
    return [layer.attention.output.dense, layer.output.dense]


def _count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def _replace(param: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data.contiguous(), requires_grad=param.requires_grad)


def _keep_rows(linear: nn.Linear, index: torch.Tensor) -> None:
    index = index.to(linear.weight.device)
    linear.weight = _replace(linear.weight, linear.weight.data.index_select(0, index))
    if linear.bias is not None:
        linear.bias = _replace(linear.bias, linear.bias.data.index_select(0, index))
    linear.out_features = len(index)


def _keep_columns(linear: nn.Linear, index: torch.Tensor) -> None:
    index = index.to(linear.weight.device)
    linear.weight = _replace(linear.weight, linear.weight.data.index_select(1, index))
    linear.in_features = len(index)  # the bias belongs to the outputs: unchanged


def _pick(scores: torch.Tensor, n_remove: int) -> tuple[list[int], list[int]]:
    """(kept, removed) unit indices, each sorted: the n_remove lowest scores go, ties to the lower index."""
    order = torch.sort(scores.double().cpu(), stable=True).indices.tolist()
    removed = sorted(order[:n_remove])
    kept = sorted(order[n_remove:])
    return kept, removed


def _row_norms_sq(linear: nn.Linear) -> torch.Tensor:
    sq = linear.weight.detach().double().pow(2).sum(1)
    if linear.bias is not None:
        sq = sq + linear.bias.detach().double().pow(2)
    return sq.cpu()


def _column_norms_sq(linear: nn.Linear) -> torch.Tensor:
    return linear.weight.detach().double().pow(2).sum(0).cpu()


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


def _loss(model, family, batch) -> torch.Tensor:
    extra = {"use_cache": False} if family == "decoder" else {}
    return model(**batch, **extra).loss


def _output_gate_scores(model, family, batches, linears: list[nn.Linear], group: int) -> list[torch.Tensor]:
    """Per linear: sum over batches of |sum over each unit's input columns of w * dL_b/dw|, a unit being
    `group` consecutive columns. That sum is dL_b/dm for a gate m multiplying the unit's output."""
    weights = [lin.weight for lin in linears]
    flags = [w.requires_grad for w in weights]
    scores = [torch.zeros(w.shape[1] // group, dtype=torch.float64) for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)  # frozen weights too: we need their gradients, never their updates
        with _EvalMode(model), torch.enable_grad():
            for batch in batches:
                grads = torch.autograd.grad(_loss(model, family, batch), weights)
                for i, (w, g) in enumerate(zip(weights, grads)):
                    per_column = (w.detach().double() * g.double()).sum(0)
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
    n = model.config.intermediate_size
    n_remove = _how_many(n, fraction, count, "neurons", " per layer")
    if criterion == "loss":
        scores = _output_gate_scores(model, family, batches, [_ffn_linears(layer, family)[1] for layer in layers], 1)
    else:
        scores = []
        for layer in layers:
            inputs, output = _ffn_linears(layer, family)
            reads = sum(_row_norms_sq(lin) for lin in inputs).sqrt()
            scores.append(reads * _column_norms_sq(output).sqrt())
    picks = [_pick(s, n_remove) for s in scores]
    changes = {}
    if n_remove:
        changes = _apply_config(model, {"intermediate_size": n - n_remove})
        for layer, (kept, _) in zip(layers, picks):
            index = torch.tensor(kept, dtype=torch.long)
            inputs, output = _ffn_linears(layer, family)
            for lin in inputs:
                _keep_rows(lin, index)
            _keep_columns(output, index)
    return {"unit": "neuron", "removed_per_layer": n_remove,
            "layers": [{"layer": i, "kept": kept, "removed": removed} for i, (kept, removed) in enumerate(picks)],
            "config_changes": changes}


# ---------------------------------------------------------------- heads (decoders)


def _shrink_heads(model, fraction, count, criterion, batches) -> dict:
    config = model.config
    layers = _layers(model, "decoder")
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    group = n_heads // n_kv  # query heads per KV head: the unit removed together
    head_dim = layers[0].self_attn.head_dim
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
        scores = _output_gate_scores(model, "decoder", batches, [layer.self_attn.o_proj for layer in layers], rows)
    else:
        scores = []
        for layer in layers:
            attn = layer.self_attn
            reads = (_row_norms_sq(attn.q_proj).view(n_kv, rows).sum(1)
                     + _row_norms_sq(attn.k_proj).view(n_kv, head_dim).sum(1)
                     + _row_norms_sq(attn.v_proj).view(n_kv, head_dim).sum(1)).sqrt()
            scores.append(reads * _column_norms_sq(attn.o_proj).view(n_kv, rows).sum(1).sqrt())
    picks = [_pick(s, n_groups) for s in scores]

    def query_heads(groups):
        return [g * group + j for g in groups for j in range(group)]

    changes = {}
    if n_groups:
        # head_dim explicit: hidden_size no longer equals num_attention_heads * head_dim.
        changes = _apply_config(model, {"num_attention_heads": new_heads, "num_key_value_heads": n_kv - n_groups,
                                        "head_dim": head_dim})
        for layer, (kept, _) in zip(layers, picks):
            attn = layer.self_attn
            kv_index = torch.tensor([g * head_dim + d for g in kept for d in range(head_dim)], dtype=torch.long)
            q_index = torch.tensor([h * head_dim + d for h in query_heads(kept) for d in range(head_dim)],
                                   dtype=torch.long)
            _keep_rows(attn.q_proj, q_index)
            _keep_rows(attn.k_proj, kv_index)
            _keep_rows(attn.v_proj, kv_index)
            _keep_columns(attn.o_proj, q_index)
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
    if criterion == "loss":
        scores = _skip_loss_scores(model, family, batches)
    else:
        scores = torch.stack([sum(_column_norms_sq(lin).sum() for lin in _output_linears(layer, family)).sqrt()
                              for layer in layers])
    kept, removed = _pick(scores, n_remove)
    changes = {}
    if n_remove:
        update = {"num_hidden_layers": n - n_remove}
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
