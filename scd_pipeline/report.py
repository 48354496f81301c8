"""The report stage (``scd-pipeline report``): one page comparing the teacher, the SFT student and
every distilled student, with the plots that explain the SCD run.

Reads only artifacts under ``results/{task}/`` and writes, beside them, ``report.md`` (plain
Markdown for a terminal), ``report.html`` (self-contained: PNGs embedded as base64, inline CSS),
``summary.csv`` (one row per model) and ``plots/*.png`` (matplotlib, Agg canvas).

Which evaluation is which row (names as ``naming.default_eval_name`` derives them from a path):

- Teacher (T*): ``eval/teacher-ckpt-{k}.json`` for k = ``best_index`` of ``teacher/checkpoints.json``
  (the checkpoint with the best validation metric), i.e. ``evaluate --model teacher/ckpt-{k}``.
- SFT student: ``eval/student_sft.json``.
- Distilled students: ``eval/{name}.json`` for every method string of config ``distill.methods``
  and every other directory under ``students/`` (``students/td+paced`` -> ``eval/td_paced.json``).
- Any other ``eval/*.json`` (e.g. a base model) is listed as "other" (never "best student");
  evaluations of non-best teacher checkpoints appear on the teacher checkpoint plot instead.

A row whose evaluation is missing stays in the table as "not run", with the command that produces
it; a plot whose input is missing is listed with the reason. The best student is the student row
(SFT or distilled) with the highest primary metric (``sft.val_metric``: accuracy for choice tasks,
exact F1 for list tasks), ties broken by the other metrics in table order; rows still tied are all
marked best. The gap to the teacher is ``student - teacher`` per metric (negative: below T*).
"""

from __future__ import annotations

import base64
import html
import math
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from scd_pipeline.config import task_dir, write_effective_config
from scd_pipeline.errors import DataError
from scd_pipeline.io import atomic_dir, atomic_path, read_json
from scd_pipeline.methods import method_label
from scd_pipeline.metrics import CHOICE_METRICS, LIST_METRICS, primary_metric
from scd_pipeline.naming import default_eval_name

METRIC_LABELS = {"accuracy": "Accuracy", "kappa": "Kappa", "macro_f1": "Macro-F1",
                 "exact_f1": "Exact F1", "partial_f1": "Partial F1"}
STUDENT_ROLES = ("sft", "distilled")
TEACHER_PLOT = "teacher_checkpoints.png"
SHARES_PLOT = "subdomain_shares.png"
AW_PLOT = "aw_histogram.png"


# --- which models, which files -------------------------------------------------------------------

@dataclass
class ModelRow:
    """One row of the results table: a model, its evaluation (or why there is none)."""

    label: str
    role: str  # teacher | sft | distilled | other
    eval_name: str
    result: dict | None = None
    missing: str | None = None  # why ``result`` is None, with the command that fixes it
    model_dir: Path | None = None  # the evaluated model's directory, when the pipeline knows it


def teacher_eval_name(best_index: int) -> str:
    """Eval name of T*: what ``evaluate --model teacher/ckpt-{k}`` writes (``teacher-ckpt-{k}``)."""
    return default_eval_name(Path("teacher") / f"ckpt-{best_index}")


def student_eval_name(name: str) -> str:
    """Eval name of a distilled student: what ``evaluate --model students/{name}`` writes."""
    return default_eval_name(Path("students") / name)


def read_eval(path: Path) -> dict:
    """An ``eval/{name}.json`` written by ``evaluate``; a one-line DataError if it is not one."""
    try:
        record = read_json(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable evaluation result ({exc.__class__.__name__}); "
                        "re-run `scd-pipeline evaluate` for it") from exc
    if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
        raise DataError(f"{path}: not an evaluation result (no 'metrics' mapping); re-run "
                        "`scd-pipeline evaluate` for it")
    return record


def _quoted(value: str | Path) -> str:
    """A path or name as the user would type it in a shell (quoted only when needed)."""
    return shlex.quote(str(value))


def _attach(row: ModelRow, eval_dir: Path, when_missing: str) -> ModelRow:
    """Fill ``row.result`` from ``eval/{eval_name}.json``, or ``row.missing`` when it is absent."""
    path = eval_dir / f"{row.eval_name}.json"
    if path.is_file():
        row.result = read_eval(path)
    else:
        row.missing = when_missing
    return row


def student_names(config: dict, root: Path) -> list[str]:
    """Distilled students: config ``distill.methods`` in order, then other ``students/*`` dirs."""
    names = list(config.get("distill", {}).get("methods", []))
    students_dir = root / "students"
    if students_dir.is_dir():
        names += sorted(p.name for p in students_dir.iterdir()
                        if p.is_dir() and not p.name.startswith(".") and p.name not in names)
    return names


def model_rows(config: dict, root: Path, best_index: int | None) -> list[ModelRow]:
    """Teacher (T*), SFT student, distilled students, then other evaluations, with their results."""
    eval_dir = root / "eval"
    rows: list[ModelRow] = []
    if best_index is None:
        rows.append(ModelRow("Teacher (T*)", "teacher", "",
                             missing=f"{root / 'teacher' / 'checkpoints.json'} not found, so T* is "
                             "unknown (run `scd-pipeline sft --role teacher`)"))
    else:
        rows.append(_attach(ModelRow(f"Teacher (T* = ckpt-{best_index})", "teacher",
                                     teacher_eval_name(best_index),
                                     model_dir=root / "teacher" / f"ckpt-{best_index}"), eval_dir,
                            f"run `scd-pipeline evaluate --model {_quoted(root / 'teacher' / f'ckpt-{best_index}')}`"))
    rows.append(_attach(ModelRow("SFT student", "sft", "student_sft", model_dir=root / "student_sft"), eval_dir,
                        f"run `scd-pipeline evaluate --model {_quoted(root / 'student_sft')}`"
                        if (root / "student_sft").is_dir() else
                        "run `scd-pipeline sft --role student`, then `scd-pipeline evaluate "
                        f"--model {_quoted(root / 'student_sft')}`"))
    seen = {row.eval_name for row in rows}
    for name in student_names(config, root):
        eval_name = student_eval_name(name)
        if eval_name in seen:
            continue
        seen.add(eval_name)
        model_dir = root / "students" / name
        command = f"`scd-pipeline evaluate --model {_quoted(model_dir)}`"
        rows.append(_attach(ModelRow(method_label(name), "distilled", eval_name, model_dir=model_dir), eval_dir,
                            f"run {command}" if model_dir.is_dir() else
                            f"run `scd-pipeline distill --method {_quoted(name)}`, then {command}"))
    if eval_dir.is_dir():
        for path in sorted(eval_dir.glob("*.json")):
            name = path.stem
            if name in seen or re.fullmatch(r"teacher-ckpt-\d+", name):
                continue
            rows.append(ModelRow(name, "other", name, result=read_eval(path)))
    return rows


def teacher_checkpoint_evals(eval_dir: Path) -> dict[int, dict]:
    """``{k: eval json}`` for every evaluated teacher checkpoint ``eval/teacher-ckpt-{k}.json``."""
    found = {}
    for path in sorted(eval_dir.glob("teacher-ckpt-*.json")) if eval_dir.is_dir() else []:
        match = re.fullmatch(r"teacher-ckpt-(\d+)", path.stem)
        if match:
            found[int(match.group(1))] = read_eval(path)
    return found


def task_kind(config: dict, root: Path, rows: Sequence[ModelRow]) -> str:
    """``choice`` or ``list``: from the evaluations, else the data manifest, else the task name."""
    for row in rows:
        if row.result is not None and row.result.get("kind") in ("choice", "list"):
            return row.result["kind"]
    manifest = root / "data" / "manifest.json"
    if manifest.is_file() and read_json(manifest).get("kind") in ("choice", "list"):
        return read_json(manifest)["kind"]
    if config["task"] == "custom":
        return config["data"]["custom"]["kind"]
    return "list" if config["task"] == "nrner" else "choice"


def metric_names(kind: str) -> tuple[str, ...]:
    return CHOICE_METRICS if kind == "choice" else LIST_METRICS


# --- the results table ---------------------------------------------------------------------------

def _number(value: Any) -> float:
    """A metric as float; None (undefined, written as null by evaluate) becomes NaN."""
    return float("nan") if value is None else float(value)


def results_frame(rows: Sequence[ModelRow], metrics: Sequence[str], primary: str) -> pd.DataFrame:
    """One row per model (the content of summary.csv).

    Columns: ``model, role, eval_name, status`` (ok / not run), ``split, n``, each metric,
    ``loss`` (mean gold NLL), ``gap_{metric}`` (row - teacher; empty for the teacher and rows
    without results) and ``best`` (the best student, see the module docstring).
    """
    records = []
    for row in rows:
        values = row.result["metrics"] if row.result else {}
        records.append({"model": row.label, "role": row.role, "eval_name": row.eval_name,
                        "status": "ok" if row.result else "not run",
                        "split": row.result.get("split") if row.result else None,
                        "n": row.result.get("n") if row.result else None,
                        **{m: _number(values.get(m)) for m in metrics},
                        "loss": _number(values.get("loss"))})
    frame = pd.DataFrame.from_records(records)
    frame["n"] = frame["n"].astype("Int64")
    teacher = frame[(frame["role"] == "teacher") & (frame["status"] == "ok")]
    for metric in metrics:
        reference = teacher[metric].iloc[0] if len(teacher) else float("nan")
        gap = frame[metric] - reference
        frame[f"gap_{metric}"] = gap.where(frame["role"] != "teacher")
    frame["best"] = best_student_mask(frame, [primary, *[m for m in metrics if m != primary]])
    return frame


def best_student_mask(frame: pd.DataFrame, metric_order: Sequence[str]) -> pd.Series:
    """True for the student row(s) with the lexicographically highest metrics (NaN = lowest)."""
    candidates = frame[frame["role"].isin(STUDENT_ROLES) & (frame["status"] == "ok")]
    if candidates.empty:
        return pd.Series(False, index=frame.index)
    keys = {i: tuple(-math.inf if math.isnan(v) else v for v in candidates.loc[i, list(metric_order)])
            for i in candidates.index}
    top = max(keys.values())
    return pd.Series([keys.get(i) == top for i in frame.index], index=frame.index)


def per_tag_frame(rows: Sequence[ModelRow], metric: str) -> pd.DataFrame:
    """Models (rows with results) x tags: the per-tag ``metric`` from each eval's ``per_tag``."""
    evaluated = [row for row in rows if row.result]
    tags = sorted({tag for row in evaluated for tag in row.result.get("per_tag", {})})
    data = {tag: [_number(row.result.get("per_tag", {}).get(tag, {}).get(metric)) for row in evaluated]
            for tag in tags}
    return pd.DataFrame(data, index=[row.label for row in evaluated], columns=tags)


def tag_sizes(rows: Sequence[ModelRow]) -> dict[str, int]:
    """Samples per tag, from the first evaluation that lists the tag."""
    sizes: dict[str, int] = {}
    for row in rows:
        for tag, values in (row.result or {}).get("per_tag", {}).items():
            sizes.setdefault(tag, values.get("n"))
    return sizes


# --- other artifacts -----------------------------------------------------------------------------

def read_teacher_checkpoints(root: Path) -> dict | None:
    """``teacher/checkpoints.json`` (None if absent; a one-line DataError if unusable)."""
    from scd_pipeline.checkpoints import read_checkpoints

    if not (root / "teacher" / "checkpoints.json").is_file():
        return None
    return read_checkpoints(root / "teacher")


def read_schedule(path: Path) -> list[dict]:
    """Phases of a ``students/{name}/schedule.json`` (written by ``distill.schedule_record``) as
    ``{"phase", "checkpoint", "candidates"}``.

    ``checkpoint`` is a teacher checkpoint index, or ``"average"`` (CD with ``cd_mode: average``).
    ``candidates`` holds, for SCD, one record per checkpoint as ``schedules.scd_choose`` returns it
    (``checkpoint, kl_best_to_c, kl_student_to_c, sum``) and is empty otherwise. The only place
    that knows the file's layout: adjust it here if distill's format changes.
    """
    try:
        phases = read_json(path)["phases"]
        out = [{"phase": int(phase["phase"]), "checkpoint": _checkpoint_id(phase["checkpoint"]),
                "candidates": [{**c, "checkpoint": int(c["checkpoint"])} for c in phase.get("candidates", [])]}
               for phase in phases]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a schedule.json with phases[].phase/checkpoint "
                        f"({exc.__class__.__name__}: {exc}); re-run `scd-pipeline distill`") from exc
    return out


def _checkpoint_id(value: Any) -> int | str:
    return value if value == "average" else int(value)


def checkpoint_label(checkpoint: int | str) -> str:
    """``ckpt-3``, or ``average`` for CD's logit average of all checkpoints."""
    return "average" if checkpoint == "average" else f"ckpt-{checkpoint}"


def chosen_terms(phases: Sequence[dict]) -> pd.DataFrame:
    """Per SCD phase: the chosen checkpoint and its two KL terms and their sum."""
    records = []
    for phase in phases:
        match = [c for c in phase["candidates"] if c["checkpoint"] == phase["checkpoint"]]
        if not match:
            continue
        term = match[0]
        records.append({"phase": phase["phase"], "checkpoint": phase["checkpoint"],
                        "kl_best_to_c": float(term["kl_best_to_c"]),
                        "kl_student_to_c": float(term["kl_student_to_c"]),
                        "sum": float(term["kl_best_to_c"]) + float(term["kl_student_to_c"])})
    return pd.DataFrame.from_records(
        records, columns=["phase", "checkpoint", "kl_best_to_c", "kl_student_to_c", "sum"])


def read_subdomains(root: Path) -> tuple[dict | None, pd.DataFrame | None]:
    """``subdomains.json`` and ``subdomains.parquet`` (each None when absent)."""
    summary_path, table_path = root / "subdomains.json", root / "subdomains.parquet"
    summary = read_json(summary_path) if summary_path.is_file() else None
    table = pd.read_parquet(table_path) if table_path.is_file() else None
    return summary, table


def sfs_shares(summary: dict | None, table: pd.DataFrame | None) -> pd.DataFrame | None:
    """Per tag (and ``all``): samples and SFS share, from the per-sample table, else the summary."""
    if table is not None and {"tag", "sfs"} <= set(table.columns):
        groups = table.groupby("tag", sort=True)["sfs"]
        shares = pd.DataFrame({"samples": groups.size(), "sfs_share": groups.mean()})
        shares.loc["all"] = [len(table), table["sfs"].mean()]
    elif summary is not None and "per_tag" in summary:
        shares = pd.DataFrame({"samples": [v["samples"] for v in summary["per_tag"].values()],
                               "sfs_share": [v["sfs_share"] for v in summary["per_tag"].values()]},
                              index=list(summary["per_tag"]))
        shares.loc["all"] = [summary["samples"], summary["sfs_share"]]
    else:
        return None
    shares["samples"] = shares["samples"].astype(int)
    shares.index.name = "tag"
    return shares


# --- plots (matplotlib Figure on an Agg canvas: no global pyplot state) --------------------------

def _figure(width: float, height: float, rows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 1, squeeze=False)[:, 0]
    return figure, axes


def plot_teacher_checkpoints(checkpoints: dict, best: int, test_metric: dict[int, float],
                             metric_label: str, path: Path) -> None:
    """Validation metric per teacher checkpoint (T* = ``best`` starred), val loss on a second axis,
    and the test metric of checkpoints that were evaluated."""
    entries = sorted(checkpoints["checkpoints"], key=lambda e: int(e["index"]))
    index = [int(e["index"]) for e in entries]
    figure, (axis,) = _figure(6.4, 3.8)
    axis.plot(index, [_number(e.get("val_metric")) for e in entries], "o-", color="tab:blue",
              label=f"val {checkpoints.get('metric', 'metric')}")
    if test_metric:
        tested = sorted(test_metric)
        axis.plot(tested, [test_metric[k] for k in tested], "s", color="tab:green", label=f"test {metric_label}")
    best_value = _number(next(e for e in entries if int(e["index"]) == best).get("val_metric"))
    axis.plot([best], [best_value], "*", markersize=18, color="tab:red", label=f"T* = ckpt-{best}")
    axis.set_xlabel("teacher checkpoint (step)")
    axis.set_xticks(index, [f"{k}\n({e.get('step', '?')})" for k, e in zip(index, entries, strict=True)])
    axis.set_ylabel(checkpoints.get("metric", "metric"))
    handles = axis.get_legend_handles_labels()[0]
    losses = [_number(e.get("val_loss")) for e in entries]
    if not all(math.isnan(v) for v in losses):
        twin = axis.twinx()
        handles += twin.plot(index, losses, "--", color="0.5", label="val loss")
        twin.set_ylabel("val loss (mean gold NLL)")
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
    axis.set_title("Teacher checkpoints: validation metric, T* marked")
    figure.savefig(path, format="png")


def plot_schedule(name: str, phases: Sequence[dict], terms: pd.DataFrame, path: Path) -> None:
    """Chosen checkpoint per phase; below, the two terms KL(T*||c*) and KL(S_k||c*) of the choice."""
    figure, axes = _figure(6.4, 5.2 if len(terms) else 3.0, rows=2 if len(terms) else 1)
    numbers = [p["phase"] for p in phases]
    axes[0].plot(numbers, [p["checkpoint"] for p in phases], "o-", color="tab:purple")
    axes[0].set_xticks(numbers)
    axes[0].set_xlabel("student phase k")
    axes[0].set_ylabel("teacher checkpoint c*")
    chosen = sorted({p["checkpoint"] for p in phases if isinstance(p["checkpoint"], int)})
    if chosen:  # whole checkpoint numbers only, with room around a flat schedule
        axes[0].set_yticks(range(chosen[0], chosen[-1] + 1))
        axes[0].set_ylim(chosen[0] - 0.5, chosen[-1] + 0.5)
    axes[0].set_title(f"{method_label(name)} schedule: checkpoint distilled from in each phase")
    if len(terms):
        axes[1].bar(terms["phase"], terms["kl_best_to_c"], color="tab:orange", label="KL(T* || c*)")
        axes[1].bar(terms["phase"], terms["kl_student_to_c"], bottom=terms["kl_best_to_c"],
                    color="tab:cyan", label="KL(S_k || c*)")
        for phase, checkpoint, total in zip(terms["phase"], terms["checkpoint"], terms["sum"], strict=True):
            axes[1].annotate(f"c*={checkpoint}", (phase, total), ha="center", va="bottom", fontsize=8)
        axes[1].margins(y=0.15)  # room for the c* labels above the bars
        axes[1].set_xticks(numbers)
        axes[1].set_xlabel("student phase k")
        axes[1].set_ylabel("KL (nats / token)")
        axes[1].legend(fontsize=8)
    figure.savefig(path, format="png")


def plot_subdomain_shares(shares: pd.DataFrame, path: Path) -> None:
    """Stacked horizontal bars: SFS and TFS share of each tag (and of all samples)."""
    figure, (axis,) = _figure(6.4, 1.6 + 0.4 * len(shares))
    labels = [f"{tag} (n={n})" for tag, n in zip(shares.index, shares["samples"], strict=True)]
    axis.barh(labels, shares["sfs_share"], color="tab:green", label="student-favoured (SFS)")
    axis.barh(labels, 1 - shares["sfs_share"], left=shares["sfs_share"], color="tab:red",
              label="teacher-favoured (TFS)")
    axis.set_xlim(0, 1)
    axis.invert_yaxis()
    axis.set_xlabel("share of samples")
    figure.legend(loc="outside lower center", ncols=2, fontsize=8)
    axis.set_title("SFS / TFS share per tag")
    figure.savefig(path, format="png")


def plot_aw_histogram(weights: pd.Series, sfs: pd.Series, best_index: int, path: Path) -> None:
    """Histogram of AW against T* per sample, SFS and TFS stacked; 0.5 marks the boundary."""
    figure, (axis,) = _figure(6.4, 3.6)
    bins = [i / 20 for i in range(21)]
    axis.hist([weights[sfs.astype(bool)], weights[~sfs.astype(bool)]], bins=bins, stacked=True,
              color=["tab:green", "tab:red"], label=["SFS", "TFS"])
    axis.axvline(0.5, color="k", linestyle="--", linewidth=1)
    axis.set_xlim(0, 1)
    axis.set_xlabel(f"AW = L_S^SFT / (L_S^SFT + L_ckpt-{best_index})")
    axis.set_ylabel("samples")
    axis.yaxis.get_major_locator().set_params(integer=True)
    axis.legend(fontsize=8)
    axis.set_title(f"Adaptive weight against T* (aw_ckpt_{best_index}), n={len(weights)}")
    figure.savefig(path, format="png")


# --- the document: blocks rendered to Markdown and HTML -------------------------------------------

@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    bold_rows: set[int] = field(default_factory=set)


@dataclass
class Image:
    file: str  # relative to the report, e.g. plots/aw_histogram.png
    caption: str


Block = tuple[str, Any]  # ("h2" | "h3" | "p" | "list", text) or ("table", Table) or ("image", Image)


def fmt(value: Any, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:+.4f}" if signed else f"{value:.4f}"
    return str(value)


def _markdown_table(table: Table) -> list[str]:
    cells = [[f"**{c}**" if i in table.bold_rows and c else c for c in row]
             for i, row in enumerate(table.rows)]
    cells = [[c.replace("|", "\\|") for c in row] for row in cells]  # a bare | would split the cell
    widths = [max(len(h), *(len(r[j]) for r in cells)) for j, h in enumerate(table.headers)]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"  # noqa: E731
    return [line(table.headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)]


def render_markdown(title: str, blocks: Sequence[Block]) -> str:
    lines = [f"# {title}", ""]
    for kind, content in blocks:
        if kind in ("h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + content, ""]
        elif kind == "p":
            lines += [content, ""]
        elif kind == "list":
            lines += [f"- {item}" for item in content] + [""]
        elif kind == "table":
            lines += _markdown_table(content) + [""]
        elif kind == "image":
            lines += [f"![{content.caption}]({content.file})", ""]
    return "\n".join(lines)


def _inline_html(text: str) -> str:
    """Escape, then turn `code` spans (the only Markdown markup in our text) into <code>."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    body = []
    for i, row in enumerate(table.rows):
        cells = "".join(f"<td>{_inline_html(c)}</td>" for c in row)
        body.append(f'<tr class="best">{cells}</tr>' if i in table.bold_rows else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


HTML_STYLE = """body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #bbb;padding:0.25em 0.6em;
text-align:right}th:first-child,td:first-child{text-align:left}tr.best td{font-weight:bold;
background:#eef6ee}img{max-width:100%;border:1px solid #ddd}code{background:#f3f3f3}"""


def render_html(title: str, blocks: Sequence[Block], base: Path) -> str:
    """A self-contained page: images read from ``base / file`` and embedded as base64."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for kind, content in blocks:
        if kind in ("h2", "h3"):
            parts.append(f"<{kind}>{html.escape(content)}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{_inline_html(content)}</p>")
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in content) + "</ul>")
        elif kind == "table":
            parts.append(_html_table(content))
        elif kind == "image":
            data = base64.b64encode((base / content.file).read_bytes()).decode("ascii")
            parts.append(f'<figure><img alt="{html.escape(content.caption)}" '
                         f'src="data:image/png;base64,{data}"><figcaption>'
                         f"{html.escape(content.caption)}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{HTML_STYLE}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


# --- sections ------------------------------------------------------------------------------------

def results_table(frame: pd.DataFrame, metrics: Sequence[str]) -> Table:
    """The paper-shaped table: metrics, then the gap to T* per metric; best student in bold."""
    headers = ["Model", "Eval", *[METRIC_LABELS[m] for m in metrics],
               *[f"Δ {METRIC_LABELS[m]} vs T*" for m in metrics]]
    rows, bold = [], set()
    for i, record in enumerate(frame.to_dict("records")):
        label = record["model"] + (" (best)" if record["best"] else "")
        eval_file = f"eval/{record['eval_name']}.json" if record["eval_name"] else "—"
        if record["status"] != "ok":
            rows.append([label, eval_file, *["not run"] * len(metrics), *["—"] * len(metrics)])
            continue
        gaps = ["—" if record["role"] == "teacher" else fmt(record[f"gap_{m}"], signed=True) for m in metrics]
        rows.append([label, eval_file, *[fmt(record[m]) for m in metrics], *gaps])
        if record["best"]:
            bold.add(i)
    return Table(headers, rows, bold)


def per_tag_table(tags: pd.DataFrame, sizes: dict[str, int]) -> Table:
    headers = ["Model", *[f"{tag} (n={sizes.get(tag, '?')})" for tag in tags.columns]]
    return Table(headers, [[label, *[fmt(v) for v in values]] for label, values in
                           zip(tags.index, tags.to_numpy().tolist(), strict=True)])


def checkpoint_table(checkpoints: dict, best: int, test_metric: dict[int, float],
                     metric_label: str) -> Table:
    metric = checkpoints.get("metric", "metric")
    headers = ["Checkpoint", "Step", "Epoch", "Train loss", "Val loss", f"Val {metric}", f"Test {metric_label}"]
    rows, bold = [], set()
    for i, entry in enumerate(sorted(checkpoints["checkpoints"], key=lambda e: int(e["index"]))):
        index = int(entry["index"])
        if index == best:
            bold.add(i)
        rows.append([f"ckpt-{index}" + (" (T*)" if index == best else ""), fmt(entry.get("step")), fmt(_number(entry.get("epoch"))),
                     fmt(_number(entry.get("train_loss"))), fmt(_number(entry.get("val_loss"))),
                     fmt(_number(entry.get("val_metric"))),
                     fmt(test_metric[index]) if index in test_metric else "not run"])
    return Table(headers, rows, bold)


def schedule_table(phases: Sequence[dict], terms: pd.DataFrame) -> Table:
    by_phase = {int(r["phase"]): r for r in terms.to_dict("records")}
    rows = []
    for phase in phases:
        term = by_phase.get(phase["phase"])
        values = [fmt(term["kl_best_to_c"]), fmt(term["kl_student_to_c"]), fmt(term["sum"])] if term else ["—"] * 3
        rows.append([str(phase["phase"]), f"ckpt-{phase['checkpoint']}", *values])
    return Table(["Phase", "Checkpoint c*", "KL(T* ‖ c*)", "KL(S_k ‖ c*)", "Sum"], rows)


def _decomposition_line(name: str, part: dict) -> str:
    return (f"{name}: student {fmt(part['student'])}, teacher {fmt(part['teacher'])}, gap S - T* "
            f"{fmt(part['gap'], True)} = SFS {fmt(part['advantage_sfs'], True)} + TFS "
            f"{fmt(part['deficit_tfs'], True)}")




# --- the stage -----------------------------------------------------------------------------------

@dataclass
class ReportInputs:
    """Everything the report shows, read from ``results/{task}/`` (None / empty where absent)."""

    config: dict
    root: Path
    rows: list[ModelRow]
    kind: str
    metrics: tuple[str, ...]
    primary: str
    frame: pd.DataFrame
    checkpoints: dict | None
    best_index: int | None
    teacher_tests: dict[int, float]  # test primary metric of evaluated teacher checkpoints
    schedules: dict[str, tuple[list[dict], pd.DataFrame]]  # student -> (phases, chosen_terms)
    subdomain_summary: dict | None
    subdomain_table: pd.DataFrame | None
    shares: pd.DataFrame | None

    @property
    def tag_metric(self) -> str:
        return "accuracy" if self.kind == "choice" else self.primary


def is_scd_method(name: str) -> bool:
    return name.partition("+")[0] in ("scd", "scd_aw")


def schedule_plot_name(name: str) -> str:
    return f"schedule_{default_eval_name(name)}.png"


def gather_inputs(config: dict) -> ReportInputs:
    """Read every artifact the report uses; absent ones stay None (malformed ones raise DataError)."""
    root = task_dir(config)
    checkpoints = read_teacher_checkpoints(root)
    best_index = int(checkpoints["best_index"]) if checkpoints is not None else None
    rows = model_rows(config, root, best_index)
    kind = task_kind(config, root, rows)
    metrics = metric_names(kind)
    primary = primary_metric(kind, config.get("sft", {}).get("val_metric", "auto"))
    schedules = {}
    for name in student_names(config, root):
        path = root / "students" / name / "schedule.json"
        if path.is_file():
            phases = read_schedule(path)
            schedules[name] = (phases, chosen_terms(phases))
    subdomain_summary, subdomain_table = read_subdomains(root)
    return ReportInputs(
        config=config, root=root, rows=rows, kind=kind, metrics=metrics, primary=primary,
        frame=results_frame(rows, metrics, primary), checkpoints=checkpoints, best_index=best_index,
        teacher_tests={k: _number(r["metrics"].get(primary))
                       for k, r in teacher_checkpoint_evals(root / "eval").items()},
        schedules=schedules, subdomain_summary=subdomain_summary, subdomain_table=subdomain_table,
        shares=sfs_shares(subdomain_summary, subdomain_table))


def plan_plots(inputs: ReportInputs) -> tuple[list[tuple[str, Callable[[Path], None]]], list[str]]:
    """``(file name, draw(path))`` for each plot whose inputs exist, and why each other one is missing."""
    jobs: list[tuple[str, Callable[[Path], None]]] = []
    missing: list[str] = []
    if inputs.checkpoints is not None:
        jobs.append((TEACHER_PLOT, lambda p: plot_teacher_checkpoints(
            inputs.checkpoints, inputs.best_index, inputs.teacher_tests, METRIC_LABELS[inputs.primary], p)))
    else:
        missing.append(f"plots/{TEACHER_PLOT}: teacher/checkpoints.json not found "
                       "(run `scd-pipeline sft --role teacher`)")
    for name in student_names(inputs.config, inputs.root):
        schedule = inputs.schedules.get(name)
        if not is_scd_method(name) and (schedule is None or not len(schedule[1])):
            continue  # TD/CD/TAID schedules are shown in the table only
        plot_name = schedule_plot_name(name)
        if schedule is None:
            missing.append(f"plots/{plot_name}: students/{name}/schedule.json not found "
                           f"(run `scd-pipeline distill --method {_quoted(name)}`)")
            continue
        jobs.append((plot_name, lambda p, n=name, s=schedule: plot_schedule(n, s[0], s[1], p)))
        if not len(schedule[1]):
            missing.append(f"plots/{plot_name}: students/{name}/schedule.json records no KL terms; "
                           "the plot shows the chosen checkpoints only")
    if inputs.shares is not None:
        jobs.append((SHARES_PLOT, lambda p: plot_subdomain_shares(inputs.shares, p)))
    else:
        missing.append(f"plots/{SHARES_PLOT}: subdomains.json / subdomains.parquet not found "
                       "(run `scd-pipeline estimate-subdomains`)")
    table = inputs.subdomain_table
    aw_best = (inputs.subdomain_summary or {}).get("best_index", inputs.best_index)
    aw_column = f"aw_ckpt_{aw_best}"
    if table is not None and aw_column in table.columns and "sfs" in table.columns:
        jobs.append((AW_PLOT, lambda p: plot_aw_histogram(table[aw_column], table["sfs"], aw_best, p)))
    elif table is None:
        missing.append(f"plots/{AW_PLOT}: subdomains.parquet not found (run `scd-pipeline estimate-subdomains`)")
    else:
        missing.append(f"plots/{AW_PLOT}: subdomains.parquet has no column {aw_column} or sfs "
                       "(re-run `scd-pipeline estimate-subdomains`)")
    return jobs, missing


@dataclass
class ReportResult:
    markdown: Path
    html: Path
    summary_csv: Path
    plots: list[Path]
    missing_evals: list[str]
    missing_plots: list[str]


def build_report(config: dict) -> ReportResult:
    """The stage: write ``report.md``, ``report.html``, ``summary.csv``, ``plots/*.png`` and
    ``report.config.yaml`` under ``results/{task}/``. No artifact is required: what is absent is
    listed in the report as missing."""
    inputs = gather_inputs(config)
    root = inputs.root
    jobs, missing_plots = plan_plots(inputs)
    plots_dir = root / "plots"
    with atomic_dir(plots_dir) as tmp:  # the folder is replaced as a whole: no stale plot survives
        for file_name, draw in jobs:
            draw(tmp / file_name)
    blocks = report_blocks(inputs, {file_name for file_name, _ in jobs}, missing_plots)
    title = f"SCD pipeline report: task {config['task']}"
    paths = {"csv": root / "summary.csv", "html": root / "report.html", "md": root / "report.md"}
    with atomic_path(paths["csv"]) as tmp:
        inputs.frame.to_csv(tmp, index=False)
    with atomic_path(paths["html"]) as tmp:
        tmp.write_text(render_html(title, blocks, root), encoding="utf-8")
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(render_markdown(title, blocks), encoding="utf-8")
    write_effective_config(config, root, "report")
    return ReportResult(paths["md"], paths["html"], paths["csv"], [plots_dir / name for name, _ in jobs],
                        [f"{row.label}: {row.missing}" for row in inputs.rows if row.missing], missing_plots)


def report_blocks(inputs: ReportInputs, drawn: set[str], missing_plots: Sequence[str]) -> list[Block]:
    """The report's content, in order, as blocks both renderers understand."""
    rows = inputs.rows
    blocks: list[Block] = [("p", _header_text(inputs))]
    blocks += results_blocks(inputs)
    blocks += teacher_blocks(inputs, drawn)
    blocks += schedule_blocks(inputs, drawn)
    blocks += subdomain_blocks(inputs, drawn)
    missing = [f"{row.label} (eval/{row.eval_name or 'teacher-ckpt-?'}.json): not run; {row.missing}"
               for row in rows if row.missing]
    items = missing + list(missing_plots) + [f"warning: {w}" for w in comparability_warnings(inputs.root, rows)]
    blocks += [("h2", "What is missing"),
               ("list", items) if items else ("p", "Nothing: every row and plot is present.")]
    return blocks


def _evaluated_splits(rows: Sequence[ModelRow]) -> tuple[list[str], list[int]]:
    evaluated = [row.result for row in rows if row.result]
    return (sorted({str(r.get("split")) for r in evaluated}),
            sorted({int(r["n"]) for r in evaluated if r.get("n") is not None}))


def comparability_warnings(root: Path, rows: Sequence[ModelRow]) -> list[str]:
    """Rows evaluated on different splits / sample counts, and evaluations older than their model."""
    warnings = []
    splits, sizes = _evaluated_splits(rows)
    if len(splits) > 1 or len(sizes) > 1:
        warnings.append(f"the rows were evaluated on different splits ({', '.join(splits)}) or sample "
                        f"counts ({', '.join(map(str, sizes))}); their metrics are not directly comparable")
    for row in rows:
        if row.result is None or row.model_dir is None or not row.model_dir.is_dir():
            continue
        weights = [p for p in row.model_dir.iterdir() if p.suffix in (".safetensors", ".bin")]
        eval_file = root / "eval" / f"{row.eval_name}.json"
        if weights and max(p.stat().st_mtime for p in weights) > eval_file.stat().st_mtime:
            warnings.append(f"eval/{row.eval_name}.json is older than the weights in {row.model_dir} "
                            f"(stale: re-run `scd-pipeline evaluate --model {_quoted(row.model_dir)}`)")
    return warnings


def _header_text(inputs: ReportInputs) -> str:
    splits, sizes = _evaluated_splits(inputs.rows)
    return (f"Results under `{inputs.root}` ({inputs.kind} task), generated "
            f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. Evaluation split: "
            f"{', '.join(splits) or 'none'}; samples: {', '.join(map(str, sizes)) or 'none'}.")


def results_blocks(inputs: ReportInputs) -> list[Block]:
    tags = per_tag_frame(inputs.rows, inputs.tag_metric)
    label = METRIC_LABELS[inputs.tag_metric]
    return [("h2", "Results"), ("table", results_table(inputs.frame, inputs.metrics)),
            ("p", "Teacher row: `eval/teacher-ckpt-{k}.json` with k = T*, the checkpoint with the "
                  "best validation metric in `teacher/checkpoints.json`. Δ = student - teacher "
                  "(negative: below T*). Best student (bold, column `best` in summary.csv): highest "
                  f"{METRIC_LABELS[inputs.primary]} among the SFT and distilled students, ties broken "
                  "by the other metrics. Loss and sample counts are in `summary.csv`."),
            ("h2", f"Per-tag {label}"),
            ("table", per_tag_table(tags, tag_sizes(inputs.rows))) if len(tags.columns)
            else ("p", "No per-tag results (no evaluation has run).")]


def teacher_blocks(inputs: ReportInputs, drawn: set[str]) -> list[Block]:
    blocks: list[Block] = [("h2", "Teacher checkpoints")]
    if inputs.checkpoints is None:
        return blocks + [("p", "Not available: teacher/checkpoints.json not found.")]
    blocks.append(("table", checkpoint_table(inputs.checkpoints, inputs.best_index, inputs.teacher_tests,
                                             METRIC_LABELS[inputs.primary])))
    if TEACHER_PLOT in drawn:
        blocks.append(("image", Image(f"plots/{TEACHER_PLOT}", "Teacher validation metric per checkpoint")))
    return blocks


def schedule_blocks(inputs: ReportInputs, drawn: set[str]) -> list[Block]:
    blocks: list[Block] = [("h2", "Distillation schedules")]
    if not inputs.schedules:
        return blocks + [("p", "No students/*/schedule.json found.")]
    n_phases = max(len(phases) for phases, _ in inputs.schedules.values())
    blocks.append(("table", Table(
        ["Student", *[f"Phase {k}" for k in range(1, n_phases + 1)]],
        [[method_label(name), *[checkpoint_label(p["checkpoint"]) for p in phases], *[""] * (n_phases - len(phases))]
         for name, (phases, _) in inputs.schedules.items()])))
    for name, (phases, terms) in inputs.schedules.items():
        if not len(terms):
            continue
        blocks += [("h3", f"{method_label(name)}: c* = argmin_c KL(T* ‖ c) + KL(S_k ‖ c)"),
                   ("table", schedule_table(phases, terms))]
        if schedule_plot_name(name) in drawn:
            blocks.append(("image", Image(f"plots/{schedule_plot_name(name)}", f"{method_label(name)} schedule")))
    return blocks


def subdomain_blocks(inputs: ReportInputs, drawn: set[str]) -> list[Block]:
    blocks: list[Block] = [("h2", "Student- and teacher-favoured subdomains")]
    summary, shares = inputs.subdomain_summary, inputs.shares
    if summary is None and shares is None:
        return blocks + [("p", "Not available: subdomains.json / subdomains.parquet not found.")]
    if summary is not None:
        blocks.append(("list", [
            f"SFS share {fmt(summary['sfs_share'])} of {summary['samples']} samples "
            f"({summary.get('split', '?')} split); rule: {summary.get('rule', 'n/a')}",
            _decomposition_line("Loss (gold NLL)", summary["loss"]),
            _decomposition_line("Error (1 - score)", summary["metric"])]))
    if shares is not None:
        blocks.append(("table", Table(["Tag", "Samples", "SFS share", "TFS share"],
                                      [[str(tag), str(n), fmt(s), fmt(1 - s)] for tag, n, s in
                                       zip(shares.index, shares["samples"], shares["sfs_share"], strict=True)])))
    for file_name, caption in ((SHARES_PLOT, "SFS / TFS share per tag"), (AW_PLOT, "Adaptive weight against T*")):
        if file_name in drawn:
            blocks.append(("image", Image(f"plots/{file_name}", caption)))
    return blocks
