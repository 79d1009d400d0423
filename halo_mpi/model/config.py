"""Model hyperparameters, read from the HDF5 store's attributes (or a GGUF header, or a named shape).

`ModelArgs` names its fields after the math of a LLaMA block; derived sizes are computed in
`__post_init__` so that no caller ever recomputes them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..errors import HaloError


@dataclass
class ModelArgs:
    dim: int                      # d_model: width of the residual stream
    n_layers: int                 # number of transformer blocks
    n_heads: int                  # query heads
    n_kv_heads: int               # key/value heads (GQA: n_heads % n_kv_heads == 0)
    hidden_dim: int               # intermediate width of the SwiGLU MLP
    vocab_size: int
    rope_theta: float = 10000.0   # RoPE base frequency
    norm_eps: float = 1e-5        # RMSNorm epsilon
    max_seq_len: int = 2048       # context length the model was trained for
    tied_embeddings: bool = True  # output head reuses the token embedding
    mlp_groups: int = 1           # G: neuron groups per MLP layer (slices of hidden_dim)
    head_dim: int = field(init=False)   # dim // n_heads
    n_rep: int = field(init=False)      # query heads per KV head
    group_size: int = field(init=False)  # neurons per MLP group: hidden_dim // mlp_groups

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size",
                     "max_seq_len"):
            if getattr(self, name) < 1:
                raise HaloError(f"{name} {getattr(self, name)} is not a positive size")
        for name in ("rope_theta", "norm_eps"):
            if not 0 < getattr(self, name) < float("inf"):
                raise HaloError(f"{name} {getattr(self, name)} is not a finite number > 0")
        if self.dim % self.n_heads:
            raise HaloError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise HaloError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.mlp_groups < 1 or self.hidden_dim % self.mlp_groups:
            raise HaloError(
                f"--mlp-groups {self.mlp_groups} does not divide the intermediate size {self.hidden_dim}; "
                f"choose a divisor of {self.hidden_dim}, e.g. {suggest_divisors(self.hidden_dim)}")
        self.head_dim = self.dim // self.n_heads
        self.n_rep = self.n_heads // self.n_kv_heads
        self.group_size = self.hidden_dim // self.mlp_groups

    @property
    def attn_group_rows(self) -> int:
        """Rows of one attention group: q (n_rep*hd) + k (hd) + v (hd) + o^T (n_rep*hd)."""
        return (2 * self.n_rep + 2) * self.head_dim

    def to_attrs(self) -> dict:
        """The init fields, as HDF5 attributes."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    @classmethod
    def from_attrs(cls, attrs) -> ModelArgs:
        kinds = {f.name: f.type for f in fields(cls) if f.init}
        missing = [k for k in kinds if k not in attrs and k not in _DEFAULTED]
        if missing:
            raise HaloError(f"store attributes lack {', '.join(missing)}")
        cast = {"int": int, "float": float, "bool": bool}
        return cls(**{k: cast[t](attrs[k]) for k, t in kinds.items() if k in attrs})

    def n_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.hidden_dim
        head = 0 if self.tied_embeddings else self.vocab_size * self.dim
        return self.n_layers * (attn + mlp + 2 * self.dim) + self.vocab_size * self.dim + self.dim + head

    def as_dict(self) -> dict:
        return asdict(self)


_DEFAULTED = {"rope_theta", "norm_eps", "max_seq_len", "tied_embeddings", "mlp_groups"}


def suggest_divisors(n: int, limit: int = 6) -> str:
    divs = [d for d in range(2, n) if n % d == 0 and d <= 256]
    return ", ".join(str(d) for d in divs[:limit])


DTYPE_NAMES = ("float32", "bfloat16", "float16")   # weight precisions (linear.DTYPES maps them)

# Named LLaMA shapes for synthetic (random-weight) stores, used for scale runs and fast tests.
SHAPES = {
    # tiny: a few layers, for unit and MPI tests (runs in milliseconds)
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=512,
                 rope_theta=10000.0, max_seq_len=256),
    # tiny-8l: tiny with 8 layers, so that pipeline tests can give every one of 4 ranks 2 blocks
    "tiny-8l": dict(dim=64, n_layers=8, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=512,
                    rope_theta=10000.0, max_seq_len=256),
    # tiny-3kv: 3 KV heads (as SmolLM2), so 2 or 4 ranks split a layer's attention groups unevenly;
    # an untied output head
    "tiny-3kv": dict(dim=96, n_layers=3, n_heads=6, n_kv_heads=3, hidden_dim=256, vocab_size=515,
                     rope_theta=10000.0, max_seq_len=256, tied_embeddings=False),
    # the real SmolLM2-135M shape, with random weights
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                         vocab_size=49152, rope_theta=100000.0, max_seq_len=8192),
    # TinyLlama-1.1B's shape (22 layers, GQA 32/4, untied head): ~1.1 B parameters
    "tinyllama-1.1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632,
                           vocab_size=32000, rope_theta=10000.0, max_seq_len=2048,
                           tied_embeddings=False),
}
