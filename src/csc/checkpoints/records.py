"""Run records beside the checkpoints: one JSON file per start of a run
(``checkpoints/csc-extras/2d_unet_run-20260102T030405Z.json``), never overwritten, so a
resumed run keeps the record of every start (docs/training.md#reproducibility).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from csc.checkpoints.reading import best_path, template_files
from csc.storage import write_text_atomic

RECORD = "{model_name}_run-{stamp}.json"  # in csc-extras, beside `best`
STAMP = "%Y%m%dT%H%M%SZ"  # UTC, sorts by time


def records_folder(template: str, model_name: str) -> Path:
    """csc's folder beside the model files (where `best` and the training states are)."""
    return best_path(template, model_name).parent


def run_records(template: str, model_name: str) -> list[Path]:
    """The run records of `model_name`, oldest first (``X-2`` after ``X``)."""
    name = RECORD.format(model_name=model_name, stamp="{stamp}")
    search = str(records_folder(template, model_name) / name)
    found = template_files(search, {"stamp": r"[0-9]{8}T[0-9]{6}Z(?:-[0-9]+)?"})
    return [path for _, path in sorted(found, key=lambda item: _order(item[0]["stamp"]))]


def _order(stamp: str) -> tuple[str, int]:
    """A stamp's place in time: its UTC time, then its count within that second."""
    time, _, count = stamp.partition("-")
    return time, int(count or 1)


def save_run_record(record: Mapping[str, Any], *, template: str, model_name: str) -> Path:
    """Write `record` as JSON into a new file named by the UTC time (``-2``, ``-3`` added
    when that name is taken); return its path."""
    folder = records_folder(template, model_name)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime(STAMP)
    path, count = folder / RECORD.format(model_name=model_name, stamp=stamp), 1
    while path.exists():
        count += 1
        path = folder / RECORD.format(model_name=model_name, stamp=f"{stamp}-{count}")
    write_text_atomic(path, record_json(record))
    return path


def record_json(record: Mapping[str, Any]) -> str:
    """The record as indented JSON; anything JSON cannot hold becomes its string."""
    return json.dumps(record, indent=2, default=str)
