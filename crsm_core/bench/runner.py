"""A `crsm bench` run: the chosen sections in order, each guarded, with the results written after every
section (bench.json, bench.md), then the plot and the documentation.

The "http" section measures the server, which the core does not import: its function is handed in
(`sections`; crsm/bench_server.py has it)."""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

from .baselines import baselines_section
from .deliberation_bench import deliberation_section
from .engine_bench import engine_section
from .environment import describe_environment, describe_model
from .guard import run_guarded
from .report import PLOT, render_markdown, write_docs, write_plot
from .results import BaselinesResult, BenchRun, SectionOutcome
from .settings import SECTIONS, BenchSettings
from .targets import evaluate_targets
from .workload import Workload

log = logging.getLogger(__name__)

SectionFn = Callable[[Workload], Any]
SECTION_FUNCTIONS: dict[str, SectionFn] = {"engine": engine_section, "baselines": baselines_section,
                                           "deliberation": deliberation_section}
JSON, MARKDOWN = "bench.json", "bench.md"


def run_section(name: str, function: SectionFn, workload: Workload) -> SectionOutcome:
    log.info("section %s: start", name)
    guarded = run_guarded(f"section {name}", lambda: function(workload))
    if guarded.error is not None:
        return SectionOutcome(name, "failed", guarded.elapsed_s, error=guarded.error)
    result = guarded.value
    reason = result.skip_reason() if isinstance(result, BaselinesResult) else None
    status = "skipped" if reason is not None else "ok"
    log.info("section %s: %s in %.1f s", name, status, guarded.elapsed_s)
    return SectionOutcome(name, status, guarded.elapsed_s, reason=reason, result=result)


def save(run: BenchRun, workload: Workload) -> None:
    """Everything known so far, so a run that dies later keeps what it measured."""
    out = workload.settings.out
    run.meta["model"] = describe_model(workload)
    run.targets = evaluate_targets(run)
    run.files.update(json=str(out / JSON), markdown=str(out / MARKDOWN))
    run.write_json(out / JSON)
    (out / MARKDOWN).write_text(render_markdown(run) + "\n")


def run_bench(settings: BenchSettings, command: str | None = None,
              sections: Mapping[str, SectionFn] | None = None) -> BenchRun:
    """sections: the functions of sections beyond the core's (SECTION_FUNCTIONS), by name."""
    functions = {**SECTION_FUNCTIONS, **(sections or {})}
    missing = [name for name in settings.sections if name not in functions]
    if missing:
        raise ValueError(f"no function for the sections {missing} (the http section's is in crsm/bench_server.py)")
    settings.out.mkdir(parents=True, exist_ok=True)
    workload = Workload(settings)
    run = BenchRun(meta=describe_environment(workload, command), settings=settings.to_dict())
    log.info("crsm bench: sections %s on %s (%s), results in %s", ", ".join(settings.sections), run.meta["device"],
             settings.dtype, settings.out)
    for name in SECTIONS:
        if name in settings.sections:
            run.sections[name] = run_section(name, functions[name], workload)
            save(run, workload)
    if write_plot(settings.out / PLOT, run):
        run.files["plot"] = str(settings.out / PLOT)
    if settings.docs is not None:
        run.files["docs"] = str(settings.docs)
    save(run, workload)
    if settings.docs is not None:
        write_docs(settings.docs, run)
    return run
