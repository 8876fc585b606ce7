"""The data of a training stage: its training, replay, eval-only and ancestors' sources, each domain's
role (target or reference), the mixture with replay and phases, the batch source and the evaluator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tunelab import tokenizers
from tunelab.errors import DataError
from tunelab.stages.setup import Init, resolve_init



@dataclass
class TrainingData:
    sets: list  # PackedSequences, one per training source, then one per replay source
    sources: list  # TokenizedSource of each training source
    eval_sources: list  # eval-only sources (scored whole, or held-out when an ancestor trained on them)
    eval_splits: dict = field(default_factory=dict)  # domain -> (tokens, loss mask or None)
    eval_starts: dict = field(default_factory=dict)  # domain -> example starts (chat sources: scored whole)
    eval_pairs: dict = field(default_factory=dict)  # domain -> held-out data.rows.PairSet (preference sources)
    replay_sources: list = field(default_factory=list)  # TokenizedSource of each replay source
    # domain -> "target" (trained on now) or "reference" (old data: replay, data.eval, ancestors' domains)
    roles: dict = field(default_factory=dict)
    fractions: dict = field(default_factory=dict)  # domain -> eval_fraction held out, where not data.eval_fraction


def ancestor_specs(model_dir: Path | None, log=print) -> list:
    """The sources the starting model's ancestors trained on, as SourceSpecs (from their lineage.json),
    newest ancestor first; sources that no longer exist on this machine are skipped with a message."""
    from tunelab.config import SourceSpec
    from tunelab.runs import ancestor_data

    specs = []
    for entry in ancestor_data(model_dir) if model_dir is not None else []:
        spec = SourceSpec(**entry["spec"]) if isinstance(entry.get("spec"), dict) else SourceSpec(source=entry["source"])
        if spec.source.startswith("builtin:") or Path(spec.source.removeprefix("hf:")).exists():
            specs.append(spec)
        else:
            log(f"note: {spec.source} (trained on by an ancestor) is not on this machine: not tracked")
    return specs


def build_data(cfg, tokenizer, cache: Path, log=print, init: Init | None = None) -> TrainingData:
    from tunelab.data import source_content_hash, tokenize_source, tokenize_sources
    from tunelab.data.rows import ExampleRows, PairSet, packed_sequences
    from tunelab.runs import trained_sources

    init = init or resolve_init(cfg)
    eos = tokenizers.eos_id(tokenizer)
    fraction = cfg.data.eval_fraction
    # Sources the starting model or its ancestors trained on (content hash -> the eval_fraction they held out).
    seen = trained_sources(init.model_dir) if init.trained else {}
    for spec in cfg.data.train if seen else []:
        earlier = seen.get(source_content_hash(spec, cache, log=log), fraction)
        if earlier is not None and earlier < fraction:
            log(f"warning: {spec.source}: data.eval_fraction={fraction} is larger than the {earlier} an ancestor "
                f"held out, so part of this run's held-out text was trained on before; set data.eval_fraction<={earlier}")
    sources = tokenize_sources(cfg.data.train, tokenizer, eos, cache, fraction, log=log)
    fractions: dict = {}

    def old_data(spec, split: bool = False):
        """An old-data source: held out exactly as its ancestor held it out, so replay never trains on the
        text forgetting is measured on, and the step-0 score is the ancestor's own eval text. An eval-only
        source nobody trained on is scored whole (split=False); replay always splits."""
        digest = source_content_hash(spec, cache, log=log)
        src = tokenize_source(spec, tokenizer, eos, cache, seen.get(digest) or fraction, log=log,
                              split=split or digest in seen)
        fractions[src.domain] = seen.get(digest) or fraction
        return src

    replay = []
    if cfg.data.replay is not None:
        specs = cfg.data.replay.sources
        if not specs:
            taken = {s.domain for s in cfg.data.train} | {s.content_hash for s in sources}
            specs = [s for s in ancestor_specs(init.model_dir, log) if s.domain not in taken
                     and source_content_hash(s, cache, log=log) not in taken]
            if not specs:
                raise DataError(f"data.replay.sources: the starting model ({init.model_dir}) records no old data to "
                                "replay (no lineage.json with data, or only this run's own sources): list the sources")
            log("replaying the starting model's old data: " + ", ".join(s.source for s in specs))
        replay = [old_data(spec, split=True) for spec in specs]
    sets = []
    for src in sources + replay:
        if src.spec.format == "preference":  # pairs, batched by train/batches.py PreferenceBatches
            packed = PairSet(src.train, src.train_starts, src.train_mask, cfg.data.seq_len)
            for line in packed.describe(src.domain):
                log(line)
            if len(packed) == 0:
                raise DataError(f"{src.spec.source}: no preference pairs to train on (see the warnings above)")
            sets.append(packed)
            continue
        packed = packed_sequences(src.train, cfg.data.seq_len, eos, cfg.data.packing, src.train_mask,
                                  src.train_starts)
        if isinstance(packed, ExampleRows):
            for line in packed.describe(src.domain, cfg.data.packing):
                log(line)
        elif src.train_starts is not None:
            log(f"note: {src.domain}: packing concat joins chat examples into one stream, so attention crosses "
                "examples and an example can be cut across sequences; data.packing: document keeps each whole")
        if len(packed) == 0:
            what = "replay" if src in replay else "training"
            raise DataError(f"{src.spec.source}: only {len(src.train)} {what} tokens, fewer than one sequence "
                            f"(data.seq_len={cfg.data.seq_len}): add text or lower data.seq_len")
        sets.append(packed)
    # Every training source is scored on its own held-out split. An eval-only source is scored whole, unless
    # the starting model or one of its ancestors trained on it: then on its held-out split, so the model is
    # never scored on text it has seen and forgetting is measured on the same text as the ancestor's own eval.
    eval_only = [old_data(spec) for spec in cfg.data.eval]
    if cfg.data.eval_ancestors:
        known = {s.domain for s in sources + replay + eval_only}
        hashes = {s.content_hash for s in sources + replay + eval_only}
        for spec in ancestor_specs(init.model_dir, log=lambda *a: None):
            if spec.domain not in known and source_content_hash(spec, cache, log=log) not in hashes:
                eval_only.append(old_data(spec))
                known.add(spec.domain)
    pairs = {s.domain: PairSet(s.eval, s.eval_starts, s.eval_mask, cfg.data.seq_len) for s in sources
             if s.spec.format == "preference"}
    for domain, held in pairs.items():
        for line in held.describe(f"{domain} (held out)")[1:]:
            log(line)
    texts = [s for s in sources + replay + eval_only if s.domain not in pairs]
    splits = {s.domain: (s.eval, s.eval_mask) for s in texts}
    starts = {s.domain: s.eval_starts for s in texts if s.eval_starts is not None}
    for src in texts:  # held-out chat examples are scored whole: what cutting them costs
        if src.eval_starts is not None and len(src.eval_starts):
            warning = ExampleRows(src.eval, src.eval_starts, src.eval_mask, cfg.data.seq_len, eos).describe(
                f"{src.domain} (held out)", "document")[1:]
            for line in warning:
                log(line)
    roles = {s.domain: "target" for s in sources} | {s.domain: "reference" for s in replay + eval_only}
    return TrainingData(sets=sets, sources=sources, eval_sources=eval_only, eval_splits=splits, eval_starts=starts,
                        eval_pairs=pairs, replay_sources=replay, roles=roles, fractions=fractions)


def mixture_plan(cfg, data: TrainingData) -> tuple[list[float], list[tuple[int, list[float]]]]:
    """Weights of every set (training sources, then replay sources) at step 0, and the phase switches.

    Replay takes `data.replay.fraction` of every global batch whatever the phase; the training sources
    share the rest in proportion to their weights (data.train, changed by data.mixture_schedule).
    """
    train_weights = {s.domain: s.weight for s in cfg.data.train}
    replay_weights = [s.spec.weight for s in data.replay_sources]
    f = cfg.data.replay.fraction if data.replay_sources else 0.0

    def combined(weights: dict) -> list[float]:
        total = sum(weights.values())
        ours = [(1 - f) * w / total for w in weights.values()]
        return ours + [f * w / sum(replay_weights) for w in replay_weights]

    phases = []
    for phase in cfg.data.mixture_schedule:
        train_weights = train_weights | phase.weights
        phases.append((round(phase.at * cfg.train.max_steps), combined(train_weights)))
    return combined({s.domain: s.weight for s in cfg.data.train}), phases


def packed_batches(cfg, data: TrainingData, tokenizer, d, objective=None):
    """The default batch source: pairs for a preference source, else text windows labelled for `objective`
    (default: the recipe's, as the training stage creates it)."""
    from tunelab.data import Mixture
    from tunelab.objectives import create_objective
    from tunelab.train.batches import PackedBatches, PreferenceBatches

    objective = objective or create_objective(cfg.objective.name, cfg.objective.options)

    tc = cfg.train
    if any(s.spec.format == "preference" for s in data.sources):  # the recipe checks refuse mixing them with text
        return PreferenceBatches(sets=data.sets, micro=tc.micro_batch_size, accum=tc.grad_accum,
                                 pad_id=tokenizers.eos_id(tokenizer), rank=d.rank, world=d.world, seed=tc.seed)
    weights, phases = mixture_plan(cfg, data)
    mixture = Mixture([len(s) for s in data.sets], weights, tc.seed)
    return PackedBatches(sets=data.sets, mixture=mixture, objective=objective.labels, micro=tc.micro_batch_size,
                         domains=[s.domain for s in data.sources + data.replay_sources], phases=phases,
                         accum=tc.grad_accum, rank=d.rank, world=d.world, seed=tc.seed,
                         **(objective.masking(tokenizer) or {}))


def evaluator(cfg, data: TrainingData, tokenizer, device, objective) -> Callable:
    """`evaluate(model, step) -> {domain: {loss, ppl, bpb, eval_tokens}}` on every eval split."""
    from tunelab.eval.perplexity import evaluate_tokens, token_byte_lengths
    from tunelab.train.objectives import fixed_mlm_labeler
    from tunelab.train.precision import autocast_dtype

    tc = cfg.train
    byte_lengths = token_byte_lengths(tokenizer)
    masking = objective.masking(tokenizer)  # MLM: fixed masks per window, the same at every evaluation
    label_fn = None if masking is None else fixed_mlm_labeler(**masking)

    def evaluate(model, step: int) -> dict:
        from tunelab.eval.preference import evaluate_pairs

        pairs = {domain: evaluate_pairs(model, held, batch_size=tc.micro_batch_size, pad_id=tokenizers.eos_id(tokenizer),
                                        device=device, autocast_dtype=autocast_dtype(tc.precision),
                                        max_tokens=tc.eval_max_tokens, chunk_tokens=tc.loss_chunk_tokens)
                 for domain, held in data.eval_pairs.items()}
        return pairs | {domain: evaluate_tokens(model, tokens, cfg.data.seq_len, eos_id=tokenizers.eos_id(tokenizer),
                                        document_mask=cfg.data.packing != "concat", byte_lengths=byte_lengths,
                                        max_tokens=tc.eval_max_tokens, batch_size=tc.micro_batch_size, device=device,
                                        autocast_dtype=autocast_dtype(tc.precision), objective=objective.labels or "clm",
                                        label_fn=label_fn, loss_mask=mask, starts=data.eval_starts.get(domain),
                                        chunk_tokens=tc.loss_chunk_tokens)
                for domain, (tokens, mask) in data.eval_splits.items()}
    return evaluate
