"""Server settings, declared once.

`ServerSettings` holds the server's own fields, the engine's `EngineConfig` (crsm_core/engine_config.py)
and the deliberation defaults of requests (`DeliberationDefaults`). Every leaf field is a `crsm serve`
flag and a `CRSM_<NAME>` environment variable, generated from its declaration: the name, the type
(booleans as --x/--no-x, literals as choices), the default, and the docstring under the field as the
help. Flags win over the environment, which wins over the defaults. Validated once, here; the rest of
the server trusts them.

Names (`settings_fields()` lists them): a server field keeps its own (`port`: --port, CRSM_PORT); the
engine's fields too (`engine.max_sessions`: --max-sessions, CRSM_MAX_SESSIONS); the deliberation
defaults take the prefix `deliberation_` (`deliberation.lag`: --deliberation-lag, CRSM_DELIBERATION_LAG).
The same flat names are accepted as keywords: `ServerSettings(max_sessions=8, deliberation_lag=2)`.

No torch here: `crsm --help` reads these declarations without loading the model code.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import os
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Mapping, Union, get_args, get_origin, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from crsm_core.config import DEFAULT_MODEL_DIR
from crsm_core.engine_config import EngineConfig

if TYPE_CHECKING:
    from crsm_core.deliberation import DeliberationConfig

ENV_PREFIX = "CRSM_"

# One request must not be able to hold up every session's planning or fill the device: a plan's node
# pool holds simulations + 1 states per session (9.8 MB each at 129M parameters), and a plan steps `lag`
# tokens ahead before it searches. The server's defaults keep to the same bounds.
MAX_SIMULATIONS = 256
MAX_LAG = 32
# A late plan is caught up by stepping its state over the positions it missed, one backbone step per
# position, in the generator: the most lateness a request may let a plan have before it is pruned.
MAX_LATENESS = 128
# The value heads' spread is a standard deviation of probabilities (at most 0.5): 1 never vetoes.
MAX_VETO_THRESHOLD = 1.0


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class Group:
    """Marks a field that nests more settings: each of its fields is a flag and an environment variable
    of its own, named `prefix + field`."""
    prefix: str = ""


@dataclass(frozen=True)
class Aliases:
    """More flags for one setting (a shorter spelling)."""
    flags: tuple[str, ...]


# ---- deliberation -------------------------------------------------------------------------------------

class DeliberationKnobs(BaseModel):
    """The deliberation settings a request or the server may choose; None = the base config's value."""
    # the docstrings under the fields are also their descriptions in /openapi.json, which the viewer's
    # form is built from (server/static/app.js)
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    lag: int | None = Field(None, ge=0, le=MAX_LAG)
    """tokens a plan speculates before the position it plans for (default: from the measured latency)"""
    simulations: int | None = Field(None, ge=1, le=MAX_SIMULATIONS)
    """searches per plan"""
    injection_rate: float | None = Field(None, ge=0.0, le=1.0)
    """how far a landed plan moves the state (the gates' scale)"""
    use_suggestions: bool | None = None
    """a confident plan's token replaces the sampled one when it is in time"""
    synchronous: bool | None = None
    """a plan for every position, which the session waits for: the output is reproducible"""
    lead_window: int | None = Field(None, ge=0, le=MAX_LAG)
    """the first this many completion positions are planned synchronously (time to think, counted in TTFT)"""
    verifier: str | None = Field(None, max_length=64)
    """score plans with this checker (one of the model's, e.g. arithmetic) instead of the value heads"""
    veto_threshold: float | None = Field(None, ge=0.0, le=MAX_VETO_THRESHOLD)
    """a plan whose value heads disagree more than this (the spread of their probabilities) is vetoed
    (default: the model's calibrated threshold)"""
    max_lag: int | None = Field(None, ge=0, le=MAX_LATENESS)
    """a plan that arrives more than this many positions late is pruned instead of caught up"""

    def apply_to(self, base: DeliberationConfig) -> DeliberationConfig:
        """`base` with the fields that are set (their bounds are within DeliberationConfig's)."""
        changes = {name: value for name in ("lag", "injection_rate", "use_suggestions", "synchronous", "lead_window",
                                            "verifier", "veto_threshold", "max_lag")
                   if (value := getattr(self, name)) is not None}
        if self.simulations is not None:
            changes["planner"] = dataclasses.replace(base.planner, n_simulations=self.simulations)
        return dataclasses.replace(base, **changes)


class DeliberationDefaults(DeliberationKnobs):
    """Deliberation of the requests that do not say; the knobs left unset are the model's (its crsm.json)."""
    enabled: Annotated[bool, Aliases(("--deliberation",))] = False
    """deliberation on for requests that do not say"""


# ---- the settings -------------------------------------------------------------------------------------

class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model_dir: Annotated[Path, Aliases(("--model",))] = DEFAULT_MODEL_DIR
    """model directory"""
    model_name: str | None = None
    """the model id clients send (default: the model directory's name)"""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto: cuda when available, else cpu"""
    host: str = "127.0.0.1"
    """address to listen on"""
    port: int = Field(8000, ge=0, le=65535)
    """port to listen on (0: any free port)"""
    default_max_tokens: int = Field(16, ge=1)
    """max_tokens of a completion or generate request that gives none (OpenAI's completions default)"""
    default_chat_max_tokens: int = Field(256, ge=1)
    """max_tokens of a chat request that gives none (at most max_new_tokens)"""
    api_key: str | None = Field(None, min_length=1, repr=False)
    """the key clients send as `Authorization: Bearer KEY`; when set, every path but /health, /ready, /metrics and the viewer's page needs it (default: none asked). Prefer the environment variable: a flag shows in the process list"""
    max_body_bytes: int = Field(4 * 2**20, ge=1024)
    """largest request body in bytes; a larger one gets 413 before it is read"""
    header_timeout_s: float = Field(10.0, gt=0)
    """seconds a connection has to send a request's head (line and headers) once it opened or began it; then 408 and closed"""
    body_timeout_s: float = Field(30.0, gt=0)
    """seconds a request has to send its whole body after its head; then 408 and closed"""
    # 65 s: more than clients' pools keep an idle connection (httpx, so the openai client and ours: 5 s) and
    # than the usual load balancers' 60 s, so that it is the client that closes it. With both at 5 s a client
    # sometimes sent a request on a connection the server was closing at that moment and got a read error
    # it cannot safely retry (the load test of tests/reliability: 1 to 4 in about 1000 requests).
    keep_alive_s: float = Field(65.0, gt=0)
    """seconds an idle keep-alive connection stays open (more than clients' pools and load balancers keep theirs)"""
    max_connections: int = Field(1024, ge=1)
    """open connections at most; one more is answered 503 and closed at once"""
    http_protocol: Literal["httptools", "h11"] = "httptools"
    """uvicorn's HTTP/1.1 implementation: httptools (llhttp, in C) or h11 (pure Python, about 10 us more per streamed chunk)"""
    shutdown_drain_s: float = Field(10.0, ge=0)
    """seconds running sessions get to finish on shutdown"""
    torch_threads: int | None = Field(None, ge=1)
    """CPU threads for model work (default: torch's)"""
    backbone: Literal["auto", "reference", "fused", "fused_step"] = "auto"
    """the backbone's kernels: auto (on a GPU with mamba_ssm: fused_step where its kernels cover the model, else fused; reference on the CPU), reference (PyTorch), fused (mamba_ssm's Triton kernels), fused_step (fused, with this project's per-layer decode-step kernels)"""
    engine_process: bool = False
    """run the engine (scheduler, model, planners) in a process of its own, so that HTTP work never shares its interpreter (crsm_core/engine_core.py)"""
    ui: bool = True
    """serve the deliberation viewer at /ui/ and redirect / to it (server/ui.py)"""
    engine: Annotated[EngineConfig, Group()] = EngineConfig()
    deliberation: Annotated[DeliberationDefaults, Group("deliberation_")] = DeliberationDefaults()

    @property
    def served_model_name(self) -> str:
        return self.model_name or self.model_dir.name

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data: Any) -> Any:
        """Flat names (as flags and environment variables spell them) into their groups."""
        if not isinstance(data, Mapping):
            return data
        paths = {s.name: s.path for s in settings_fields() if len(s.path) > 1}
        # the rest (unknown names too: refused by extra="forbid") as given; a group given whole is copied
        nested = {key: dict(value) if isinstance(value, Mapping) else value
                  for key, value in data.items() if key not in paths}
        for key, value in data.items():
            if key in paths:
                node = nested
                for part in paths[key][:-1]:
                    node = node.setdefault(part, {})
                    if not isinstance(node, dict):
                        raise ValueError(f"give {part} whole or its fields by name, not both")
                node[paths[key][-1]] = value
        return nested

    def flat(self, mode: Literal["python", "json"] = "python") -> dict[str, Any]:
        """Every setting by its flat name (what `from_env` and the flags take)."""
        values = self.model_dump(mode=mode)
        return {s.name: functools.reduce(lambda node, part: node[part], s.path, values) for s in settings_fields()}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "ServerSettings":
        """Settings from `CRSM_<NAME>` variables, then the given flat overrides (None = not given)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {s.name: environ[s.env] for s in settings_fields() if s.env in environ}
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            problems = "; ".join(f"{_flat_name(err['loc'])}: {err['msg']}" for err in e.errors())
            raise SettingsError(f"invalid server settings: {problems}") from e

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per setting. Every flag defaults to None (not given), so that the environment and
        then the declared default apply."""
        for s in settings_fields():
            kind, choices = _cli_type(s.annotation)
            default = "" if s.default is None else f"; default {s.default}"
            options = dict(dest=s.name, default=None, help=f"{s.help} (${s.env}{default})")
            if kind is bool:
                parser.add_argument(s.flag, *s.aliases, action=argparse.BooleanOptionalAction, **options)
            else:
                parser.add_argument(s.flag, *s.aliases, type=kind, choices=choices,
                                    metavar=None if choices else s.name.upper(), **options)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> "ServerSettings":
        return cls.from_env(environ, **{s.name: getattr(args, s.name) for s in settings_fields()})


# ---- the flat view ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """One leaf of the settings."""
    name: str                     # flat name: "port", "max_sessions", "deliberation_lag"
    path: tuple[str, ...]         # where it sits: ("engine", "max_sessions")
    annotation: Any               # its type; a setting that may be unset is X | None
    default: Any
    help: str
    aliases: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


@functools.cache
def settings_fields() -> tuple[Setting, ...]:
    """Every leaf of ServerSettings, in declaration order."""
    return tuple(_leaves(ServerSettings, "", ()))


def _leaves(cls: type, prefix: str, path: tuple[str, ...]):
    docs = attribute_docs(cls)
    for name, annotation, default, metadata in _fields(cls):
        group = next((m for m in metadata if isinstance(m, Group)), None)
        if group is not None:
            yield from _leaves(annotation, prefix + group.prefix, path + (name,))
            continue
        aliases = next((m.flags for m in metadata if isinstance(m, Aliases)), ())
        yield Setting(prefix + name, path + (name,), annotation, default, docs.get(name, ""), aliases)


def _fields(cls: type) -> list[tuple[str, Any, Any, list]]:
    """(name, type, default, Annotated metadata) of a pydantic model's or a dataclass's fields."""
    if issubclass(cls, BaseModel):
        return [(name, f.annotation, f.get_default(call_default_factory=True), f.metadata)
                for name, f in cls.model_fields.items()]
    hints = get_type_hints(cls, include_extras=True)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        annotation, *metadata = get_args(hint) if get_origin(hint) is Annotated else (hint,)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out.append((f.name, annotation, default, metadata))
    return out


def attribute_docs(cls: type) -> dict[str, str]:
    """The docstring under each annotated field of a class and of its bases (as vLLM reads its configs')."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if k not in (object, BaseModel)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _cli_type(annotation: Any) -> tuple[type, list | None]:
    """The argparse type (and choices) of a setting's type."""
    if get_origin(annotation) in (Union, types.UnionType):
        [annotation] = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        choices = list(get_args(annotation))
        return type(choices[0]), choices
    if annotation in (bool, int, float, str, Path):
        return annotation, None
    raise TypeError(f"no command-line type for {annotation!r}")


def _flat_name(loc: tuple) -> str:
    """A pydantic error location as the setting's flat name (a whole group's: the group's name)."""
    for s in settings_fields():
        if tuple(loc[:len(s.path)]) == s.path:
            return s.name
    return ".".join(map(str, loc))


# ---- what a request that leaves fields out gets ---------------------------------------------------------

@dataclass(frozen=True)
class RequestDefaults:
    """The values of the fields a request leaves out: the server's settings over the model's own."""
    max_tokens: int                        # completions and /v1/generate
    max_new_tokens: int                    # the limit
    chat_max_tokens: int                   # chat's default, within the limit
    deliberation_enabled: bool
    deliberation: DeliberationConfig       # the model's, with the server's knobs applied

    @classmethod
    def of(cls, settings: ServerSettings, model_deliberation: DeliberationConfig) -> "RequestDefaults":
        deliberation = settings.deliberation.apply_to(dataclasses.replace(model_deliberation, enabled=True))
        limit = settings.engine.max_new_tokens
        return cls(min(settings.default_max_tokens, limit), limit, min(settings.default_chat_max_tokens, limit),
                   settings.deliberation.enabled, deliberation)
