"""Tables of the suites' results: number formats, method labels, markdown, same-run ratios, and
the JSON form of a result document (every function takes plain dicts, as stored)."""

from __future__ import annotations

import json
import math
import os
import re

# Display names (methods without an entry keep their registry name).
LABELS = {
    "vpcce_triton": "ours (default)",
    "vpcce_triton_gif": "ours grad_in_forward",
    "vpcce_triton_memory": "ours memory-first",
    "vpcce_triton_exact": "ours triton_exact",
    "vpcce_triton_dense": "ours dense dC",
    "vpcce_triton_auto": "ours memory-first, adaptive skip",
    "vpcce_triton_filter": "ours skip 2^-12",
    "vpcce_triton_filter14": "ours skip 2^-14",
    "vpcce_torch": "ours (torch path)",
    "vpcce_torch_gif": "ours (torch path) grad_in_forward",
    "vpcce_torch_memory": "ours (torch path) memory-first",
    "torch_compile": "torch.compile",
    "torch_eager": "torch eager",
    "torch_linear_ce": "torch F.linear_cross_entropy",
    "liger": "Liger FLCE",
    "apple_cce": "Apple CCE",
    "apple_cce_exact": "Apple CCE exact",
    "megatron_fused": "Megatron fused CE",
    "cublas_3x": "3 cuBLAS products",
    "cublas_4x": "4 cuBLAS products",
}


def label(method: str) -> str:
    """The display name of a method; a Tuning variant 'name[spec]' keeps its spec."""
    base, _, rest = method.partition("[")
    return LABELS.get(base, base) + (f" [{rest}" if rest else "")


def num(x) -> float | None:
    """A finite float, or None (JSON keeps NaN as the string 'nan')."""
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
        return float(x)
    return None


def fmt(x, spec: str = ".1f") -> str:
    """`x` formatted, '–' for None / NaN; strings as they are."""
    if isinstance(x, str):
        return "–" if x == "nan" else x
    x = num(x)
    return "–" if x is None else format(x, spec)


def short_error(err: BaseException, limit: int = 300) -> str:
    """An exception as one table cell: 'Type: message', newlines folded, cut to `limit` characters."""
    s = f"{type(err).__name__}: {err}".replace("\n", " ")
    return s if len(s) <= limit else s[:limit] + "…"


def md_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return out


def shape_label(shape) -> str:
    return "×".join(str(x) for x in shape)


def add_ratio(rows: list[dict], value_key: str, out_key: str, base_method: str, group) -> None:
    """rows[i][out_key] = its value / the value of the `base_method` row of the same group(row)
    (None where either is missing): the same-run ratios of the tables."""
    base = {group(r): num(r.get(value_key)) for r in rows if r.get("method") == base_method}
    for r in rows:
        v, b = num(r.get(value_key)), base.get(group(r))
        r[out_key] = v / b if v is not None and b else None


def concat_docs(docs: list[dict], keys: tuple[str, ...]) -> dict:
    """Several result documents of one suite as one: the first's fields, the lists `keys` joined."""
    out = dict(docs[0])
    for key in keys:
        out[key] = [x for d in docs for x in d.get(key, [])]
    out["merged_from"] = [d.get("command", "") for d in docs]
    out["seconds"] = sum(d.get("seconds", 0) or 0 for d in docs)
    return out


def status(rec: dict) -> str:
    """'' for a measured row, else 'skipped: …' / 'ERROR …' (what a table shows instead)."""
    if "skipped" in rec:
        return f"skipped: {rec['skipped']}"
    errs = rec.get("errors") or {}
    return "ERROR " + "; ".join(f"{k}: {v}" for k, v in errs.items()) if errs else ""


# ----------------------------------------------------------------------------------------------
# the JSON form
# ----------------------------------------------------------------------------------------------
def jsonable(x, digits: int | None = None):
    """`x` for json.dump: tensors dropped, non-finite floats as strings ('nan', 'inf'), and with
    `digits` every float to that many significant digits."""
    if isinstance(x, dict):
        return {k: jsonable(v, digits) for k, v in x.items() if type(v).__name__ != "Tensor"}
    if isinstance(x, (list, tuple)):
        return [jsonable(v, digits) for v in x]
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return x if digits is None else float(f"{x:.{digits}g}")
    return x


_NUMBER_LIST = re.compile(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]")


def dumps(doc, digits: int | None = None) -> str:
    """The document as indented JSON with lists of numbers on one line (per-round times, per-step
    losses stay readable and small); floats to `digits` significant digits where given."""
    text = json.dumps(jsonable(doc, digits), indent=1, ensure_ascii=False)
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)


def save_json(doc, path: str, digits: int | None = None) -> None:
    """Write `dumps(doc, digits)` to `path` atomically (a reader never sees half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(dumps(doc, digits) + "\n")
    os.replace(tmp, path)
