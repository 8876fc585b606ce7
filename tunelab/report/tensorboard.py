"""metrics.jsonl -> TensorBoard scalars (`tunelab report ... --tensorboard DIR`), when tensorboard is installed.

A conversion after the fact rather than a writer in the training loop: the loop stays as it is,
any finished or running run can be exported, and tensorboard stays an optional extra
(`pip install 'tunelab[tensorboard]'`). Uses tensorboard's own event writer, so neither torch nor
TensorFlow is needed. Re-exporting a run replaces the files an earlier export wrote.
"""

from __future__ import annotations

import math
from pathlib import Path

SUFFIX = ".tunelab"  # our event files, so a re-export replaces them and leaves any other file alone
TRAIN_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "tokens")
EVAL_KEYS = ("loss", "bpb", "ppl", "delta_from_start", "bpb_delta_from_start")


def export(runs, logdir, warn) -> Path | None:
    try:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        warn("tensorboard is not installed (pip install 'tunelab[tensorboard]' or pip install tensorboard): "
             "no TensorBoard logs written")
        return None
    from tunelab.report.collect import expand, load

    logdir = Path(logdir).expanduser()
    paths, _ = expand(list(runs))
    for entry in load(paths, warn):
        if not entry.has_metrics:
            continue
        where = logdir / entry.label
        where.mkdir(parents=True, exist_ok=True)
        for old in where.glob(f"events.out.tfevents.*{SUFFIX}"):
            old.unlink()
        writer = EventFileWriter(str(where), filename_suffix=SUFFIX)

        def scalar(tag: str, value, event: dict) -> None:
            if isinstance(value, (int, float)) and math.isfinite(value):
                summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value))])
                writer.add_event(Event(wall_time=float(event.get("time", 0.0)), step=int(event["step"]), summary=summary))

        for event in entry.events:
            if "step" not in event:
                continue
            if event.get("event") == "train":
                for key in TRAIN_KEYS:
                    scalar(f"train/{key}", event.get(key), event)
            elif event.get("event") == "eval" and "domain" in event:
                for key in EVAL_KEYS:
                    scalar(f"eval/{event['domain']}/{key}", event.get(key), event)
        writer.close()
    return logdir
