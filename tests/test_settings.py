"""The server's settings, declared once (server/settings.py): every setting is a flag of `crsm serve` and a
`CRSM_<NAME>` variable, flags win over the environment, and a request becomes engine parameters in one
method per request model (server/schemas.py)."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest

from crsm.cli import build_parser
from crsm_core.deliberation import DeliberationConfig
from crsm_core.engine_config import EngineConfig
from server.chat_template import CHAT_STOPS
from server.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest
from server.settings import RequestDefaults, ServerSettings, SettingsError, _cli_type, settings_fields

REPO = Path(__file__).resolve().parent.parent


def serve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices["serve"]


def other_value(setting) -> object:
    """A valid value of the setting that is not its default."""
    kind, choices = _cli_type(setting.annotation)
    if choices:
        return next(c for c in choices if c != setting.default)
    if kind is bool:
        return not setting.default
    if kind is Path:
        return Path("/models/other")
    if kind is str:
        return "cpu" if setting.name == "device" else "other"
    if kind is float:
        return 0.5 if setting.default is None else setting.default / 2
    return 2 if setting.default in (None, 1) else setting.default // 2  # within every int setting's bounds


def test_every_setting_is_a_flag_with_help():
    flags = {s: a for a in serve_parser()._actions for s in a.option_strings}
    assert len(settings_fields()) > 15
    for s in settings_fields():
        assert s.flag in flags, s.flag
        assert s.help and s.env in flags[s.flag].help, s.name
    # the engine's fields are the engine's own: one declaration
    assert {f.name for f in dataclasses.fields(EngineConfig)} <= {s.name for s in settings_fields()}


def test_every_environment_variable_and_flag_sets_its_setting():
    values = {s.name: other_value(s) for s in settings_fields()}
    from_env = ServerSettings.from_env({s.env: str(v).lower() if isinstance(v, bool) else str(v)
                                        for s, v in zip(settings_fields(), values.values())})
    assert from_env.flat() == values
    argv = ["serve"]
    for s in settings_fields():
        v = values[s.name]
        argv += [s.flag if v else "--no-" + s.flag[2:]] if isinstance(v, bool) else [s.flag, str(v)]
    from_flags = ServerSettings.from_cli_args(build_parser().parse_args(argv), environ={})
    assert from_flags == from_env
    assert from_flags.engine == EngineConfig(**{f.name: values[f.name] for f in dataclasses.fields(EngineConfig)})


def test_flags_win_over_the_environment_and_the_environment_over_defaults():
    args = build_parser().parse_args(["serve", "--model", "/m", "--max-sessions", "3", "--deliberation",
                                      "--deliberation-lag", "2", "--planner-mode", "ride"])
    s = ServerSettings.from_cli_args(args, environ={"CRSM_MAX_SESSIONS": "9", "CRSM_QUEUE_SIZE": "7",
                                                    "CRSM_DELIBERATION_SIMULATIONS": "5"})
    assert s.model_dir == Path("/m") and s.engine.max_sessions == 3 and s.engine.queue_size == 7
    assert s.engine.planner_mode == "ride" and s.engine.prefill_chunk == EngineConfig().prefill_chunk
    assert s.deliberation.enabled and s.deliberation.lag == 2 and s.deliberation.simulations == 5
    assert s.deliberation.injection_rate is None  # unset: the model's own


def test_python_keywords_take_the_flat_names():
    s = ServerSettings(max_sessions=2, deliberation_lag=4, port=0)
    assert s.engine.max_sessions == 2 and s.deliberation.lag == 4 and s.port == 0
    assert ServerSettings(engine=EngineConfig(max_sessions=2)).engine.max_sessions == 2
    with pytest.raises(ValueError, match="not both"):
        ServerSettings(engine=EngineConfig(), max_sessions=2)
    with pytest.raises(ValueError, match="extra"):
        ServerSettings(max_sesions=2)


@pytest.mark.parametrize("environ, message", [
    ({"CRSM_MAX_SESSIONS": "0"}, "engine: .*max_sessions must be >= 1"),
    ({"CRSM_DELIBERATION_LAG": "99"}, "deliberation_lag: .*less than or equal to 32"),
    ({"CRSM_PLANNER_MODE": "wild"}, "planner_mode: "),
    ({"CRSM_PORT": "x"}, "port: "),
])
def test_invalid_settings_name_the_setting(environ, message):
    with pytest.raises(SettingsError, match=message):
        ServerSettings.from_env(environ)


def test_the_settings_table_in_the_docs_names_every_setting():
    doc = (REPO / "docs" / "serving.md").read_text()
    missing = [s.name for s in settings_fields() if f"`{s.name}`" not in doc]
    assert not missing


def test_literal_settings_are_choices():
    literal = [s for s in settings_fields() if get_origin(s.annotation) is Literal]
    assert [s.name for s in literal] == ["http_protocol", "backbone", "planner_mode"]
    for flag in ("--planner-mode", "--backbone"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", flag, "wild"])
    for setting in literal:
        assert _cli_type(setting.annotation)[1] == list(get_args(setting.annotation))
    assert build_parser().parse_args(["serve", "--backbone", "fused_step"]).backbone == "fused_step"


# ---- requests into engine parameters -------------------------------------------------------------------

MODEL_DELIBERATION = DeliberationConfig(enabled=False, lag=3, injection_rate=0.05)


def defaults(**settings) -> RequestDefaults:
    return RequestDefaults.of(ServerSettings(**settings), MODEL_DELIBERATION)


def test_deliberation_takes_the_request_then_the_server_then_the_model():
    off = defaults()
    assert GenerateRequest(prompt="a").to_generation_request([1], off).deliberation is None
    on = defaults(deliberation_enabled=True, deliberation_lag=5, deliberation_simulations=7)
    config = GenerateRequest(prompt="a", deliberation={"lag": 2}).to_generation_request([1], on).deliberation
    assert config.enabled and config.lag == 2                      # the request's
    assert config.planner.n_simulations == 7                       # the server's
    assert config.injection_rate == MODEL_DELIBERATION.injection_rate  # the model's
    declined = GenerateRequest(prompt="a", deliberation={"enabled": False}).to_generation_request([1], on)
    assert declined.deliberation is None
    asked = GenerateRequest(prompt="a", deliberation={"enabled": True}).to_generation_request([1], off).deliberation
    assert asked.enabled and asked.lag == MODEL_DELIBERATION.lag


def test_generate_request_fields_reach_the_engine():
    body = GenerateRequest(token_ids=[5, 6], temperature=0.5, top_p=0.9, top_k=3, seed=11, stop="x", ignore_eos=True)
    request = body.to_generation_request(body.token_ids, defaults(default_max_tokens=9))
    assert request.prompt_ids == (5, 6) and request.max_tokens == 9 and request.stop == ("x",) and request.ignore_eos
    s = request.sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed) == (0.5, 0.9, 3, 11)


def test_openai_requests_choices_seeds_limits_and_stops():
    d = defaults(default_max_tokens=9, max_new_tokens=40)
    completion = CompletionRequest(model="m", prompt="a", seed=-1, n=2, stop=["z"])
    first, second = (completion.to_generation_request([1], d, choice=j) for j in range(2))
    assert (first.sampling.seed, second.sampling.seed) == (2**64 - 1, 0)  # seed + j in 64 bits
    assert first.max_tokens == 9 and first.stop == ("z",) and first.deliberation is None
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], stop="z")
    request = chat.to_generation_request([1], d)
    assert request.max_tokens == 40 and request.stop == ("z", *CHAT_STOPS) and request.sampling.seed is None
    assert ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                 max_completion_tokens=6).to_generation_request([1], d).max_tokens == 6

