"""Render evaluate's report dict as Markdown, a self-contained HTML page, and a terminal summary.

Every number is printed with :func:`fmt`, so report.md and report.html show exactly the
figures of report.json, rounded the same way.
"""

from __future__ import annotations

import base64
import html as html_lib
import io
import json
from pathlib import Path

from pastiche import style


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in rows]


def _delta_lines(delta: dict) -> list[str]:
    if not delta["measured"]:
        return [delta["reason"]]
    rows = [[f"D({name}, test)", delta[name]["delta"], delta[name]["low"], delta[name]["high"]]
            for name in ("tuned", "base", "train")]
    rows.append(["gap (D_base - D_tuned) / (D_base - D_self)", delta["gap"], delta["gap_low"], delta["gap_high"]])
    return [(f"{delta['mfw_used']} most frequent words of the training split"
            f"{', pronouns left out' if delta['drop_pronouns'] else ''}; 95% bootstrap intervals."), "",
            *_table(["distance", "value", "low", "high"], rows)]


def markdown(report: dict) -> str:
    ppl, copy, div, length = report["perplexity"], report["copying"], report["diversity"], report["length"]
    stop, ver = report["stopping"], report["verifier"]
    lines = [f"# Evaluation of {Path(report['run']).name}", "",
             f"Test split of {report['data']}; base model as control, the author's test pieces as ceiling.", "",
             "## Perplexity (completion tokens only)", "",
             *_table(["split", "base", "tuned", "tokens"],
                     [["test", ppl["base_test"], ppl["tuned_test"], ppl["test_tokens"]],
                      ["train", ppl["base_train"], ppl["tuned_train"], ppl["train_tokens"]]]),
             "", "## Style distance (Cosine Delta to the test pieces)", "", *_delta_lines(report["delta"]),
             "", f"## Copying (word {copy['ngram']}-grams found verbatim in the training split)", "",
             *_table(["texts", "copy rate", "longest run (max)", "longest run (p95)"],
                     [[name, copy[name]["copy_rate"], copy[name]["longest_max"], copy[name]["longest_p95"]]
                      for name in ("tuned", "base", "test")]),
             "", f"Flagged: {fmt(copy['flagged'])} (limit {fmt(copy['flag_above'])}).",
             "", "## Diversity", "",
             *_table(["texts", "distinct-1", "distinct-2", "distinct-3", "compression ratio"],
                     [[name, *(div[name][k] for k in ("distinct_1", "distinct_2", "distinct_3", "compression_ratio"))]
                      for name in ("tuned", "base", "test")]),
             "", "## Length (words) and stopping", "",
             *_table(["texts", "count", "mean", "median", "p10", "p90"],
                     [[name, *(length[name].get(k) for k in ("count", "mean", "median", "p10", "p90"))]
                      for name in ("tuned", "base", "test")]),
             "", (f"Samples that ended by end-of-turn: tuned {fmt(stop['tuned_eos_share'])}, "
             f"base {fmt(stop['base_eos_share'])}."), "", "## Author verification", ""]
    if ver["measured"]:
        lines += [("Share accepted as the author by a classifier trained on the author's training pieces vs "
                  "base-model samples for other prompts:"), "",
                  *_table(["texts", "accepted"], [["tuned samples", ver["tuned"]], ["test pieces (ceiling)", ver["test"]],
                                                  ["base samples (floor)", ver["base_heldout"]]])]
    else:
        lines.append(ver["reason"])
    return "\n".join(lines) + "\n"


def summary(report: dict, out: Path) -> str:
    ppl, delta, copy = report["perplexity"], report["delta"], report["copying"]
    gap = (f"{fmt(delta['gap'])} ({fmt(delta['gap_low'])} .. {fmt(delta['gap_high'])})" if delta["measured"]
           else delta["reason"])
    return "\n".join([
        f"perplexity (test)  base {fmt(ppl['base_test'])} -> tuned {fmt(ppl['tuned_test'])}",
        f"Delta gap          {gap}",
        f"copy rate          tuned {fmt(copy['tuned']['copy_rate'])}, author's own {fmt(copy['test']['copy_rate'])}"
        + ("  FLAGGED" if copy["flagged"] else ""),
        f"stopped by EOS     {fmt(report['stopping']['tuned_eos_share'])}",
        f"report             {out / 'report.html'}"])


# --- HTML ----------------------------------------------------------------------------------

def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _plots(report: dict, metrics_file: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    curves = _loss_curves(metrics_file)
    if curves:
        fig, ax = plt.subplots(figsize=(6, 3))
        for name, (steps, values) in curves.items():
            ax.plot(steps, values, marker="." if name == "eval_loss" else None, label=name)
        ax.set(xlabel="step", ylabel="loss", title="Training")
        ax.legend()
        figures.append(_png(fig))
    ppl = report["perplexity"]
    fig, ax = plt.subplots(figsize=(5, 3))
    labels = ["base test", "tuned test", "base train", "tuned train"]
    ax.bar(labels, [ppl["base_test"], ppl["tuned_test"], ppl["base_train"], ppl["tuned_train"]],
           color=["#999", "#c50", "#bbb", "#e96"])
    ax.set(ylabel="perplexity", title="Perplexity (completion tokens)")
    figures.append(_png(fig))
    delta = report["delta"]
    if delta["measured"]:
        fig, ax = plt.subplots(figsize=(5, 3))
        names = ["tuned", "base", "train"]
        values = [delta[n]["delta"] for n in names]
        ax.bar(names, values, color=["#c50", "#999", "#58a"])
        # The bootstrap interval is drawn as it is: a percentile interval need not contain the point.
        ax.vlines(range(len(names)), [delta[n]["low"] for n in names], [delta[n]["high"] for n in names],
                  color="black", linewidth=2)
        ax.set(ylabel="Cosine Delta to test pieces", title="Style distance (95% intervals)")
        figures.append(_png(fig))
    fig, ax = plt.subplots(figsize=(6, 3))
    for name in ("test", "base", "tuned"):
        ax.hist(report["length"][name].get("words", []), bins=15, alpha=0.5, label=name)
    ax.set(xlabel="words", ylabel="texts", title="Length")
    ax.legend()
    figures.append(_png(fig))
    return figures


def _loss_curves(metrics_file: Path) -> dict[str, tuple[list, list]]:
    curves: dict[str, tuple[list, list]] = {}
    if not metrics_file.is_file():
        return curves
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        for key in ("loss", "eval_loss"):
            if isinstance(record.get(key), (int, float)) and "step" in record:
                steps, values = curves.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(record[key])
    return curves


def highlighted(text: str, copied: list[bool]) -> str:
    """``text`` as HTML with the words inside copied runs wrapped in <mark>."""
    spans = [m.span() for m in style.WORD.finditer(text.lower().replace("’", "'"))]
    parts, at, open_mark = [], 0, False
    for (start, end), is_copied in zip(spans, copied):
        gap = html_lib.escape(text[at:start])
        if open_mark and not is_copied:
            parts.append("</mark>")
            open_mark = False
        parts.append(gap)
        if is_copied and not open_mark:
            parts.append("<mark>")
            open_mark = True
        parts.append(html_lib.escape(text[start:end]))
        at = end
    parts.append(("</mark>" if open_mark else "") + html_lib.escape(text[at:]))
    return "".join(parts)


def _markdown_tables_as_html(md: str) -> str:
    out, in_table = [], False
    for line in md.splitlines():
        if line.startswith("|"):
            if line.startswith("|---"):
                continue
            cells = [html_lib.escape(c.strip()) for c in line.strip("|").split("|")]
            tag = "th" if not in_table else "td"
            out.append(("<table>" if not in_table else "") + "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
            in_table = True
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html_lib.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{html_lib.escape(line)}</p>")
    return "\n".join(out + (["</table>"] if in_table else []))


def html(report: dict, metrics_file: Path) -> str:
    samples = "\n".join(
        f"<section class=sample><h3>{html_lib.escape(s['prompt'])}</h3><div class=pair>"
        f"<div><h4>tuned ({s['tuned_finish']})</h4><p>{highlighted(s['tuned'], s['tuned_copied'])}</p></div>"
        f"<div><h4>base ({s['base_finish']})</h4><p>{html_lib.escape(s['base'])}</p></div></div></section>"
        for s in report["samples"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>pastiche evaluation</title><style>
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}
td:first-child,th:first-child{{text-align:left}}mark{{background:#fd6}}
.pair{{display:grid;grid-template-columns:1fr 1fr;gap:1em}}.pair p{{white-space:pre-wrap}}
.sample{{border-top:1px solid #ddd}}img{{margin:.5em 1em .5em 0}}</style></head><body>
{_markdown_tables_as_html(markdown(report))}
<h2>Plots</h2>{''.join(_plots(report, metrics_file))}
<h2>Samples</h2><p>Words inside runs of {report['copying']['ngram']} or more words shared with the training split
are <mark>highlighted</mark>.</p>
{samples}
</body></html>
"""
