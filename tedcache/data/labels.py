"""Label sets and label ids: class names from the data or the model, tags for token classification."""

from __future__ import annotations

import numpy as np

from ..errors import TedcacheError


def label_names_from_data(table, label_column: str) -> list[str]:
    """Label names for a classification set: ClassLabel names, sorted strings, or 0..max ints."""
    feature = table.features[label_column]
    if hasattr(feature, "names"):
        return list(feature.names)
    values = [v for v in table[label_column][:] if not missing_label(v)]  # (empty labels: see encode_labels)
    if all(isinstance(v, str) for v in values):
        return sorted(set(values))
    ints = np.asarray(values)
    if not np.issubdtype(ints.dtype, np.integer) or ints.min() < 0:
        raise TedcacheError(f"column '{label_column}' holds {ints.dtype} values; classification labels "
                            "must be class names or integers 0..K-1 (use --task regression for numbers)")
    return [str(i) for i in range(int(ints.max()) + 1)]


def missing_label(value) -> bool:
    return value is None or value == "" or (isinstance(value, float) and np.isnan(value))


def encode_labels(table, label_column: str, task: str, label_names: list[str] | None, source: str,
                  allow_missing: bool = False) -> np.ndarray:
    """Labels as class ids (classification) or float targets (regression), checked against the label set.
    With `allow_missing` (training data for a cache), an empty label marks an unlabelled example: -1
    (classification) or NaN (regression)."""
    values = table[label_column][:]
    missing = np.asarray([missing_label(v) for v in values], dtype=bool)
    if missing.any() and not allow_missing:
        raise TedcacheError(f"{source}: column '{label_column}' has empty labels; drop those rows or fill them in")
    if missing.any():
        known = encode_labels(table.select(np.flatnonzero(~missing)), label_column, task, label_names, source) \
            if not missing.all() else np.zeros(0)
        filled = np.full(len(values), np.nan if task == "regression" else -1,
                         dtype=np.float32 if task == "regression" else np.int64)
        filled[~missing] = known
        return filled
    if task == "regression":
        try:
            return np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise TedcacheError(f"{source}: column '{label_column}' is not numeric; regression needs numbers") from exc
    assert label_names is not None
    if all(isinstance(v, str) for v in values):
        index = {name: i for i, name in enumerate(label_names)}
        unknown = sorted({v for v in values if v not in index})
        if unknown:
            raise TedcacheError(f"{source}: labels {unknown[:5]} are outside the label set {label_names}; "
                                "fix the labels or use a model trained on this label set")
        return np.asarray([index[v] for v in values], dtype=np.int64)
    ids = np.asarray(values)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TedcacheError(f"{source}: column '{label_column}' holds {ids.dtype} values; classification labels "
                            "must be class names or integers 0..K-1")
    bad = sorted({int(v) for v in ids if not 0 <= v < len(label_names)})
    if bad:
        raise TedcacheError(f"{source}: labels {bad[:5]} are outside the label set 0..{len(label_names) - 1}; "
                            "fix the labels or use a model with that many labels")
    return ids.astype(np.int64)


def resolve_label_names(table, label_column: str, model_config) -> list[str]:
    """The label set: the model's own names when the data uses them, else names from the data,
    checked against the model's number of labels."""
    num_labels = model_config.num_labels if model_config is not None else None
    model_names = [model_config.id2label[i] for i in range(num_labels)] if num_labels else None
    values = [v for v in table[label_column][:] if not missing_label(v)]
    if model_names and (not values or all(isinstance(v, str) for v in values) and set(values) <= set(model_names)):
        return model_names
    names = label_names_from_data(table, label_column)
    if num_labels is None:
        return names
    if all(n.isdigit() for n in names):  # integer labels: encode_labels checks the range
        return model_names if not generic_names(model_names) else [str(i) for i in range(num_labels)]
    if len(names) != num_labels:
        raise TedcacheError(f"the data has {len(names)} labels {names[:5]} but the model has {num_labels}; "
                            "fine-tune a model on this label set first (tedcache finetune)")
    return names


def generic_names(names: list[str]) -> bool:
    return all(n == f"LABEL_{i}" for i, n in enumerate(names))


def tag_names(table, tag_column: str | None, model_config, source: str) -> list[str]:
    """Token-classification label set: the model's names when the data's tags are among them, else the
    data's tags sorted (an untrained head's generic LABEL_i names are not a label set)."""
    num_labels = model_config.num_labels if model_config is not None else None
    model_names = [model_config.id2label[i] for i in range(num_labels)] if num_labels else None
    if tag_column is None:
        if model_names is None or generic_names(model_names):
            raise TedcacheError(f"{source} has no tags and the model names no labels; give tagged training data")
        return model_names
    seen = sorted({t for row in table[tag_column] for t in row or []})
    if any(not isinstance(t, str) for t in seen):
        raise TedcacheError(f"{source}: column '{tag_column}' must hold lists of tag names (strings)")
    if model_names and not generic_names(model_names) and set(seen) <= set(model_names):
        return model_names
    if model_names and not generic_names(model_names):
        raise TedcacheError(f"{source}: tags {sorted(set(seen) - set(model_names))[:5]} are outside the model's "
                            f"label set {model_names[:8]}; fix the tags or fine-tune a model on them")
    return seen
