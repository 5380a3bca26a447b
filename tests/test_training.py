"""Training pipeline: tasks, data, rollouts, metrics, and the `tiny` pipeline end to end (CPU)."""
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from crsm.cli import main as crsm_main
from crsm_core.backbone import MambaLM
from crsm_core.checkpoint import load_pretrained
from crsm_core.config import ConfigError, tiny_config
from crsm_core.tokenizer import ByteTokenizer
from crsm_core.training.config import DataConfig, deliberation_config, load_config
from crsm_core.training.data import BatchSampler, heldout_text_windows, is_heldout_file, list_corpus_files, \
    load_corpus, stdlib_root
from crsm_core.training.rollout import generate, replay
from crsm_core.training.stage3_value import roc_auc
from crsm_core.tasks import TaskSpec, answer, check, heldout_prompts, is_heldout, sample_prompts

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


# ---- tasks and data ------------------------------------------------------------------------------

def test_checker_accepts_exactly_the_answer():
    # subset sums: any right subset, each number at most once, no other text
    prompt = "pick 3,8,5,11,23 sum 16:"
    assert answer(prompt) == "5+11" and check(prompt, "11+5") and check(prompt, "3+5+8") and check(prompt, "5+11\nx")
    assert not check(prompt, "8+8") and not check(prompt, "5+11+0") and not check(prompt, "05+11")
    assert not check(prompt, "16") and not check(prompt, "5 + 11") and not check(prompt, "")
    assert answer("12+345=") == "357" and answer("345-12=") == "333"
    assert check("12+345=", "357") and check("12+345=", " 357\nmore text")
    assert not check("12+345=", "358") and not check("12+345=", "3570") and not check("12+345=", "")
    assert not check("12+345=", "357.0") and not check("12+345=", "+357")
    with pytest.raises(ValueError):
        answer("12*3=")


def test_subset_prompts_have_an_answer_of_the_sizes_asked_and_prefixes_are_checked():
    from crsm_core.tasks import subset_consistent, subset_problem
    spec = TaskSpec(families=("subset",), subset_numbers=6, subset_max=40, subset_sizes=(2, 3))
    for p in sample_prompts(np.random.default_rng(1), spec, 200, heldout=False):
        numbers, target = subset_problem(p)
        assert len(set(numbers)) == 6 and all(1 <= x <= 40 for x in numbers) and target not in numbers
        assert check(p, answer(p)) and len(answer(p).split("+")) <= 3
        assert subset_consistent(numbers, target, answer(p)[:2])   # a right answer's prefixes stay consistent
    assert not subset_consistent([3, 8, 5], 16, "5+5") and not subset_consistent([3, 8, 5], 4, "5")
    assert set(heldout_prompts(spec, 50, seed=0, family="subset")).isdisjoint(
        sample_prompts(np.random.default_rng(0), spec, 3000, heldout=False))


def test_task_split_is_disjoint_and_heldout_prompts_are_fixed():
    spec = TaskSpec(max_digits=3)
    train = sample_prompts(np.random.default_rng(0), spec, 2000, heldout=False)
    held = heldout_prompts(spec, 100, seed=0)
    assert len(set(held)) == 100 and not set(train) & set(held)
    assert all(is_heldout(p, spec) for p in held) and not any(is_heldout(p, spec) for p in train)
    assert held == heldout_prompts(spec, 100, seed=0)
    for p in train[:200]:
        a, b = (int(x) for x in p[:-1].replace("-", "+").split("+"))
        assert a < 1000 and b < 1000 and int(answer(p)) >= 0


def test_corpus_split_by_path_hash_is_deterministic_and_disjoint():
    cfg = DataConfig(max_corpus_bytes=400_000)
    files = list_corpus_files(stdlib_root(), cfg.exclude_dirs)
    assert files == sorted(files) and any(f.endswith(".py") for f in files)
    assert not any("site-packages" in f for f in files)
    held = [f for f in files if is_heldout_file(f, cfg.heldout_percent)]
    assert 0 < len(held) < len(files) / 5
    a, b = load_corpus(cfg), load_corpus(cfg)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.heldout, b.heldout)
    assert a.train.max() <= ByteTokenizer.eos_id and (a.train == ByteTokenizer.eos_id).sum() == a.train_files


def test_batches_depend_only_on_seed_and_step_and_mix_tasks():
    cfg = DataConfig(seq_len=64, task_fraction=0.5, max_corpus_bytes=1_500_000)
    corpus = load_corpus(cfg)
    sampler = BatchSampler(corpus, TaskSpec(), cfg, batch_size=32, seed=1)
    x = sampler.batch(7)
    assert x.shape == (32, 65) and x.dtype == torch.long
    assert torch.equal(x, BatchSampler(corpus, TaskSpec(), cfg, 32, 1).batch(7))
    assert not torch.equal(x, sampler.batch(8))
    tok = ByteTokenizer()
    # A task row starts at a document boundary: "a+b=c<eos>...", every answer right.
    first_docs = [tok.decode(r[:r.index(tok.eos_id)]) for r in x.tolist() if tok.eos_id in r[:20]]
    task_docs = [d for d in first_docs if re.fullmatch(r"\d+[+-]\d+=\d+", d)]
    assert 5 <= len(task_docs) <= 27  # Binomial(32, 0.5): far inside these bounds
    for doc in task_docs:
        prompt, got = doc.split("=")
        assert check(prompt + "=", got)
    windows = heldout_text_windows(corpus, 4, 65)
    assert torch.equal(windows, heldout_text_windows(corpus, 4, 65)) and windows.shape == (4, 65)


def test_config_is_validated_once():
    cfg = load_config(TINY)
    assert cfg.model.n_layer == 4 and cfg.dynamics.lags == (1, 3, 8)
    with pytest.raises(ConfigError, match="unknown keys"):
        load_config(TINY, backbone={"stepz": 3})
    with pytest.raises(ConfigError, match="expected int"):
        load_config(TINY, seed="zero")
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config(TINY, backbone={"steps": 10, "warmup_steps": 10})
    with pytest.raises(ConfigError, match="deliberation"):
        load_config(TINY, deliberation={"injection_rate": 2.0})
    with pytest.raises(ConfigError, match="deliberation"):
        load_config(TINY, deliberation={"planner": {"n_simulation": 8}})


# ---- rollouts and metrics ------------------------------------------------------------------------

@pytest.fixture
def random_model():
    torch.manual_seed(0)
    return MambaLM(tiny_config()).eval()


def test_lockstep_generation_matches_one_prompt_at_a_time(random_model):
    prompts = [[5, 6, 7], [9], [1, 2, 3, 4, 5, 6]]
    out = generate(random_model, prompts, max_new_tokens=5, temperature=0.0, eos_id=256)
    for prompt, completion in zip(prompts, out.completions):
        state = random_model.allocate_state(1)
        logits = random_model.prefill(torch.tensor([prompt]), state)
        expected = []
        for _ in range(5):
            token = int(logits.argmax())
            if token == 256:
                break
            expected.append(token)
            logits = random_model.step(torch.tensor([token]), state)
        assert completion == expected


def test_replay_sees_the_states_after_each_completion_token(random_model):
    prompts, completions = [[3, 4], [7, 8, 9]], [[10, 11], []]
    seen: dict[tuple[int, int], torch.Tensor] = {}
    counter = {0: len(prompts[0]), 1: len(prompts[1])}

    def record(state, rows):
        for r in rows.tolist():
            seen[(r, counter[r])] = state.ssm[:, r].clone()
            counter[r] += 1

    replay(random_model, prompts, completions, record, pad_id=258)
    assert sorted(seen) == [(0, 2), (0, 3), (0, 4), (1, 3)]
    for (row, t), ssm in seen.items():
        state = random_model.allocate_state(1)
        random_model.prefill(torch.tensor([(prompts[row] + completions[row])[:t]]), state)
        torch.testing.assert_close(ssm, state.ssm[:, 0], rtol=1e-4, atol=1e-5)


def test_auc_matches_pair_counting():
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 5, 60).astype(float), rng.random(60) < 0.4
    pairs = [(1.0 if s > t else 0.5 if s == t else 0.0) for s, a in zip(scores, labels) if a
             for t, b in zip(scores, labels) if not b]
    assert roc_auc(scores, labels) == pytest.approx(np.mean(pairs))
    assert roc_auc(scores, np.zeros(60, bool)) is None


# ---- the tiny pipeline end to end ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-run")
    args = ["--config", str(TINY), "--out-dir", str(out)]
    # Stage 1 interrupted after 20 steps, then the full pipeline resumes it and runs stages 2-4.
    assert crsm_main(["train", "backbone", *args, "--stop-after", "20"]) == 0
    interrupted = torch.load(out / "backbone" / "train_state.pt", weights_only=False)
    assert crsm_main(["train", "all", *args]) == 0
    return out, interrupted


@pytest.mark.slow
def test_tiny_backbone_learns_and_resumes(tiny_run):
    out, interrupted = tiny_run
    cfg = load_config(TINY)
    assert interrupted["step"] == 20
    report = json.loads((out / "reports" / "backbone.json").read_text())
    assert report["steps"] == cfg.backbone.steps
    final = torch.load(out / "backbone" / "train_state.pt", weights_only=False)
    assert final["step"] == cfg.backbone.steps
    assert [s for s, _ in final["history"]["train"]] == list(range(1, cfg.backbone.steps + 1))
    assert final["history"]["train"][:20] == interrupted["history"]["train"]
    assert report["final_heldout_text_loss"] < report["initial_heldout_text_loss"] - 1.0
    assert report["final_train_loss"] < report["first_train_loss"] - 1.0


@pytest.mark.slow
def test_tiny_reports_fidelity_and_calibration(tiny_run):
    out, _ = tiny_run
    model_dir = out / "model"
    report = json.loads((model_dir / "training_report.json").read_text())
    n_layer = report["model"]["n_layer"]
    assert report["train_config"]["name"] == "tiny" and report["train_config"]["dynamics"]["horizon"] == 2
    assert all(report["stages"][s]["commit"] for s in ("backbone", "dynamics", "value"))
    fid = report["stages"]["dynamics"]["fidelity"]
    assert [f["lag"] for f in fid] == [1, 3, 8]
    for f in fid:
        assert len(f["cosine"]) == len(f["rel_error"]) == n_layer
        assert all(-1 <= c <= 1 for c in f["cosine"]) and all(e >= 0 for e in f["rel_error"])
    assert report["stages"]["dynamics"]["final_loss"] < report["stages"]["dynamics"]["first_loss"]
    value = report["stages"]["value"]
    q = value["quality_heldout"]
    # every branch point of the held-out rollouts has branch_top_k candidates
    assert q["candidates"] == q["branch_points"] * value["branch_top_k"] > 0
    assert all(0 <= p["position"] < value["max_new_tokens"] for p in q["per_position"])
    assert q["prior_auc"] is None or 0 <= q["prior_auc"] <= 1
    assert value["heads_beat_the_prior"] == (q["heads_auc"] is not None and q["prior_auc"] is not None
                                              and q["heads_auc"] > q["prior_auc"])
    heads = json.loads((model_dir / "value_heads.json").read_text())
    assert heads["beats_prior"] == value["heads_beat_the_prior"]
    assert heads["veto_threshold"] == value["veto"]["threshold"] and heads["veto_percentile"] == 99.0
    md = (model_dir / "TRAINING_REPORT.md").read_text()
    assert "| 8 |" in md and "Sibling-ranking AUC" in md and "Veto threshold" in md


@pytest.mark.slow
def test_tiny_assembled_directory_loads_and_generates(tiny_run):
    out, _ = tiny_run
    model_dir = out / "model"
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "dynamics.safetensors", "dynamics.json",
            "value_heads.safetensors", "value_heads.json", "crsm.json", "training_report.json",
            "TRAINING_REPORT.md"} <= names
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["backbone.layers.0.mixer.in_proj.weight"] == "BF16"
    assert dtypes["backbone.layers.0.mixer.A_log"] == "F32"
    model = load_pretrained(model_dir, impl="reference")
    assert model.dtype == torch.float32
    tok = ByteTokenizer()
    out_ids = generate(model, [tok.encode("def ")], max_new_tokens=12, temperature=0.0, eos_id=tok.eos_id)
    assert len(out_ids.completions[0]) > 0
    # The exported stage-1 weights already were rounded to bf16: assembly is lossless.
    exported = load_pretrained(out / "backbone" / "model", impl="reference")
    for (k, a), b in zip(exported.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.slow
def test_tiny_assembled_directory_serves_deliberation(tiny_run):
    import asyncio

    from crsm_core.model import CRSMModel
    from crsm_core.sampling import SamplingParams
    from crsm_core.deliberation import load_deliberation_config

    out, _ = tiny_run
    defaults = load_deliberation_config(out / "model")
    assert defaults == deliberation_config(load_config(TINY).deliberation)
    model = CRSMModel.from_pretrained(out / "model", config=replace(defaults, synchronous=True))
    try:
        result = asyncio.run(model.think_and_generate("12+34=", max_length=6, use_deliberation=True,
                                                      sampling=SamplingParams(temperature=0.0)))
    finally:
        model.close()
    assert 1 <= len(result.tokens) <= 6 and result.counters["launched"] >= 1


@pytest.mark.slow
def test_tiny_eval_writes_the_table(tiny_run, tmp_path):
    out, _ = tiny_run
    doc = tmp_path / "evaluation.md"
    assert crsm_main(["eval", "--config", str(TINY), "--out-dir", str(out), "--prompts", "12", "--out", str(doc)]) == 0
    families = json.loads(doc.with_suffix(".json").read_text())["summary"]
    assert set(families) == {"arithmetic", "subset"}
    for summary in families.values():
        for mode in ("greedy", "async", "sync", "best_of_n", "oracle", "suggestions_only", "injection_only"):
            row = summary[mode]
            assert row["prompts"] == 12 and row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
            assert row["tokens_per_s"] > 0 and row["itl_p50_ms"] > 0
            if mode != "greedy":
                assert row["fixes"] - row["regressions"] == round(12 * (row["accuracy"] - summary["greedy"]["accuracy"]))
        assert summary["best_of_n"]["notes"]["n_basis"] == "equal GPU time as (b)"
        assert summary["best_of_n"]["notes"]["n"] >= 1
        # synchronous sessions planned every position they produced a token at, and waited for plans
        sync = summary["sync"]["notes"]["counters"]
        assert sync["launched"] >= summary["sync"]["tokens"] and sync["waited"] >= 1
    text = doc.read_text()
    assert "(c) synchronous deliberation" in text and "## Dynamics fidelity" in text
    assert "## Value heads: quality at every answer position" in text and "Sibling-ranking AUC" in text

    # --families and --modes choose what runs
    one = tmp_path / "arithmetic.md"
    assert crsm_main(["eval", "--config", str(TINY), "--out-dir", str(out), "--prompts", "4", "--out", str(one),
                      "--families", "arithmetic", "--modes", "greedy"]) == 0
    summary = json.loads(one.with_suffix(".json").read_text())["summary"]
    assert set(summary) == {"arithmetic"} and set(summary["arithmetic"]) == {"greedy"}


@pytest.mark.slow
def test_an_eval_stopped_part_way_keeps_the_modes_it_finished(tiny_run, tmp_path, monkeypatch):
    from crsm_core.training import evaluate

    out, _ = tiny_run
    real = evaluate.run_mode

    def run_mode(crsm, mode, *args, **kwargs):
        if mode == "sync":
            raise TimeoutError("the machine's time ran out")
        return real(crsm, mode, *args, **kwargs)

    monkeypatch.setattr(evaluate, "run_mode", run_mode)
    doc = tmp_path / "evaluation.md"
    with pytest.raises(TimeoutError):
        evaluate.evaluate(load_config(TINY).replace(out_dir=str(out)), prompts=4, out=doc, families=("subset",),
                          modes=("greedy", "async", "sync"))
    summary = json.loads(doc.with_suffix(".json").read_text())["summary"]
    assert set(summary["subset"]) == {"greedy", "async"}
    assert "(b) async deliberation" in doc.read_text() and "(c) synchronous" not in doc.read_text()


def test_open_loop_loss_of_one_step_is_the_distillation_loss(random_model):
    from crsm_core.dynamics import DynamicsConfig, LatentDynamics, distillation_loss
    from crsm_core.training.stage2_dynamics import open_loop_loss

    dynamics = LatentDynamics(DynamicsConfig.for_model(random_model.config), random_model)
    with torch.no_grad():
        dynamics.write.normal_(0, 0.05)  # away from the zero init, so the state terms are not trivial
    state = random_model.allocate_state(3)
    random_model.prefill(torch.randint(0, 256, (3, 9)), state)
    tokens = torch.randint(0, 256, (3, 4))
    one = open_loop_loss(dynamics, random_model, state, tokens[:, :1])
    torch.testing.assert_close(one, distillation_loss(dynamics, random_model, state, tokens[:, 0]))
    assert open_loop_loss(dynamics, random_model, state, tokens).item() > 0
