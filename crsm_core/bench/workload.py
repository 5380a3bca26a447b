"""The model, prompts and tokenizer every section measures with.

Full run: mamba2-130m's shape (d_model 768, 24 layers, vocab 50277 padded to a multiple of 16 = 50288,
d_state 128, headdim 64, expand 2, ngroups 1, chunk 256), random weights, bf16, the first of
`settings.backbones` on CUDA (fused_step by default). `--quick`: crsm_core.config's tiny config, fp32,
the reference backbone on the CPU.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import torch

from ..backbone import MambaLM, build_backbone
from ..config import MambaConfig, tiny_config
from ..deliberation import DeliberationConfig
from ..dynamics import DynamicsConfig, LatentDynamics
from ..model import CRSMModel
from ..planner import PlannerConfig
from ..tokenizer import TokenIdTokenizer
from .settings import BenchSettings

log = logging.getLogger(__name__)


def bench_model_config(quick: bool) -> MambaConfig:
    if quick:
        return tiny_config()
    return MambaConfig(d_model=768, n_layer=24, vocab_size=50277, pad_vocab_size_multiple=16)


def deliberation_config(quick: bool) -> DeliberationConfig:
    """The planners' settings: the defaults (exact steps, the lag from the measured latency). --quick
    uses a small search, so that plans finish within its few tokens on the CPU."""
    if quick:
        return DeliberationConfig(planner=PlannerConfig(n_simulations=4, top_k=2, max_depth=2, leaf_batch=2))
    return DeliberationConfig()


@dataclass
class Workload:
    """Built once per run and shared by the sections (same weights everywhere). The backbone is built
    lazily, so a failure to build it fails each section that needs it, with the reason, and nothing else."""
    settings: BenchSettings
    config: MambaConfig = field(init=False)
    tokenizer: TokenIdTokenizer = field(init=False)
    _backbone: MambaLM | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.config = bench_model_config(self.settings.quick)
        self.tokenizer = TokenIdTokenizer(self.config.vocab_size)

    @property
    def impl(self) -> str:
        """The backbone every section runs (the engine section compares the others with it)."""
        return self.settings.backbones[0]

    @property
    def backbone(self) -> MambaLM:
        if self._backbone is None:
            torch.manual_seed(self.settings.seed)  # the same random weights on every run
            self._backbone = build_backbone(self.config, self.settings.device, dtype=self.settings.dtype,
                                            impl=self.impl)
            log.info("backbone: %s, %.1fM parameters, %s on %s", self.impl, self._backbone.num_parameters() / 1e6,
                     self.settings.dtype, self.settings.device)
        return self._backbone

    def backbone_of(self, impl: str) -> MambaLM:
        """A backbone of `impl` holding the shared backbone's weights (the shared one for its own impl)."""
        if impl == self.impl:
            return self.backbone
        model = build_backbone(self.config, self.settings.device, dtype=self.settings.dtype, impl=impl)
        model.load_state_dict(self.backbone.state_dict())
        return model

    @property
    def built_backbone(self) -> MambaLM | None:
        """The backbone if a section has built it (for the report), without building it."""
        return self._backbone

    def crsm_model(self) -> CRSMModel:
        """A CRSMModel around the shared backbone with untrained dynamics and value heads (close() it
        when done)."""
        backbone = self.backbone
        dynamics = LatentDynamics(DynamicsConfig.for_model(backbone.config), backbone).to(backbone.device).eval()
        return CRSMModel(backbone, tokenizer=self.tokenizer, dynamics=dynamics,
                         config=deliberation_config(self.settings.quick))

    def prompts(self, n: int, length: int | None = None, salt: int = 0) -> list[tuple[int, ...]]:
        """n random prompts of `length` tokens (default: settings.prompt_tokens), reproducible per salt."""
        rng = random.Random(self.settings.seed * 1_000_003 + salt)
        length = self.settings.prompt_tokens if length is None else length
        return [tuple(rng.randrange(self.config.vocab_size) for _ in range(length)) for _ in range(n)]
