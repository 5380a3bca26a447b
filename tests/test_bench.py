"""`crsm bench --quick` on the CPU: every section's numbers are present and consistent, the baselines are
recorded as skipped with their reason, a failing section is recorded and the run goes on, and the
generated markdown lands between its markers without touching the text around them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crsm.bench_server import SECTIONS as SERVER_SECTIONS
from crsm.cli import build_parser
from crsm_core.bench import runner
from crsm_core.bench.cli import settings_from_args
from crsm_core.bench.report import BEGIN, END, write_docs
from crsm_core.bench.settings import BenchSettings, SettingsError
from crsm_core.bench.stats import LatencyStats, gaps, steady_tokens_per_s, window_gaps
from crsm_core.engine_config import PLANNER_MODES
from crsm_core.markdown import write_generated_section


def quick_settings(out: Path, *extra: str) -> BenchSettings:
    return settings_from_args(build_parser().parse_args(["bench", "--quick", "--out", str(out), "--no-docs", *extra]))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, single_intra_op_thread):
    out = tmp_path_factory.mktemp("bench")
    settings = quick_settings(out)
    run = runner.run_bench(settings, sections=SERVER_SECTIONS)
    return settings, run, json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


@pytest.mark.slow
def test_quick_run_measures_every_section(quick_run):
    settings, run, data, _ = quick_run
    assert settings.docs is None and settings.device == "cpu" and settings.dtype == torch.float32
    statuses = {name: s["status"] for name, s in data["sections"].items()}
    assert statuses == {"engine": "ok", "baselines": "skipped", "deliberation": "ok", "http": "ok"}
    assert data["meta"]["model"]["parameters"] > 0 and data["meta"]["commit"]


def check_run(run: dict, streams: int, tokens: int, warmup: int) -> None:
    assert run["streams"] == streams and run["tokens_per_stream"] == tokens
    assert run["total_tokens"] == streams * tokens
    assert run["itl"]["count"] == streams * (tokens - 1 - warmup)
    assert 0 < run["itl"]["p50_ms"] <= run["itl"]["p99_ms"] <= run["itl"]["max_ms"]
    assert run["tokens_per_s"] > 0 and run["wall_s"] > 0


@pytest.mark.slow
def test_engine_section(quick_run):
    settings, run, data, markdown = quick_run
    result = data["sections"]["engine"]["result"]
    assert [b["backbone"] for b in result["backbones"]] == ["reference"]
    runs, traffic = result["backbones"][0]["runs"], result["backbones"][0]["traffic"]
    assert [(r["streams"], r["label"]) for r in runs] == [(1, "greedy"), (16, "greedy"), (64, "greedy"),
                                                           (64, "temperature 1"), (16, "greedy, logprobs 5")]
    for r in runs:
        check_run(r, r["streams"], settings.tokens, settings.warmup_gaps)
    assert result["engine_config"]["max_sessions"] == 64
    # bandwidth: the bytes of each run's step (the CPU steps exactly its rows) over its ITL p50
    assert result["copy_gb_per_s"] > 0
    model = run.sections["engine"].result
    assert model.runs == model.backbones[0].runs
    for r, t in zip(runs, traffic):
        assert t["rows"] == r["streams"]
        assert t["gb_per_s"] == pytest.approx(t["bytes_per_step"] / (r["itl"]["p50_ms"] / 1e3) / 1e9)
        assert t["share_of_copy"] == pytest.approx(t["gb_per_s"] / result["copy_gb_per_s"])
    assert traffic[1]["bytes_per_step"] > traffic[0]["bytes_per_step"]   # 16 rows of state against 1
    assert "| reference | 1 | greedy |" in markdown and "bandwidth used (GB/s, % of copy)" in markdown


@pytest.mark.slow
def test_baselines_are_skipped_with_a_reason(quick_run):
    _, _, data, markdown = quick_run
    backends = data["sections"]["baselines"]["result"]["backends"]
    assert [b["backend"] for b in backends] == ["mamba_ssm", "transformers"]
    for b in backends:
        assert b["status"] == "skipped" and "--quick" in b["reason"] and b["runs"] == []
    assert "| mamba_ssm | - | skipped: --quick" in markdown and "| transformers | - | skipped: --quick" in markdown


@pytest.mark.slow
def test_deliberation_section(quick_run):
    settings, _, data, _ = quick_run
    result = data["sections"]["deliberation"]["result"]
    assert result["tokens_per_session"] == settings.deliberation_tokens
    alone = result["plans_alone"]
    assert [a["roots"] for a in alone] == [1, 16]
    for a in alone:
        assert a["plans"] == a["latency"]["count"] > 0 and a["latency"]["p50_ms"] > 0
        assert a["state_steps_per_plan"] > 0 and a["state_steps_per_s"] > 0
    # one batched plan of 16 sessions does 16 sessions' work (lag and expansions per root)
    assert alone[1]["state_steps_per_plan"] > 8 * alone[0]["state_steps_per_plan"]
    rows = result["rows"]
    assert [(r["planner_mode"], r["sessions"]) for r in rows] == [(m, n) for m in PLANNER_MODES for n in (1, 16)]
    for r in rows:
        check_run(r["off"], r["sessions"], settings.deliberation_tokens, settings.warmup_gaps)
        check_run(r["on"], r["sessions"], settings.deliberation_tokens, settings.warmup_gaps)
        assert r["p50_ratio"] == pytest.approx(r["on"]["itl"]["p50_ms"] / r["off"]["itl"]["p50_ms"])
        assert r["p99_ratio"] > 0 and r["state_steps_per_s"] >= 0 and r["rows_stepped_per_s"] >= 0
        assert r["state_steps"] == r["counters"]["state_steps"]
        assert r["plans_launched"] >= 1 and 0 <= r["plans_finished"] <= r["plans_launched"]
        assert set(r["injections"]) == {"applied", "applied_late", "pruned", "vetoed", "diverged", "rejected"}
        judged = r["counters"]["produced"] - r["counters"]["vetoed"]
        if judged:
            landed = r["counters"]["applied"] + r["counters"]["applied_late"]
            assert r["landing_ratio"] == pytest.approx(landed / judged)
        else:
            assert r["landing_ratio"] is None
    # plans of the light --quick planner finish within the sessions somewhere, so the rate is measured
    assert sum(r["state_steps"] for r in rows) > 0
    # every counted state-step of a finished plan went through the dynamics (plus its lag fast-forward)
    assert sum(r["rows_stepped_per_s"] for r in rows) > 0


@pytest.mark.slow
def test_http_section(quick_run):
    settings, _, data, _ = quick_run
    designs = data["sections"]["http"]["result"]["designs"]
    # the server in a process of its own, measured with the engine in its process and in one of its own
    assert [d["design"] for d in designs] == ["one-process", "engine-process"]
    assert [d["server"]["engine_process"] for d in designs] == [False, True]
    for design in designs:
        assert design["server"]["max_prompt_tokens"] >= 4096 and design["server"]["backbone"] == "reference"
        assert [r["streams"] for r in design["runs"]] == [1, 16, 64]
        for r in design["runs"]:
            check_run(r, r["streams"], settings.tokens, settings.warmup_gaps)
            assert r["ttft"]["count"] == r["streams"] and r["ttft"]["p50_ms"] > 0
        long = design["long_prompt"]
        assert long["prompt_tokens"] == 4096 and long["streams"] == 16 and long["prefill_chunk"] == 256
        assert long["window_ms"] > 0 and long["itl_during"]["count"] > 0 and long["itl_before"]["count"] > 0
        assert long["p99_ratio"] == pytest.approx(long["itl_during"]["p99_ms"] / long["itl_before"]["p99_ms"])


@pytest.mark.slow
def test_targets_and_markdown(quick_run):
    _, _, data, markdown = quick_run
    targets = {t["name"]: t for t in data["targets"]}
    assert len(targets) == 5 + 4 * len(PLANNER_MODES) + 8 * 2   # engine, plans alone, per mode, per HTTP design
    against_mamba = {"engine ITL p50, 1 session, vs mamba_ssm generate", "engine throughput, 64 sessions, vs mamba_ssm generate"}
    rows = {f"planners ({r['planner_mode']}), {r['sessions']} sessions: landing ratio": r
            for r in data["sections"]["deliberation"]["result"]["rows"]}
    for name, t in targets.items():  # every section ran, so every target has its number and a verdict...
        if name in against_mamba:    # ...but those against mamba_ssm, whose baseline --quick skips
            assert t["measured"] is None and t["met"] is None and t["margin"] == "not measured"
        elif name in rows and rows[name]["counters"].get("produced", 0) == rows[name]["counters"].get("vetoed", 0):
            # ...and the landing ratio where no plan of the quick run was judged (all cancelled or vetoed)
            assert t["measured"] is None and t["met"] is None and rows[name]["landing_ratio"] is None
        else:
            assert t["measured"] is not None and t["met"] in (True, False) and t["margin"]
    assert targets["engine ITL p50, 1 session"]["measured"] == \
        data["sections"]["engine"]["result"]["backbones"][0]["runs"][0]["itl"]["p50_ms"]
    alone = data["sections"]["deliberation"]["result"]["plans_alone"][1]
    assert targets["plans alone, 16 sessions: state-steps/s"]["measured"] == alone["state_steps_per_s"]
    for row in ("#### Targets", "| engine ITL p50, 1 session | <= 0.55 ms |", "| 1 | greedy |", "| 64 | temperature 1 |",
                "| crsm engine (reference) | 64 |", "| stream | 16 |", "| ride | 1 |", "| 16 | ", "p99 ratio",
                "4,096-token prompt", "| one-process | 64 |", "| engine-process | 16 |",
                "| HTTP (engine-process), 64 clients: tokens/s vs the engine | >= 0.90x |", "| plans alone, 16 sessions: state-steps/s | >= 18,454 /s |"):
        assert row in markdown, row


@pytest.mark.slow
def test_docs_section_is_replaced_and_the_text_around_it_kept(quick_run, tmp_path):
    _, run, _, _ = quick_run
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nwritten by hand\n\n{BEGIN}\nold numbers\n{END}\n\nnotes after\n")
    write_docs(doc, run)
    write_docs(doc, run)  # a rerun replaces its own section, once
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nwritten by hand\n\n") and text.endswith(f"{END}\n\nnotes after\n")
    assert "old numbers" not in text and text.count(BEGIN) == 1 and "### Latest run" in text


def test_generated_section_without_markers_is_appended(tmp_path):
    doc = tmp_path / "doc.md"
    write_generated_section(doc, "body 1", "<!-- b -->", "<!-- e -->", heading="# Title\n\n")
    assert doc.read_text() == "# Title\n\n<!-- b -->\nbody 1\n<!-- e -->\n"
    doc.write_text("hand-written\n")
    write_generated_section(doc, "body 2", "<!-- b -->", "<!-- e -->")
    assert doc.read_text() == "hand-written\n\n<!-- b -->\nbody 2\n<!-- e -->\n"


def test_a_failing_section_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken(workload):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setitem(runner.SECTION_FUNCTIONS, "engine", broken)
    run = runner.run_bench(quick_settings(tmp_path, "--sections", "engine", "baselines"))
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["sections"]["engine"]["status"] == "failed"
    assert data["sections"]["engine"]["error"] == "RuntimeError: boom"
    assert data["sections"]["baselines"]["status"] == "skipped"
    assert "**failed**: `RuntimeError: boom`" in (tmp_path / "bench.md").read_text()
    engine_target = next(t for t in run.targets if t.name == "engine ITL p50, 1 session")
    assert engine_target.met is None and engine_target.margin == "not measured"


def test_settings_are_validated(tmp_path):
    with pytest.raises(SettingsError, match="tokens must be"):
        quick_settings(tmp_path, "--tokens", "3")
    with pytest.raises(SystemExit):  # argparse refuses an unknown section
        quick_settings(tmp_path, "--sections", "nope")
    with pytest.raises(SettingsError, match="sections"):
        BenchSettings(out=tmp_path, device="cpu", sections=())
    assert quick_settings(tmp_path, "--tokens", "40").deliberation_tokens == 40
    with pytest.raises(SettingsError, match="on the CPU the only backbone is the reference"):
        quick_settings(tmp_path, "--backbones", "fused_step")
    with pytest.raises(SettingsError, match="distinct"):
        BenchSettings(out=tmp_path, device="cpu", backbones=("reference", "reference"))
    assert quick_settings(tmp_path).backbones == ("reference",)
    if not torch.cuda.is_available():
        with pytest.raises(SettingsError, match="CUDA"):
            quick_settings(tmp_path, "--device", "cuda")


def test_step_bytes_count_the_weights_once_and_each_row_twice():
    from crsm_core.backbone import MambaLM
    from crsm_core.bench.bandwidth import rows_stepped, step_bytes
    from crsm_core.config import tiny_config
    from crsm_core.state import RecurrentState

    config = tiny_config()
    model = MambaLM(config)
    row = RecurrentState.bytes_per_row(config, torch.float32)
    assert step_bytes(model, 3) == model.num_parameters() * 4 + 2 * 3 * row   # tied: the LM head reads the table
    untied = MambaLM(tiny_config(tie_embeddings=False))
    table = untied.backbone.embedding.weight.numel() * 4
    assert step_bytes(untied, 3) == untied.num_parameters() * 4 - table + 3 * config.d_model * 4 + 2 * 3 * row
    assert rows_stepped(16, 64, torch.device("cpu")) == 16
    assert rows_stepped(9, 64, torch.device("cuda")) == 16 and rows_stepped(64, 80, torch.device("cuda")) == 64


def test_stats():
    assert gaps([0.0, 1.0, 3.0, 6.0], warmup=1) == [2.0, 3.0]
    stats = LatencyStats.of([0.001, 0.002, 0.003])
    assert stats.count == 3 and stats.p50_ms == pytest.approx(2.0) and stats.max_ms == pytest.approx(3.0)
    # two streams, one token per second each; both past warm-up from t=1 to t=9: 16 tokens in 8 s
    a, b = [float(t) for t in range(10)], [float(t) + 0.5 for t in range(10)]
    assert steady_tokens_per_s([a, b], warmup=1) == pytest.approx(16 / 8.0)
    assert window_gaps([a], 2.5, 4.5) == [1.0, 1.0, 1.0]


def test_transformers_baseline_loads_the_same_weights_on_the_cpu(tmp_path):
    # The GPU run's transformers baseline, on the CPU with the tiny model: the renamed weights load
    # strictly and give our logits, and generate() streams exactly the requested tokens.
    pytest.importorskip("transformers")
    from crsm_core.bench import baselines
    from crsm_core.bench.workload import Workload

    workload = Workload(quick_settings(tmp_path))
    model = baselines.hf_model(workload, torch.device("cpu"))
    ids = torch.tensor(workload.prompts(2, salt=1))
    with torch.no_grad():
        assert baselines.rel_err(model(ids).logits[..., :workload.config.vocab_size], workload.backbone(ids)) < 1e-4
    result = baselines.hf_runs(workload, torch.device("cpu"), (1, 3), tokens=8)
    assert result.status == "ok" and [r.streams for r in result.runs] == [1, 3]
    assert all(r.tokens_per_stream == 8 and r.itl.count == 8 - 1 - workload.settings.warmup_gaps for r in result.runs)


def test_timed_runs_streams_every_step_of_each_batch(tmp_path):
    # The baselines' timing loop, with a greedy loop of the tiny backbone standing in for generate().
    from crsm_core.bench import baselines
    from crsm_core.bench.workload import Workload

    workload = Workload(quick_settings(tmp_path))
    model, warmed = workload.backbone, []

    @torch.no_grad()
    def generate(ids, streamer):
        state = model.allocate_state(ids.shape[0])
        logits, out = model.prefill(ids, state), [ids]
        streamer.put(ids)
        for _ in range(10):
            token = logits.argmax(dim=-1)
            streamer.put(token)
            out.append(token[:, None])
            logits = model.step(token, state)
        streamer.end()
        return torch.cat(out, dim=1)

    runs = baselines.timed_runs("greedy loop", workload, torch.device("cpu"), (1, 3), 10,
                                lambda ids: warmed.append(ids.shape[0]), generate)
    assert warmed == [1, 3] and [r.streams for r in runs] == [1, 3]
    assert all(r.total_tokens == r.streams * 10 and r.itl.count == 10 - 1 - workload.settings.warmup_gaps
               and r.tokens_per_s > 0 for r in runs)
    with pytest.raises(RuntimeError, match="greedy loop generate returned"):
        baselines.timed_runs("greedy loop", workload, torch.device("cpu"), (2,), 9, lambda ids: None, generate)
