"""Read prompt rows from disk with `datasets` and check each one (L1).

Owns: format detection, loading jsonl / json / parquet / `save_to_disk` directories and Hub dataset ids
("org/name", from the local cache when HF_HUB_OFFLINE is set), and running the row
checks (rows.py) over a file: a malformed row is an error naming the file, the row and the key, or is
skipped and counted when the config says `on_bad_row: skip`. Tokenisation lives in dataset.py.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional

from megatron_gift.data.config import PromptDataConfig
from megatron_gift.hf.hub import hub_offline, is_hub_id, snapshot_dir
from megatron_gift.data.rows import PromptDataError, RawPrompt, bad_row_reason, check_row
from megatron_gift.utils.dataclass_dict import nearest

logger = logging.getLogger(__name__)

_SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


@dataclass
class LoadStats:
    """What happened to the rows of one file; `bad_rows` maps a reason to its count."""

    rows_read: int = 0
    rows_kept: int = 0
    bad_rows: dict[str, int] = field(default_factory=dict)
    too_long: int = 0

    @property
    def rows_skipped(self) -> int:
        return sum(self.bad_rows.values())

    def count_bad(self, reason: str) -> None:
        self.bad_rows[reason] = self.bad_rows.get(reason, 0) + 1


def detect_format(path: str, fmt: str = "auto") -> str:
    """The concrete format of `path`; errors name the path and the formats understood."""
    if fmt != "auto":
        return fmt
    if os.path.isdir(path):
        return "arrow-dir"
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _SUFFIX_FORMATS:
        raise PromptDataError(f"{path}: cannot tell the format from suffix {suffix!r}; set 'format' to one of "
                              f"jsonl, json, parquet, arrow-dir")
    return _SUFFIX_FORMATS[suffix]


def load_rows(config: PromptDataConfig, stats: LoadStats):
    """The file's rows as a `datasets.Dataset` (rows are dicts); unreadable JSON lines follow on_bad_row."""
    import datasets  # heavy import, only where data is actually read

    path = config.path
    if not os.path.exists(path):
        if is_hub_id(path) and os.path.splitext(path)[1].lower() not in _SUFFIX_FORMATS:
            return load_hub_dataset(path, config.split)
        raise PromptDataError(f"prompt data file not found: {path}")
    fmt = detect_format(path, config.format)
    datasets.disable_progress_bars()
    if fmt == "arrow-dir":
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if config.split not in loaded:
                raise PromptDataError(f"{path}: no split {config.split!r} (splits: {', '.join(loaded)})")
            loaded = loaded[config.split]
        return loaded
    builder = "parquet" if fmt == "parquet" else "json"
    try:
        return datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as exc:  # datasets wraps pyarrow parse errors; find the offending line ourselves
        if fmt != "jsonl":
            raise PromptDataError(f"{path}: cannot read as {fmt}: {exc}") from exc
        return datasets.Dataset.from_list(_read_jsonl_lines(path, config.on_bad_row, stats))


def load_hub_dataset(repo_id: str, split: str):
    """A Hub dataset id ("org/name") through `datasets`: online, load_dataset(repo_id); offline, the repo's
    snapshot in the huggingface_hub cache (HF_HOME), else what load_dataset cached before."""
    import datasets

    if not hub_offline():
        return datasets.load_dataset(repo_id, split=split)
    try:
        local = snapshot_dir(repo_id, "prompt data path", repo_type="dataset")
    except ValueError as missing:
        try:
            return datasets.load_dataset(repo_id, split=split)
        except Exception:
            raise PromptDataError(str(missing)) from None
    try:
        return datasets.load_dataset(local, split=split)
    except ValueError as exc:  # e.g. an unknown split
        raise PromptDataError(f"{repo_id} (cached at {local}): {exc}") from exc


def _read_jsonl_lines(path: str, on_bad_row: str, stats: LoadStats) -> list[dict]:
    """Parse a jsonl file line by line so a syntax error names its line (1-based) or is skipped."""
    rows: list[dict] = []
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(f"not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1})") from None
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            except ValueError as exc:
                if on_bad_row == "error":
                    raise PromptDataError(f"{path}: line {line_no}: invalid JSON row: {exc}") from exc
                stats.rows_read += 1
                stats.count_bad("invalid_json")
                continue
            rows.append(row)
    # Rows with inconsistent column sets still load: missing keys become None and are caught per row.
    keys = sorted({k for r in rows for k in r})
    return [{k: r.get(k) for k in keys} for r in rows]


def check_rows(rows: Iterable[dict], config: PromptDataConfig, stats: LoadStats) -> list[RawPrompt]:
    """All valid rows of a file; a bad row raises (naming file and row) or is counted by reason."""
    kept: list[RawPrompt] = []
    for index, row in enumerate(rows):
        stats.rows_read += 1
        try:
            kept.append(check_row(row, index, config))
        except PromptDataError as exc:
            if config.on_bad_row == "error":
                raise PromptDataError(f"{config.path}: {exc}") from None
            stats.count_bad(bad_row_reason(exc))
    if stats.bad_rows:
        logger.warning("%s: skipped %d malformed rows (%s)", config.path, stats.rows_skipped,
                       ", ".join(f"{k}={v}" for k, v in sorted(stats.bad_rows.items())))
    return kept


def load_raw_prompts(config: PromptDataConfig,
                     stats: Optional[LoadStats] = None) -> tuple[list[RawPrompt], LoadStats]:
    """Read and validate the prompt file of `config`."""
    stats = stats if stats is not None else LoadStats()
    rows = load_rows(config, stats)
    missing = [k for k in [config.prompt_key] if k not in rows.column_names
               and k.split(".")[0] not in rows.column_names]
    if missing:
        raise PromptDataError(f"{config.path}: no column {missing[0]!r} in any row"
                              f"{nearest(missing[0], rows.column_names)} (columns: {', '.join(rows.column_names)})")
    try:
        prompts = check_rows(rows, config, stats)
    except UnicodeDecodeError as exc:  # pyarrow's JSON reader keeps invalid UTF-8; decoding a row fails later
        raise PromptDataError(f"{config.path}: {_first_non_utf8(config.path) or 'not UTF-8 text'}: {exc}") from None
    stats.rows_kept = len(prompts)
    return prompts, stats


def _first_non_utf8(path: str) -> Optional[str]:
    """'line N: not UTF-8 text' for the first line of a file that does not decode, or None."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return f"line {line_no}: not UTF-8 text"
    return None
