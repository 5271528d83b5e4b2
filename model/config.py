"""Model configuration: one dataclass for the three architectures, with the paper's presets.

Presets (paper Table 4 and §3.3; the encoder follows Google BERT, the decoder is 2 layers at half width)::

    name   encoder (layers x hidden, FFN, heads)   decoder (layers x hidden, FFN, heads)   positions  LN
    tiny   2 x 64,    FFN 128,  4 heads            1 x 32,  FFN 64,   2 heads              128        see below
    mini   4 x 256,   FFN 1024, 4 heads            2 x 128, FFN 512,  2 heads              512        see below
    base   12 x 768,  FFN 3072, 12 heads           2 x 384, FFN 1536, 6 heads              512        see below
    large  24 x 1024, FFN 4096, 16 heads           2 x 512, FFN 2048, 8 heads              512        pre-LN

The ``base`` layer-norm placement depends on the architecture, as in the paper: post-LN for ``3ml-self`` and
``mlm`` (RoBERTa-base), pre-LN for ``3ml-cross`` ("Post-LN doesn't work for 3MLcross"). ``large`` is pre-LN for
all (24hBERT recipe). The large recipe trains at sequence length 128 but keeps 512 positions so the encoder can
be fine-tuned like BERT-large; the sequence length is a data/training setting, not a model one.
``tiny`` and ``mini`` use the base rule and exist for CPU tests and the demo.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields

ARCHITECTURES = ("mlm", "3ml-self", "3ml-cross")

_PRESETS: dict[str, dict] = {
    "tiny": dict(num_layers=2, hidden_size=64, ffn_size=128, num_heads=4,
                 decoder_num_layers=1, decoder_hidden_size=32, decoder_ffn_size=64, decoder_num_heads=2,
                 max_positions=128, vocab_pad_multiple=8),
    "mini": dict(num_layers=4, hidden_size=256, ffn_size=1024, num_heads=4,
                 decoder_num_layers=2, decoder_hidden_size=128, decoder_ffn_size=512, decoder_num_heads=2,
                 max_positions=512),
    "base": dict(num_layers=12, hidden_size=768, ffn_size=3072, num_heads=12,
                 decoder_num_layers=2, decoder_hidden_size=384, decoder_ffn_size=1536, decoder_num_heads=6,
                 max_positions=512),
    "large": dict(num_layers=24, hidden_size=1024, ffn_size=4096, num_heads=16,
                  decoder_num_layers=2, decoder_hidden_size=512, decoder_ffn_size=2048, decoder_num_heads=8,
                  max_positions=512, pre_ln=True),
}


@dataclass
class ModelConfig:
    """Everything that defines the network's shape and initialisation (not its parallelism: the tensor-parallel
    size comes from megatron-core's ``parallel_state``, so one config serves every TP size).

    Saved as JSON in every checkpoint (``to_dict``/``from_dict``); the export reads it back.
    """

    architecture: str = "3ml-self"
    """``mlm`` (RoBERTa baseline), ``3ml-self`` (self-attention decoder) or ``3ml-cross`` (cross-attention
    decoder)."""
    vocab_size: int = 50265
    """Tokenizer vocabulary size |V| (RoBERTa BPE: 50,265). Embedding rows beyond it are padding, see
    ``vocab_pad_multiple``."""
    vocab_pad_multiple: int = 128
    """The embedding/output matrix has ``padded_vocab_size`` rows (``vocab_size`` rounded up to this multiple) so
    it splits evenly over tensor-parallel ranks and GEMMs get friendly shapes; must be divisible by the TP size.
    Padded rows are never looked up and their logits are masked to -inf, so they do not change the loss."""
    max_positions: int = 512
    """Rows of the (learned, absolute) position embeddings of the encoder and of the decoder; the maximum
    sequence length."""
    num_layers: int = 12
    """Encoder Transformer layers."""
    hidden_size: int = 768
    """Encoder hidden width d_en (also the embedding width; the tied output projection works in this width)."""
    ffn_size: int = 3072
    """Encoder feed-forward inner width."""
    num_heads: int = 12
    """Encoder attention heads; must divide ``hidden_size`` and be divisible by the TP size."""
    decoder_num_layers: int = 2
    """3ML decoder layers (ignored by ``mlm``)."""
    decoder_hidden_size: int = 384
    """3ML decoder width d_de; an FC layer projects the encoder output from d_en to d_de."""
    decoder_ffn_size: int = 1536
    """3ML decoder feed-forward inner width."""
    decoder_num_heads: int = 6
    """3ML decoder attention heads; must divide ``decoder_hidden_size`` and be divisible by the TP size."""
    pre_ln: bool = False
    """Pre-layer-norm blocks (LN before each sub-layer, a final LN after the stack) if True; post-LN (BERT /
    RoBERTa: LN after each residual add) if False. Applies to encoder and decoder."""
    hidden_dropout: float = 0.1
    """Dropout on embeddings and on every sub-layer output before the residual add."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities."""
    tie_embeddings: bool = True
    """Output (vocabulary) projection shares the word-embedding matrix, as BERT/RoBERTa and the paper."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of every weight matrix and embedding (BERT/RoBERTa);
    biases start at 0, layer norms at (1, 0)."""
    layernorm_eps: float = 1e-5
    """Epsilon of every LayerNorm (RoBERTa: 1e-5)."""
    pad_token_id: int = 1
    """Id of ``<pad>`` (RoBERTa: 1). Padding is excluded through the batch's validity masks; the id is kept to
    check batches and for the export."""
    decoder_locality_bias: float = 0.0
    """Slope of an additive ``-slope * |i - j|`` bias on every 3ML decoder attention score, ``i, j`` the tokens'
    original positions (ALiBi's distance penalty, one slope for all heads, on top of the learned positions);
    0 = none (the paper). Why: a small model at the start of training knows no token's neighbours -- attention
    over random absolute positions is uniform -- and sits at the unigram plateau until it finds them (~1,750
    steps for the demo's model); this prior puts a [MASK]'s neighbours first from step 0 (README, "What the
    demo shows"). The decoder only: it is dropped for fine-tuning, so the exported RoBERTa encoder is unchanged.
    A float mask costs SDPA its fastest (flash) kernel in the decoder; the paper recipes leave it at 0."""
    activation: str = "gelu"
    """Feed-forward and LM-head activation: ``gelu`` (exact erf form, as BERT/RoBERTa) or ``gelu_tanh``."""

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        for name in ("vocab_size", "vocab_pad_multiple", "max_positions", "num_layers", "hidden_size", "ffn_size",
                     "num_heads", "decoder_num_layers", "decoder_hidden_size", "decoder_ffn_size",
                     "decoder_num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.decoder_hidden_size % self.decoder_num_heads:
            raise ValueError(f"decoder_hidden_size {self.decoder_hidden_size} is not divisible by "
                             f"decoder_num_heads {self.decoder_num_heads}")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not (0.0 <= value < 1.0):
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {value}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")
        if not self.layernorm_eps > 0:
            raise ValueError(f"layernorm_eps must be > 0, got {self.layernorm_eps}")
        if not (0 <= self.pad_token_id < self.vocab_size):
            raise ValueError(f"pad_token_id {self.pad_token_id} outside the vocabulary [0, {self.vocab_size})")
        if self.activation not in ("gelu", "gelu_tanh"):
            raise ValueError(f"activation must be 'gelu' or 'gelu_tanh', got {self.activation!r}")
        value = self.decoder_locality_bias
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value < float("inf")):
            raise ValueError(f"ModelConfig.decoder_locality_bias must be a finite number >= 0, got {value!r}")
        if not isinstance(self.pre_ln, bool) or not isinstance(self.tie_embeddings, bool):
            raise ValueError("pre_ln and tie_embeddings must be booleans")

    # ----------------------------------------------------------------------------------------------------------
    @property
    def is_3ml(self) -> bool:
        return self.architecture != "mlm"

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def decoder_head_dim(self) -> int:
        return self.decoder_hidden_size // self.decoder_num_heads

    def check_tensor_parallel_size(self, tp_size: int) -> None:
        """Raises ValueError if the heads, FFN widths or the padded vocabulary do not split over ``tp_size``."""
        checks = [("num_heads", self.num_heads), ("ffn_size", self.ffn_size),
                  ("padded_vocab_size", self.padded_vocab_size)]
        if self.is_3ml:
            checks += [("decoder_num_heads", self.decoder_num_heads), ("decoder_ffn_size", self.decoder_ffn_size)]
        for name, value in checks:
            if value % tp_size:
                raise ValueError(f"{name}={value} is not divisible by the tensor-parallel size {tp_size}"
                                 + (" (raise vocab_pad_multiple)" if name == "padded_vocab_size" else ""))

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, architecture: str = "3ml-self", **overrides) -> "ModelConfig":
        """A named preset (``tiny``, ``mini``, ``base``, ``large``) for ``architecture``; keyword overrides win."""
        if name not in _PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose from {sorted(_PRESETS)}")
        values = dict(_PRESETS[name])
        # Paper §3.3: post-LN for 3MLself-base (and RoBERTa-base), pre-LN for 3MLcross and for large.
        values.setdefault("pre_ln", architecture == "3ml-cross")
        values["architecture"] = architecture
        values.update(overrides)
        return cls(**values)

    @staticmethod
    def preset_names() -> list[str]:
        return list(_PRESETS)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
