"""What a run leaves behind: the markdown section of docs/benchmarks.md (also `bench.md` in --out), the
plot `itl_vs_concurrency.png`, and the summary printed at the end."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from ..markdown import write_generated_section
from .results import BaselinesResult, BenchRun, DeliberationResult, EngineResult, HttpResult, SectionOutcome, StreamRun
from .settings import SECTIONS

log = logging.getLogger(__name__)

BEGIN, END = "<!-- crsm bench: begin (generated) -->", "<!-- crsm bench: end -->"
PLOT = "itl_vs_concurrency.png"


def _ms(value: float) -> str:
    return f"{value:.3f}"


def _rate(value: float) -> str:
    return f"{value:,.0f}"


def format_value(value: float, unit: str) -> str:
    """A target's number in its unit: ratios as 1.07x, milliseconds to the microsecond, rates whole."""
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "ms":
        return f"{value:.3f} ms"
    return f"{value:,.0f} {unit}"


def _millions(count: int | None) -> str:
    return "?" if count is None else f"{count / 1e6:.1f}M"


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |",
            *("| " + " | ".join(row) + " |" for row in rows)]


def _not_ok(outcome: SectionOutcome | None, width: int) -> list[str] | None:
    """The row that stands for a section that did not produce results (None when it did)."""
    if outcome is None:
        return ["not run (not in --sections)"] + ["-"] * (width - 1)
    if outcome.status == "failed":
        return [f"**failed**: `{(outcome.error or '').replace('|', '/')[:300]}`"] + ["-"] * (width - 1)
    if outcome.status == "skipped":
        return [f"skipped: {outcome.reason}"] + ["-"] * (width - 1)
    return None


def _missing_table(outcome: SectionOutcome | None, header: list[str]) -> list[str] | None:
    """A one-row table saying why a section has no results (None when it has them)."""
    missing = _not_ok(outcome, len(header))
    return None if missing is None else _table(header, [missing])


def _meta_lines(run: BenchRun) -> list[str]:
    m, s = run.meta, run.settings
    v = m["versions"]
    versions = ", ".join(f"{name} {v[name] or 'not installed'}" for name in
                         ("torch", "triton", "mamba_ssm", "causal_conv1d", "transformers"))
    model = m["model"]
    return [
        f"- Device: {m['device']}; CUDA {m['cuda'] or '-'}; Python {m['python']}",
        f"- Versions: {versions}",
        f"- Commit: `{m['commit']}`; date: {m['date']}; command: `{m['command']}`",
        f"- Model: d_model {model['d_model']}, {model['n_layer']} layers, vocab {model['vocab_size']} (padded to "
        f"{model['padded_vocab_size']}), d_state {model['d_state']}, headdim {model['headdim']}, expand "
        f"{model['expand']}, ngroups {model['ngroups']}, chunk {model['chunk_size']}; "
        f"{_millions(model['parameters'])} parameters, random weights, {s['dtype']}, {model['backbone']} backbone" +
        (f" (the engine section also on {', '.join(s['backbones'][1:])})" if len(s["backbones"]) > 1 else ""),
        f"- Workload: every session a random {s['prompt_tokens']}-token prompt, {s['tokens']} new tokens "
        f"(ignore_eos), greedy unless said; ITL percentiles pool every session's gaps after its first "
        f"{s['warmup_gaps']}; tokens/s counts all sessions over the window where all of them are past that "
        f"warm-up and none has finished; `EngineConfig(max_sessions={s['max_sessions']})`; each section warms "
        "up first (graph capture, Triton autotuning)",
    ]


def _targets(run: BenchRun) -> list[str]:
    rows = []
    for t in run.targets:
        measured = "-" if t.measured is None else format_value(t.measured, t.unit)
        result = "not measured" if t.met is None else ("met" if t.met else "**missed**")
        rows.append([t.name, t.goal, measured, result, t.margin])
    return _table(["target", "goal", "measured", "result", "margin"], rows)


def _engine(run: BenchRun) -> list[str]:
    header = ["backbone", "sessions", "sampling", "ITL p50 (ms)", "ITL p99 (ms)", "tokens/s", "tokens",
              "bandwidth used (GB/s, % of copy)"]
    outcome = run.sections.get("engine")
    if (missing := _missing_table(outcome, header)) is not None:
        return missing
    result: EngineResult = outcome.result
    rows = ([b.backbone, str(r.streams), r.label, _ms(r.itl.p50_ms), _ms(r.itl.p99_ms), _rate(r.tokens_per_s),
             f"{r.streams} x {r.tokens_per_stream}", f"{t.gb_per_s:,.0f} ({t.share_of_copy:.0%})"]
            for b in result.backbones for r, t in zip(b.runs, b.traffic))
    return _table(header, rows) + [
        "", f"Bandwidth used: the bytes a step must move (every weight read once, each of the step's state rows, "
            f"the graph bucket's, read and written; {_bytes_note(result)}) over the ITL p50, against this "
            f"device's device-to-device copy in the same run: {result.copy_gb_per_s:,.0f} GB/s read + written."]


def _bytes_note(result: EngineResult) -> str:
    first = result.backbones[0]
    sizes = sorted({(t.rows, t.bytes_per_step) for t in first.traffic})
    return ", ".join(f"{rows} row{'s' if rows > 1 else ''}: {moved / 1e6:,.0f} MB" for rows, moved in sizes)


def _baselines(run: BenchRun) -> list[str]:
    header = ["generator", "batch", "ITL p50 (ms)", "ITL p99 (ms)", "tokens/s", "first token (ms)"]
    rows: list[list[str]] = []
    engine = run.sections.get("engine")
    if engine is not None and engine.status == "ok":
        rows += [[f"crsm engine ({b.backbone})", str(r.streams), _ms(r.itl.p50_ms), _ms(r.itl.p99_ms),
                  _rate(r.tokens_per_s), "-"] for b in engine.result.backbones for r in b.runs if r.label == "greedy"]
    outcome = run.sections.get("baselines")
    # a section whose backends were all skipped still lists them, each with its reason
    missing = None if outcome is not None and outcome.result is not None else _not_ok(outcome, len(header))
    notes: list[str] = []
    if missing is not None:
        rows.append(missing)
    else:
        result: BaselinesResult = outcome.result
        for b in result.backends:
            if b.status != "ok":
                rows.append([b.backend, "-", f"{b.status}: {(b.reason or '').replace('|', '/')[:300]}", "-", "-", "-"])
                continue
            rows += [[b.backend, str(r.streams), _ms(r.itl.p50_ms), _ms(r.itl.p99_ms), _rate(r.tokens_per_s),
                      _ms(r.ttft.p50_ms) if r.ttft else "-"] for r in b.runs]
            notes.append(f"- {b.backend}: {b.notes}; weights: {b.weights}.")
    return _table(header, rows) + ([""] + notes if notes else [])


def _deliberation(run: BenchRun) -> list[str]:
    header = ["planner mode", "sessions", "ITL p50 off / on (ms)", "p50 ratio", "ITL p99 off / on (ms)", "p99 ratio",
              "state-steps/s", "rows stepped/s", "plans launched / finished", "landing ratio",
              "results: applied / late / pruned / vetoed / diverged / rejected", "effects: suggested / blended"]
    outcome = run.sections.get("deliberation")
    if (missing := _missing_table(outcome, header)) is not None:
        return missing
    result: DeliberationResult = outcome.result
    rows = []
    for r in result.rows:
        i = r.injections
        rows.append([r.planner_mode, str(r.sessions), f"{_ms(r.off.itl.p50_ms)} / {_ms(r.on.itl.p50_ms)}",
                     f"{r.p50_ratio:.2f}x", f"{_ms(r.off.itl.p99_ms)} / {_ms(r.on.itl.p99_ms)}", f"{r.p99_ratio:.2f}x",
                     _rate(r.state_steps_per_s), _rate(r.rows_stepped_per_s),
                     f"{r.plans_launched} / {r.plans_finished}",
                     "-" if r.landing_ratio is None else f"{r.landing_ratio:.2f}",
                     " / ".join(str(i[k]) for k in ("applied", "applied_late", "pruned", "vetoed", "diverged", "rejected")),
                     f"{r.counters.get('suggested', 0)} / {r.counters.get('blended', 0)}"])
    planner = result.deliberation_config["planner"]
    config = result.deliberation_config
    alone = "; ".join(f"{a.roots} session(s): {a.latency.p50_ms:.1f} ms p50 over {a.plans} plans, "
                      f"{a.state_steps_per_plan:.0f} state-steps each, {_rate(a.state_steps_per_s)} state-steps/s"
                      for a in result.plans_alone)
    return _table(header, rows) + [
        "", f"Plans alone (the planner worker, batched over the sessions, nothing else running): {alone}.",
        "", f"{result.tokens_per_session} tokens per session. Planner settings: lag "
            f"{'from the measured latency' if config['lag'] is None else config['lag']}, `{config['steps']}` steps, "
            f"{planner['n_simulations']} simulations, top-k {planner['top_k']}, depth "
            f"{planner['max_depth']}; untrained value heads. Landing ratio: results applied on time or caught up, "
            "over the results that were not vetoed. State-steps/s: the done events' "
            "`state_steps` summed over sessions, over the planners-on run's wall time; a plan still running when "
            "its session ends is cancelled and not counted (launched minus finished). Rows stepped/s: the rows "
            "the engine's planner runtime advanced by one token during the run, finished plans or not."]


def _http(run: BenchRun) -> list[str]:
    header = ["design", "clients", "first token p50 (ms)", "first token p99 (ms)", "ITL p50 (ms)", "ITL p99 (ms)",
              "tokens/s", "ITL p50 / p99 vs the engine", "tokens/s vs the engine"]
    outcome = run.sections.get("http")
    if (missing := _missing_table(outcome, header)) is not None:
        return missing
    result: HttpResult = outcome.result
    engine = run.sections.get("engine")
    engine_runs = engine.result.runs if engine is not None and engine.status == "ok" else []

    def against_engine(r: StreamRun) -> list[str]:
        e = next((e for e in engine_runs if e.streams == r.streams and e.label == "greedy"), None)
        if e is None:
            return ["-", "-"]
        return [f"{r.itl.p50_ms / e.itl.p50_ms:.2f}x / {r.itl.p99_ms / e.itl.p99_ms:.2f}x",
                f"{r.tokens_per_s / e.tokens_per_s:.2f}"]

    lines = _table(header, ([d.design, str(r.streams), _ms(r.ttft.p50_ms), _ms(r.ttft.p99_ms), _ms(r.itl.p50_ms),
                             _ms(r.itl.p99_ms), _rate(r.tokens_per_s), *against_engine(r)]
                            for d in result.designs for r in d.runs))
    lp = result.designs[0].long_prompt
    lines += ["", f"A {lp.prompt_tokens:,}-token prompt admitted while {lp.streams} streams run (prefilled "
                  f"{lp.prefill_chunk} tokens per iteration): the streams' gaps from its submission to its first "
                  "token, against the same streams' gaps before it.", ""]
    lines += _table(["design", "window (ms)", "ITL p50 before / during (ms)", "ITL p99 before / during (ms)",
                     "p99 ratio", "gaps before / during"],
                    [[d.design, f"{d.long_prompt.window_ms:.1f}",
                      f"{_ms(d.long_prompt.itl_before.p50_ms)} / {_ms(d.long_prompt.itl_during.p50_ms)}",
                      f"{_ms(d.long_prompt.itl_before.p99_ms)} / {_ms(d.long_prompt.itl_during.p99_ms)}",
                      f"{d.long_prompt.p99_ratio:.2f}x", f"{d.long_prompt.itl_before.count} / {d.long_prompt.itl_during.count}"]
                     for d in result.designs])
    return lines


def render_markdown(run: BenchRun) -> str:
    lines = ["### Latest run", "", *_meta_lines(run), "", "#### Targets", "", *_targets(run),
             "", "#### Engine, no HTTP", "",
             "Sessions submitted together to `Engine` (no deliberation), on each backbone in turn (same "
             "weights); timestamps from the generator thread.", "",
             *_engine(run), "", "#### Against mamba_ssm's and transformers' generate", "",
             "Same config and weights; per-token timestamps from a streamer that synchronises the GPU at each "
             "token. Every row of a batch gets its token at the same step, so batch = concurrent streams.", "",
             *_baselines(run), "", "#### Deliberation overhead", "",
             "The same engine with planners off, then on, back to back, per planner mode.", "",
             *_deliberation(run), "", "#### End to end over HTTP", "",
             "`crsm serve` in a process of its own on the same model (saved to a directory), with the engine "
             "in the server's process (one-process) or in its own (engine-process, `--engine-process`); "
             "clients in the benchmark's process stream SSE `/v1/generate` as a load generator does (one "
             "keep-alive connection per stream, opened and warmed before the clock starts, request bytes built "
             "beforehand), all clients of a row arriving together; client-side timestamps: a request's as its "
             "bytes are written, a token's as the chunk holding its `token` event is read. \"vs the engine\": the engine section's "
             "greedy run of the same concurrency in this run.", "", *_http(run)]
    if run.files.get("plot"):
        lines += ["", f"Plot: `{PLOT}` in the run's output directory (ITL p50 and p99 against concurrent sessions)."]
    return "\n".join(lines)


def write_docs(path: Path, run: BenchRun) -> None:
    write_generated_section(path, render_markdown(run), BEGIN, END,
                            heading="# Benchmarks\n\n## Serving benchmark (`crsm bench`)\n\n")
    log.info("wrote the benchmark section of %s", path)


def write_plot(path: Path, run: BenchRun) -> bool:
    """ITL p50 and p99 against concurrent sessions, ours and each baseline; False when matplotlib is
    missing (a warning, not an error: the numbers are in bench.json and the markdown)."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed; skipping %s", path.name)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    series: dict[str, list[StreamRun]] = {}
    engine = run.sections.get("engine")
    if engine is not None and engine.status == "ok":
        for b in engine.result.backbones:
            series[f"crsm engine ({b.backbone})"] = [r for r in b.runs if r.label == "greedy"]
    baselines = run.sections.get("baselines")
    if baselines is not None and baselines.status == "ok":
        for b in baselines.result.backends:
            if b.status == "ok":
                series[b.backend] = b.runs
    http = run.sections.get("http")
    if http is not None and http.status == "ok":
        for d in http.result.designs:
            series[f"crsm over HTTP ({d.design})"] = d.runs
    if not series:
        log.warning("no ITL results to plot; skipping %s", path.name)
        return False
    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=120)
    for i, (name, runs) in enumerate(series.items()):
        color = f"C{i}"
        x = [r.streams for r in runs]
        ax.plot(x, [r.itl.p50_ms for r in runs], "o-", color=color, label=f"{name} p50")
        ax.plot(x, [r.itl.p99_ms for r in runs], "s--", color=color, label=f"{name} p99")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted({r.streams for runs in series.values() for r in runs})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.set_xlabel("concurrent sessions (batch)")
    ax.set_ylabel("inter-token latency (ms)")
    ax.set_title(f"ITL vs concurrency: {run.meta['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def summary(run: BenchRun) -> str:
    """Plain text for the terminal: each section's status and the targets."""
    lines = ["crsm bench: " + ", ".join(f"{name} {run.sections[name].status}"
                                        for name in SECTIONS if name in run.sections)]
    for name in SECTIONS:
        outcome = run.sections.get(name)
        if outcome is not None and outcome.status == "failed":
            lines.append(f"  {name} failed: {outcome.error}")
    width = max(len(t.name) for t in run.targets) if run.targets else 10
    lines.append(f"  {'target':<{width}}  {'goal':<20} {'measured':>18}  result")
    for t in run.targets:
        measured = "-" if t.measured is None else format_value(t.measured, t.unit)
        result = "not measured" if t.met is None else (f"met ({t.margin})" if t.met else f"MISSED ({t.margin})")
        lines.append(f"  {t.name:<{width}}  {t.goal:<20} {measured:>18}  {result}")
    return "\n".join(lines)
