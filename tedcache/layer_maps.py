"""Layer maps: which student layer learns from which cached teacher layer (`distill --layer-map`)."""

from __future__ import annotations

from .errors import TedcacheError

LAYER_MAP_RULES = ("auto", "interval", "copy", "provenance")  # and last:K


def map_layers(student_layers: list[int], cache_layers: list[int], layer_map: str, student_total: int,
               copied_from: list[int] | None = None, teacher_total: int | None = None) -> tuple[list[int], list[int]]:
    """Pair student layers with cached teacher layers; returns (student_layers, teacher_layers).

    "interval" (TED's rule applied to the cache): with m student layers and K cached layers, K a multiple
    of m, student layer j is paired with cached layer (j+1)*K/m - 1 (every (K/m)-th, ending at the last).
    For a student whose layers carry teacher layers (init-student's copy or prune; `copied_from[j]`: the
    teacher layer student layer j carries), "provenance" pairs student layer j with copied_from[j], and
    "copy" with the teacher layer whose output the next carried layer was trained to read
    (copied_from[j+1] - 1), the last student layer with the teacher's last layer. "last:K" pairs the
    student's last K layers with the teacher's last K (Minitron's finding for depth-cut students); it sets
    the student layers itself. Anything else is an explicit map "s:t,s:t" of 0-based student and teacher
    layers. "auto" is one of the rules: see auto_rule. With provenance, the student layers whose teacher
    layer is not cached are left out (see left_out)."""
    if layer_map == "auto":
        layer_map = auto_rule(student_layers, cache_layers, copied_from, teacher_total)
    if layer_map.startswith("last:"):
        count = layer_map[5:]
        if not count.isdigit() or not 0 < int(count) <= student_total or teacher_total is None \
                or int(count) > teacher_total:
            raise TedcacheError(f"--layer-map {layer_map}: give last:K with K from 1 to "
                                f"{min(student_total, teacher_total or student_total)} (the student's and the "
                                "teacher's layers)")
        k = int(count)
        return _cached(list(range(student_total - k, student_total)),
                       list(range(teacher_total - k, teacher_total)), cache_layers, layer_map)
    if layer_map in ("copy", "provenance"):
        if not copied_from or teacher_total is None:
            raise TedcacheError(f"--layer-map {layer_map} needs a student whose layers carry the teacher's (made by "
                                "tedcache init-student --init copy or prune, whose config records them); use "
                                "--layer-map interval, last:K or explicit pairs")
        if layer_map == "provenance":
            carried = [j for j in student_layers if copied_from[j] in cache_layers]
            return _cached(carried or student_layers, [copied_from[j] for j in carried or student_layers],
                           cache_layers, layer_map)
        wanted = [copied_from[j + 1] - 1 if j + 1 < len(copied_from) else teacher_total - 1 for j in student_layers]
        return _cached(student_layers, wanted, cache_layers, layer_map)
    if layer_map != "interval":
        try:
            pairs = [tuple(int(x) for x in item.split(":")) for item in layer_map.split(",") if item.strip()]
        except ValueError:
            pairs = []
        if not pairs or any(len(p) != 2 for p in pairs) or len({s for s, _ in pairs}) != len(pairs):
            raise TedcacheError(f"--layer-map '{layer_map}' is not interval, copy, provenance, last:K or a list "
                                "like 0:2,1:5 (distinct student layer:teacher layer pairs)")
        bad = [f"{s}:{t}" for s, t in pairs if not 0 <= s < student_total or t not in cache_layers]
        if bad:
            raise TedcacheError(f"--layer-map pairs {bad} do not fit: student layers are 0..{student_total - 1}, "
                                f"cached teacher layers are {cache_layers}")
        return [s for s, _ in pairs], [t for _, t in pairs]
    m, k = len(student_layers), len(cache_layers)
    if m > k or k % m:
        raise TedcacheError(f"cannot map {m} student layers {student_layers} onto the cache's {k} layers "
                            f"{cache_layers}; choose --student-layers so their count divides {k}, "
                            "or give --layer-map copy or s:t,...")
    step = k // m
    return student_layers, [cache_layers[(j + 1) * step - 1] for j in range(m)]


def auto_rule(student_layers: list[int], cache_layers: list[int], copied_from: list[int] | None,
              teacher_total: int | None) -> str:
    """What --layer-map auto stands for: TED's interval rule wherever it pairs every chosen student layer (the
    rule the evidence study measured); else, for a student that records the teacher layers it carries (a
    pruned full-depth student against a cache of a few layers), provenance over the carried cached layers."""
    m, k = len(student_layers), len(cache_layers)
    if (m <= k and k % m == 0) or not copied_from or teacher_total is None:
        return "interval"
    return "provenance"


def map_rule(layer_map: str, student_layers: list[int], cache_layers: list[int], copied_from: list[int] | None,
             teacher_total: int | None) -> str:
    """The rule a --layer-map value names ("auto" resolved; "explicit" for pairs)."""
    if layer_map == "auto":
        return auto_rule(student_layers, cache_layers, copied_from, teacher_total)
    return layer_map if layer_map in LAYER_MAP_RULES or layer_map.startswith("last:") else "explicit"


def describe_map(layer_map: str, rule: str, requested: list[int], pairs: dict[int, int],
                 copied_from: list[int] | None) -> str:
    """The log line of a run's map: the rule, why it was chosen, the pairs, and the student layers left out."""
    why = {"interval": "TED's rule: the chosen student layers spread over the cached ones",
           "provenance": "the student records the teacher layer each of its layers carries"}.get(rule, "as given")
    text = f"layer map {rule} ({'auto: ' if layer_map == 'auto' else ''}{why}), student -> teacher: {pairs}"
    left = [j for j in requested if j not in pairs]
    if left and copied_from:
        text += (f"; left out student layers {left} (they carry teacher layers {[copied_from[j] for j in left]}, "
                 "which the cache does not hold)")
    return text


def _cached(student_layers: list[int], wanted: list[int], cache_layers: list[int], layer_map: str):
    """(student_layers, wanted) when the cache holds every wanted teacher layer; else one line naming the
    --layers to extract."""
    missing = sorted(set(wanted) - set(cache_layers))
    if missing:
        raise TedcacheError(f"--layer-map {layer_map} pairs student layers {student_layers} with teacher layers "
                            f"{wanted}; the cache holds {cache_layers}: extract one with --layers "
                            f"{','.join(map(str, sorted(set(wanted) | set(cache_layers))))}")
    return student_layers, wanted
